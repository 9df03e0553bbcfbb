"""Training patches straight from slides: the random 4K tissue sampler and the fixed-grid tile sampler.

Both yield {"image": (3, h, w) uint8, "label": (1, h, w) uint8} with the label read from the
slide's whole-slide mask at the same physical place and size. Reading is MONAI's
`PatchWSIDataset` (a thin subclass adds the mask read); the random sampler is a MONAI
`IterableDataset` because its supply of patches has no end and no fixed list of locations.
By `patch_mpp`, every slide is read at the level of that physical scale (`custom.data.scale`).
The random and fixed samplers also take image items (KPIs task-1 JPEG patches, PNG ROIs), see
`custom.data.image_patches`. Two classes binarise the labels (> 0); more keep them (0..C-1).
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Sequence

import numpy as np
import torch
from monai.data import Dataset, IterableDataset, MetaTensor, PatchWSIDataset
from monai.transforms import apply_transform
from monai.utils import ensure_tuple_rep

from custom.data.image_patches import draw_image_patch, is_image_item, read_image_patch
from custom.data.scale import level_for_item, resize_factor
from custom.data.tiling import grid_locations
from custom.data.tissue import TissueCache
from custom.errors import ConfigError
from custom.io import rank_world
from custom.wsi.reader import HoloWSIReader, open_mask, open_slide

logger = logging.getLogger(__name__)

# Foreground-oversampling draws centres from a thumbnail of the label mask no larger than this.
LABEL_THUMBNAIL_SIDE_PX = 2048
LEVEL_RTOL = 0.02  # a mask level "matches" a slide level when their downsamples agree this closely


def read_label_region(mask, slide, location: Sequence[int], size: Sequence[int], level: int) -> np.ndarray:
    """The label patch covering the same place as slide.read_region(location, size, level).

    Handles masks whose pyramid (or level-0 size) differs from the slide's: the region is read at
    the matching mask level when there is one, else at the next finer level and reduced by
    nearest-neighbour sampling.
    """
    h, w = int(size[0]), int(size[1])
    sy = mask.level_shapes[0][0] / slide.level_shapes[0][0]
    sx = mask.level_shapes[0][1] / slide.level_shapes[0][1]
    want = slide.downsamples[level] * max(sy, sx)
    loc = (round(location[0] * sy), round(location[1] * sx))
    finer = [i for i, d in enumerate(mask.downsamples) if d <= want * (1 + LEVEL_RTOL)]
    mlevel = finer[-1] if finer else 0
    ratio = want / mask.downsamples[mlevel]
    if abs(ratio - 1) <= LEVEL_RTOL:
        return mask.read_region(loc, (h, w), level=mlevel)
    big = mask.read_region(loc, (math.ceil(h * ratio), math.ceil(w * ratio)), level=mlevel)
    rows = np.minimum((np.arange(h) * ratio).astype(int), big.shape[0] - 1)
    cols = np.minimum((np.arange(w) * ratio).astype(int), big.shape[1] - 1)
    return big[rows][:, cols]


def transformed(transform, sample: dict) -> dict:
    """A read patch through the training transform, if there is one."""
    # `is None`, never truth: bool(Compose) calls len(), which builds a flattened Compose that
    # re-seeds every random transform from the global seed, so every patch drew the same flips,
    # intensity shifts and stains (MONAI 1.6).
    return sample if transform is None else apply_transform(transform, sample)


class LabelledPatchWSIDataset(PatchWSIDataset):
    """MONAI's PatchWSIDataset whose label is the same region of the item's whole-slide mask.

    Items: {"image": slide, "label": mask, "location": [y, x] (level-0 top-left),
    "size": [h, w], "level": L, optional "class"}, or drawn image items. With two classes any
    mask value > 0 is 1; with more the values are the classes and must be below `num_classes`.
    """

    def __init__(self, data, transform=None, num_classes: int = 2, reader=None):
        super().__init__(
            data,
            patch_size=None,
            patch_level=None,
            transform=transform,
            include_label=True,
            center_location=False,
            reader=reader or HoloWSIReader(),
        )
        if int(num_classes) < 2:
            raise ConfigError(f"num_classes must be at least 2 (background + one class), got {num_classes}")
        self.num_classes = int(num_classes)
        self._masks: dict[str, object] = {}

    def read(self, sample: dict) -> dict:
        """Image and label patch of one item, through the transform."""
        if is_image_item(sample):
            image, label, location = read_image_patch(sample, self.num_classes)
            meta = {
                "path": sample["image"],
                "location": location,
                "size": sample["size"],
                "scale": sample["scale"],
            }
            image, label = MetaTensor(torch.from_numpy(image), meta=meta), torch.from_numpy(label)[None]
        else:
            image, metadata = self._get_data(sample)
            image, label = MetaTensor(image, meta=metadata), self._get_label(sample)
        out = {"image": image, "label": label, "class": sample.get("class", "")}
        return transformed(self.transform, out)

    def _transform(self, index: int):
        return self.read(self.data[index])

    def _get_label(self, sample: dict):
        mask_path = sample["label"]
        if mask_path not in self._masks:
            self._masks[mask_path] = open_mask(mask_path)
        slide = self._get_wsi_object(sample)
        region = read_label_region(
            self._masks[mask_path], slide, sample["location"], self._get_size(sample), self._get_level(sample)
        )
        if self.num_classes == 2:
            region = region > 0
        elif region.size and int(region.max()) >= self.num_classes:
            raise ConfigError(
                f"{mask_path}: holds label {int(region.max())} but num_classes is {self.num_classes} "
                f"(labels 0..{self.num_classes - 1})"
            )
        return torch.from_numpy(np.ascontiguousarray(region, dtype=np.uint8))[None]


class RandomPatchStream(IterableDataset):
    """An endless supply of random patches: `samples_per_epoch` per epoch over all ranks, drawn afresh every epoch.

    Subclasses say where a patch comes from (`draw(rng)`: an item with its location) and how it is read
    (`read(item)`); the stream gives every rank and DataLoader worker its own reproducible generator.
    """

    def __init__(self, data: Sequence[dict], samples_per_epoch: int = 64, seed: int = 0):
        super().__init__(data=list(data), transform=None)
        self.samples_per_epoch = int(samples_per_epoch)
        self.seed = int(seed)
        self._rng: np.random.Generator | None = None

    def draw(self, rng: np.random.Generator) -> dict:
        raise NotImplementedError

    def read(self, item: dict) -> dict:
        raise NotImplementedError

    def __len__(self) -> int:
        return self.samples_per_epoch // rank_world()[1]

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        workers, worker = (info.num_workers, info.id) if info else (1, 0)
        share = len(self)
        count = share // workers + (1 if worker < share % workers else 0)
        rng = self._stream(info)
        for _ in range(count):
            yield self.read(self.draw(rng))

    def fixed_items(self, count: int, seed: int | None = None) -> list[dict]:
        """`count` locations drawn once (e.g. a validation set that stays the same all run)."""
        rng = np.random.default_rng([self.seed if seed is None else seed, 7919])
        return [self.draw(rng) for _ in range(count)]

    def _stream(self, info) -> np.random.Generator:
        rank = rank_world()[0]
        if info is None:
            # main process: one generator for the whole run, so every epoch draws new patches
            if self._rng is None:
                self._rng = np.random.default_rng([self.seed, rank])
            return self._rng
        # a worker's torch seed is base_seed + worker id, with a new base_seed for every epoch's
        # workers (drawn from the main process's seeded torch RNG): fresh yet reproducible streams
        return np.random.default_rng([self.seed, rank, info.id, torch.initial_seed() % 2**63])


class FixedDraws(Dataset):
    """`count` draws of a random sampler made once (a validation set): the same patches every epoch.

    They are read by the sampler's own reader; the sampler itself, with its open slides, is not kept.
    """

    def __init__(self, sampler: RandomPatchStream, count: int):
        super().__init__(sampler.fixed_items(count))
        self.reader = sampler.reader

    def _transform(self, index: int):
        return self.reader.read(self.data[index])


def draw_settings(patch_size: int | Sequence[int], foreground_ratio: float) -> tuple[tuple[int, ...], float]:
    """A random sampler's patch (h, w) and its foreground_ratio, which must be a fraction."""
    if not 0.0 <= foreground_ratio <= 1.0:
        raise ConfigError(f"foreground_ratio must be in [0, 1], got {foreground_ratio}")
    return tuple(int(s) for s in ensure_tuple_rep(patch_size, 2)), float(foreground_ratio)


class RandomTissuePatchDataset(RandomPatchStream):
    """An endless supply of patches centred uniformly on tissue, drawn afresh every epoch.

    Args:
        data: items {"image": slide, "label": mask, optional "class"}.
        patch_size: (h, w) at the read level; 4096 x 4096 by default.
        patch_level / patch_mpp: the level to read, or the mpp to pick it by (mpp wins when both are set).
        samples_per_epoch: patches per epoch over all ranks; `len()` is this rank's share.
        backend: "auto" (per file, see custom.wsi.reader) or a slide backend forced for every slide.
        foreground_ratio: fraction of patches centred on a labelled pixel instead of on tissue.
        seed: the same seed gives the same patches; streams differ per rank and per worker.
        tissue: a `TissueCache` (or its settings as a dict).
        num_classes: 2 binarises the labels; more keeps label values 0..num_classes-1.
    """

    def __init__(
        self,
        data: Sequence[dict],
        patch_size: int | Sequence[int] = 4096,
        patch_level: int | None = None,
        patch_mpp: float | None = None,
        samples_per_epoch: int = 64,
        foreground_ratio: float = 0.0,
        seed: int = 0,
        transform=None,
        tissue: TissueCache | dict | None = None,
        num_classes: int = 2,
        backend: str = "auto",
    ):
        if not data:
            raise ConfigError("the random patch sampler got an empty datalist")
        super().__init__(data, samples_per_epoch, seed)
        self.patch_size, self.foreground_ratio = draw_settings(patch_size, foreground_ratio)
        _check_scale(patch_level, patch_mpp)
        self.patch_level, self.patch_mpp = patch_level, patch_mpp
        self.tissue = tissue_cache(tissue)
        self.backend = backend
        self.reader = LabelledPatchWSIDataset(
            [], transform=transform, num_classes=num_classes, reader=HoloWSIReader(slide_backend=backend)
        )
        self._slides: dict[str, tuple] = {}
        self._lock = threading.Lock()

    def read(self, item: dict) -> dict:
        return self.reader.read(item)

    def draw(self, rng: np.random.Generator) -> dict:
        """One patch location: a slide, then a centre on its tissue (or on its labels)."""
        item = self.data[int(rng.integers(len(self.data)))]
        if is_image_item(item):
            scale = resize_factor(item, self.patch_level, self.patch_mpp)
            return draw_image_patch(item, rng, self.patch_size, scale, self.foreground_ratio)
        slide, level, tissue, labelled = self._slide_info(item)
        ds = slide.downsamples[level]
        if labelled is not None and rng.random() < self.foreground_ratio:
            corners, cell = labelled
            cy, cx = corners[int(rng.integers(len(corners)))] + rng.random(2) * cell
        else:
            cy, cx = tissue.sample_centres(rng, 1)[0]
        top = int(cy - self.patch_size[0] * ds / 2)
        left = int(cx - self.patch_size[1] * ds / 2)
        return {**item, "location": [top, left], "size": list(self.patch_size), "level": level}

    def _slide_info(self, item: dict):
        key = item["image"]
        with self._lock:
            if key not in self._slides:
                slide = open_slide(key, self.backend)
                level = level_for_item(slide, item, self.patch_level, self.patch_mpp)
                tissue = self.tissue.get(slide)
                if tissue.empty:
                    raise ConfigError(f"{key}: no tissue found, so no training patches can be drawn from it")
                labelled = None
                if self.foreground_ratio > 0 and item.get("label"):
                    labelled = _labelled_cells(item["label"], slide)
                self._slides[key] = (slide, level, tissue, labelled)
            return self._slides[key]


def _labelled_cells(mask_path: str, slide) -> tuple[np.ndarray, np.ndarray] | None:
    """Level-0 (y, x) corners of the labelled pixels of a small mask thumbnail, and the cell size.

    None when the mask has no label at all (foreground oversampling then falls back to tissue).
    """
    mask = open_mask(mask_path)
    level = len(mask.level_shapes) - 1
    for i, (h, w) in enumerate(mask.level_shapes):
        if max(h, w) <= LABEL_THUMBNAIL_SIDE_PX:
            level = i
            break
    thumb = mask.read_level(level) > 0
    cell = np.array([slide.level_shapes[0][0] / thumb.shape[0], slide.level_shapes[0][1] / thumb.shape[1]])
    ys, xs = np.nonzero(thumb)
    if ys.size == 0:
        return None
    return np.stack([ys, xs], axis=1) * cell, cell


class TilePatchDataset(LabelledPatchWSIDataset):
    """The fixed-grid sampler: every patch-sized tile that holds tissue, cut once per slide.

    The paper's "tile" arm of the random-vs-tile ablation. A tile is kept when at least
    `min_tissue_fraction` of it is tissue.
    """

    def __init__(
        self,
        data: Sequence[dict],
        patch_size: int | Sequence[int] = 4096,
        patch_level: int | None = None,
        patch_mpp: float | None = None,
        overlap: int = 0,
        min_tissue_fraction: float = 0.05,
        transform=None,
        tissue: TissueCache | dict | None = None,
        num_classes: int = 2,
    ):
        _check_scale(patch_level, patch_mpp)
        size = tuple(int(s) for s in ensure_tuple_rep(patch_size, 2))
        cache = tissue_cache(tissue)
        items = []
        for item in data:
            if is_image_item(item):
                raise ConfigError(
                    f"{item['image']}: the tile sampler cuts slides; train image patches by the random sampler"
                )
            slide = open_slide(item["image"])
            level = level_for_item(slide, item, patch_level, patch_mpp)
            tissue_mask = cache.get(slide)
            ds = slide.downsamples[level]
            size0 = (round(size[0] * ds), round(size[1] * ds))
            for y, x in grid_locations(slide.level_shapes[level], size, overlap):
                loc0 = (round(y * ds), round(x * ds))
                if tissue_mask.box_fraction(loc0, size0) >= min_tissue_fraction:
                    items.append({**item, "location": list(loc0), "size": list(size), "level": level})
        if not items:
            raise ConfigError("the tile sampler found no tile with enough tissue in any slide")
        super().__init__(items, transform=transform, num_classes=num_classes)


def tissue_cache(tissue: TissueCache | dict | None) -> TissueCache:
    """The samplers' `tissue` argument as a TissueCache: one given as is, else one built from its settings."""
    return tissue if isinstance(tissue, TissueCache) else TissueCache(**(tissue or {}))


def _check_scale(level, mpp) -> None:
    if level is not None and mpp is not None:
        # inference resolves the recorded pair the same way (mpp first), so training must too
        logger.warning("patch_level %s is ignored: patches are read at patch_mpp %s um/px", level, mpp)


class FixedTissuePatchDataset(FixedDraws):
    """A fixed set of patches drawn once from slides (validation): the same patches every epoch.

    `data` is a list of slides ({"image", "label"}), as MONAI Label sets `validate#dataset#data`.
    The `count` patches are the draws of a RandomTissuePatchDataset with this `foreground_ratio` and
    the `sampler_settings` given (its patch_size, patch_level, patch_mpp, seed, tissue, transform,
    num_classes).
    """

    def __init__(
        self, data: Sequence[dict], count: int = 16, foreground_ratio: float = 0.5, **sampler_settings
    ):
        if not data:
            raise ConfigError(
                "no validation slides: use at least two slides, or set a datalist with validation items"
            )
        sampler = RandomTissuePatchDataset(data, foreground_ratio=foreground_ratio, **sampler_settings)
        super().__init__(sampler, count)
