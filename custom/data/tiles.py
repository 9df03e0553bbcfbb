"""Training patches from image tiles: PNG or JPEG image/label pairs, the items MONAI Label trains on.

MONAI Label's bundle trainer sets `train#dataset#data` and `validate#dataset#data` to its datastore's
{"image", "label"} items; for pathology those are 2D tiles a user labelled, not slides. A tile is
taken as it is, already at the resolution the model works at (the level or mpp it trained at), so
its patches are `patch_size` crops, padded with white glass and background where the tile is
smaller. `random_patches` and `fixed_patches` choose these datasets for tiles and the slide samplers
of custom.data.patches for slides, so one train.json serves both.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from monai.data import MetaTensor
from PIL import Image, UnidentifiedImageError

from custom.data.patches import (
    FixedDraws,
    FixedTissuePatchDataset,
    RandomPatchStream,
    RandomTissuePatchDataset,
    draw_settings,
    transformed,
)
from custom.data.scale import guessed_mpp
from custom.errors import ConfigError
from custom.wsi.reader import MASK_PAD_VALUE, SLIDE_PAD_VALUE

TILE_SUFFIXES = (".png", ".jpg", ".jpeg")


def is_tile(path: str | Path) -> bool:
    """A plain image file (PNG/JPEG) rather than a slide."""
    return Path(path).suffix.lower() in TILE_SUFFIXES


def is_scaled_image(item: dict) -> bool:
    """An image item whose pixel size is known (an "mpp" entry, or KPIs task-1 data by its path):
    custom.data.patches resamples those to the training scale, as it reads slides by mpp."""
    return bool(item.get("mpp")) or guessed_mpp(item) is not None


def holds_tiles(data: Sequence[dict]) -> bool:
    """True when every item is a tile taken as it is (an image of unknown scale, as MONAI Label
    sends them), False when none is; a mix is refused."""
    tiles = [is_tile(item["image"]) and not is_scaled_image(item) for item in data]
    if any(tiles) and not all(tiles):
        tile = next(item["image"] for item, t in zip(data, tiles, strict=True) if t)
        slide = next(item["image"] for item, t in zip(data, tiles, strict=True) if not t)
        raise ConfigError(f"{slide}: the datalist mixes slides with image tiles (e.g. {tile}); use one kind")
    return bool(tiles) and all(tiles)


def read_tile(item: dict) -> tuple[np.ndarray, np.ndarray]:
    """The (h, w, 3) uint8 image and (h, w) label of one {"image", "label"} tile item."""
    image = np.asarray(_open(item["image"]).convert("RGB"))
    if not item.get("label"):
        raise ConfigError(f"{item['image']}: a training tile needs a label image")
    label = np.asarray(_open(item["label"]))
    if label.ndim != 2:
        raise ConfigError(
            f"{item['label']}: a label tile must have one channel (0 = background, 1.. = classes), "
            f"found shape {label.shape}"
        )
    if label.shape != image.shape[:2]:
        raise ConfigError(
            f"{item['label']}: label is {label.shape[1]} x {label.shape[0]} px but its image "
            f"{item['image']} is {image.shape[1]} x {image.shape[0]} px"
        )
    return image, label


def _open(path: str | Path) -> Image.Image:
    try:
        return Image.open(path)
    except FileNotFoundError as err:
        raise ConfigError(f"{path}: no such tile") from err
    except (UnidentifiedImageError, OSError) as err:
        raise ConfigError(f"{path}: not a readable image ({err})") from err


def crop_padded(array: np.ndarray, top: int, left: int, size: Sequence[int], pad_value: int) -> np.ndarray:
    """array[top:top + h, left:left + w], filled with pad_value where the window leaves the array."""
    h, w = size
    out = np.full((h, w, *array.shape[2:]), pad_value, dtype=array.dtype)
    y0, x0 = max(top, 0), max(left, 0)
    y1, x1 = min(top + h, array.shape[0]), min(left + w, array.shape[1])
    if y1 > y0 and x1 > x0:
        out[y0 - top : y1 - top, x0 - left : x1 - left] = array[y0:y1, x0:x1]
    return out


class TileCropReader:
    """Reads {"image", "label", "location": [top, left], "size": [h, w]} crops of tiles, as slide patches look."""

    def __init__(self, transform=None, num_classes: int = 2):
        self.transform = transform
        self.num_classes = int(num_classes)

    def read(self, item: dict) -> dict:
        image, label = read_tile(item)
        top, left = item["location"]
        image = crop_padded(image, top, left, item["size"], SLIDE_PAD_VALUE)
        label = crop_padded(label, top, left, item["size"], MASK_PAD_VALUE)
        if self.num_classes == 2:
            label = label > 0
        elif label.max() >= self.num_classes:
            raise ConfigError(
                f"{item['label']}: label value {label.max()} is not one of 0..{self.num_classes - 1}"
            )
        out = {
            "image": MetaTensor(torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))),
            "label": torch.from_numpy(np.ascontiguousarray(label, dtype=np.uint8))[None],
            "class": item.get("class", ""),
        }
        return transformed(self.transform, out)


class RandomTileCropDataset(RandomPatchStream):
    """Random `patch_size` crops of labelled tiles, drawn afresh every epoch.

    A crop lies inside its tile where the tile is large enough; with probability `foreground_ratio`
    it is centred on a labelled pixel (tiles without labels fall back to a uniform crop).
    """

    def __init__(
        self,
        data: Sequence[dict],
        patch_size: int | Sequence[int] = 4096,
        samples_per_epoch: int = 64,
        foreground_ratio: float = 0.0,
        seed: int = 0,
        transform=None,
        num_classes: int = 2,
    ):
        if not data:
            raise ConfigError("the tile sampler got an empty datalist")
        super().__init__(data, samples_per_epoch, seed)
        self.patch_size, self.foreground_ratio = draw_settings(patch_size, foreground_ratio)
        self.reader = TileCropReader(transform, num_classes)

    def read(self, item: dict) -> dict:
        return self.reader.read(item)

    def draw(self, rng: np.random.Generator) -> dict:
        item = self.data[int(rng.integers(len(self.data)))]
        ph, pw = self.patch_size
        labelled = np.empty(0)
        if rng.random() < self.foreground_ratio:
            label = read_tile(item)[1]
            h, w = label.shape
            labelled = np.flatnonzero(label)
        else:
            w, h = _open(item["image"]).size  # the header only; read() checks the pair
        if labelled.size:
            cy, cx = np.unravel_index(labelled[int(rng.integers(labelled.size))], label.shape)
            top = int(np.clip(cy - ph // 2, min(0, h - ph), max(0, h - ph)))
            left = int(np.clip(cx - pw // 2, min(0, w - pw), max(0, w - pw)))
        else:
            top = int(rng.integers(min(0, h - ph), max(0, h - ph) + 1))
            left = int(rng.integers(min(0, w - pw), max(0, w - pw) + 1))
        return {"image": item["image"], "label": item["label"], "location": [top, left], "size": [ph, pw]}


class FixedTileCropDataset(FixedDraws):
    """`count` crops of labelled tiles drawn once (validation): the same crops every epoch.

    The crops are the draws of a RandomTileCropDataset with this `foreground_ratio` and the
    `sampler_settings` given (its patch_size, seed, transform, num_classes).
    """

    def __init__(
        self, data: Sequence[dict], count: int = 16, foreground_ratio: float = 0.5, **sampler_settings
    ):
        if not data:
            raise ConfigError("no validation tiles: give the validation split at least one labelled tile")
        super().__init__(
            RandomTileCropDataset(data, foreground_ratio=foreground_ratio, **sampler_settings), count
        )


# A tile is read as it is, whole and at the model's resolution: the slide samplers' scale and tissue
# settings do not apply to it.
SLIDE_ONLY_SETTINGS = frozenset({"patch_level", "patch_mpp", "tissue"})


def _sampler_for(data: Sequence[dict], for_tiles, for_slides, settings: dict):
    """`for_tiles` when `data` holds tiles (given the settings that apply to tiles), else `for_slides`."""
    if holds_tiles(data):
        return for_tiles(data, **{k: v for k, v in settings.items() if k not in SLIDE_ONLY_SETTINGS})
    return for_slides(data, **settings)


def random_patches(data: Sequence[dict], **settings):
    """The training sampler for `data`: random tile crops for tiles, RandomTissuePatchDataset otherwise.

    `settings` are RandomTissuePatchDataset's (patch_size, patch_level, patch_mpp, samples_per_epoch,
    foreground_ratio, seed, transform, tissue, num_classes); `patch_level`, `patch_mpp` and `tissue`
    do not apply to tiles: a tile is at the model's resolution.
    """
    return _sampler_for(data, RandomTileCropDataset, RandomTissuePatchDataset, settings)


def fixed_patches(data: Sequence[dict], **settings):
    """The validation set for `data`: fixed tile crops for tiles, FixedTissuePatchDataset otherwise.

    `settings` are FixedTissuePatchDataset's (count, foreground_ratio, transform, num_classes and its
    sampler's patch_size, patch_level, patch_mpp, seed, tissue); tiles drop the same ones as in random_patches.
    """
    return _sampler_for(data, FixedTileCropDataset, FixedTissuePatchDataset, settings)
