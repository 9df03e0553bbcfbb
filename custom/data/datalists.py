"""Datalists: which slides (and masks) a run uses, from a JSON file or a KPIs-layout folder.

An item is a MONAI-style dict {"image": slide path, "label": mask path, "class": optional name}.
Splits are made by slide (or by case for patch data), never by patch, so no tissue leaks
from training into validation.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from pathlib import Path

import numpy as np
from monai.data import partition_dataset_classes

from custom.errors import ConfigError

KPIS_CLASSES = ("56Nx", "DN", "NEP25", "normal")
# The data's folders spell the first class 56Nx; the organisers' README layouts spell it 56NX.
CLASS_SPELLINGS = {"56NX": "56Nx"}
TASK1_IMAGE_GLOB = "img/*_img.jpg"
WSI_SUFFIX = "_wsi"
MASK_SUFFIX = "_mask"
SLIDE_EXTENSIONS = (".tiff", ".tif", ".svs", ".ndpi", ".mrxs", ".scn", ".dcm")


def slide_id(path: str | Path) -> str:
    """`<id>` of `<id>_wsi.tiff` (KPIs naming); otherwise the file name without its extension."""
    stem = _stem(Path(path))
    return stem[: -len(WSI_SUFFIX)] if stem.endswith(WSI_SUFFIX) else stem


def natural_key(text: str) -> list:
    """Sort key that puts slide_9 before slide_10."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", text)]


def load_datalist(path: str | Path, key: str | None = None, require_labels: bool = True) -> list[dict]:
    """Items from a JSON datalist: a list of items, or a dict of lists (pick one with `key`).

    Relative paths are resolved against the JSON file's folder, so a datalist travels with its data.
    Not MONAI's `load_decathlon_datalist`: it needs a named key of dict items; KPIs lists are often bare.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: datalist not found")
    try:
        content = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"{path}: not valid JSON ({err})") from err
    if isinstance(content, dict):
        if key is None:
            lists = [v for v in content.values() if isinstance(v, list)]
            items = [item for lst in lists for item in lst]
        elif key in content:
            items = content[key]
        else:
            raise ConfigError(f"{path}: has no list named {key!r} (it has {sorted(content)})")
    else:
        items = content
    resolved = []
    for i, item in enumerate(items):
        if isinstance(item, str):
            item = {"image": item}
        if not isinstance(item, dict) or "image" not in item:
            raise ConfigError(f"{path}: item {i} has no 'image' entry: {item!r}")
        item = dict(item)
        for field in ("image", "label"):
            if item.get(field):
                item[field] = str((path.parent / item[field]).resolve())
        resolved.append(item)
    return _checked(resolved, str(path), require_labels)


def discover_kpis_slides(root: str | Path, require_labels: bool = True) -> list[dict]:
    """Whole-slide items of a KPIs task-2 folder: `<class>/<id>_wsi.tiff` with `<id>_mask.tiff`.

    Masks are looked up anywhere under `root` by id, so both "mask beside slide" and separate
    mask folders work. The class is the nearest parent folder named like a KPIs class.
    """
    root = Path(root)
    if not root.is_dir():
        raise ConfigError(f"{root}: dataset folder not found")
    masks = {}
    for mask in sorted(root.rglob(f"*{MASK_SUFFIX}.tif*")):
        masks.setdefault(_stem(mask)[: -len(MASK_SUFFIX)], mask)
    items = []
    for image in sorted(root.rglob(f"*{WSI_SUFFIX}.*")):
        if image.suffix.lower() not in SLIDE_EXTENSIONS:
            continue
        items.append(_kpis_item(image, masks.get(slide_id(image)), image, root))
    if not items:
        raise ConfigError(f"{root}: no slides named <id>{WSI_SUFFIX}.tiff found (KPIs task-2 layout)")
    return _checked(items, str(root), require_labels)


def discover_kpis_patches(root: str | Path) -> list[dict]:
    """Patch items of a KPIs task-1 folder: `<class>/<case>/img/*_img.jpg` with `mask/*_mask.jpg`."""
    root = Path(root)
    if not root.is_dir():
        raise ConfigError(f"{root}: dataset folder not found")
    items = []
    for image in sorted(root.rglob(TASK1_IMAGE_GLOB)):
        mask = image.parent.parent / "mask" / image.name.replace("_img.jpg", "_mask.jpg")
        case_dir = image.parent.parent
        items.append(_kpis_item(image, mask if mask.is_file() else None, case_dir, root, case=case_dir.name))
    if not items:
        raise ConfigError(f"{root}: no <class>/<case>/img/*_img.jpg patches found (KPIs task-1 layout)")
    return _checked(items, str(root), require_labels=True)


def load_items(dataset_dir: str | None = None, datalist: str | None = None, require_labels: bool = True):
    """The config's entry point: a JSON datalist if given, else a KPIs-layout folder (task-2 slides,
    or task-1 patches when the folder holds no slide)."""
    if datalist:
        return load_datalist(datalist, require_labels=require_labels)
    if dataset_dir:
        if is_patch_folder(dataset_dir) and not any(Path(dataset_dir).rglob(f"*{WSI_SUFFIX}.*")):
            return discover_kpis_patches(dataset_dir)
        return discover_kpis_slides(dataset_dir, require_labels=require_labels)
    raise ConfigError("no data: pass dataset_dir (a KPIs-layout folder) or datalist (a JSON file)")


def split_by_slide(items: list[dict], val_fraction: float = 0.2, seed: int = 0) -> dict[str, list[dict]]:
    """Split into {"training", "validation"} by slide (or by "case" for patch items).

    Each class is split on its own in proportion (MONAI's `partition_dataset_classes`); at least one
    slide goes to validation whenever there are two or more slides overall.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ConfigError(f"val_fraction must be in [0, 1), got {val_fraction}")
    groups: dict[str, list[dict]] = defaultdict(list)
    for item in items:
        groups[item.get("case") or item["image"]].append(item)
    keys = sorted(groups)
    names = sorted({groups[k][0].get("class", "") for k in keys})
    classes = [names.index(groups[k][0].get("class", "")) for k in keys]
    val_keys: set[str] = set()
    if val_fraction > 0:
        _, val = partition_dataset_classes(
            keys, classes, ratios=[1 - val_fraction, val_fraction], shuffle=True, seed=seed
        )
        val_keys = set(val)
        if not val_keys and len(keys) > 1:  # MONAI rounds a small class to nothing: keep one slide out anyway
            val_keys.add(keys[int(np.random.default_rng(seed).integers(len(keys)))])
    split = {"training": [], "validation": []}
    for key in keys:
        split["validation" if key in val_keys else "training"].extend(groups[key])
    return split


def _checked(items: list[dict], source: str, require_labels: bool) -> list[dict]:
    missing = [item["image"] for item in items if not Path(item["image"]).exists()]
    missing += [item["label"] for item in items if item.get("label") and not Path(item["label"]).exists()]
    if missing:
        raise ConfigError(f"{source}: {len(missing)} listed file(s) do not exist, first: {missing[0]}")
    if require_labels:
        unlabelled = [item["image"] for item in items if not item.get("label")]
        if unlabelled:
            raise ConfigError(
                f"{source}: {len(unlabelled)} slide(s) have no mask (<id>{MASK_SUFFIX}.tiff), first: {unlabelled[0]}"
            )
    return items


def is_patch_folder(root: str | Path) -> bool:
    """Whether a folder holds KPIs task-1 patches (<class>/<case>/img/*_img.jpg)."""
    return Path(root).is_dir() and next(Path(root).rglob(TASK1_IMAGE_GLOB), None) is not None


def kpis_class(name: str) -> str | None:
    """The KPIs class a folder name stands for, in the data's spelling (56NX and 56Nx are one class)."""
    name = CLASS_SPELLINGS.get(name, name)
    return name if name in KPIS_CLASSES else None


def _kpis_item(image: Path, mask: Path | None, class_path: Path, root: Path, **extra: str) -> dict:
    """A discovered image's item: its mask if it has one, the class of the folder `class_path` is in."""
    item = {"image": str(image.resolve()), **extra}
    if mask is not None:
        item["label"] = str(mask.resolve())
    cls = _kpis_class(class_path, root)
    if cls is not None:
        item["class"] = cls
    return item


def _kpis_class(path: Path, root: Path) -> str | None:
    for parent in [path, *path.parents]:
        if kpis_class(parent.name):
            return kpis_class(parent.name)
        if parent == root:
            break
    return None


def _stem(path: Path) -> str:
    """File name without its extension; a DICOM folder keeps its name."""
    name = path.name
    for ext in (".ome.tiff", ".ome.tif", *SLIDE_EXTENSIONS, ".jpg", ".png"):
        if name.lower().endswith(ext):
            return name[: -len(ext)]
    return path.stem
