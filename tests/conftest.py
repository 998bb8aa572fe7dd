"""Shared test fixtures: fresh seeds, isolated Triton workers, tier markers, the AOT report."""
from __future__ import annotations

import os
import random

import pytest
import torch

from felix.testing.isolated import IsolatedRunner

# Fresh random inputs every run; the seed is printed so a failure can be replayed with FELIX_TEST_SEED.
SEED = int(os.environ.get("FELIX_TEST_SEED", random.SystemRandom().randrange(2**31)))

_TIER_BY_FILE = {
    "test_codecs_triton.py": "interpreter",
    "test_aot_compile.py": "aot",
    "test_codecs_ggml.py": "llamacpp",
    "test_gpu.py": "gpu",
}

AOT_REPORTS: list[dict] = []


def pytest_report_header(config):
    return f"felix test seed: FELIX_TEST_SEED={SEED}"


def pytest_collection_modifyitems(config, items):
    for item in items:
        tier = _TIER_BY_FILE.get(item.fspath.basename, "reference")
        item.add_marker(getattr(pytest.mark, tier))


@pytest.fixture
def seed(request) -> int:
    """A per-test seed derived from the run's seed and the test id (stable within a run)."""
    return (SEED + hash(request.node.nodeid)) % (2**31)


@pytest.fixture
def gen(seed) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="session")
def interpret():
    """Runs a function in a spawned worker under the Triton interpreter (TRITON_INTERPRET=1)."""
    runner = IsolatedRunner({"TRITON_INTERPRET": "1"})
    yield runner
    runner.close()


@pytest.fixture(scope="session")
def compiled_triton():
    """Runs a function in a spawned worker where Triton compiles for real (for AOT builds)."""
    runner = IsolatedRunner({"TRITON_INTERPRET": None, "TRITON_DEFAULT_FP_FUSION": "0"})
    yield runner
    runner.close()


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if not AOT_REPORTS:
        return
    from felix.aot import ResourceReport, format_reports

    terminalreporter.section("AOT resource report (Triton kernels, no GPU needed)")
    terminalreporter.write_line(format_reports([ResourceReport(**r) for r in AOT_REPORTS]))
