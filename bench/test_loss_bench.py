"""Fused linear CE + QUAIL loss benchmarks: time and peak memory of forward+backward.

GPU (d = 1024, V = 32K and 128K, N = 4K..32K, bf16): Felix's Triton loss against torch
``linear + cross_entropy + hinge`` on the full logits, and Liger-Kernel's fused linear cross-entropy
(CE only) when `liger_kernel` is installed. Goals (reported, not asserted): peak memory <= 0.25x torch,
time <= 1.0x torch.

CPU: the chunked torch path (the reference backend, what CPU training runs) against the same full-logits
torch loss, with peak resident memory measured in a fresh process per implementation.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

import felix
from conftest import QUICK  # noqa: E402  (bench/ is on sys.path under pytest)

D = 1024
GPU_SIZES = [(4096, 32000)] if QUICK else [(n, v) for v in (32000, 128000) for n in (4096, 8192, 16384, 32768)]
MARGIN, LAMBDA_Q = 2.0, 0.1


def torch_loss(h, w, t, wl):
    """What a PyTorch user writes: full logits, cross-entropy, and the hinge on whitelisted targets."""
    logits = (h @ w.t()).float()
    ce = torch.nn.functional.cross_entropy(logits, t)
    zt = logits.gather(1, t[:, None])[:, 0]
    other = logits.scatter(1, t[:, None], float("-inf")).amax(1)
    watched = wl[t]
    hinge = (torch.relu(MARGIN - (zt - other)) * watched).sum() / watched.sum().clamp_min(1)
    return ce + LAMBDA_Q * hinge


def inputs(n, v, device, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, D, generator=g).to(device, dtype).requires_grad_()
    w = (torch.randn(v, D, generator=g) / D**0.5).to(device, dtype).requires_grad_()
    t = torch.randint(0, v, (n,), generator=g).to(device)
    wl = (torch.rand(v, generator=g) < 0.01).to(device)
    return h, w, t, wl


def impl_fn(impl, h, w, t, wl):
    if impl == "felix-triton":
        return lambda: felix.linear_ce_quail(
            h, w, t, wl, margin=MARGIN, lambda_q=LAMBDA_Q, backend="triton"
        ).loss.backward()
    if impl == "torch":
        return lambda: torch_loss(h, w, t, wl).backward()
    if impl == "liger-ce-only":
        liger = pytest.importorskip("liger_kernel.transformers", reason="liger-kernel is not installed")
        loss = liger.LigerFusedLinearCrossEntropyLoss()
        return lambda: loss(w, h, t).backward()
    raise ValueError(impl)


def flops(n, v) -> float:
    return 2.0 * n * v * D * 3  # logits, dh, dW


@pytest.mark.parametrize("impl", ["felix-triton", "torch", "liger-ce-only"])
@pytest.mark.parametrize("n,v", GPU_SIZES, ids=lambda x: str(x))
def test_loss_fwd_bwd_gpu(gpu, measure, impl, n, v):
    h, w, t, wl = inputs(n, v, gpu, torch.bfloat16)
    fn = impl_fn(impl, h, w, t, wl)
    fn()  # warm up (compiles kernels)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    peak_mib = (torch.cuda.max_memory_allocated() - base) / 2**20
    measure(
        gpu,
        f"ce+quail fwd+bwd N={n} V={v} d={D} bf16",
        impl,
        fn,
        flops=flops(n, v),
        candidate=impl == "felix-triton",
        extra={"peak_mib": peak_mib},
    )


# ------------------------------------------------------------------------------------------- CPU
CPU_N, CPU_V, CPU_D = (512, 8000, 128) if QUICK else (2048, 32000, 256)

_PEAK_SCRIPT = r"""
import json, sys, torch
sys.path.insert(0, {bench_dir!r})
import felix
from felix.testing.bench import peak_rss_growth_bytes
from test_loss_bench import torch_loss
torch.manual_seed(0)
n, v, d, impl = {n}, {v}, {d}, {impl!r}
h = torch.randn(n, d, requires_grad=True); w = (torch.randn(v, d) / d ** 0.5).requires_grad_()
t = torch.randint(0, v, (n,)); wl = torch.rand(v) < 0.01
if impl == "felix-reference-chunked":
    fn = lambda: felix.linear_ce_quail(h, w, t, wl, margin=2.0, lambda_q=0.1, backend="reference",
                                       chunk_size=256).loss.backward()
else:
    fn = lambda: torch_loss(h, w, t, wl).backward()
print(json.dumps({{"peak_mib": peak_rss_growth_bytes(fn) / 2**20}}))
"""


def peak_rss_mib(impl: str) -> float:
    """Growth of the peak resident set of a fresh process running one forward+backward (MiB; VmHWM, see
    felix.testing.bench.peak_rss_bytes for why not ru_maxrss)."""
    code = _PEAK_SCRIPT.format(bench_dir=os.path.dirname(__file__), n=CPU_N, v=CPU_V, d=CPU_D, impl=impl)
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        env=dict(os.environ, OMP_NUM_THREADS=str(torch.get_num_threads())),
    )
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_mib"]


@pytest.mark.parametrize("impl", ["felix-reference-chunked", "torch"])
def test_loss_fwd_bwd_cpu(measure, impl):
    cpu = torch.device("cpu")
    torch.manual_seed(0)
    h = torch.randn(CPU_N, CPU_D, requires_grad=True)
    w = (torch.randn(CPU_V, CPU_D) / CPU_D**0.5).requires_grad_()
    t = torch.randint(0, CPU_V, (CPU_N,))
    wl = torch.rand(CPU_V) < 0.01
    if impl == "torch":
        fn = lambda: torch_loss(h, w, t, wl).backward()  # noqa: E731
    else:

        def fn():
            felix.linear_ce_quail(
                h, w, t, wl, margin=MARGIN, lambda_q=LAMBDA_Q, backend="reference", chunk_size=256
            ).loss.backward()

    measure(
        cpu,
        f"ce+quail fwd+bwd N={CPU_N} V={CPU_V} d={CPU_D} fp32 (logits {CPU_N * CPU_V * 4 / 2**20:.0f} MiB)",
        impl,
        fn,
        flops=2.0 * CPU_N * CPU_V * CPU_D * 3,
        candidate=impl != "torch",
        extra={"peak_rss_mib": peak_rss_mib(impl)},
        rounds=3,
    )
