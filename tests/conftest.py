"""Shared test fixtures: paths to the real slide files in ../shared/fixtures and the repo layout."""

from __future__ import annotations

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
