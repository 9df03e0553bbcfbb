"""Small helpers every stage uses, written once: atomic writes, weights-only loads, state-dict reports, ranks, DDP unwrapping,
and the process's malloc settings."""

from __future__ import annotations

import contextlib
import ctypes
import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it replaces `path`, on any error it is removed.

    Readers (and a crashed run's re-run) therefore only ever see a complete file or none. The
    temporary name is unique per call, so ranks or threads writing the same target never collide.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.partial{path.suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_atomic(path: str | os.PathLike, write: Callable[[Path], object]) -> Path:
    """`atomic_write` for a one-call writer: `write(tmp)` fills the temporary path."""
    with atomic_write(path) as tmp:
        write(tmp)
    return Path(path)


def unwrap(network):
    """The model inside a DistributedDataParallel (or any `.module` wrapper); the network itself otherwise."""
    return getattr(network, "module", network)


def rank_world() -> tuple[int, int]:
    """(rank, world size) of this process: ignite's view of torch.distributed, (0, 1) when not distributed."""
    import ignite.distributed as idist

    return idist.get_rank(), idist.get_world_size()


# glibc's mallopt parameters (malloc.h) and the most either takes (an int)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_KEEP_BYTES = 2**31 - 1
GLIBC_MALLOC_ENV = "HOLOHISTO_GLIBC_MALLOC"  # "1": leave glibc's defaults alone


def reuse_freed_memory() -> bool:
    """Keep freed tensor memory in the process for the next pass instead of handing it back to the OS.

    Why: by default glibc serves every block over its mmap threshold (32 MB at most) from fresh pages
    and unmaps it when freed, so each forward and backward pass faults its activations back in, zeroed:
    2.7 M page faults per 2048-px training step of the tiny net on the CPU, and half the step's time
    (`benchmarks/RESULTS.md`, "Freed memory"). Up to 2 GiB per block now stays in the heap for reuse.
    Called when `custom` is imported. Off glibc, or with HOLOHISTO_GLIBC_MALLOC=1, nothing changes.
    Returns whether both settings took.
    """
    if os.environ.get(GLIBC_MALLOC_ENV) == "1":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the C library this process already runs on
    except (OSError, AttributeError):  # not glibc (macOS, Windows): nothing to tune
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, _KEEP_BYTES)) & bool(mallopt(_M_TRIM_THRESHOLD, _KEEP_BYTES))
