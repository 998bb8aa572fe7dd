"""Shared test fixtures: fresh seeds, isolated Triton workers, tier markers, the AOT report."""

from __future__ import annotations

import os
import random
import zlib

import pytest
import torch

from felix.testing.isolated import IsolatedRunner

# Deterministic by default (CI): every test's random inputs derive from one fixed seed, and hypothesis is
# derandomized. Exploring: FELIX_TEST_SEED=random draws a fresh seed (printed in the header) and lets hypothesis
# search freely; FELIX_TEST_SEED=<n> replays a run.
DEFAULT_SEED = 20261205
_SEED_ENV = os.environ.get("FELIX_TEST_SEED", "").strip().lower()
EXPLORING = _SEED_ENV == "random"
SEED = random.SystemRandom().randrange(2**31) if EXPLORING else int(_SEED_ENV or DEFAULT_SEED)

try:
    from hypothesis import settings as _hypothesis_settings

    _hypothesis_settings.register_profile("felix-ci", derandomize=True, print_blob=True)
    _hypothesis_settings.register_profile("felix-explore", derandomize=False, print_blob=True)
    _hypothesis_settings.load_profile("felix-explore" if EXPLORING else "felix-ci")
except ImportError:  # hypothesis comes with `setup.sh --test`; the property tests import it themselves
    pass


# Test tiers follow file names, so a new op's tests land in the right tier by naming alone:
# test_<op>_triton.py -> interpreter, test_aot*.py -> aot, test_<op>_ggml.py / test_*llamacpp*.py ->
# llamacpp, test_gpu*.py -> gpu; everything else is the reference tier (pure torch / C++).
def tier_of(filename: str) -> str:
    stem = filename.removesuffix(".py")
    if stem.startswith("test_gpu"):
        return "gpu"
    if stem.startswith("test_aot"):
        return "aot"
    if stem.endswith("_triton"):
        return "interpreter"
    if stem.endswith("_ggml") or "llamacpp" in stem:
        return "llamacpp"
    return "reference"


AOT_REPORTS: list[dict] = []
HIP_REPORTS: list[str] = []  # csrc/hip compile checks: register tables (tests/ops/test_hip_compile.py)


def pytest_report_header(config):
    mode = "random (exploring; hypothesis randomized)" if EXPLORING else "fixed (hypothesis derandomized)"
    return f"felix test seed: FELIX_TEST_SEED={SEED} [{mode}]"


def pytest_collection_modifyitems(config, items):
    for item in items:
        tier = tier_of(item.fspath.basename)
        item.add_marker(getattr(pytest.mark, tier))


@pytest.fixture
def seed(request) -> int:
    """A per-test seed derived from the run's seed and the test id. crc32, not hash(): str hashes are salted
    per process, so hash() would not replay a failure under the same FELIX_TEST_SEED."""
    return (SEED + zlib.crc32(request.node.nodeid.encode())) % (2**31)


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
    if HIP_REPORTS:
        terminalreporter.section("csrc/hip resource report (hipcc gfx1101, nvcc sm_90; no GPU needed)")
        for table in HIP_REPORTS:
            terminalreporter.write_line(table)
    if not AOT_REPORTS:
        return
    from felix.ops.aot import ResourceReport, format_reports

    terminalreporter.section("AOT resource report (Triton kernels, no GPU needed)")
    terminalreporter.write_line(format_reports([ResourceReport(**r) for r in AOT_REPORTS]))
