"""The page's files: our static/ folder and the OpenSeadragon build that npm installs.

In a checkout OpenSeadragon comes from node_modules/ (`npm ci` installs the version that
package.json and package-lock.json pin); an exported bundle carries the same files in
custom/view/vendor/openseadragon/, copied there by `custom.export`. The server serves exactly the
files listed here, so a URL can never name any other file.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from custom.errors import ConfigError

VIEW_DIR = Path(__file__).resolve().parent
STATIC_DIR = VIEW_DIR / "static"
VENDOR_DIR = VIEW_DIR / "vendor" / "openseadragon"  # only in an exported bundle
REPO_DIR = VIEW_DIR.parents[1]
NPM_PACKAGE_DIR = REPO_DIR / "node_modules" / "openseadragon"
OSD_SCRIPT = "openseadragon.min.js"
OSD_LICENSE = "LICENSE.txt"
CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".png": "image/png",
    ".txt": "text/plain; charset=utf-8",
}


def openseadragon_files() -> list[tuple[str, Path]]:
    """(path under the OpenSeadragon folder, file): the script, its button images and its licence."""
    if (VENDOR_DIR / OSD_SCRIPT).is_file():
        build, license_file = VENDOR_DIR, VENDOR_DIR / OSD_LICENSE
    else:
        build, license_file = NPM_PACKAGE_DIR / "build" / "openseadragon", NPM_PACKAGE_DIR / OSD_LICENSE
    if not (build / OSD_SCRIPT).is_file():
        raise ConfigError(
            f"{NPM_PACKAGE_DIR}: OpenSeadragon is not installed; run `npm ci` in {REPO_DIR} "
            "(package.json pins its version)"
        )
    files = [(OSD_SCRIPT, build / OSD_SCRIPT)]
    files += [(f"images/{p.name}", p) for p in sorted((build / "images").glob("*.png"))]
    if license_file.is_file():
        files.append((OSD_LICENSE, license_file))
    return files


def page_files() -> dict[str, Path]:
    """URL path -> file for everything the page loads: `/`, `/static/...` and `/osd/...`."""
    files = {"/": STATIC_DIR / "index.html"}
    files |= {f"/static/{p.name}": p for p in sorted(STATIC_DIR.iterdir()) if p.suffix in CONTENT_TYPES}
    files |= {f"/osd/{rel}": path for rel, path in openseadragon_files()}
    return files


def vendor_entries() -> Iterator[tuple[str, Path]]:
    """(path inside the bundle, file) of the OpenSeadragon files an exported bundle carries."""
    for rel, path in openseadragon_files():
        yield f"custom/view/vendor/openseadragon/{rel}", path
