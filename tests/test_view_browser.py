"""The review page in a real browser: Debian's chromium, headless, driven by playwright.

The page is served by a `ViewServer` on an ephemeral loopback port (the `view_outputs` folder of
conftest: the prediction is the slide's own truth mask). What is checked is what a pathologist
sees: slide tiles and mask-overlay pixels in a screenshot, the overlay's toggle, the truth
outline, an object zoomed to when its row in the list is clicked, and a broken slide's error.
The page's Content-Security-Policy stays on, so waits poll from Python rather than evaluate
strings in the page.
"""

from __future__ import annotations

import io
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from custom.outputs.geojson import DEFAULT_COLOURS
from custom.view.catalog import Catalog
from custom.view.dzi import OUTLINE_RGB
from custom.view.server import ViewServer

CHROMIUM = Path("/usr/bin/chromium")
# No network, no first-run work, no GPU: the same pixels on every machine, CI included.
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
WAIT_S = 60.0
SYNTH = "synth_31_wsi"
MASK_RGB = np.array(DEFAULT_COLOURS[0])


@pytest.fixture(scope="module")
def page(view_outputs, tmp_path_factory):
    if not CHROMIUM.is_file():
        pytest.fail(
            f"{CHROMIUM} not found: `./run.sh test` installs Debian's chromium (apt-get install chromium)"
        )
    from playwright.sync_api import sync_playwright

    catalog = Catalog(view_outputs["out"], view_outputs["slides"])
    server = ViewServer(catalog, port=0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    profile = tmp_path_factory.mktemp("chromium-profile")  # a new, empty user-data-dir
    with sync_playwright() as driver:
        context = driver.chromium.launch_persistent_context(
            profile,
            executable_path=str(CHROMIUM),
            args=CHROMIUM_ARGS,
            headless=True,
            viewport={"width": 1200, "height": 800},
        )
        tab = context.new_page()
        errors: list[str] = []
        tab.on("pageerror", lambda err: errors.append(str(err)))
        # failed requests and Content-Security-Policy violations are reported as console errors
        tab.on("console", lambda message: errors.append(message.text) if message.type == "error" else None)
        tab.goto(f"{server.url}#{SYNTH}")
        tab.errors = errors
        try:
            yield tab
        finally:
            context.close()
            server.shutdown()
            server.server_close()
            catalog.close()


def wait_for(page, expression: str) -> None:
    """Poll a JavaScript expression until it is truthy (at most WAIT_S)."""
    deadline = time.monotonic() + WAIT_S
    while not page.evaluate(expression):
        assert time.monotonic() < deadline, f"timed out waiting for {expression}"
        page.wait_for_timeout(100)


def settled(page) -> None:
    wait_for(page, "window.holoView && holoView.loaded && !holoView.animating")


def viewer_pixels(page) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(page.locator("#viewer").screenshot())).convert("RGB")).astype(int)


def near(pixels: np.ndarray, rgb, tolerance: int = 12) -> np.ndarray:
    return (np.abs(pixels - np.asarray(rgb)) <= tolerance).all(axis=-1)


def set_layers(page, mask: bool, opacity: int = 100, outlines: bool = False, truth: bool = False) -> None:
    page.locator("#mask-on").set_checked(mask)
    page.locator("#mask-opacity").fill(str(opacity))
    page.locator("#outlines-on").set_checked(outlines)
    page.locator("#truth-on").set_checked(truth)
    settled(page)


def test_page_loads_with_the_slide_list_and_its_figures(page, view_outputs):
    settled(page)
    rows = page.locator("#slides li")
    assert rows.count() == 3
    synth = page.locator(f"#slides li[data-name='{SYNTH}']")
    count = len(view_outputs["features"])
    assert synth.locator(".figures").inner_text() == f"WSI Dice 0.930 · {count} objects · 12.50 glomeruli/mm²"
    assert "active" in synth.get_attribute("class")
    assert page.locator("#objects li").count() == count
    assert page.errors == []


def test_slide_tiles_and_mask_overlay_pixels_are_drawn(page):
    set_layers(page, mask=False)
    bare = viewer_pixels(page)
    # slide tiles: the synthetic stain (pink/purple tissue), nowhere the overlay's green
    tissue = (bare[..., 0] > bare[..., 1] + 20) & (bare[..., 2] > bare[..., 1] + 10)
    assert tissue.mean() > 0.2
    assert near(bare, MASK_RGB).mean() == 0

    set_layers(page, mask=True, opacity=100)
    overlaid = viewer_pixels(page)
    green = near(overlaid, MASK_RGB)
    assert green.mean() > 0.02
    assert (near(bare, MASK_RGB) <= green).all()

    set_layers(page, mask=True, opacity=50)
    half = viewer_pixels(page)[green]
    expected = (bare[green] + MASK_RGB) / 2  # the overlay blends over the slide at the chosen opacity
    assert np.abs(half - expected).mean() < 6


def test_truth_outline_toggles_on_and_off(page):
    set_layers(page, mask=False, truth=False)
    assert near(viewer_pixels(page), OUTLINE_RGB).sum() == 0
    set_layers(page, mask=False, truth=True)
    assert near(viewer_pixels(page), OUTLINE_RGB).sum() > 200


def test_clicking_an_object_zooms_to_it(page):
    set_layers(page, mask=True, opacity=100)
    whole = page.evaluate("holoView.viewImageRect()")
    index = page.locator("#objects li").count() - 1
    page.locator("#objects li").nth(index).click()
    wait_for(page, f"holoView.zoomedTo === {index}")
    settled(page)
    view = page.evaluate("holoView.viewImageRect()")
    box = page.evaluate(f"holoView.features[{index}].box")
    # the object is inside the view, and the view is not much larger than the object
    assert view["x"] <= box["x"] and box["x"] + box["width"] <= view["x"] + view["width"]
    assert view["y"] <= box["y"] and box["y"] + box["height"] <= view["y"] + view["height"]
    assert max(box["width"], box["height"]) * 1.2 < view["width"] < whole["width"] / 3
    assert "active" in page.locator("#objects li").nth(index).get_attribute("class")
    # and the object itself, overlaid, fills the middle of the screen
    pixels = viewer_pixels(page)
    h, w = pixels.shape[:2]
    assert near(pixels[h // 2 - 10 : h // 2 + 10, w // 2 - 10 : w // 2 + 10], MASK_RGB).mean() > 0.9


def test_a_slide_that_failed_to_open_shows_its_error(page, view_outputs):
    page.locator("#slides li[data-name='broken_wsi']").click()
    message = page.locator("#message")
    error = str(view_outputs["slides"] / "broken_wsi.tiff") + ": "
    assert message.is_visible() and message.inner_text().startswith(error)
    assert page.locator("#slides li[data-name='broken_wsi'] .error").inner_text().startswith(error)
    assert page.errors == []
