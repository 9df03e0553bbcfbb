"""A thumbnail of the slide with the predicted outlines drawn on it: a first look before a viewer."""

from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

OUTLINE_RGB = (0, 230, 0)
OUTLINE_PX = 2


def draw_outlines(thumbnail: np.ndarray, labels: np.ndarray, colour=OUTLINE_RGB, thickness=OUTLINE_PX):
    """Copy of an (h, w, 3) uint8 thumbnail with the outlines of `labels` > 0 drawn on it.

    `labels` is resized (nearest) to the thumbnail when their sizes differ.
    """
    if labels.shape != thumbnail.shape[:2]:
        labels = cv2.resize(labels.astype(np.uint8), thumbnail.shape[1::-1], interpolation=cv2.INTER_NEAREST)
    canvas = np.ascontiguousarray(thumbnail[..., :3]).copy()
    contours, _ = cv2.findContours((labels > 0).astype(np.uint8), cv2.RETR_LIST, cv2.CHAIN_APPROX_SIMPLE)
    cv2.drawContours(canvas, contours, -1, colour, thickness)
    return canvas


def write_overlay(path: str | Path, thumbnail: np.ndarray, labels: np.ndarray) -> Path:
    """Draw outlines and save a PNG atomically (temporary name, then rename)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp.png")
    Image.fromarray(draw_outlines(thumbnail, labels)).save(tmp)
    os.replace(tmp, path)
    return path
