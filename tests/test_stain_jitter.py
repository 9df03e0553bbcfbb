"""Stain jitter against the synthetic renderer's own stain physics, and as a training transform."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from custom.data.stain import RGB_FROM_STAINS, RandStainJitterd, jitter_stains
from custom.synth.layout import build_scene
from custom.synth.render import render_rgb
from custom.synth.scene import Stain

TRAIN_CONFIG = Path(__file__).resolve().parents[1] / "holohisto_bundle" / "configs" / "train.json"


def _render(haematoxylin: float, pas: float) -> torch.Tensor:
    """A 256-px region of a synthetic slide (glomerulus, tubules, nuclei) whose two stains are the
    jitter's haematoxylin and eosin vectors at the given strengths, on white glass."""
    scene = build_scene(7, 4096, 4096, decoys=False)
    basis = RGB_FROM_STAINS.numpy()
    scene.stain = Stain(
        od_h=(basis[0] * haematoxylin).astype(np.float32),
        od_pas=(basis[1] * pas).astype(np.float32),
        glass=np.full(3, 255.0, np.float32),
    )
    scene.cache.clear()
    rgb = render_rgb(scene, 2, 256, 256, 256, 256)
    return torch.from_numpy(rgb).permute(2, 0, 1).float() / 255.0


def test_jitter_turns_a_slide_into_the_same_slide_stained_harder():
    original = _render(1.0, 1.0)
    assert original.std() > 0.1  # real structure, not glass
    for factors, stained in (([1.25, 1.0, 1.0], _render(1.25, 1.0)), ([1.0, 0.8, 1.0], _render(1.0, 0.8))):
        jittered = jitter_stains(original, factors, [0.0, 0.0, 0.0])
        error = (jittered - stained).abs()
        # Only the renderer's 8-bit rounding (<= 1 step per pixel) separates them.
        assert error.max() < 1.5 / 255, (factors, error.max())
        change = (original - stained).abs()
        assert change.max() > 15 / 255 and error.mean() < 0.2 * change.mean(), (error.mean(), change.mean())


def test_jitter_without_change_gives_the_image_back_and_keeps_range():
    image = _render(1.0, 1.0)
    assert torch.allclose(jitter_stains(image, [1, 1, 1], [0, 0, 0]), image, atol=1e-5)
    strong = jitter_stains(image, [1.2, 0.8, 1.2], [0.03, -0.03, 0.03])
    assert strong.min() >= 0 and strong.max() <= 1
    with pytest.raises(ValueError, match="channel-first RGB"):
        jitter_stains(image.permute(1, 2, 0), [1, 1, 1], [0, 0, 0])


def test_random_transform_draws_within_bounds_touches_only_the_image_and_repeats_with_a_seed():
    image, label = _render(1.0, 1.0), torch.zeros(1, 256, 256)
    transform = RandStainJitterd("image", prob=1.0, scale=0.2, shift=0.03)
    transform.set_random_state(5)
    outs = []
    for _ in range(20):
        out = transform({"image": image, "label": label})
        assert out["label"] is label
        assert all(0.8 <= f <= 1.2 for f in transform._factors)
        assert all(-0.03 <= o <= 0.03 for o in transform._offsets)
        outs.append(out["image"])
    assert all((a - image).abs().mean() > 1e-3 for a in outs)
    transform.set_random_state(5)
    assert torch.equal(transform({"image": image})["image"], outs[0])
    never = RandStainJitterd("image", prob=0.0)
    assert never({"image": image})["image"] is image
    with pytest.raises(ValueError, match="scale < 1"):
        RandStainJitterd("image", scale=1.5)


def test_training_preprocessing_jitters_stains_after_scaling_to_unit_range():
    targets = [
        t["_target_"] for t in json.loads(TRAIN_CONFIG.read_text())["train"]["preprocessing"]["transforms"]
    ]
    jitter = targets.index("custom.data.stain.RandStainJitterd")
    assert targets[jitter - 1] == "ScaleIntensityRanged"  # it needs RGB in [0, 1]
