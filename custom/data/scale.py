"""The physical scale training patches are read at: a slide's level, or an image's resize factor, by mpp.

KPIs mixes 40X slides (0.25 um/px) with native-20X NEP25 slides (0.5 um/px), so a fixed level
reads two physical scales. By mpp, a slide's pixel size comes from, in order: the datalist item's
"mpp" (the user's word), the file's own resolution tags, and, for a KPIs slide that has neither,
its class's scanner magnification (NEP25 20X, the other classes 40X, the organisers' rule), with a
warning. Anything else without a pixel size is an error: its scale cannot be guessed.
"""

from __future__ import annotations

import logging
from pathlib import Path

from custom.data.datalists import kpis_class
from custom.errors import ConfigError, SlideError
from custom.metrics.kpis import downsample_factor
from custom.wsi.reader import DEFAULT_MPP_RTOL

logger = logging.getLogger(__name__)

KPIS_40X_MPP = 0.25
KPIS_20X_MPP = 0.5
_warned: set[str] = set()


def guessed_mpp(item: dict) -> float | None:
    """The pixel size a KPIs slide or patch was scanned at, from its class or path; None if not KPIs."""
    path = Path(item["image"])
    cls = item.get("class") or next((kpis_class(p.name) for p in path.parents if kpis_class(p.name)), None)
    native_20x = downsample_factor(path) == 1 or kpis_class(cls or "") == "NEP25"
    if native_20x:
        return KPIS_20X_MPP
    return KPIS_40X_MPP if kpis_class(cls or "") else None


def base_mpp(item: dict, file_mpp: float | None) -> float:
    """Level-0 um/px of an item: declared, read from the file, or guessed for KPIs data (warned once)."""
    path = str(item["image"])
    if item.get("mpp"):
        try:
            return float(item["mpp"])
        except (TypeError, ValueError):
            raise ConfigError(
                f"{path}: its datalist 'mpp' must be a number of um/px, got {item['mpp']!r}"
            ) from None
    if file_mpp:
        return float(file_mpp)
    guess = guessed_mpp(item)
    if guess is None:
        raise ConfigError(
            f"{path}: has no pixel size, so the level for a physical scale cannot be chosen: add "
            '"mpp" (um/px) to its datalist item, or train by patch_level'
        )
    if path not in _warned:
        _warned.add(path)
        magnification = "20X" if guess == KPIS_20X_MPP else "40X"
        logger.warning(
            '%s: no pixel size in the file; assuming %s um/px (KPIs %s); add "mpp" to its datalist item '
            "if that is wrong",
            path,
            guess,
            magnification,
        )
    return guess


def level_for_item(slide, item: dict, level: int | None = None, mpp: float | None = None) -> int:
    """The slide level to read an item's patches at: by `mpp` when given, else `level` (default 0)."""
    if mpp is None:
        level = 0 if level is None else int(level)
        if not 0 <= level < slide.level_count:
            raise ConfigError(
                f"{slide.path}: level {level} requested, the slide has levels 0..{slide.level_count - 1}"
            )
        return level
    file_mpp = slide.mpp[1] if slide.mpp else None
    base = base_mpp(item, file_mpp)
    if file_mpp and not item.get("mpp"):
        return slide.level_for_mpp(mpp)  # MONAI's matching on the file's own pixel size
    level_mpps = [base * d for d in slide.downsamples]
    best = min(range(len(level_mpps)), key=lambda i: abs(level_mpps[i] - mpp))
    if abs(level_mpps[best] - mpp) > DEFAULT_MPP_RTOL * mpp:
        available = ", ".join(f"{m:.4g}" for m in level_mpps)
        raise SlideError(
            slide.path,
            f"no level is within {DEFAULT_MPP_RTOL:.0%} of {mpp} um/px; its levels are at {available} um/px",
        )
    return best


def resize_factor(item: dict, level: int | None = None, mpp: float | None = None) -> float:
    """How many source pixels one patch pixel spans for an image item (a JPEG or PNG patch)."""
    if mpp is None:
        return float(2 ** (int(level) if level else 0))  # level L of a 2x pyramid
    return float(mpp) / base_mpp(item, None)
