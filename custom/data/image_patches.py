"""Training patches from plain image files: KPIs task-1 JPEG patches, NEPTUNE-style PNG ROIs.

An item {"image": x.jpg|png, "label": mask.jpg|png, optional "class", "mpp"} is one small image
(2048 px for KPIs task 1, 3000 px for a NEPTUNE ROI), read whole, so nothing is cached. It is
resized to the patch scale (area averaging for the image, nearest for the labels; the factor comes
from `custom.data.scale`), then a patch is cropped around a centre drawn in advance, so a drawn
sample reads the same pixels every time (fixed validation sets stay fixed).

Labels: two classes follow the task-1 protocol (min-max scaled, foreground at >= 0.5, which
also absorbs JPEG ringing); more classes keep the label values, which must be 0..num_classes-1.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from custom.errors import ConfigError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
GLASS = 255  # padding where a patch sticks out of a small image: white, like a slide's glass


def is_image_item(item: dict) -> bool:
    return Path(str(item["image"])).suffix.lower() in IMAGE_SUFFIXES


def draw_image_patch(
    item: dict, rng: np.random.Generator, patch_size: Sequence[int], scale: float, foreground_ratio: float
) -> dict:
    """A sample of an image item: where the patch centre falls is fixed now, read later."""
    return {
        **item,
        "size": [int(s) for s in patch_size],
        "scale": float(scale),
        "anchor": [float(rng.random()), float(rng.random())],
        "on_label": bool(rng.random() < foreground_ratio),
    }


def read_image_patch(sample: dict, num_classes: int = 2) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """(image (3, h, w) uint8, label (h, w) uint8, [top, left] at the patch scale) of a drawn sample."""
    image, label = load_pair(sample, sample["scale"], num_classes)
    h, w = sample["size"]
    rows, cols = label.shape
    uy, ux = sample["anchor"]
    if sample["on_label"] and label.any():
        ys, xs = np.nonzero(label)
        k = min(int(uy * len(ys)), len(ys) - 1)
        cy, cx = float(ys[k]), float(xs[k])
    else:
        cy, cx = uy * rows, ux * cols
    top = int(np.clip(round(cy - h / 2), 0, max(0, rows - h)))
    left = int(np.clip(round(cx - w / 2), 0, max(0, cols - w)))
    out_image = np.full((h, w, 3), GLASS, np.uint8)
    out_label = np.zeros((h, w), np.uint8)
    crop_image = image[top : top + h, left : left + w]
    out_image[: crop_image.shape[0], : crop_image.shape[1]] = crop_image
    out_label[: crop_image.shape[0], : crop_image.shape[1]] = label[top : top + h, left : left + w]
    return np.ascontiguousarray(out_image.transpose(2, 0, 1)), out_label, [top, left]


def load_pair(item: dict, scale: float, num_classes: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """An image item and its labels, resized by 1 / `scale`."""
    image = _read(item["image"], rgb=True)
    if item.get("label"):
        label = _labels(_read(item["label"], rgb=False), num_classes, item["label"])
        if label.shape != image.shape[:2]:
            raise ConfigError(
                f"{item['label']}: label is {label.shape[0]} x {label.shape[1]} px but its image "
                f"{Path(item['image']).name} is {image.shape[0]} x {image.shape[1]} px"
            )
    else:
        label = np.zeros(image.shape[:2], np.uint8)
    if abs(scale - 1.0) > 1e-6:
        size = (max(1, round(image.shape[1] / scale)), max(1, round(image.shape[0] / scale)))
        # area averaging: what a slide pyramid's coarser level holds; labels must stay labels
        image = cv2.resize(image, size, interpolation=cv2.INTER_AREA)
        label = cv2.resize(label, size, interpolation=cv2.INTER_NEAREST)
    return image, label


def _labels(mask: np.ndarray, num_classes: int, path) -> np.ndarray:
    if num_classes == 2:
        lo, hi = int(mask.min()), int(mask.max())
        if hi == lo:
            return np.zeros(mask.shape, np.uint8)
        return (2 * (mask.astype(np.int32) - lo) >= hi - lo).astype(np.uint8)
    top = int(mask.max())
    if top >= num_classes:
        raise ConfigError(
            f"{path}: holds label {top} but num_classes is {num_classes} (labels 0..{num_classes - 1})"
        )
    return mask.astype(np.uint8)


def _read(path, rgb: bool) -> np.ndarray:
    try:
        with Image.open(path) as image:
            if rgb:
                return np.asarray(image.convert("RGB"))
            array = np.asarray(image)  # palette PNGs keep their indices: those are the labels
    except OSError as err:
        raise ConfigError(f"{path}: not a readable image ({err})") from None
    return array[..., 0] if array.ndim == 3 else array
