"""One atomic write for every output: the file appears at its final path only once complete."""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable
from pathlib import Path


def write_atomic(path: str | Path, write: Callable[[Path], object]) -> Path:
    """Call `write(tmp)` on a hidden name beside `path`, then rename it over `path`.

    The temporary name is unique per call, so concurrent writers (ranks, threads) never share one;
    on any failure the partial file is removed and the error goes on.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.partial")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path
