"""Felix-LM training-step benchmarks: one optimizer step (forward, backward, AdamW) at sequence length 2048.

GPU: pilot-50m and felix-300m at micro-batch 1/2/4, with and without per-layer activation checkpointing, with
felix.attention's Triton kernels ("felix-triton", the candidate) and its torch reference ("reference"), bf16
autocast. FLOPs per step = tokens x (6 x matmul parameters + 12 x layers x d_model x seq_len), so the report's
TFLOP/s over the device's bf16 peak is the MFU. Peak memory goes into each case's extra_info. Goals (reported,
not asserted): felix-300m peak <= 10 GB at micro-batch 4 with checkpointing; MFU >= 40% on an H100.
CPU: tokens/s of the tiny preset (fp32).
"""

from __future__ import annotations

import pytest
import torch

from conftest import QUICK  # noqa: E402  (bench/ is on sys.path under pytest)
from felix.model import felix_lm as M
from felix.train.loop import flops_per_token

GPU_PRESETS = ["tiny"] if QUICK else ["pilot-50m", "felix-300m"]
MICRO_BATCHES = [1] if QUICK else [1, 2, 4]
SEQ = 256 if QUICK else 2048


def step_fn(model, tokens, device, attention_backend, bf16):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = model.loss(tokens[:, :-1], tokens[:, 1:], attention_backend=attention_backend).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


@pytest.mark.parametrize("checkpointing", [False, True], ids=["no-ckpt", "ckpt"])
@pytest.mark.parametrize("micro_batch", MICRO_BATCHES)
@pytest.mark.parametrize("preset", GPU_PRESETS)
@pytest.mark.parametrize("impl", ["felix-triton", "reference"])
def test_train_step_gpu(measure, benchmark, gpu, impl, preset, micro_batch, checkpointing):
    torch.cuda.empty_cache()
    cfg = M.preset(preset, max_seq_len=SEQ, checkpoint_activations=checkpointing)
    model = M.FelixLM(cfg).to(gpu)
    tokens = torch.randint(0, cfg.vocab_size, (micro_batch, SEQ + 1), device=gpu)
    fn = step_fn(model, tokens, gpu, "triton" if impl == "felix-triton" else "reference", bf16=True)
    try:
        fn()  # warm-up: Triton JIT, optimizer state
    except torch.OutOfMemoryError:
        pytest.skip(f"{preset} at micro-batch {micro_batch} does not fit on this GPU")
    torch.cuda.reset_peak_memory_stats(gpu)
    case = f"train step {preset} mb{micro_batch} T{SEQ} {'ckpt' if checkpointing else 'no-ckpt'}"
    measure(gpu, case, impl, fn, flops=micro_batch * SEQ * flops_per_token(cfg, SEQ), candidate=impl == "felix-triton")
    benchmark.extra_info["peak_memory_gb"] = torch.cuda.max_memory_allocated(gpu) / 2**30
    benchmark.extra_info["tokens_per_step"] = micro_batch * SEQ


def test_train_step_cpu_tiny(measure, benchmark):
    cpu = torch.device("cpu")
    seq, batch = (32, 2) if QUICK else (128, 16)
    cfg = M.preset("tiny")
    model = M.FelixLM(cfg)
    tokens = torch.randint(0, cfg.vocab_size, (batch, seq + 1))
    fn = step_fn(model, tokens, cpu, "reference", bf16=False)
    measure(
        cpu,
        f"train step tiny b{batch} T{seq} cpu fp32",
        "reference",
        fn,
        flops=batch * seq * flops_per_token(cfg, seq),
        candidate=True,
    )
    benchmark.extra_info["tokens_per_step"] = batch * seq
