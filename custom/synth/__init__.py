"""Synthetic PAS-stained kidney slides with exact glomerulus ground truth, any size, streamed.

scene.py   geometry fixed by the seed (tissue, stain, orientation fields, glomeruli, decoys)
render.py  any region of any level, straight from the scene
slides.py  pyramidal TIFF slide + mask + JSON sidecar, tile by tile
"""

from __future__ import annotations

from custom.synth.render import render_mask, render_rgb
from custom.synth.scene import Scene, build_scene
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
