"""The review server: the page, its JSON, GeoJSON and Deep Zoom tiles, on the standard library's HTTP server.

Routes (GET and HEAD; anything else is a 404, and nothing is ever listed):

    /                                   the page (static/index.html)
    /static/<file>, /osd/<file>         the page's scripts and OpenSeadragon's build (a fixed list)
    /api/slides                         every slide: name, DZI URLs, GeoJSON URL, figures, error
    /geojson/<name>.geojson             the slide's predicted objects
    /dzi/<name>/<image>.dzi             DZI descriptor of image slide, mask or truth
    /dzi/<name>/<image>_files/<level>/<col>_<row>.<jpeg|png>

No URL is ever turned into a file path: names are looked up in the catalog and static files in a
fixed table, so traversal, absolute paths and links out of the given folders all end in a 404.
Tiles are rendered once and kept in an LRU cache; each request runs on its own thread.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import logging
import re
import socket
import sys
from functools import lru_cache
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import quote, unquote, urlsplit

from custom.data.datalists import slide_id
from custom.errors import HoloHistoError
from custom.view.assets import CONTENT_TYPES, page_files
from custom.view.catalog import Catalog, SlideEntry, one_line
from custom.view.dzi import TileNotFound

log = logging.getLogger(__name__)

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8765
TILE_CACHE_TILES = 4096  # ~40 kB each: at most ~160 MB of encoded tiles
IMAGES = ("slide", "mask", "truth")
TILE_PATH = re.compile(
    r"(?P<image>[a-z]+)_files/(?P<level>\d{1,3})/(?P<col>\d{1,9})_(?P<row>\d{1,9})\.(?P<fmt>jpeg|png)"
)
TILE_TYPES = {"jpeg": "image/jpeg", "png": "image/png"}
# Same-origin everything and no inline script; inline style stays allowed because OpenSeadragon
# applies some (the browser test fails on any CSP violation the page reports).
SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Content-Security-Policy": (
        "default-src 'self'; img-src 'self' data: blob:; style-src 'self' 'unsafe-inline'; frame-ancestors 'none'"
    ),
}


class NotFound(Exception):
    """Answered with a 404 and this one-line reason."""


class ViewServer(ThreadingHTTPServer):
    """Serves one catalog; `server_address` holds the bound port (pass port 0 for any free one)."""

    daemon_threads = True

    def __init__(self, catalog: Catalog, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT):
        self.address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.catalog = catalog
        self.files = page_files()
        self.tile = lru_cache(maxsize=TILE_CACHE_TILES)(self._render_tile)
        try:
            super().__init__((host, port), Handler)
        except OSError as err:
            raise HoloHistoError(f"cannot serve on {host}:{port}: {err.strerror or err}") from err
        self.loopback = _is_loopback(host)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{f'[{host}]' if ':' in host else host}:{port}/"

    def allowed_host(self, header: str | None) -> bool:
        """A loopback server answers only to loopback Host names, so a web page that rebinds its
        own domain to 127.0.0.1 cannot read the slides through a visitor's browser."""
        return not self.loopback or header is None or _is_loopback(_host_name(header))

    def slides(self) -> list[dict]:
        return [describe(self.catalog.entry(name)) for name in self.catalog.entries]

    def _render_tile(self, name: str, image: str, level: int, col: int, row: int, fmt: str) -> bytes:
        return self._image(name, image).tile(level, col, row, fmt)

    def descriptor(self, name: str, image: str) -> str:
        dzi = self._image(name, image)
        return dzi.geometry.xml(dzi.format)

    def geojson(self, name: str) -> bytes:
        entry = self._entry(name)
        if entry.geojson is None or entry.error:
            raise NotFound(f"slide {name} has no GeoJSON")
        return entry.geojson.read_bytes()

    def _entry(self, name: str) -> SlideEntry:
        try:
            return self.catalog.entry(name)
        except KeyError:
            raise NotFound(f"no slide named {name}") from None

    def _image(self, name: str, image: str):
        entry = self._entry(name)
        if image not in entry.images:
            raise NotFound(f"slide {name} has no {image} image" + (f": {entry.error}" if entry.error else ""))
        return entry.images[image]


def describe(entry: SlideEntry) -> dict:
    """One slide of /api/slides."""
    q = quote(entry.name, safe="")
    mask = entry.images.get("mask")
    return {
        "name": entry.name,
        "slide_id": slide_id(entry.name),
        "width": mask.geometry.width if mask else None,
        "height": mask.geometry.height if mask else None,
        "mpp": entry.mpp,
        "dzi": {image: f"/dzi/{q}/{image}.dzi" if image in entry.images else None for image in IMAGES},
        "geojson": f"/geojson/{q}.geojson" if entry.geojson is not None and not entry.error else None,
        "metrics": entry.figures(),
        "error": entry.error,
        "notes": list(entry.notes),
    }


class Handler(BaseHTTPRequestHandler):
    server: ViewServer
    server_version = "HoloHistoView"
    sys_version = ""

    def do_GET(self) -> None:
        self._respond(send_body=True)

    def do_HEAD(self) -> None:
        self._respond(send_body=False)

    def _respond(self, send_body: bool) -> None:
        text = "text/plain; charset=utf-8"
        try:
            if self.server.allowed_host(self.headers.get("Host")):
                response = self._route(_segments(self.path))
            else:
                response = (HTTPStatus.FORBIDDEN, b"unexpected Host header\n", text)
        except NotFound as err:
            response = (HTTPStatus.NOT_FOUND, f"not found: {err}\n".encode(), text)
        except HoloHistoError as err:  # a file that fails while being read: say which, in one line
            log.warning("%s: %s", self.path, err)
            response = (HTTPStatus.INTERNAL_SERVER_ERROR, f"{one_line(err)}\n".encode(), text)
        except Exception:
            log.exception("%s failed", self.path)
            response = (HTTPStatus.INTERNAL_SERVER_ERROR, b"internal error\n", text)
        # The browser may have given up on it: OpenSeadragon drops tiles it no longer needs.
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            self._send(*response, send_body=send_body)

    def _route(self, parts: list[str]) -> tuple[HTTPStatus, bytes, str, str | None]:
        path = "/" + "/".join(parts)
        if path in self.server.files:
            file = self.server.files[path]
            return HTTPStatus.OK, file.read_bytes(), CONTENT_TYPES[file.suffix], "no-cache"
        match parts:
            case ["api", "slides"]:
                body = json.dumps({"slides": self.server.slides()}, allow_nan=False).encode()
                return HTTPStatus.OK, body, "application/json", "no-store"
            case ["geojson", file] if file.endswith(".geojson"):
                body = self.server.geojson(file[: -len(".geojson")])
                return HTTPStatus.OK, body, "application/geo+json", "no-cache"
            case ["dzi", name, file] if file.endswith(".dzi"):
                body = self.server.descriptor(name, file[: -len(".dzi")]).encode()
                return HTTPStatus.OK, body, "application/xml", "no-cache"
            case ["dzi", name, *rest] if tile := TILE_PATH.fullmatch("/".join(rest)):
                level, col, row = (int(tile[k]) for k in ("level", "col", "row"))
                try:
                    body = self.server.tile(name, tile["image"], level, col, row, tile["fmt"])
                except TileNotFound as err:
                    raise NotFound(str(err)) from None
                return HTTPStatus.OK, body, TILE_TYPES[tile["fmt"]], "max-age=300"
        raise NotFound(path)

    def _send(
        self,
        status: HTTPStatus,
        body: bytes,
        content_type: str,
        cache: str | None = None,
        send_body: bool = True,
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", cache or "no-store")
        for key, value in SECURITY_HEADERS.items():
            self.send_header(key, value)
        self.end_headers()
        if send_body:
            self.wfile.write(body)

    def log_message(self, format: str, *args) -> None:
        log.debug("%s " + format, self.address_string(), *args)


def _segments(raw: str) -> list[str]:
    """URL path segments, each percent-decoded; a 404 for empty, dot or slash-bearing segments."""
    path = urlsplit(raw).path
    if not path.startswith("/"):
        raise NotFound(raw)
    if path == "/":
        return []
    parts = [unquote(p) for p in path[1:].split("/")]
    for part in parts:
        if part in ("", ".", "..") or any(c in part for c in "/\\\0"):
            raise NotFound(raw)
    return parts


def _host_name(header: str) -> str:
    """The name in a Host header: '127.0.0.1:8765' -> '127.0.0.1', '[::1]:8765' -> '::1'."""
    header = header.strip()
    if header.startswith("["):
        return header[1:].split("]", 1)[0]
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def serve(
    out_dir: str,
    slides: str | None = None,
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    report: str | None = None,
) -> None:
    """Serve OUT_DIR's slides until interrupted (Ctrl-C)."""
    catalog = Catalog(out_dir, slides, report)
    server = ViewServer(catalog, host, port)
    if not server.loopback:
        print(f"warning: serving on {host}: whoever reaches it sees these slides", file=sys.stderr)
    count = len(catalog.entries)
    print(f"{count} slide(s) from {catalog.out_dir}; open {server.url} (Ctrl-C stops)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        catalog.close()
