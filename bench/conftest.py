"""Benchmark fixtures: `pytest bench/` times each case for Felix and its peers in the same run and
writes bench/results/<device>.{json,md,png} (see felix/testing/bench.py).

FELIX_BENCH_QUICK=1 shrinks every case to a smoke-test size; `--benchmark-disable` runs each case
once without timing (how CI checks that the benchmarks still run).
"""

from __future__ import annotations

import os

import pytest
import torch

from felix.testing.bench import BenchRecorder, Measurement, measure_copy_bandwidth, synchronize

RESULTS_DIR = os.environ.get("FELIX_BENCH_RESULTS") or os.path.join(os.path.dirname(__file__), "results")
QUICK = os.environ.get("FELIX_BENCH_QUICK", "0") not in ("", "0")

_RECORDERS: dict[str, BenchRecorder] = {}


def recorder_for(device: torch.device) -> BenchRecorder:
    key = str(device)
    if key not in _RECORDERS:
        _RECORDERS[key] = BenchRecorder(
            device, copy_gbps=measure_copy_bandwidth(device, 64 << 20 if QUICK else 256 << 20)
        )
    return _RECORDERS[key]


@pytest.fixture(scope="session")
def gpu() -> torch.device:
    if not torch.cuda.is_available():
        pytest.skip("no CUDA/ROCm GPU on this machine: GPU benchmark cases need one")
    return torch.device("cuda")


@pytest.fixture
def measure(benchmark):
    """measure(device, case, impl, fn, bytes_moved=..., flops=..., candidate=..., extra=...) times `fn`
    with pytest-benchmark (one case + impl per test) and records it for the report; `extra` holds other
    per-case numbers (e.g. peak memory) that the report shows beside the time: a dict, or a function
    returning one, called after the timing (for numbers the timed runs produce)."""

    def run(device, case, impl, fn, bytes_moved=0.0, flops=0.0, candidate=False, rounds=5, extra=None):
        benchmark.group = case
        benchmark.name = impl
        benchmark.extra_info.update(case=case, impl=impl, bytes_moved=bytes_moved, flops=flops)

        def call():
            fn()
            synchronize(device)

        benchmark.pedantic(call, rounds=1 if QUICK else rounds, warmup_rounds=0 if QUICK else 1, iterations=1)
        if benchmark.stats is None:  # --benchmark-disable: ran once, nothing to record
            return
        recorder_for(device).add(
            Measurement(
                case,
                impl,
                candidate,
                benchmark.stats.stats.median,
                bytes_moved,
                flops,
                extra() if callable(extra) else dict(extra or {}),
            )
        )

    return run


def pytest_sessionfinish(session, exitstatus):
    if QUICK:
        return  # smoke-test sizes say nothing about speed: keep them out of the committed results
    for rec in _RECORDERS.values():
        if rec.measurements:
            path = rec.write(RESULTS_DIR)
            session.config.pluginmanager.get_plugin("terminalreporter").write_line(
                f"benchmark results: {path} (+ .md, .png)\n\n{rec.markdown()}"
            )
