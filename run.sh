#!/usr/bin/env bash
# The project's two commands. Each creates or reuses .venv in the checkout and installs the
# pinned requirements itself, then:
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
py="$venv/bin/python"
cmd=${1:-help}
shift || true
case "$cmd" in
    demo)
        exec "$py" -m custom demo "$@" ;;
    test)
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
