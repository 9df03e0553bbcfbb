"""HoloHisto: end-to-end whole-slide segmentation as a MONAI bundle.

The subpackages follow the flow of data:

    synth/      synthetic kidney slides with exact ground truth (the data the demo and tests read)
    wsi/        read: open slides and masks safely (cuCIM, OpenSlide, tifffile), chosen from the header
    data/       sample: tissue detection, datalists and splits, random and tile patch samplers, scale
    networks/   net: tokenizer, linear-attention ViT, head, presets, baselines
    inference/  stitch: tissue tiles, the network, seam-free stitching, slide-wide cleanup
    outputs/    write: pyramidal mask, GeoJSON, object tables, overlay, KPIs export
    metrics/    measure: patch and whole-slide Dice, the KPIs protocol, object F1, reports, statistics
    view/       review results in a browser (Deep Zoom server and page)

Modules beside them: `cli` (the command line), `bundle` (running the configs), `training` and
`tokenizer_training` (pieces the training configs compose), `checkpoints`, `export`, `demo`, `io`, `errors`.
"""

from __future__ import annotations

import contextlib
import importlib.abc
import importlib.machinery
import os
import sys

__version__ = "0.3.1"


@contextlib.contextmanager
def _native_stderr_silenced():
    """Mute C-level stderr (fd 2) for the duration; Python exceptions still propagate."""
    try:
        saved = os.dup(2)
    except OSError:  # no real fd 2 (embedded interpreters): nothing to silence
        yield
        return
    try:
        sys.stderr.flush()
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


class _QuietNativeImport(importlib.abc.MetaPathFinder):
    """Import MONAI with C-level stderr muted, whenever it is first imported.

    Why: its DICOM support loads nvJPEG/nvTIFF at import and, on every CPU-only machine, prints a dozen "Failed to
    load" lines that are not errors. Done as an import hook so `import custom` stays cheap for
    commands that never touch MONAI.
    """

    NAMES = frozenset({"monai"})

    def find_spec(self, name, path=None, target=None):
        if name not in self.NAMES:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is not None and spec.loader is not None:
            spec.loader = _QuietLoader(spec.loader)
        return spec


class _QuietLoader(importlib.abc.Loader):
    def __init__(self, loader):
        self.loader = loader

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        with _native_stderr_silenced():
            self.loader.exec_module(module)


if not any(isinstance(f, _QuietNativeImport) for f in sys.meta_path):
    sys.meta_path.insert(0, _QuietNativeImport())

from custom.io import reuse_freed_memory  # noqa: E402  (after the import hook, which must come first)

reuse_freed_memory()
