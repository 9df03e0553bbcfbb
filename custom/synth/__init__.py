"""Synthetic PAS-stained kidney slides with exact glomerulus ground truth, any size, streamed.

scene.py   the geometry one seed fixes (tissue, stain, orientation fields, objects) and its index
layout.py  building that scene: stain, fields, and where the glomeruli and decoys go
render.py  any region of any level, straight from the scene
slides.py  pyramidal TIFF slide + mask + JSON sidecar, tile by tile
"""

from __future__ import annotations

from custom.synth.layout import build_scene
from custom.synth.render import render_mask, render_rgb
from custom.synth.scene import Scene
from custom.synth.slides import SlideResult, write_synthetic_slide, write_synthetic_slides

__all__ = [
    "Scene",
    "SlideResult",
    "build_scene",
    "render_mask",
    "render_rgb",
    "write_synthetic_slide",
    "write_synthetic_slides",
]
