"""GPU tier: a training step (Felix-LM tiny, bf16 autocast, the fused loss on Triton) makes no host sync:
torch.cuda.set_sync_debug_mode("error") turns any into an error. Skips cleanly without a GPU."""

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA/ROCm GPU on this machine")


def test_training_step_is_sync_free_on_gpu():
    from felix.model.felix_lm import FelixLM, preset
    from felix.ops.loss import whitelist_mask

    torch.manual_seed(0)
    dev = torch.device("cuda")
    model = FelixLM(preset("tiny", vocab_size=512)).to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    wl = whitelist_mask(list(range(1, 40)), 512, dev)
    x = torch.randint(0, 512, (4, 64)).pin_memory()
    for i in range(3):  # the first step warms caches (kernel compilation reads no device values either)
        mode = "error" if i else "default"
        torch.cuda.set_sync_debug_mode(mode)
        try:
            xd = x.to(dev, non_blocking=True)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                parts = model.loss(xd, torch.roll(xd, -1, 1), wl, 2.0, 0.1)
            parts.loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(parts.loss).item()
