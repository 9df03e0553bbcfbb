"""Compare two evaluation reports slide by slide: a Wilcoxon signed-rank test of one figure."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from custom.data.datalists import natural_key
from custom.errors import ConfigError
from custom.metrics.stats import wilcoxon_p


def compare(metrics_a: str | Path, metrics_b: str | Path, key: str = "wsi_dice") -> dict:
    """Wilcoxon signed-rank test of one per-slide figure between two evaluation reports.

    Slides are paired by slide id; slides in only one report, or without a value for `key` in
    either, are left out and listed. The p-value is two-sided (scipy.stats.wilcoxon); it is None
    with fewer than two pairs or when every pair ties.

    Args:
        metrics_a: metrics.json of method A, or the report folder holding it.
        metrics_b: metrics.json of method B, or the report folder holding it.
        key: the per-slide figure to compare: wsi_dice, patch_dice, kpis_dice, kpis_f1,
            instance_f1, patch_dice_1024, ...
    """
    a, b = _load_slides(metrics_a), _load_slides(metrics_b)
    for path, slides in ((metrics_a, a), (metrics_b, b)):
        if slides and not any(key in s for s in slides.values()):
            keys = sorted({k for s in slides.values() for k, v in s.items() if isinstance(v, (int, float))})
            raise ConfigError(f"{path}: no per-slide figure named {key!r}; it has {', '.join(keys)}")
    common = sorted(set(a) & set(b), key=natural_key)
    paired = [(sid, a[sid].get(key), b[sid].get(key)) for sid in common]
    missing = [sid for sid, va, vb in paired if not _is_number(va) or not _is_number(vb)]
    values = np.array([(va, vb) for _, va, vb in paired if _is_number(va) and _is_number(vb)], float)
    values = values.reshape(-1, 2)
    diff = values[:, 0] - values[:, 1]
    p = wilcoxon_p(values[:, 0], values[:, 1]) if len(values) else float("nan")
    return {
        "key": key,
        "n_pairs": len(values),
        "mean_a": float(values[:, 0].mean()) if len(values) else None,
        "mean_b": float(values[:, 1].mean()) if len(values) else None,
        "mean_difference": float(diff.mean()) if len(values) else None,
        "a_better": int((diff > 0).sum()),
        "b_better": int((diff < 0).sum()),
        "ties": int((diff == 0).sum()),
        "p_value": None if math.isnan(p) else p,
        "only_in_a": sorted(set(a) - set(b), key=natural_key),
        "only_in_b": sorted(set(b) - set(a), key=natural_key),
        "missing_value": missing,
    }


def _load_slides(path: str | Path) -> dict[str, dict]:
    path = Path(path)
    if path.is_dir():
        path = path / "metrics.json"
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such metrics file") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: not a metrics.json ({err})") from None
    if not isinstance(data, dict) or not isinstance(data.get("slides"), list):
        raise ConfigError(f"{path}: has no 'slides' list; pass an evaluation report's metrics.json")
    return {str(s["slide"]): s for s in data["slides"] if isinstance(s, dict) and "slide" in s}


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
