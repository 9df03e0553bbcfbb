"""Synthetic kidney slides: real pyramids in every reader, exact masks, planted edge cases, decoys."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import openslide
import pytest
import tifffile
from cucim import CuImage
from scipy import ndimage as ndi

from custom.cli import main
from custom.errors import ConfigError
from custom.synth import build_scene, render_rgb, write_synthetic_slides
from custom.synth.scene import CONTEXT_CLEARANCE_UM

REPO = Path(__file__).resolve().parents[1]
MPP = 0.25
GLASS_GREEN_MIN = 232  # green of glass (~242); all tissue, even interstitium, is darker once smoothed


def _write(folder, **kwargs):
    (result,) = write_synthetic_slides(folder, count=1, progress=False, **kwargs)
    return result


@pytest.fixture(scope="module")
def issue_slide(tmp_path_factory):
    """The issue's own size and seed: 8192 x 6144, seed 3."""
    return _write(tmp_path_factory.mktemp("issue"), width=8192, height=6144, seed=3)


@pytest.fixture(scope="module")
def decoy_slide(tmp_path_factory):
    return _write(tmp_path_factory.mktemp("decoys"), width=8192, height=4096, seed=3, decoys=True)


def _sidecar(result) -> dict:
    return json.loads(result.objects_path.read_text())


def _level(path, level: int) -> np.ndarray:
    with tifffile.TiffFile(path) as tif:
        return tif.pages[level].asarray()


def _rasterise(
    objects: list[dict], level: int, shape: tuple[int, int], box=None
) -> tuple[np.ndarray, np.ndarray]:
    """The sidecar's glomeruli drawn at a level from its outline formula, independently of the
    renderer; also where a pixel centre lies within 1e-9 of an outline (float rounding decides)."""
    y0, x0, h, w = box or (0, 0, *shape)
    scale = 2**level
    xs = (x0 + np.arange(w) + 0.5) * scale
    ys = (y0 + np.arange(h) + 0.5) * scale
    mask = np.zeros((h, w), bool)
    tie = np.zeros((h, w), bool)
    for o in objects:
        if o["mask_value"] != 1:
            continue
        dx, dy = xs[None, :] - o["cx"], ys[:, None] - o["cy"]
        phi = np.arctan2(dy, dx)
        r = o["radius"] * (1 + sum(a * np.cos(k * phi + p) for k, a, p in o["outline_harmonics"]))
        s = np.hypot(dx, dy) / r
        mask |= s <= 1
        tie |= np.abs(s - 1) < 1e-9
    return mask.astype(np.uint8), tie


def _tissue(rgb: np.ndarray) -> np.ndarray:
    """Tissue by colour alone: smoothed green darker than glass (lumens count as tissue)."""
    return ndi.uniform_filter(rgb[..., 1].astype(np.float32), 9) < GLASS_GREEN_MIN


# -- the file format -------------------------------------------------------------------------


def test_issue_size_slide_has_the_same_levels_and_mpp_in_cucim_openslide_and_tifffile(issue_slide):
    expected = [(6144, 8192), (3072, 4096), (1536, 2048), (768, 1024)]
    assert issue_slide.level_shapes == expected
    for path in (issue_slide.wsi_path, issue_slide.mask_path):
        with tifffile.TiffFile(path) as tif:
            assert [p.shape[:2] for p in tif.pages] == expected
            for level, page in enumerate(tif.pages):
                assert page.is_tiled and page.subfiletype == (0 if level == 0 else 1)
                num, den = page.tags["XResolution"].value
                assert 1e4 * den / num == pytest.approx(MPP * 2**level)
        with openslide.OpenSlide(str(path)) as slide:
            assert slide.level_dimensions == tuple((w, h) for h, w in expected)
            assert float(slide.properties[openslide.PROPERTY_NAME_MPP_X]) == pytest.approx(MPP)
    image = CuImage(str(issue_slide.wsi_path))
    assert tuple(image.resolutions["level_dimensions"]) == tuple((w, h) for h, w in expected)
    assert image.metadata["cucim"]["spacing"][:2] == pytest.approx([MPP, MPP])
    with tifffile.TiffFile(issue_slide.wsi_path) as tif:
        assert tif.pages[0].compression == tifffile.COMPRESSION.JPEG
    with tifffile.TiffFile(issue_slide.mask_path) as tif:
        assert tif.pages[0].compression == tifffile.COMPRESSION.LZW and tif.pages[0].dtype == np.uint8


def test_cucim_and_openslide_agree_on_random_regions_of_every_level(issue_slide):
    rng = np.random.default_rng(0)
    image = CuImage(str(issue_slide.wsi_path))
    with openslide.OpenSlide(str(issue_slide.wsi_path)) as slide:
        for level, (h, w) in enumerate(issue_slide.level_shapes):
            size = (min(600, w), min(400, h))
            x, y = int(rng.integers(0, w - size[0] + 1)), int(rng.integers(0, h - size[1] + 1))
            scale = 2**level
            a = np.asarray(slide.read_region((x * scale, y * scale), level, size))[..., :3]
            b = np.asarray(image.read_region((x * scale, y * scale), size, level=level))[..., :3]
            assert a.shape == b.shape == (size[1], size[0], 3)
            assert a.std() > 5, "region should not be blank"
            assert np.abs(a.astype(int) - b).max() <= 2, f"level {level}: readers disagree"


def test_mask_is_readable_by_openslide_and_tifffile_at_every_level(issue_slide):
    with openslide.OpenSlide(str(issue_slide.mask_path)) as slide:
        for level, (h, w) in enumerate(issue_slide.level_shapes):
            via_tifffile = _level(issue_slide.mask_path, level)
            assert set(np.unique(via_tifffile)) == {0, 1}
            # The middle 2048 x 2048 (or the whole level), where the tile-line glomeruli are.
            size_w, size_h = min(w, 2048), min(h, 2048)
            x, y = (w - size_w) // 2, (h - size_h) // 2
            scale = 2**level
            via_openslide = np.asarray(slide.read_region((x * scale, y * scale), level, (size_w, size_h)))[
                ..., 0
            ]
            np.testing.assert_array_equal(via_openslide, via_tifffile[y : y + size_h, x : x + size_w])


# -- what the slide shows ----------------------------------------------------------------------


def test_glomerulus_fraction_inside_tissue_is_plausible_and_matches_the_sidecar(issue_slide):
    level = 2
    rgb, mask = _level(issue_slide.wsi_path, level), _level(issue_slide.mask_path, level)
    tissue = _tissue(rgb)
    fraction = float((mask.astype(bool) & tissue).sum() / tissue.sum())
    assert 0.01 <= fraction <= 0.15
    sidecar = _sidecar(issue_slide)
    assert sidecar["glomerulus_fraction_in_tissue"] == pytest.approx(fraction, rel=0.2)
    assert sidecar["tissue_fraction"] == pytest.approx(tissue.mean(), abs=0.05)
    # Irregular outline, not a rectangle: tissue fills much less than its bounding box.
    rows, cols = np.nonzero(tissue)
    box = (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)
    assert 0.3 < tissue.sum() / box < 0.95
    assert 0.2 < issue_slide.tissue_fraction < 0.95


def test_tissue_is_pas_pink_purple_on_white_glass_with_darker_glomeruli(issue_slide):
    rgb = _level(issue_slide.wsi_path, 1).astype(np.float64)  # float32 sums drift over millions of pixels
    mask = _level(issue_slide.mask_path, 1).astype(bool)
    tissue = _tissue(rgb.astype(np.uint8))
    glass = rgb[~ndi.binary_dilation(tissue, iterations=8)]
    assert glass.min(axis=0).min() > 225 and np.ptp(glass.mean(axis=0)) < 10  # near-white, neutral
    r, g, b = (rgb[tissue & ~mask][:, c].mean() for c in range(3))
    assert r > g + 20 and b > g + 20, "PAS tissue is magenta: red and blue above green"
    glom_lum = rgb[mask].mean()
    assert glom_lum < rgb[tissue & ~mask].mean() - 5, "glomeruli are denser (darker) than the tubules"
    # Nuclei: a tail of dark blue-purple pixels, blue well above red.
    nuclei = rgb[tissue & (rgb.sum(-1) < 330)]
    assert len(nuclei) > 0.01 * tissue.sum()
    assert (nuclei[:, 2] > nuclei[:, 0]).mean() > 0.8


def test_mask_equals_the_sidecar_geometry_at_level_0_and_level_2(issue_slide):
    sidecar = _sidecar(issue_slide)
    objects = sidecar["objects"]
    assert sum(o["mask_value"] for o in objects) >= 3
    level2 = _level(issue_slide.mask_path, 2)
    expected, tie = _rasterise(objects, 2, level2.shape)
    np.testing.assert_array_equal(level2[~tie], expected[~tie])
    level0 = _level(issue_slide.mask_path, 0)
    height, width = level0.shape
    for o in objects:
        reach = math.ceil(o["max_radius"]) + 4
        y0, x0 = max(0, int(o["cy"]) - reach), max(0, int(o["cx"]) - reach)
        y1, x1 = min(height, int(o["cy"]) + reach), min(width, int(o["cx"]) + reach)
        box = (y0, x0, y1 - y0, x1 - x0)
        expected, tie = _rasterise(objects, 0, level0.shape, box)
        got = level0[y0:y1, x0:x1]
        np.testing.assert_array_equal(got[~tie], expected[~tie])
        if 0 <= o["cx"] < width and 0 <= o["cy"] < height:
            assert level0[int(o["cy"]), int(o["cx"])] == 1
    # Away from every object the mask is 0.
    rng = np.random.default_rng(1)
    ys, xs = rng.integers(0, height, 2000), rng.integers(0, width, 2000)
    far = np.ones(len(xs), bool)
    for o in objects:
        far &= np.hypot(xs + 0.5 - o["cx"], ys + 0.5 - o["cy"]) > o["max_radius"] + 1
    assert far.sum() > 1000 and not level0[ys[far], xs[far]].any()


def test_glomeruli_are_planted_on_4096_tile_lines_and_cut_by_slide_edges(issue_slide):
    objects = _sidecar(issue_slide)["objects"]
    mask = _level(issue_slide.mask_path, 0)
    rgb = _level(issue_slide.wsi_path, 0)
    height, width = mask.shape
    on_4k = [o for o in objects if o["planted"].startswith("tile4096")]
    assert on_4k, "no glomerulus planted on a 4096-px tile line"
    for o in on_4k:
        assert o["cx"] % 4096 == 0 or o["cy"] % 4096 == 0
        cx, cy = int(o["cx"]), int(o["cy"])
        if o["cx"] % 4096 == 0:  # foreground on both sides of the vertical tile line
            assert mask[cy, cx - 1] == 1 and mask[cy, cx] == 1
        if o["cy"] % 4096 == 0:
            assert mask[cy - 1, cx] == 1 and mask[cy, cx] == 1
    for step in (2048, 1024):
        assert any(
            o["planted"] == f"tile{step}_corner" and o["cx"] % step == 0 == o["cy"] % step for o in objects
        )
    at_edge = [o for o in objects if o["planted"].startswith("slide_edge")]
    assert len(at_edge) >= 2
    for o in at_edge:
        cx, cy = min(int(o["cx"]), width - 1), min(int(o["cy"]), height - 1)
        side = o["planted"].rsplit("_", 1)[1]
        border = {"left": mask[cy, 0], "right": mask[cy, -1], "top": mask[0, cx], "bottom": mask[-1, cx]}[
            side
        ]
        assert border == 1, f"{o['planted']} is not cut by the slide edge"
        assert rgb[cy, cx, 1] < GLASS_GREEN_MIN, "planted glomeruli sit in tissue"


def test_coarse_levels_are_rendered_directly_but_match_downsampled_level_0(issue_slide):
    level0 = _level(issue_slide.wsi_path, 0).astype(np.float32)
    level2 = _level(issue_slide.wsi_path, 2).astype(np.float32)
    down = level0.reshape(level2.shape[0], 4, level2.shape[1], 4, 3).mean(axis=(1, 3))
    # Same picture: large-scale colour agrees; only texture finer than the level is left out.
    coarse = (ndi.uniform_filter(down, (16, 16, 1)), ndi.uniform_filter(level2, (16, 16, 1)))
    assert np.abs(coarse[0] - coarse[1]).mean() < 4.0
    assert np.corrcoef(down[..., 1].ravel(), level2[..., 1].ravel())[0, 1] > 0.7
    # Glomeruli and the tissue around them keep their colour at every level, including those too
    # coarse to draw nuclei (level 3 here), where their mean stands in for them.
    # The same areas at every level, from the coarsest level scaled up: glomerulus interiors, and
    # tissue at least 8 coarse pixels (64 level-0 px) away from any glomerulus.
    top = len(issue_slide.level_shapes) - 1
    mask_top = _level(issue_slide.mask_path, top).astype(bool)
    inner_top = ndi.binary_erosion(mask_top, iterations=2)
    around_top = ndi.binary_erosion(_tissue(_level(issue_slide.wsi_path, top)), iterations=2)
    around_top &= ~ndi.binary_dilation(mask_top, iterations=8)
    means = []
    for level, (h, w) in enumerate(issue_slide.level_shapes):
        rgb = _level(issue_slide.wsi_path, level)
        scale = 2 ** (top - level)
        inner, around = (
            np.repeat(np.repeat(a, scale, axis=0), scale, axis=1)[:h, :w] for a in (inner_top, around_top)
        )
        # float64 sums: float32 drifts badly over millions of pixels.
        means.append((rgb[inner].mean(axis=0, dtype=np.float64), rgb[around].mean(axis=0, dtype=np.float64)))
    for level, (glom, tissue) in enumerate(means[1:], start=1):
        assert np.abs(glom - means[0][0]).max() < 6, f"level {level}: glomeruli change colour"
        assert np.abs(tissue - means[0][1]).max() < 6, f"level {level}: tissue changes colour"


def test_glass_regions_are_plain_glass():
    scene = build_scene(3, 8192, 6144)
    tile = render_rgb(scene, 0, 0, 0, 64, 64)  # the corner is outside this slide's tissue
    assert (tile == tile[0, 0]).all() and tile[0, 0].min() > 230


# -- determinism, decoys and the command line ----------------------------------------------------


def test_same_seed_gives_identical_pixels_and_another_seed_does_not(tmp_path):
    a = _write(tmp_path / "a", width=2048, height=1536, seed=7)
    b = _write(tmp_path / "b", width=2048, height=1536, seed=7)
    c = _write(tmp_path / "c", width=2048, height=1536, seed=8)
    for level in range(len(a.level_shapes)):
        np.testing.assert_array_equal(_level(a.wsi_path, level), _level(b.wsi_path, level))
        np.testing.assert_array_equal(_level(a.mask_path, level), _level(b.mask_path, level))
    assert a.objects_path.read_text() == b.objects_path.read_text()
    assert not np.array_equal(_level(a.wsi_path, 0), _level(c.wsi_path, 0))
    # Stain colour varies with the seed.
    ta, tc = (_level(r.wsi_path, 1) for r in (a, c))
    mean_a, mean_c = (t[_tissue(t)].mean(axis=0) for t in (ta, tc))
    assert np.abs(mean_a - mean_c).max() > 2


def test_stain_seed_changes_the_stain_and_nothing_else(tmp_path):
    own = _write(tmp_path / "own", width=2048, height=1536, seed=7)
    restained = _write(tmp_path / "restained", width=2048, height=1536, seed=7, stain_seed=8)
    donor = _write(tmp_path / "donor", width=2048, height=1536, seed=8)
    for level in range(len(own.level_shapes)):
        np.testing.assert_array_equal(_level(own.mask_path, level), _level(restained.mask_path, level))
    sidecars = [_sidecar(r) for r in (own, restained)]
    assert sidecars[0]["objects"] == sidecars[1]["objects"]
    assert (sidecars[0]["stain_seed"], sidecars[1]["stain_seed"]) == (7, 8)
    # Same tissue, another colour: the restained slide's tissue colour is the donor's, not its own.
    rgb = {
        name: _level(r.wsi_path, 1) for name, r in (("own", own), ("restained", restained), ("donor", donor))
    }
    tissue = {"own": _tissue(rgb["own"]), "restained": _tissue(rgb["own"]), "donor": _tissue(rgb["donor"])}
    mean = {name: image[tissue[name]].mean(axis=0) for name, image in rgb.items()}
    assert np.abs(mean["restained"] - mean["own"]).max() > 2
    assert np.abs(mean["restained"] - mean["donor"]).max() < np.abs(mean["restained"] - mean["own"]).max() / 2


def test_glomerulus_size_option_sets_the_diameters(tmp_path):
    result = _write(tmp_path, width=2048, height=2048, seed=4, glomerulus_um=(60.0, 100.0))
    diameters = [o["diameter_um"] for o in _sidecar(result)["objects"]]
    assert diameters and all(60.0 <= d <= 100.0 for d in diameters)


def test_decoys_are_labelled_0_and_sit_only_in_the_medulla(decoy_slide):
    sidecar = _sidecar(decoy_slide)
    decoys = [o for o in sidecar["objects"] if o["label"] == "decoy"]
    glomeruli = [o for o in sidecar["objects"] if o["label"] == "glomerulus"]
    assert decoys and glomeruli and decoy_slide.n_decoys == len(decoys)
    scene = build_scene(3, 8192, 4096, decoys=True)
    clearance_px = CONTEXT_CLEARANCE_UM / MPP
    for o in decoys:
        assert o["mask_value"] == 0
        assert scene.medulla_distance(np.array(o["cx"]), np.array(o["cy"])) > clearance_px
    for o in glomeruli:
        assert scene.medulla_distance(np.array(o["cx"]), np.array(o["cy"])) < -clearance_px
    mask, rgb = _level(decoy_slide.mask_path, 0), _level(decoy_slide.wsi_path, 0)
    for o in decoys:
        cy, cx = int(o["cy"]), int(o["cx"])
        assert not mask[max(0, cy - 50) : cy + 50, max(0, cx - 50) : cx + 50].any()
        assert rgb[cy - 20 : cy + 20, cx - 20 : cx + 20, 1].mean() < 200, "a decoy looks like a glomerulus"
    expected, tie = _rasterise(sidecar["objects"], 2, _level(decoy_slide.mask_path, 2).shape)
    np.testing.assert_array_equal(_level(decoy_slide.mask_path, 2)[~tie], expected[~tie])


def test_decoy_value_2_marks_the_decoys_in_the_mask_and_changes_no_pixel(decoy_slide, tmp_path):
    marked = _write(tmp_path, width=8192, height=4096, seed=3, decoys=True, decoy_value=2)
    for level in (0, 2):
        before, after = _level(decoy_slide.mask_path, level), _level(marked.mask_path, level)
        assert np.unique(after).tolist() == [0, 1, 2]
        np.testing.assert_array_equal(np.where(after == 2, 0, after), before)  # glomeruli untouched
    np.testing.assert_array_equal(_level(marked.wsi_path, 0), _level(decoy_slide.wsi_path, 0))
    sidecar = _sidecar(marked)
    decoys = [o for o in sidecar["objects"] if o["label"] == "decoy"]
    assert {o["mask_value"] for o in decoys} == {2} and sidecar["decoy_mask_value"] == 2
    mask = _level(marked.mask_path, 0)
    assert all(mask[int(o["cy"]), int(o["cx"])] == 2 for o in decoys)
    with pytest.raises(ConfigError, match="decoy_value must be 0"):
        _write(tmp_path / "bad", width=512, height=512, decoys=True, decoy_value=1)
    assert not (tmp_path / "bad").exists()


def _window_statistics(rgb: np.ndarray) -> np.ndarray:
    """Per-channel mean and std, gradient energy, and orientation coherence of the window's
    structure tensor (0 = isotropic, 1 = all edges parallel)."""
    f = rgb.astype(np.float64)
    grey = f.mean(axis=-1)
    gx, gy = ndi.sobel(grey, 1), ndi.sobel(grey, 0)
    jxx, jyy, jxy = (gx * gx).mean(), (gy * gy).mean(), (gx * gy).mean()
    coherence = math.sqrt((jxx - jyy) ** 2 + 4 * jxy**2) / (jxx + jyy)
    pixels = f.reshape(-1, 3)
    return np.r_[pixels.mean(0), pixels.std(0), jxx + jyy, coherence]


def _windows(scene, ids, level: int, side: int) -> np.ndarray:
    o = scene.objects
    scale = 2**level
    return np.array(
        [
            _window_statistics(
                render_rgb(
                    scene,
                    level,
                    int(o.cy[i] // scale) - side // 2,
                    int(o.cx[i] // scale) - side // 2,
                    side,
                    side,
                )
            )
            for i in ids
        ]
    )


def _effect_size(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Difference of means in units of the pooled standard deviation (Cohen's d), per column."""
    return np.abs(a.mean(0) - b.mean(0)) / np.sqrt((a.var(0) + b.var(0)) / 2)


def test_decoys_match_glomeruli_in_512px_windows_but_differ_in_4k_context():
    """512-px windows at level 1 (256 um) centred on decoys and on glomeruli have the same
    statistics: Cohen's d < 0.5 (a small effect) for every one, over 32 objects a side (seeds 0-7
    all stay under 0.5; this seed is typical). 2 mm windows (512 px at level 4) do differ: tubule
    orientation stays coherent over millimetres only in the medulla."""
    scene = build_scene(7, 32768, 24576, decoys=True)
    o = scene.objects
    random_placed = np.array([p == "" for p in o.planted])
    per_group = 32
    glom_ids = np.flatnonzero((o.label == 1) & random_placed)[:per_group]
    decoy_ids = np.flatnonzero((o.label == 0) & random_placed)[:per_group]
    assert len(glom_ids) == len(decoy_ids) == per_group

    local_glom, local_decoy = _windows(scene, glom_ids, 1, 512), _windows(scene, decoy_ids, 1, 512)
    d_local = _effect_size(local_glom, local_decoy)
    assert (d_local < 0.5).all(), f"local statistics differ: Cohen's d {np.round(d_local, 2)}"
    # The same statistics do tell a glomerulus from plain cortex 350 um away: they are not blind.
    plain = [
        _window_statistics(render_rgb(scene, 1, int(y) // 2 - 256, int(x) // 2 - 256, 512, 512))
        for x, y in zip(o.cx[glom_ids[:12]] + 1400, o.cy[glom_ids[:12]], strict=True)
    ]
    assert _effect_size(local_glom, np.array(plain)).max() > 1.0

    half_context_px = 4096  # level-0 px: the 2 mm window stays on the slide
    on_slide = (o.cx > half_context_px) & (o.cx < scene.width - half_context_px)
    on_slide &= (o.cy > half_context_px) & (o.cy < scene.height - half_context_px)
    coherence_glom = _windows(scene, np.flatnonzero((o.label == 1) & on_slide)[:10], 4, 512)[:, -1]
    coherence_decoy = _windows(scene, np.flatnonzero((o.label == 0) & on_slide)[:10], 4, 512)[:, -1]
    assert len(coherence_glom) == len(coherence_decoy) == 10
    assert coherence_decoy.mean() > coherence_glom.mean()
    assert _effect_size(coherence_glom[:, None], coherence_decoy[:, None])[0] > 2.0


def test_command_line_writes_kpis_named_slides_in_a_subprocess(tmp_path):
    out = tmp_path / "s"
    args = [
        "--count",
        "2",
        "--width",
        "2048",
        "--height",
        "1536",
        "--seed",
        "5",
        "--glomerulus_um",
        "[80,150]",
    ]
    done = subprocess.run(
        [sys.executable, "-m", "custom", "synth", str(out), *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    lines = [line for line in done.stdout.splitlines() if line.strip()]
    assert (
        len(lines) == 2 and lines[0].startswith("synth_5: 2048 x 1536 px") and lines[1].startswith("synth_6")
    )
    for seed in (5, 6):
        for suffix in ("_wsi.tiff", "_mask.tiff", "_objects.json"):
            assert (out / f"synth_{seed}{suffix}").is_file()
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == []


def test_command_line_rejects_a_bad_count_with_one_line_and_exit_code_2(tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        main(["synth", str(tmp_path), "--count", "0"])
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "count" in err
    assert list(tmp_path.iterdir()) == []
