"""The review server over real HTTP: listing, DZI descriptors and tiles, GeoJSON, the page, and its refusals.

A `ViewServer` runs on an ephemeral loopback port in a thread, serving the `view_outputs` folder
(conftest: a synthetic slide whose truth mask is its prediction, a slide that fails to open, a
mask without slide, links out of the folders) and, in a second server, a prediction for every
real slide fixture, so tiles come through the project's reader from every format it opens.
"""

from __future__ import annotations

import http.client
import io
import json
import threading
import xml.etree.ElementTree as ET
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import numpy as np
import pytest
from PIL import Image

from custom.cli import main
from custom.errors import HoloHistoError
from custom.outputs.geojson import DEFAULT_COLOURS
from custom.outputs.pyramid import write_pyramid
from custom.view.catalog import Catalog
from custom.view.dzi import OUTLINE_RGB, DziGeometry, TileNotFound, source_level
from custom.view.server import ViewServer
from custom.wsi.reader import open_mask, open_slide

SYNTH = "synth_31_wsi"
DZ_NS = "{http://schemas.microsoft.com/deepzoom/2008}"


@contextmanager
def running(catalog: Catalog):
    server = ViewServer(catalog, port=0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        catalog.close()


@pytest.fixture(scope="module")
def server(view_outputs):
    with running(Catalog(view_outputs["out"], view_outputs["slides"])) as srv:
        yield srv


def get(server: ViewServer, path: str, method: str = "GET", headers: dict | None = None):
    """(status, headers, body) of one request, with the path sent exactly as given."""
    conn = http.client.HTTPConnection(*server.server_address[:2], timeout=60)
    try:
        conn.request(method, path, headers=headers or {})
        response = conn.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        conn.close()


def get_json(server, path):
    status, headers, body = get(server, path)
    assert status == 200 and headers["Content-Type"] == "application/json", body
    return json.loads(body)


def get_image(server, path) -> np.ndarray:
    status, _, body = get(server, path)
    assert status == 200, body
    return np.asarray(Image.open(io.BytesIO(body)))


def slides_by_name(server) -> dict[str, dict]:
    return {s["name"]: s for s in get_json(server, "/api/slides")["slides"]}


# ---- DZI geometry ----------------------------------------------------------------------------


def test_dzi_geometry_halves_down_to_one_pixel_with_overlapping_tiles():
    geometry = DziGeometry(2048, 1536)
    assert geometry.max_level == 11
    assert geometry.level_size(11) == (2048, 1536) and geometry.level_size(10) == (1024, 768)
    assert geometry.level_size(0) == (1, 1)
    assert geometry.grid(11) == (9, 7)
    assert geometry.tile_box(11, 0, 0) == (0, 0, 255, 255)
    assert geometry.tile_box(11, 1, 1) == (253, 253, 509, 509)
    assert geometry.tile_box(11, 8, 6) == (2031, 1523, 2048, 1536)
    with pytest.raises(TileNotFound):
        geometry.tile_box(11, 9, 0)
    with pytest.raises(TileNotFound):
        geometry.level_size(12)
    assert DziGeometry(1, 1).max_level == 0


def test_tiles_read_the_coarsest_pyramid_level_that_is_still_fine_enough():
    downsamples = [1.0, 2.0, 4.0, 8.0]
    assert [source_level(downsamples, s) for s in (1, 2, 3, 4, 16)] == [0, 1, 1, 2, 3]


# ---- the listing -----------------------------------------------------------------------------


def test_api_lists_each_prediction_with_its_urls_figures_and_errors(server, view_outputs):
    slides = slides_by_name(server)
    assert set(slides) == {SYNTH, "broken_wsi", "maskonly_wsi"}  # the link out is not served
    synth = slides[SYNTH]
    assert synth["dzi"] == {
        "slide": f"/dzi/{SYNTH}/slide.dzi",
        "mask": f"/dzi/{SYNTH}/mask.dzi",
        "truth": f"/dzi/{SYNTH}/truth.dzi",
    }
    assert synth["geojson"] == f"/geojson/{SYNTH}.geojson"
    assert synth["metrics"] == {
        "wsi_dice": 0.93,
        "object_count": len(view_outputs["features"]),
        "glomeruli_per_mm2": 12.5,
    }
    assert (synth["width"], synth["height"], synth["mpp"], synth["error"]) == (2048, 1536, 0.25, None)

    broken = slides["broken_wsi"]
    assert broken["error"].startswith(str(view_outputs["slides"] / "broken_wsi.tiff") + ": ")
    assert "\n" not in broken["error"] and broken["dzi"] == {"slide": None, "mask": None, "truth": None}

    # its slide and GeoJSON are links out of their folders: as if they were not there
    alone = slides["maskonly_wsi"]
    assert alone["error"] is None and alone["dzi"]["slide"] is None and alone["geojson"] is None
    assert alone["dzi"]["mask"] == "/dzi/maskonly_wsi/mask.dzi"
    assert any("not found under" in note for note in alone["notes"])


def test_object_count_falls_back_to_the_geojson_without_a_summary(view_outputs, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    for name in (f"{SYNTH}_pred.tiff", f"{SYNTH}.geojson"):
        (out / name).write_bytes((view_outputs["out"] / name).read_bytes())
    entry = Catalog(out, view_outputs["slides"]).entry(SYNTH)
    assert entry.figures() == {
        "wsi_dice": None,
        "object_count": len(view_outputs["features"]),
        "glomeruli_per_mm2": None,
    }


def test_figures_that_are_not_finite_numbers_are_shown_as_unknown(view_outputs, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / f"{SYNTH}_pred.tiff").write_bytes((view_outputs["out"] / f"{SYNTH}_pred.tiff").read_bytes())
    (out / f"{SYNTH}_summary.json").write_text('{"glomerulus_count": 3, "glomeruli_per_mm2_tissue": NaN}')
    catalog = Catalog(out, view_outputs["slides"])
    with running(catalog) as srv:
        (listed,) = get_json(srv, "/api/slides")["slides"]
    assert listed["metrics"] == {"wsi_dice": None, "object_count": 3, "glomeruli_per_mm2": None}


def test_a_port_in_use_is_a_one_line_error(server, view_outputs):
    with pytest.raises(HoloHistoError, match=r"^cannot serve on 127\.0\.0\.1:\d+: "):
        ViewServer(Catalog(view_outputs["out"], view_outputs["slides"]), port=server.server_address[1])


def test_dzi_descriptors_give_the_level0_size_tile_size_and_format(server):
    for image, fmt in (("slide", "jpeg"), ("mask", "png"), ("truth", "png")):
        status, headers, body = get(server, f"/dzi/{SYNTH}/{image}.dzi")
        assert status == 200 and headers["Content-Type"] == "application/xml"
        root = ET.fromstring(body)
        assert root.tag == f"{DZ_NS}Image"
        assert (root.get("Format"), root.get("TileSize"), root.get("Overlap")) == (fmt, "254", "1")
        size = root.find(f"{DZ_NS}Size")
        assert (size.get("Width"), size.get("Height")) == ("2048", "1536")


def test_geojson_endpoint_serves_the_slides_features(server, view_outputs):
    status, headers, body = get(server, f"/geojson/{SYNTH}.geojson")
    assert status == 200 and headers["Content-Type"] == "application/geo+json"
    assert json.loads(body)["features"] == json.loads(json.dumps(view_outputs["features"]))


# ---- tiles -----------------------------------------------------------------------------------


def test_full_resolution_slide_tiles_are_the_readers_pixels(server, view_outputs):
    tile = get_image(server, f"/dzi/{SYNTH}/slide_files/11/1_1.jpeg")
    assert tile.shape == (256, 256, 3)
    with open_slide(view_outputs["slide"]) as slide:
        expected = slide.read_region((253, 253), (256, 256), 0)
    assert np.abs(tile.astype(int) - expected).mean() < 3  # JPEG's error only


def test_coarse_slide_tiles_average_the_slide(server, view_outputs):
    tile = get_image(server, f"/dzi/{SYNTH}/slide_files/8/0_0.jpeg")  # 8x coarser: 256 x 192, two columns
    assert tile.shape == (192, 255, 3)
    with open_slide(view_outputs["slide"]) as slide:
        level0 = slide.read_region((0, 0), (1536, 2040), 0).astype(float)
    expected = level0.reshape(192, 8, 255, 8, 3).mean(axis=(1, 3))
    assert np.abs(tile - expected).mean() < 6


def test_mask_tiles_colour_each_class_over_a_transparent_background(server, view_outputs):
    labels = view_outputs["labels"]
    for level, col, row, scale in ((11, 3, 2, 1), (9, 0, 0, 4)):
        tile = get_image(server, f"/dzi/{SYNTH}/mask_files/{level}/{col}_{row}.png")
        assert tile.shape[2] == 4
        left, top = max(col * 254 - 1, 0), max(row * 254 - 1, 0)
        expected = labels[top * scale :: scale, left * scale :: scale][: tile.shape[0], : tile.shape[1]]
        assert expected.shape == tile.shape[:2]
        # nearest-neighbour from the mask's own pyramid: the same labels up to a pixel at object borders
        assert (np.where(tile[..., 3] > 0, 1, 0) == expected).mean() > 0.99
        assert (tile[tile[..., 3] > 0][:, :3] == DEFAULT_COLOURS[0]).all()
        assert (tile[tile[..., 3] == 0][:, :3] == 0).all()
    assert (expected == 1).any() and (expected == 0).any()


def test_truth_tiles_draw_only_the_outline_of_the_truth_mask(server, view_outputs):
    labels = view_outputs["labels"]
    tile = get_image(server, f"/dzi/{SYNTH}/truth_files/11/3_2.png")
    left, top = 3 * 254 - 1, 2 * 254 - 1
    region = labels[top - 1 : top + tile.shape[0] + 1, left - 1 : left + tile.shape[1] + 1].astype(int)
    drawn = tile[..., 3] > 0
    assert drawn.sum() > 100
    assert (tile[drawn][:, :3] == OUTLINE_RGB).all()
    # drawn exactly where a 4-neighbour has another label
    centre = region[1:-1, 1:-1]
    edge = (
        (centre != region[:-2, 1:-1])
        | (centre != region[2:, 1:-1])
        | (centre != region[1:-1, :-2])
        | (centre != region[1:-1, 2:])
    )
    assert (drawn == edge).all()


def test_tiles_are_cached_and_concurrent_requests_are_all_served(server):
    paths = [f"/dzi/{SYNTH}/{image}_files/10/{c}_{r}.{fmt}" for image, fmt in (("slide", "jpeg"), ("mask", "png")) for c in range(4) for r in range(3)]  # fmt: skip
    server.tile.cache_clear()
    with ThreadPoolExecutor(8) as pool:
        first = list(pool.map(lambda p: get(server, p), paths * 2))
    assert all(status == 200 for status, _, _ in first)
    bodies = [body for _, _, body in first]
    assert bodies[: len(paths)] == bodies[len(paths) :]
    before = server.tile.cache_info()
    assert before.currsize == len(paths)
    again = [get(server, p)[2] for p in paths]
    assert again == bodies[: len(paths)] and server.tile.cache_info().hits == before.hits + len(paths)


def test_a_tile_the_slide_cannot_decode_is_a_one_line_500(fixture_server):
    status, _, body = get(fixture_server, "/dzi/unreadable/slide_files/4/0_0.jpeg")
    assert status == 500
    text = body.decode()
    assert "unreadable.svs" in text and text.count("\n") == 1 and "Traceback" not in text


# ---- every format the reader opens -------------------------------------------------------------

READABLE = {  # prediction stem -> fixture slide under the fixtures' slides/
    "CMU-1-Small-Region": "aperio/CMU-1-Small-Region.svs",
    "small": "aperio/small.svs",
    "CMU-1-Small-Region.generic": "derived/CMU-1-Small-Region.generic.tif",
    "CMU-1-Small-Region.pyramid": "derived/CMU-1-Small-Region.pyramid.ome.tif",
    "boxes": "generic-tiff/boxes.tiff",
    "dicom": "dicom",
}
FAILING = {
    "unopenable": "negative/unopenable.tiff",
    "multi-channel-z-series": "ome-tiff/multi-channel-z-series.ome.tif",
}


@pytest.fixture(scope="module")
def fixture_server(slides_dir, tmp_path_factory):
    """A prediction (foreground: the top-left quarter) for every slide fixture, served with --slides at the fixtures."""
    out = tmp_path_factory.mktemp("fixture_preds")
    for stem, rel in {**READABLE, "unreadable": "negative/unreadable.svs"}.items():
        with open_slide(slides_dir / rel) as slide:
            height, width = slide.level_shapes[0]
        square = np.zeros((height, width), np.uint8)
        square[: height // 2 + 1, : width // 2 + 1] = 1
        write_pyramid(out / f"{stem}_pred.tiff", [(height, width)], lambda lv, y, x, h, w, m=square: m[y : y + h, x : x + w], channels=1, mpp=None, compression="lzw")  # fmt: skip
    for stem in FAILING:
        write_pyramid(out / f"{stem}_pred.tiff", [(1, 1)], lambda lv, y, x, h, w: np.zeros((h, w), np.uint8), channels=1, mpp=None, compression="lzw")  # fmt: skip
    with running(Catalog(out, slides_dir)) as srv:
        yield srv


@pytest.mark.parametrize("stem", sorted(READABLE))
def test_slide_tiles_come_from_every_format_the_reader_opens(fixture_server, slides_dir, stem):
    entry = slides_by_name(fixture_server)[stem]
    assert entry["error"] is None and entry["dzi"]["slide"] == f"/dzi/{stem}/slide.dzi"
    root = ET.fromstring(get(fixture_server, entry["dzi"]["slide"])[2])
    width, height = (int(root.find(f"{DZ_NS}Size").get(k)) for k in ("Width", "Height"))
    level = DziGeometry(width, height).max_level
    tile = get_image(fixture_server, f"/dzi/{stem}/slide_files/{level}/0_0.png")  # lossless: exact pixels
    with open_slide(slides_dir / READABLE[stem]) as slide:
        expected = slide.read_region((0, 0), tile.shape[:2], 0)
    assert tile.shape == (*expected.shape[:2], 3) and (tile == expected).all()
    mask = get_image(fixture_server, f"/dzi/{stem}/mask_files/{level}/0_0.png")
    assert mask.shape[:2] == tile.shape[:2] and mask[..., 3].any()


@pytest.mark.parametrize("stem", sorted(FAILING))
def test_a_slide_that_fails_to_open_carries_its_one_line_error(fixture_server, slides_dir, stem):
    entry = slides_by_name(fixture_server)[stem]
    assert entry["error"].startswith(f"{slides_dir / FAILING[stem]}: ")
    assert "\n" not in entry["error"]
    status, _, body = get(fixture_server, f"/dzi/{stem}/slide.dzi")
    assert status == 404 and body.decode().count("\n") == 1


# ---- the page --------------------------------------------------------------------------------


def test_page_scripts_and_openseadragon_are_served_with_their_types(server):
    status, headers, body = get(server, "/")
    assert status == 200 and headers["Content-Type"].startswith("text/html")
    assert b"/osd/openseadragon.min.js" in body and b"/static/viewer.js" in body
    for path, kind in (
        ("/static/viewer.js", "text/javascript"),
        ("/static/viewer.css", "text/css"),
        ("/osd/openseadragon.min.js", "text/javascript"),
        ("/osd/images/home_rest.png", "image/png"),
    ):
        status, headers, body = get(server, path)
        assert status == 200 and headers["Content-Type"].startswith(kind) and body, path
        assert headers["X-Content-Type-Options"] == "nosniff"
    assert b"OpenSeadragon" in get(server, "/osd/openseadragon.min.js")[2]
    status, headers, body = get(server, "/", method="HEAD")
    assert status == 200 and body == b"" and int(headers["Content-Length"]) > 0


# ---- refusals --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path",
    [
        "/dzi/nosuchslide/slide.dzi",
        f"/dzi/{SYNTH}/overlay.dzi",
        f"/dzi/{SYNTH}/slide_files/12/0_0.jpeg",  # past the finest level
        f"/dzi/{SYNTH}/slide_files/11/9_0.jpeg",  # past the last column
        f"/dzi/{SYNTH}/slide_files/11/0_7.jpeg",  # past the last row
        f"/dzi/{SYNTH}/slide_files/-1/0_0.jpeg",
        f"/dzi/{SYNTH}/slide_files/x/0_0.jpeg",
        f"/dzi/{SYNTH}/slide_files/99999999999/0_0.jpeg",
        f"/dzi/{SYNTH}/slide_files/11/0_0.gif",
        f"/dzi/{SYNTH}/mask_files/11/0_0.jpeg",  # masks come as PNG only (alpha)
        "/dzi/broken_wsi/mask.dzi",  # the slide failed to open: nothing of it is served
        "/dzi/maskonly_wsi/slide.dzi",
        "/geojson/nosuchslide.geojson",
        "/api/slides/extra",
        "/api",
    ],
)
def test_bad_names_levels_and_tiles_are_404s_never_tracebacks(server, path):
    status, headers, body = get(server, path)
    assert status == 404, path
    assert headers["Content-Type"].startswith("text/plain")
    assert body.decode().count("\n") == 1 and "Traceback" not in body.decode()


@pytest.mark.parametrize(
    "path",
    [
        "/../../../../etc/passwd",
        "/static/../../../../etc/passwd",
        "/static/%2e%2e/%2e%2e/%2e%2e/etc/passwd",
        "/static/..%2f..%2f..%2fcatalog.py",
        "/osd/../../package.json",
        "/static/viewer.js%00.png",
        "//etc/passwd",
        "/etc/passwd",
        "/dzi/%2Fetc%2Fpasswd/slide.dzi",
        f"/dzi/{SYNTH}/..%2F..%2Fslide.dzi",
        f"/geojson/..%2F{SYNTH}.geojson",
        "/dzi/escape_wsi/mask.dzi",  # a prediction that links out of OUT_DIR
        "/geojson/maskonly_wsi.geojson",  # a GeoJSON that links out of OUT_DIR
        "/static/",  # no directory listing anywhere
        "/static",
        "/osd/images/",
        "/dzi/",
        f"/dzi/{SYNTH}/",
        f"/dzi/{SYNTH}/slide_files/11/",
        "/geojson/",
        f"/{SYNTH}_pred.tiff",
        f"/{SYNTH}.geojson",
        "/report/metrics.json",
    ],
)
def test_traversal_absolute_paths_links_out_and_listings_are_404s(server, view_outputs, path):
    status, _, body = get(server, path)
    assert status == 404, path
    assert b"root:" not in body and b"<a href" not in body


def test_absolute_file_paths_are_404s(server, view_outputs):
    for path in (view_outputs["slide"], view_outputs["out"] / f"{SYNTH}.geojson"):
        assert get(server, str(path))[0] == 404
        assert get(server, f"/static/{path}")[0] == 404
        assert get(server, f"http://127.0.0.1{path}")[0] == 404


def test_server_binds_loopback_by_default_and_refuses_foreign_host_names(server, view_outputs):
    assert server.server_address[0] == "127.0.0.1"
    port = server.server_address[1]
    assert get(server, "/api/slides", headers={"Host": f"localhost:{port}"})[0] == 200
    status, _, body = get(server, "/api/slides", headers={"Host": "attacker.example"})
    assert status == 403 and b"synth" not in body


def test_view_cli_errors_are_one_line_with_exit_code_2(tmp_path, capsys):
    for folder, message in (
        (tmp_path / "missing", "output folder not found"),
        (tmp_path, "predictions found"),
    ):
        with pytest.raises(SystemExit) as exit_info:
            main(["view", str(folder), "--port", "0"])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"error: {folder}") and message in err and "\n" not in err


def test_mask_sizes_that_differ_from_the_slide_are_the_slides_error(view_outputs, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    with open_mask(view_outputs["out"] / f"{SYNTH}_pred.tiff") as full:
        half = full.read_level(1)
    write_pyramid(out / f"{SYNTH}_pred.tiff", [half.shape], lambda lv, y, x, h, w: half[y : y + h, x : x + w], channels=1, mpp=0.5, compression="lzw")  # fmt: skip
    entry = Catalog(out, view_outputs["slides"]).entry(SYNTH)
    assert entry.error == (
        f"{out / f'{SYNTH}_pred.tiff'}: the prediction is 768 x 1024 px but its slide {SYNTH}.tiff is 1536 x 2048 px"
    )
