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
    raise pytest.UsageError(f"shared fixtures not found at {FIXTURES}; set HOLOHISTO_FIXTURES to their folder")


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    return FIXTURES


@pytest.fixture(scope="session")
def slides_dir() -> Path:
    return SLIDES
