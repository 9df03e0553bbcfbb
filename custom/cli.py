"""`python -m custom VERB ...`: the command line over the same code and configs as the bundle.

Every verb prints its help with `python -m custom VERB --help`. User errors (a missing slide, a
checkpoint that does not match, an unwritable folder) end in one line and exit code 2.
"""

from __future__ import annotations

import sys

import fire

from custom.errors import HoloHistoError


def synth(
    out_dir: str,
    count: int = 1,
    width: int = 8192,
    height: int = 6144,
    seed: int = 0,
    glomerulus_um: tuple[float, float] = (60.0, 250.0),
    decoys: bool = False,
    prefix: str = "synth",
):
    """Write synthetic kidney slides: <id>_wsi.tiff (pyramidal JPEG TIFF, 0.25 um/px) and <id>_mask.tiff.

    Args:
        out_dir: folder to write into (created if missing).
        count: number of slides; slide i uses seed + i.
        width: level-0 width in pixels.
        height: level-0 height in pixels.
        seed: base seed; the same seed gives the same slides.
        glomerulus_um: (min, max) glomerulus diameter in micrometres (mouse ~60-100, human ~150-250).
        decoys: add context decoys: glomerulus-like objects labelled 0 inside a medulla-like region.
        prefix: slide ids are <prefix>_<seed>.
    """
    from custom.synth import write_synthetic_slides

    for result in write_synthetic_slides(
        out_dir,
        count=count,
        width=width,
        height=height,
        seed=seed,
        glomerulus_um=tuple(glomerulus_um),
        decoys=decoys,
        prefix=prefix,
    ):
        print(result.summary())


def main(argv: list[str] | None = None) -> None:
    verbs = {"synth": synth}
    try:
        fire.Fire(verbs, command=argv, name="python -m custom")
    except HoloHistoError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
