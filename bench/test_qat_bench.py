"""Quantization-aware training's cost: a linear layer whose weight is fake-quantized every call (felix.model.qat: encode to
the format's exact ggml bytes and decode, straight-through backward) against the plain linear on the same weight,
forward and forward + backward, on the CPU (C++ codecs) and on a GPU (Triton codecs), with the peak memory of the
forward + backward (GPU). The fake-quant overhead is the codec's roundtrip of the weight, once per call: it shrinks
relative to the matmul as the token count grows. Reported, not asserted.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import QUICK  # noqa: E402  (bench/ is on sys.path under pytest)
from felix.model import qat

CPU = torch.device("cpu")
MODES = ["plain", "rq4", "q4_0", "q8_0", "tq2_0", "bitnet"] + ([] if QUICK else ["iq4_nl"])
CPU_CASE = (64, 256, 256) if QUICK else (512, 1024, 1024)  # tokens, in, out
GPU_CASES = [(256, 1024, 1024)] if QUICK else [(4096, 2048, 2048), (16384, 2048, 5632)]


def layer(mode: str, in_f: int, out_f: int, device):
    torch.manual_seed(0)
    lin = torch.nn.Linear(in_f, out_f, bias=False).to(device)
    if mode != "plain":
        fmt = qat.export_type(mode)
        torch.nn.utils.parametrize.register_parametrization(lin, "weight", qat.FakeQuant(fmt, mode), unsafe=True)
    return lin


def run_case(measure, device, mode, direction, tokens, in_f, out_f, dtype=torch.float32):
    lin = layer(mode, in_f, out_f, device)
    x = torch.randn(tokens, in_f, device=device, dtype=dtype, requires_grad=direction != "fwd")
    if direction == "fwd":

        def fn():
            with torch.no_grad():
                return F.linear(x, lin.weight.to(dtype))

        flops = 2.0 * tokens * in_f * out_f
    else:
        dy = torch.randn(tokens, out_f, device=device, dtype=dtype)

        def fn():
            F.linear(x, lin.weight.to(dtype)).backward(dy)

        flops = 6.0 * tokens * in_f * out_f
    fn()

    def memory():
        if device.type != "cuda":
            return {}
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return {"peak_extra_mb": (torch.cuda.max_memory_allocated(device) - base) / 2**20}

    impl = "plain-linear" if mode == "plain" else f"fake-quant {mode}"
    case = f"qat linear {direction} x[{tokens},{in_f}] W[{out_f},{in_f}] {str(dtype).removeprefix('torch.')}"
    measure(device, case, impl, fn, flops=flops, candidate=mode != "plain", extra=memory)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("direction", ["fwd", "fwd+bwd"])
def test_qat_linear_cpu(measure, mode, direction):
    run_case(measure, CPU, mode, direction, *CPU_CASE)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("direction", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("tokens,in_f,out_f", GPU_CASES, ids=str)
def test_qat_linear_gpu(gpu, measure, mode, direction, tokens, in_f, out_f):
    run_case(measure, gpu, mode, direction, tokens, in_f, out_f, torch.bfloat16)
