"""Small helpers every stage uses, written once: atomic writes, weights-only loads, state-dict reports, ranks, DDP unwrapping."""

from __future__ import annotations

import contextlib
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
