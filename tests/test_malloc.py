"""`import custom` keeps freed tensor memory for the next pass: the same large blocks stop faulting in again."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# A fresh process (glibc's settings are per process): import custom, then allocate, fill and free a
# 64 MB tensor 16 times, as each forward pass does with its activations, counting the page faults.
PROBE = """
import json, resource, sys
sys.path.insert(0, sys.argv[1])
import custom, torch
from custom.io import reuse_freed_memory
faults = []
for _ in range(16):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.empty(16 * 2**20).fill_(1.0)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"took": reuse_freed_memory(), "faults": faults}))
"""


def _probe(**env) -> dict:
    done = subprocess.run(
        [sys.executable, "-c", PROBE, str(REPO)],
        env=os.environ | env,
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_freed_blocks_are_reused_instead_of_faulted_in_again():
    tuned = _probe(HOLOHISTO_GLIBC_MALLOC="0")
    glibc = _probe(HOLOHISTO_GLIBC_MALLOC="1")
    assert tuned["took"] and not glibc["took"]
    pages = 64 * 2**20 // os.sysconf("SC_PAGE_SIZE")
    # glibc's defaults: every pass faults the whole block in again
    assert all(f > pages // 2 for f in glibc["faults"]), glibc
    # kept: the heap grows by a few blocks (each freed block is a little short of what an aligned
    # allocation asks), until freed neighbours merge; from then on every pass reuses them
    assert sum(tuned["faults"][-6:]) < pages // 10, tuned
    assert sum(tuned["faults"]) < 12 * pages, tuned
