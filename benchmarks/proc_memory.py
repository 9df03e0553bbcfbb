"""The memory benchmarks' probes of their own process (Linux /proc): resident memory and its peak.

Imported by the scripts beside it, which Python runs with this folder first on sys.path.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from pathlib import Path

KB_PER_MB = 1024


def status_kb(field: str) -> int:
    """A kB field of /proc/self/status, e.g. VmRSS (resident now) or VmHWM (its peak)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def reset_peak() -> None:
    """Set VmHWM to the current VmRSS, so the peak read next is that of what runs from now on."""
    Path("/proc/self/clear_refs").write_text("5")


@contextlib.contextmanager
def measured() -> Iterator[dict[str, float]]:
    """Wall and CPU seconds of the block and its peak resident memory, in a dict filled when it ends.

    Keys: wall_s, cpu_s (all threads, user + system), baseline_mb (resident just before the block),
    peak_mb and peak_above_baseline_mb.
    """
    numbers: dict[str, float] = {}
    baseline_kb = status_kb("VmRSS")
    reset_peak()
    started, cpu0 = time.perf_counter(), os.times()
    yield numbers
    wall_s = time.perf_counter() - started
    cpu1 = os.times()
    peak_kb = status_kb("VmHWM")
    numbers.update(
        wall_s=wall_s,
        cpu_s=(cpu1.user - cpu0.user) + (cpu1.system - cpu0.system),
        baseline_mb=baseline_kb / KB_PER_MB,
        peak_mb=peak_kb / KB_PER_MB,
        peak_above_baseline_mb=(peak_kb - baseline_kb) / KB_PER_MB,
    )
