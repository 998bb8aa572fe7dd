"""Resident memory of this process, for the benchmark recorder's CPU peak-memory figures (felix.testing.bench).

Standard library only, so a measuring child process can load it without torch."""

from __future__ import annotations

import resource
import sys


def _proc_status_kib(field_name: str) -> int | None:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def rss_bytes() -> int:
    """This process's resident set now (Linux VmRSS; elsewhere the peak, the best available)."""
    kib = _proc_status_kib("VmRSS")
    return kib * 1024 if kib is not None else peak_rss_bytes()


def peak_rss_bytes() -> int:
    """This process's peak resident set. On Linux VmHWM, the high-water mark of this process's own memory map.
    Not getrusage's ru_maxrss: Linux carries that over execve from the process that forked it, so a benchmark
    child spawned by a large pytest process starts with the parent's peak and reads a growth of 0 (why the
    fused-loss rows read ``peak_rss_mib 0`` when the whole bench suite ran before them)."""
    kib = _proc_status_kib("VmHWM")
    if kib is not None:
        return kib * 1024
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # macOS reports bytes, Linux KiB


def reset_peak_rss() -> bool:
    """Reset this process's peak resident set to its current one (Linux: "5" to /proc/self/clear_refs); False
    where that is not possible (the peak then includes what came before)."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def peak_rss_growth_bytes(fn) -> int:
    """How far the resident set peaks above where it stood when `fn()` is called (bytes)."""
    reset = reset_peak_rss()
    before = rss_bytes() if reset else peak_rss_bytes()
    fn()
    return max(0, peak_rss_bytes() - before)
