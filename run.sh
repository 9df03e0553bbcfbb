#!/usr/bin/env bash
# The project's two commands. Each creates or reuses .venv in the checkout and installs the
# pinned requirements (and, with npm, the viewer's pinned package-lock.json) itself, then:
#   ./run.sh demo [--out DIR]   the main job: synthetic slides -> train tiny -> segment -> Dice
#   ./run.sh test               ruff (lint + format check) and the whole test suite; it also builds or
#                               reuses .venv-monailabel, MONAI Label's environment for its server test
set -euo pipefail
cd "$(dirname "$0")"
venv=.venv
if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv"
fi
# Reinstall only when requirements.txt changed since the last successful install.
stamp="$venv/.requirements.sha256"
want=$(sha256sum requirements.txt | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    "$venv/bin/pip" install --quiet --disable-pip-version-check -r requirements.txt
    echo "$want" > "$stamp"
fi
# The review page's OpenSeadragon: `npm ci` again only when package-lock.json changed.
npm_stamp=node_modules/.package-lock.sha256
npm_deps() {
    local want_lock
    want_lock=$(sha256sum package-lock.json | cut -d' ' -f1)
    if [ "$(cat "$npm_stamp" 2>/dev/null)" != "$want_lock" ]; then
        npm ci --silent --no-audit --no-fund
        echo "$want_lock" > "$npm_stamp"
    fi
}
# The browser tests drive Debian's chromium (never a browser build downloaded by playwright).
chromium_dep() {
    if [ ! -x /usr/bin/chromium ]; then
        local sudo=""
        [ "$(id -u)" -eq 0 ] || sudo=sudo
        $sudo apt-get update -qq
        DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq chromium >/dev/null
    fi
}
py="$venv/bin/python"
cmd=${1:-help}
shift || true
case "$cmd" in
    demo)
        if command -v npm >/dev/null; then npm_deps; else echo "note: no npm; 'view' needs npm ci" >&2; fi
        exec "$py" -m custom demo "$@" ;;
    test)
        npm_deps
        chromium_dep
        # MONAI Label's own environment for tests/test_monai_label.py (monailabel pins numpy<2, jsonschema<4):
        # a lock installed without resolving, rebuilt only when requirements-monailabel.txt changes.
        mlvenv=.venv-monailabel
        mlstamp="$mlvenv/.requirements.sha256"
        mlwant=$(sha256sum requirements-monailabel.txt | cut -d' ' -f1)
        if [ "$(cat "$mlstamp" 2>/dev/null)" != "$mlwant" ]; then
            rm -rf "$mlvenv"
            python3 -m venv "$mlvenv"
            "$mlvenv/bin/pip" install --quiet --disable-pip-version-check --no-deps --no-compile \
                -r requirements-monailabel.txt
            "$mlvenv/bin/pip" check --disable-pip-version-check
            echo "$mlwant" > "$mlstamp"
        fi
        "$venv/bin/ruff" check .
        "$venv/bin/ruff" format --check .
        exec "$py" -m pytest -q "$@" ;;
    *)
        echo "usage: ./run.sh demo [--out DIR] | ./run.sh test [pytest args]" >&2
        exit 2 ;;
esac
