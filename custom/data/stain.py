"""Stain augmentation for training patches: random stain strengths in optical density (HED jitter).

Slides differ in how strongly each stain took, and the nets here are colour-sensitive: checkpoints
that found almost no glomeruli on held-out synthetic slides found them on the same slides
re-rendered in a training slide's stain (`synth --stain_seed`, benchmarks/RESULTS.md). Scaling
intensities per RGB channel, as MONAI's RandScaleIntensityd does, cannot mimic a stain that took
harder: that multiplies optical density, and only in the pixels that hold the stain. So each patch
is separated into stain concentrations with a fixed matrix, each concentration is scaled and
shifted at random, and the patch is put back together (Tellez et al., 2018). MONAI has stain
normalisation (Macenko) but no stain augmentation.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform, RandomizableTransform
from skimage.color.colorconv import hed_from_rgb, rgb_from_hed

# Haematoxylin, eosin and DAB (Ruifrok & Johnston), as scikit-image holds them. Any fixed, invertible
# stain basis gives a valid jitter; PAS's magenta lies close to eosin's, so H&E's basis suits PAS too.
RGB_FROM_STAINS = torch.from_numpy(np.asarray(rgb_from_hed, np.float32))
STAINS_FROM_RGB = torch.from_numpy(np.asarray(hed_from_rgb, np.float32))
_DARKEST = 1.0 / 255.0  # one 8-bit step: keeps log() finite in black pixels


def jitter_stains(image: torch.Tensor, scale: Sequence[float], shift: Sequence[float]) -> torch.Tensor:
    """A channel-first RGB image in [0, 1] with each stain's concentration c -> c * scale + shift."""
    if image.ndim < 3 or image.shape[0] != 3:
        raise ValueError(f"stain jitter needs a channel-first RGB image, got shape {tuple(image.shape)}")
    density = -torch.log(image.clamp(_DARKEST, 1.0))
    stains = torch.einsum("c...,cs->s...", density, STAINS_FROM_RGB.to(image.device, density.dtype))
    view = (3,) + (1,) * (image.ndim - 1)
    stains = stains * image.new_tensor(scale).view(view) + image.new_tensor(shift).view(view)
    density = torch.einsum("s...,sc->c...", stains, RGB_FROM_STAINS.to(image.device, density.dtype))
    return torch.exp(-density).clamp(0.0, 1.0)


class RandStainJitterd(RandomizableTransform, MapTransform):
    """With probability `prob`, draw per stain a factor in 1 +- `scale` and an offset in +- `shift`
    (optical density units) and apply them to every key (RGB in [0, 1], channel first)."""

    def __init__(
        self,
        keys: KeysCollection,
        prob: float = 0.5,
        scale: float = 0.2,
        shift: float = 0.03,
        allow_missing_keys: bool = False,
    ) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        RandomizableTransform.__init__(self, prob)
        if not 0.0 <= scale < 1.0 or shift < 0.0:
            raise ValueError(f"stain jitter needs 0 <= scale < 1 and shift >= 0, got {scale}, {shift}")
        self.scale, self.shift = scale, shift
        self._factors, self._offsets = [1.0] * 3, [0.0] * 3

    def randomize(self, data=None) -> None:
        super().randomize(None)
        self._factors = self.R.uniform(1.0 - self.scale, 1.0 + self.scale, 3).tolist()
        self._offsets = self.R.uniform(-self.shift, self.shift, 3).tolist()

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        self.randomize()
        if not self._do_transform:
            return d
        for key in self.key_iterator(d):
            d[key] = jitter_stains(d[key], self._factors, self._offsets)
        return d
