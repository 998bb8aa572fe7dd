"""The training step has no avoidable host syncs (issue 22): the whitelist is a device mask built once, loss
parts stay on the device until a logging interval ends, and target checks on device tensors are asynchronous.

felix.testing.host_sync.HostSyncRecorder records, on a CPU, every aten op that would make a GPU host wait
(value reads, data-dependent output sizes). On a CPU two kinds remain and are allowed by name: the target
range check's CPU branch (device tensors take torch._assert_async instead, tests/train/test_gpu_train.py) and
torch.optim reading its step counters, which live on the host on a GPU as well.
"""

import torch

import felix
from felix.model.felix_lm import FelixLM, preset
from felix.ops.loss import whitelist_mask
from felix.ops.reference import attention as ref_attention
from felix.ops.reference.loss import chunked_loss_and_grads
from felix.testing.host_sync import HostSyncRecorder

HOST_SIDE = ("in _check_target_values", "torch/optim/optimizer.py")


def _unexpected(syncs):
    return [s for s in syncs if not any(tag in s[1] for tag in HOST_SIDE)]


def test_recorder_sees_syncs():
    x = torch.randn(5)
    with HostSyncRecorder() as rec:
        bool(x.sum() > 0)
        x[x > 0]
        whitelist_mask([1, 2, 3], 10, x.device)  # token ids: checked on the host (done once, before training)
    assert [name for name, _ in rec.syncs][:2] == ["_local_scalar_dense", "index"]  # boolean indexing
    assert any("whitelist_mask" in where for _, where in rec.syncs)


def test_training_step_has_no_avoidable_host_sync(seed):
    torch.manual_seed(seed)
    model = FelixLM(preset("tiny", vocab_size=300))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    wl = whitelist_mask([1, 2, 3, 40], 300, torch.device("cpu"))  # once, as felix.train.loop does
    x = torch.randint(0, 300, (2, 24))
    for _ in range(2):
        with HostSyncRecorder() as rec:
            parts = model.loss(x, torch.roll(x, -1, 1), wl, 2.0, 0.1)
            (parts.loss / 2).backward()
            logged = torch.stack([parts.loss.detach(), parts.ce, parts.hinge])  # kept on the device
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
        assert _unexpected(rec.syncs) == [], rec.syncs
        assert any("_check_target_values" in w for _, w in rec.syncs)  # the recorder did look inside the step
    assert torch.isfinite(logged).all()


def test_backend_implementations_do_not_sync(seed):
    g = torch.Generator().manual_seed(seed)
    h, w = torch.randn(40, 16, generator=g), torch.randn(70, 16, generator=g)
    t = torch.randint(0, 70, (40,), generator=g)
    t[::7] = -100
    wl = torch.rand(70, generator=g) < 0.3
    q, k, v = (torch.randn(1, 2, 9, 32, generator=g) for _ in range(3))
    with HostSyncRecorder() as rec:
        chunked_loss_and_grads(h, w, t, wl, None, 2.0, 0.1, 1e-3, -100, 16)
        out, lse = ref_attention.attention_forward(q, k, v, True, 0.2)
        ref_attention.attention_backward(torch.ones_like(out), q, k, v, out, lse, True, 0.2)
        felix.lowrank_linear(
            h, w, torch.randn(4, 16, generator=g), torch.randn(70, 4, generator=g), 0.5, backend="reference"
        )
    assert rec.syncs == []


def test_step_guard_adds_no_host_sync(seed):
    """The long-run guard (felix.train.loop.StepGuard + fused AdamW's found_inf) decides to skip a step on the device:
    the guarded step has no sync the plain step lacks, and a NaN step is really skipped."""
    from felix.train.loop import StepGuard

    torch.manual_seed(seed)
    model = FelixLM(preset("tiny", vocab_size=300))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    guard = StepGuard(torch.device("cpu"), window=2, threshold=3.0, skip_spikes=True)
    wl = whitelist_mask([1, 2, 3, 40], 300, torch.device("cpu"))
    x = torch.randint(0, 300, (2, 24))
    for poison in (1.0, 1.0, 1.0, float("nan")):
        before = [p.detach().clone() for p in model.parameters()]
        with HostSyncRecorder() as rec:
            parts = model.loss(x, torch.roll(x, -1, 1), wl, 2.0, 0.1)
            (parts.loss * poison).backward()
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            skip, z = guard(parts.loss.detach() * poison, norm)
            opt.found_inf = skip
            opt.step()
            opt.zero_grad(set_to_none=True)
            logged = torch.stack([parts.loss.detach(), parts.ce, parts.hinge, skip, z, norm])  # kept on the device
        assert _unexpected(rec.syncs) == [], rec.syncs
    assert logged[3] == 1.0 and all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert int(guard.count) == 3 and all(int(s["step"]) == 3 for s in opt.state.values())
