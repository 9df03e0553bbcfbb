"""Shared test fixtures: paths to the real slide files in ../shared/fixtures and the repo layout."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "holohisto_bundle"
# The shared fixtures live beside the checkout and are never copied into it; CI sets the same layout.
FIXTURES = Path(os.environ.get("HOLOHISTO_FIXTURES", REPO.parent / "shared" / "fixtures")).resolve()
SLIDES = FIXTURES / "slides"
SCHEMA = FIXTURES / "monai" / "meta_schema_20240725.json"

if not SLIDES.is_dir():
    # Fail loudly: silently skipping every reader test would pass off an untested path as done.
    raise pytest.UsageError(
        f"shared fixtures not found at {FIXTURES}; set HOLOHISTO_FIXTURES to their folder"
    )


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    return FIXTURES


@pytest.fixture(scope="session")
def slides_dir() -> Path:
    return SLIDES


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for the module that asks (`usefixtures`), restored after it.

    On a 2-core machine shared with other jobs, two OpenMP threads stall at barriers.
    """
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def requirements_pins() -> dict[str, str]:
    """name: version of every `name==version` line of the repository's requirements.txt."""
    lines = (REPO / "requirements.txt").read_text().split("\n")
    return dict(line.split("==") for line in lines if "==" in line)


@pytest.fixture(scope="session")
def metadata_pins() -> dict[str, str]:
    """name: version of every package the bundle's metadata.json pins (monai, torch, numpy and the rest)."""
    from custom.bundle import bundle_root

    metadata = json.loads((bundle_root() / "configs" / "metadata.json").read_text())
    return {
        "monai": metadata["monai_version"],
        "torch": metadata["pytorch_version"],
        "numpy": metadata["numpy_version"],
        **metadata["required_packages_version"],
    }


@pytest.fixture(scope="session")
def kpis_folder(tmp_path_factory) -> Path:
    """Three small synthetic slides in the KPIs task-2 layout (<class>/<id>_wsi.tiff + _mask.tiff).

    Shared by the sampler, training and evaluation tests: 4096 x 3072 px keeps each one a few
    seconds to write while holding several glomeruli at 0.25 um/px.
    """
    from custom.synth import write_synthetic_slides

    root = tmp_path_factory.mktemp("kpis") / "Task2_WSI_level"
    for cls, seed in (("56Nx", 21), ("56Nx", 22), ("DN", 23)):
        list(write_synthetic_slides(root / cls, count=1, width=4096, height=3072, seed=seed, progress=False))
    return root


@pytest.fixture(scope="session")
def view_outputs(tmp_path_factory) -> dict:
    """A `segment`-like output folder for the viewer, independent of the inference code.

    out/synth_31_wsi_pred.tiff is the synthetic slide's own truth mask (so every overlay pixel is
    known), with its GeoJSON, a summary and an evaluation report; out/broken_wsi_pred.tiff has a
    slide that fails to open; out/maskonly_wsi_pred.tiff has no slide; out/escape_wsi_pred.tiff is a
    link out of the folder, and maskonly's slide and GeoJSON are links out of theirs.
    """
    import json
    import shutil

    import numpy as np

    from custom.metrics.report import build_report, write_reports
    from custom.outputs.geojson import mask_to_features, write_geojson
    from custom.outputs.pyramid import write_pyramid
    from custom.synth import write_synthetic_slides
    from custom.wsi.reader import open_mask

    root = tmp_path_factory.mktemp("view")
    slides, out, elsewhere = root / "slides", root / "out", root / "elsewhere"
    for folder in (out, elsewhere):
        folder.mkdir()
    (result,) = write_synthetic_slides(
        slides / "56Nx", width=2048, height=1536, seed=31, glomerulus_um=(50.0, 90.0), progress=False
    )
    truth = result.wsi_path.with_name("synth_31_mask.tiff")
    shutil.copyfile(truth, out / "synth_31_wsi_pred.tiff")
    with open_mask(truth) as mask:
        labels, mpp = mask.read_level(0), mask.mpp
    features = mask_to_features(labels, mpp=mpp, class_names={1: "Glomerulus"})
    write_geojson(out / "synth_31_wsi.geojson", features)
    summary = {"slide": "synth_31_wsi", "glomerulus_count": len(features), "glomeruli_per_mm2_tissue": 12.5}
    (out / "synth_31_wsi_summary.json").write_text(json.dumps(summary))
    record = {"slide": "synth_31", "class": "56Nx", "wsi_dice": 0.93, "instance_f1": 0.9}
    write_reports(out / "report", build_report([record], [], {}))

    def small(path, channels=1, height=64, width=96):
        """A one-level all-zero mask (channels=1) or all-black slide (channels=3)."""
        sample = () if channels == 1 else (channels,)
        return write_pyramid(
            path, [(height, width)], lambda level, y, x, h, w: np.zeros((h, w, *sample), np.uint8),
            channels=channels, mpp=0.25, compression="lzw" if channels == 1 else "jpeg",
        )  # fmt: skip

    small(out / "broken_wsi_pred.tiff")
    (slides / "broken_wsi.tiff").write_bytes(b"II*\x00 this is not a slide")
    small(out / "maskonly_wsi_pred.tiff")
    (slides / "maskonly_wsi.tiff").symlink_to(small(elsewhere / "maskonly_wsi.tiff", channels=3))
    write_geojson(elsewhere / "maskonly_wsi.geojson", features)
    (out / "maskonly_wsi.geojson").symlink_to(elsewhere / "maskonly_wsi.geojson")
    (out / "escape_wsi_pred.tiff").symlink_to(small(elsewhere / "secret_pred.tiff"))
    return {"out": out, "slides": slides, "labels": labels, "features": features, "slide": result.wsi_path}
