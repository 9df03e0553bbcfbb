"""HoloHisto: end-to-end whole-slide segmentation as a MONAI bundle.

The package mirrors the flow of data: `wsi` (read, write), `data` (tissue, samplers, datalists),
`networks`, `metrics`, `synth` (synthetic kidney slides) and `cli` (the command line).
"""

from __future__ import annotations

import contextlib
import os
import sys

__version__ = "0.1.0"


@contextlib.contextmanager
def _native_stderr_silenced():
    """Mute C-level stderr for one import.

    Why: `monai.data` imports nvImageCodec, whose native loader prints a dozen "Failed to load
    nvjpeg" lines on every CPU-only machine; Python-level errors still raise normally.
    """
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


if "monai.data" not in sys.modules:
    with _native_stderr_silenced():
        import monai.data  # noqa: F401
