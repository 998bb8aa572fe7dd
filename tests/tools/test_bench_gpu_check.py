"""bench/gpu_check.sh proven on a CPU: --dry-run runs the same steps (GPU test tier, benchmarks) with the GPU
parts skipped, offline, inside its budget, and writes its log and summary under FELIX_BENCH_RESULTS."""

import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_gpu_check_dry_run_on_cpu(tmp_path):
    env = dict(
        os.environ,
        FELIX_BENCH_RESULTS=str(tmp_path),
        FELIX_GPU_CHECK_BUDGET_S="300",
        FELIX_GPU_CHECK_BENCH_K="lowrank or (quantize_cpu and rq4)",
    )  # GPU-only + CPU cases, kept short
    run = subprocess.run(
        ["bash", str(ROOT / "bench" / "gpu_check.sh"), "--dry-run"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    summary = next(tmp_path.glob("*-gpu-check.txt")).read_text()
    log = next(tmp_path.glob("*-gpu-check.log")).read_text()
    assert "dry run: 1" in summary and "gpu tests (rc 0)" in summary and "benchmarks (rc 0)" in summary
    assert "no CUDA/ROCm GPU on this machine" in log  # the GPU tier ran and skipped
    assert " passed" in summary.split("benchmarks")[1]  # CPU benchmark cases ran (untimed)
    assert "skipped" in summary.split("benchmarks")[1]  # their GPU cases skipped


def test_gpu_check_refuses_without_gpu_unless_dry(tmp_path):
    import torch

    if torch.cuda.is_available():
        return
    run = subprocess.run(
        ["bash", str(ROOT / "bench" / "gpu_check.sh")],
        capture_output=True,
        text=True,
        env=dict(os.environ, FELIX_BENCH_RESULTS=str(tmp_path)),
        timeout=120,
    )
    assert run.returncode == 2 and "no CUDA/ROCm GPU" in run.stderr
