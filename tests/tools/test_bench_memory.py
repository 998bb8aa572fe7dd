"""The benchmark recorder's CPU peak-memory figure (felix.testing.bench.peak_rss_growth_bytes): non-zero, grows
with the allocation, and right in a child process spawned by a large parent (where getrusage's ru_maxrss, which
Linux carries over fork+exec, read 0)."""

from __future__ import annotations

import json
import mmap
import subprocess
import sys

import numpy as np
import pytest

import felix.testing.rss
from felix.testing.bench import peak_rss_bytes, peak_rss_growth_bytes, rss_bytes

MIB = 2**20

_CHILD = r"""
import importlib.util, json, sys, numpy as np
spec = importlib.util.spec_from_file_location("rss", sys.argv[1])  # the module alone: no torch import in the child
rss = importlib.util.module_from_spec(spec); spec.loader.exec_module(rss)
peak_rss_growth_bytes = rss.peak_rss_growth_bytes
out = {}
for mib in (16, 64):
    out[mib] = peak_rss_growth_bytes(lambda: np.ones(mib * 2**20 // 8).sum())
print(json.dumps(out))
"""

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")


def touch_fresh_pages(nbytes: int) -> None:
    """Map `nbytes` of anonymous memory straight from the kernel (not malloc, whose arenas may already be
    resident), write every page, unmap."""
    with mmap.mmap(-1, nbytes) as m:
        for offset in range(0, nbytes, mmap.PAGESIZE):
            m[offset] = 1


def test_peak_rss_growth_tracks_an_allocation():
    small = peak_rss_growth_bytes(lambda: touch_fresh_pages(8 * MIB))
    big = peak_rss_growth_bytes(lambda: touch_fresh_pages(48 * MIB))
    # the peak rises by the pages touched (interpreter noise stays far below a MiB)
    assert 7 * MIB < small < 10 * MIB
    assert 47 * MIB < big < 50 * MIB
    assert peak_rss_bytes() >= rss_bytes() > 0


def test_child_of_a_large_process_reads_its_own_growth():
    ballast = np.ones(160 * MIB // 8)  # the parent's resident set is now larger than anything the child allocates
    ballast.sum()
    out = subprocess.run(
        [sys.executable, "-c", _CHILD, felix.testing.rss.__file__], capture_output=True, text=True, check=True
    )
    growth = {int(k): v for k, v in json.loads(out.stdout.strip().splitlines()[-1]).items()}
    assert 14 * MIB < growth[16] < 32 * MIB
    assert 60 * MIB < growth[64] < 80 * MIB
    del ballast
