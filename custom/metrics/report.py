"""Evaluation reports: metrics.json, per_slide.csv, summary.md and dice_per_slide.png.

metrics.json holds {"slides": [per-slide records], "summary": {class: figures}, "errors": [...],
"settings": {...}}. A summary entry averages each per-slide score over the class's slides that
have it (a slide with no foreground anywhere has no patch Dice, for instance), sums the object
and patch counts, and adds the mean absolute count error. Every file appears at its final path
only once complete (written beside it, then renamed), so a reader never sees half a report.
"""

from __future__ import annotations

import csv
import io
import json
import math
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from custom.data.datalists import KPIS_CLASSES
from custom.errors import ConfigError
from custom.io import write_atomic

ALL = "all"
FILES = {
    "json": "metrics.json",
    "csv": "per_slide.csv",
    "markdown": "summary.md",
    "plot": "dice_per_slide.png",
}
# Per-slide fields that describe the slide or the run rather than score it: never averaged.
DESCRIPTIVE = frozenset(
    {
        "slide",
        "class",
        "prediction",
        "ground_truth",
        "patch_grid",
        "height_px",
        "width_px",
        "instance_downsample",
        "instance_um_per_px",
        "kpis_downsample",
        "case",
        "seconds",
    }
)
# Per-slide counts: the summary gives their totals, not their means.
COUNT_PREFIXES = ("patches_scored_", "patches_empty_", "kpis_n_", "kpis_example_n_", "instance_n_")
PLOTTED = (("patch_dice", "patch Dice"), ("wsi_dice", "WSI Dice"), ("kpis_dice", "KPIs Dice"))
TASK1 = "kpis_task1"  # settings["task"] of a task-1 (patch) report
PLOTTED_TASK1 = (("kpis_task1_dice", "KPIs task-1 Dice"),)


def build_report(slides: list[dict], errors: list[dict], settings: dict) -> dict:
    """The content of metrics.json: NaN becomes null so any JSON reader takes it."""
    slides = [{k: _plain(v) for k, v in s.items()} for s in slides]
    created = datetime.now(UTC).isoformat(timespec="seconds")
    return {
        "slides": slides,
        "summary": summarize(slides),
        "errors": [dict(e) for e in errors],
        "settings": dict(settings) | {"created": created},
    }


def error_entry(name: str, reason: str, prediction=None, ground_truth=None) -> dict:
    """One "errors" entry: what could not be scored, why, and which files were involved."""
    return {
        "slide": name,
        "error": reason,
        "prediction": str(prediction) if prediction else None,
        "ground_truth": str(ground_truth) if ground_truth else None,
    }


def summarize(slides: list[dict]) -> dict[str, dict]:
    """Figures per KPIs class present (in KPIs order, then other names), and over all slides."""
    names = {s["class"] for s in slides if s.get("class")}
    order = [c for c in KPIS_CLASSES if c in names] + sorted(names - set(KPIS_CLASSES))
    groups = {c: [s for s in slides if s.get("class") == c] for c in order}
    groups[ALL] = list(slides)
    return {name: _summary(members) for name, members in groups.items()}


def write_reports(out_dir: str | Path, report: dict) -> dict[str, Path]:
    """Write every report file into `out_dir` and return their paths."""
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ConfigError(f"{out}: report folder cannot be created ({err.strerror or err})") from err
    paths = {kind: out / name for kind, name in FILES.items()}
    text = json.dumps(report, indent=1, allow_nan=False)
    task1 = report["settings"].get("task") == TASK1
    write_atomic(paths["json"], lambda tmp: tmp.write_text(text + "\n"))
    write_atomic(paths["csv"], lambda tmp: tmp.write_text(slides_csv(report["slides"])))
    write_atomic(
        paths["markdown"], lambda tmp: tmp.write_text((task1_markdown if task1 else markdown)(report))
    )
    plotted = PLOTTED_TASK1 if task1 else PLOTTED
    write_atomic(paths["plot"], lambda tmp: plot_dice(report["slides"], tmp, plotted))
    return paths


def parse_class_names(value) -> dict[str, str] | None:
    """{label: name} from a dict, or from a JSON file holding one (or a datalist's "labels")."""
    if value is None or value == "" or value == {}:
        return None
    if isinstance(value, (str, Path)):
        path = Path(value)
        try:
            value = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise ConfigError(f"{path}: class names must be a JSON file of {{label: name}} ({err})") from None
        value = value.get("labels", value) if isinstance(value, dict) else value
    if not isinstance(value, dict) or not all(str(k).isdigit() for k in value):
        raise ConfigError(f"class names must map label numbers to names, got {value!r}")
    return {str(int(k)): str(v) for k, v in sorted(value.items(), key=lambda kv: int(kv[0]))}


def slides_csv(slides: list[dict]) -> str:
    columns: list[str] = []
    for s in slides:
        columns += [k for k in s if k not in columns]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, restval="", lineterminator="\n")
    writer.writeheader()
    for s in slides:
        writer.writerow({k: "" if v is None else v for k, v in s.items()})
    return buffer.getvalue()


def class_table(report: dict) -> str:
    """Markdown: one row per class, patch-level against whole-slide Dice (the paper's Table 1)."""
    sizes = report["settings"].get("patch_sizes_px", [])
    primary = report["settings"].get("primary_patch_px")
    columns = [("Class", None), ("Slides", "n_slides")]
    columns += [(f"Patch Dice ({s} px){' *' if s == primary else ''}", f"patch_dice_{s}") for s in sizes]
    columns += [
        ("WSI Dice", "wsi_dice"),
        ("KPIs Dice", "kpis_dice"),
        ("KPIs F1", "kpis_f1"),
        ("KPIs F1 (script's IoU)", "kpis_f1_as_script"),
        ("Example pipeline Dice / F1", None),
        ("Object F1", "instance_f1"),
        ("Count error (mean abs)", "count_abs_error"),
    ]
    rows = [
        [name, *(_cell(fig.get(k)) if k else _example(fig) for _, k in columns[1:])]
        for name, fig in report["summary"].items()
    ]
    return _table([c for c, _ in columns], rows)


def slide_table(report: dict) -> str:
    columns = [
        ("Slide", "slide"),
        ("Class", "class"),
        ("Patch Dice", "patch_dice"),
        ("WSI Dice", "wsi_dice"),
        ("KPIs Dice", "kpis_dice"),
        ("KPIs P", "kpis_precision"),
        ("KPIs R", "kpis_recall"),
        ("KPIs F1", "kpis_f1"),
        ("KPIs F1 (script's IoU)", "kpis_f1_as_script"),
        ("Example Dice / F1", None),
        ("Object P", "instance_precision"),
        ("Object R", "instance_recall"),
        ("Object F1", "instance_f1"),
        ("Objects (pred / true)", None),
    ]
    labels = sorted({k for s in report["slides"] for k in s if k.startswith("dice_label_")})
    rows = []
    for s in report["slides"]:
        row = [_cell(s.get(k)) if k else _example(s) for _, k in columns[:-1]]
        row.append(f"{s.get('instance_n_pred', '-')} / {s.get('instance_n_gt', '-')}")
        rows.append(row + [_cell(s.get(k)) for k in labels])
    header = [c for c, _ in columns] + [_label_header(k, report) for k in labels]
    return _table(header, rows)


def markdown(report: dict) -> str:
    settings = report["settings"]
    n = len(report["slides"])
    primary = settings.get("primary_patch_px")
    lines = [
        f"# Evaluation: {n} slide(s)",
        "",
        f"Predictions `{settings.get('pred_dir')}` against ground truth `{settings.get('gt_dir')}`, "
        f"{settings.get('created')}.",
        "",
        "## By class",
        "",
        class_table(report),
        "",
        f"\\* `patch_dice`: the mean Dice over a fixed grid of {primary}-px tissue patches; patches "
        "where neither mask has a glomerulus are left out. WSI Dice: over the whole slide at full "
        "resolution. KPIs: the challenge's task-2 scoring of the mask as submitted (at 20X); F1 with the "
        "script's in-place contour shift beside it; example pipeline: after the organisers' example "
        "adds its tile vote and 20,000-px removal. Object F1: glomeruli matched at IoU >= 0.5 "
        f"on masks sampled at about {settings.get('instance_um_per_px')} um/px. Means over slides.",
    ]
    labels = sorted({k for s in report["slides"] for k in s if k.startswith("dice_label_")})
    if labels:
        header = ["Class", *(_label_header(k, report) for k in labels), "Mean"]
        rows = [
            [name, *(_cell(fig.get(k)) for k in labels), _cell(fig.get("wsi_dice"))]
            for name, fig in report["summary"].items()
        ]
        lines += ["", "## Per label (whole slide)", "", _table(header, rows)]
    lines += ["", "## Per slide", "", slide_table(report) if n else "No slide was scored."]
    if report["errors"]:
        lines += ["", f"## Errors ({len(report['errors'])})", ""]
        lines += [f"- `{e['slide']}`: {e['error']}" for e in report["errors"]]
    return "\n".join(lines) + "\n"


def task1_markdown(report: dict) -> str:
    """summary.md of a task-1 report: the challenge's patch Dice by class, then every patch."""
    settings = report["settings"]
    rows = [
        [
            name,
            str(fig.get("n_slides", 0)),
            str(fig.get("kpis_n_scored", 0)),
            _cell(fig.get("kpis_task1_dice")),
        ]
        for name, fig in report["summary"].items()
    ]
    lines = [
        f"# KPIs task-1 evaluation: {len(report['slides'])} patch(es)",
        "",
        f"Predictions `{settings.get('pred_dir')}` against patches `{settings.get('gt_dir')}`, "
        f"{settings.get('created')}.",
        "",
        _table(["Class", "Patches", "Scored (mask not empty)", "KPIs task-1 Dice"], rows),
        "",
        "The mean over patches of the Dice of the prediction thresholded at 0.5 against the min-max "
        "scaled mask; patches with an empty mask are left out, as MONAI's DiceMetric does in the "
        "organisers' validator.",
        "",
        "## Per patch",
        "",
        _table(
            ["Patch", "Class", "Case", "Dice"],
            [
                [s["slide"], s.get("class") or "-", s.get("case") or "-", _cell(s.get("kpis_task1_dice"))]
                for s in report["slides"]
            ],
        ),
    ]
    if report["errors"]:
        lines += ["", f"## Errors ({len(report['errors'])})", ""]
        lines += [f"- `{e['slide']}`: {e['error']}" for e in report["errors"]]
    return "\n".join(lines) + "\n"


def plot_dice(slides: list[dict], path: str | Path, plotted=PLOTTED) -> None:
    """Grouped bars of patch, whole-slide and KPIs Dice per slide (or `plotted` keys), grouped by class."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(slides)
    fig, ax = plt.subplots(figsize=(min(40.0, max(6.0, 0.45 * n * len(plotted) / 2 + 2)), 4.5))
    try:
        width = 0.8 / len(plotted)
        x = np.arange(n)
        for i, (key, label) in enumerate(plotted):
            # a slide without a value (no foreground anywhere) gets no bar rather than a false 0
            heights = [s[key] if _is_number(s.get(key)) else np.nan for s in slides]
            ax.bar(x + (i - (len(plotted) - 1) / 2) * width, heights, width, label=label)
        names = [f"{s['slide']}\n{s.get('class') or ''}".strip() for s in slides]
        many = n > 6
        ax.set_xticks(x, names, rotation=60 if many else 0, ha="right" if many else "center")
        ax.set_ylim(0.0, 1.05)
        ax.set_ylabel("Dice")
        ax.set_title(f"Dice per slide ({n} slide{'s' if n != 1 else ''})")
        ax.grid(axis="y", alpha=0.3)
        ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize="small")  # never over a bar
        fig.tight_layout()
        fig.savefig(path, format="png", dpi=100)
    finally:
        plt.close(fig)


def _summary(slides: list[dict]) -> dict:
    keys: list[str] = []
    for s in slides:
        keys += [k for k, v in s.items() if k not in keys and k not in DESCRIPTIVE and _is_number(v)]
    figures: dict = {"n_slides": len(slides)}
    for key in keys:
        values = [s[key] for s in slides if _is_number(s.get(key))]
        if key.startswith(COUNT_PREFIXES):
            figures[key] = int(sum(values))
        else:
            figures[key] = float(np.mean(values)) if values else None
    errors = [abs(s["count_error"]) for s in slides if _is_number(s.get("count_error"))]
    figures["count_abs_error"] = float(np.mean(errors)) if errors else None
    return figures


def _example(figures: dict) -> str:
    return f"{_cell(figures.get('kpis_example_dice'))} / {_cell(figures.get('kpis_example_f1'))}"


def _label_header(key: str, report: dict) -> str:
    label = key.rsplit("_", 1)[1]
    name = (report["settings"].get("class_names") or {}).get(label)
    return f"Dice label {label}" + (f" ({name})" if name else "")


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def _plain(value):
    """JSON-ready: numpy scalars to Python, NaN to None."""
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
