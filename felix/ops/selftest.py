"""`felix selftest`: every Felix op on this machine's best device, against its torch reference, on random
inputs. One row per (op, backend, case): the max error, the bound it must stay within, pass/fail and the
time of one call. This is how a user learns in a minute that this machine's Triton / ROCm / CUDA stack
computes correctly (docs/platform-notes.md lists the RDNA3 hazards it guards against: NaNs, bf16 truncation).

Ops covered: the block codecs (quantize / dequantize: every non-reference backend must produce the
reference's exact bytes and values), quant_matmul (each backend vs a float64 product on the dequantized
weight), attention (output and dq/dk/dv vs float64 autograd), the fused CE + QUAIL loss (loss, dL/dh,
dL/dW vs the float64 full-logits spec) and the fused low-rank GEMM (y and every gradient). On CPU the
cpu and reference backends run; with TRITON_INTERPRET=1 the Triton kernels run too, on tiny shapes.
The truths are the float64 textbook references of felix/ops/reference/ and the bounds come from
felix/ops/reference/tolerances.py, the same ones the tests use.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from felix.ops.dispatch import runnable_backends
from felix.ops.reference.attention import attention_textbook
from felix.ops.reference.loss import clear_margin, full_logits_loss
from felix.ops.reference.lowrank import lowrank_textbook
from felix.ops.reference.qmatmul import QUANT_MATMUL_FORMATS
from felix.ops.reference.spoke import spoke_textbook
from felix.ops.reference.tolerances import tolerances
from felix.core.formats import FORMATS, get_format
from felix.ops.attention import attention
from felix.ops.codecs import dequantize, quantize
from felix.ops.loss import linear_ce_quail
from felix.ops.lowrank import lowrank_linear
from felix.ops.qmatmul import quant_matmul
from felix.ops.spoke import spoke_residual


@dataclass
class Check:
    op: str
    backend: str
    device: str
    case: str
    max_error: float
    bound: float
    seconds: float

    @property
    def passed(self) -> bool:
        return self.max_error <= self.bound  # NaN fails


def _timed(fn, device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return out, time.perf_counter() - t0


def _dtypes(backend: str, device: torch.device) -> list[torch.dtype]:
    """fp32, fp16, bf16 -- without bf16 for Triton on CPU: the interpreter's bf16 math is wrong
    (triton-lang/triton#11584)."""
    if backend == "triton" and device.type == "cpu":
        return [torch.float32, torch.float16]
    return [torch.float32, torch.float16, torch.bfloat16]


def _max_rel_error(got, want, floor: float = 1e-30) -> float:
    """max over tensors of max|got - want| / max(max|want|, floor); NaN when any output is not finite."""
    if not all(bool(torch.isfinite(g).all()) for g in got):
        return float("nan")
    return max(
        float((g.detach().double() - w.detach()).abs().max() / w.detach().abs().max().clamp_min(floor))
        for g, w in zip(got, want)
    )


def check_codecs(device: torch.device, gen: torch.Generator) -> list[Check]:

    small = device.type == "cpu"
    rows = []
    for fmt in FORMATS:
        f = get_format(fmt)
        shape = (8, 2 * f.block_size) if small else (256, 4096)
        x = (torch.randn(shape, generator=gen) * torch.exp(2 * torch.randn(shape[0], 1, generator=gen))).to(device)
        want = quantize(x.cpu(), fmt, backend="reference")
        want_values = dequantize(want, fmt, shape, backend="reference")
        for backend in runnable_backends("quantize", device):
            if backend == "reference":
                continue
            got, dt = _timed(lambda: quantize(x, fmt, backend=backend), device)
            rows.append(
                Check(
                    "quantize",
                    backend,
                    str(device),
                    f"{fmt} {shape[0]}x{shape[1]} (bytes differing)",
                    float((got.cpu() != want).sum()),
                    0.0,
                    dt,
                )
            )
            values, dt = _timed(lambda: dequantize(want.to(device), fmt, shape, backend=backend), device)
            err = (values.cpu() - want_values).abs().max()
            rows.append(
                Check(
                    "dequantize",
                    backend,
                    str(device),
                    f"{fmt} {shape[0]}x{shape[1]}",
                    float(err) if torch.isfinite(values).all() else float("nan"),
                    0.0,
                    dt,
                )
            )
    return rows


# max |y - ref| / max(sum |x||w|) per activation dtype: output rounding, plus (Triton GEMM) weights rounded
# to the activation dtype for the matrix units
QMM_BOUNDS = tolerances("quant_matmul")


def check_quant_matmul(device: torch.device, gen: torch.Generator) -> list[Check]:
    small = device.type == "cpu"
    shapes = (
        [(1, 40, 64), (5, 24, 96), (20, 33, 64)] if small else [(1, 2816, 1024), (8, 1024, 2816), (300, 2816, 1024)]
    )
    rows = []
    for backend in runnable_backends("quant_matmul", device):
        dtypes = _dtypes(backend, device)
        for fmt in QUANT_MATMUL_FORMATS:
            for m, n, k in shapes:
                w = (torch.randn(n, k, generator=gen) * 0.02).to(device)
                blocks = quantize(w, fmt)
                wd = dequantize(blocks, fmt, (n, k)).double()
                x32 = torch.randn(m, k, generator=gen).to(device)
                for dtype in dtypes:
                    x = x32.to(dtype)
                    y, dt = _timed(lambda: quant_matmul(x, blocks, fmt, n, backend=backend), device)
                    ref = x.double() @ wd.t()
                    scale = (x.double().abs() @ wd.abs().t()).max().clamp_min(1e-30)
                    err = float((y.double() - ref).abs().max() / scale)
                    if not bool(torch.isfinite(y).all()):
                        err = float("nan")
                    rows.append(
                        Check(
                            "quant_matmul",
                            backend,
                            str(device),
                            f"{fmt} M={m} N={n} K={k} {str(dtype).removeprefix('torch.')}",
                            err,
                            QMM_BOUNDS[dtype],
                            dt,
                        )
                    )
    return rows


# max |error| / max(|reference|, 1) of the output and of dq/dk/dv per input dtype (fp32 dots are IEEE, no tf32)
ATTENTION_BOUNDS = tolerances("attention")


def check_attention(device: torch.device, gen: torch.Generator) -> list[Check]:
    """Forward and backward (dq, dk, dv) of felix.attention vs float64 autograd, GQA and causal."""

    small = device.type == "cpu"
    cases = (
        [(1, 4, 2, 37, 32, True), (2, 2, 2, 19, 64, False)]
        if small
        else [(2, 16, 4, 1024, 128, True), (1, 8, 8, 777, 64, False)]
    )
    rows = []
    for backend in runnable_backends("attention_fwd", device):
        dtypes = _dtypes(backend, device)
        for b, h, hkv, t, d, causal in cases:
            q32 = torch.randn(b, h, t, d, generator=gen)
            k32, v32 = torch.randn(b, hkv, t, d, generator=gen), torch.randn(b, hkv, t, d, generator=gen)
            dout32 = torch.randn(b, h, t, d, generator=gen)
            for dtype in dtypes:
                q, k, v = (x.to(device, dtype).requires_grad_() for x in (q32, k32, v32))
                dout = dout32.to(device, dtype)

                def fwd_bwd():
                    out = attention(q, k, v, causal=causal, backend=backend)
                    return (out, *torch.autograd.grad(out, (q, k, v), dout))

                got, dt = _timed(fwd_bwd, device)
                qd, kd, vd = (x.detach().double().requires_grad_() for x in (q, k, v))
                ref_out, _ = attention_textbook(qd, kd, vd, causal)
                want = (ref_out, *torch.autograd.grad(ref_out, (qd, kd, vd), dout.double()))
                err = _max_rel_error(got, want, floor=1.0)
                rows.append(
                    Check(
                        "attention",
                        backend,
                        str(device),
                        f"B{b} H{h}/{hkv} T{t} D{d} {'causal' if causal else 'full'} "
                        f"{str(dtype).removeprefix('torch.')} fwd+bwd",
                        err,
                        ATTENTION_BOUNDS[dtype],
                        dt,
                    )
                )
    return rows


# max relative error of the loss and of dL/dh, dL/dW per input dtype (logits and their gradient in fp32)
LOSS_BOUNDS = tolerances("linear_ce_quail")


def check_linear_ce_quail(device: torch.device, gen: torch.Generator) -> list[Check]:
    """The fused CE + QUAIL loss and its gradients vs the float64 full-logits spec."""
    small = device.type == "cpu"
    cases = [(37, 16, 301, 8)] if small else [(2048, 1024, 32000, 512)]
    rows = []
    for backend in runnable_backends("linear_ce_quail", device):
        dtypes = _dtypes(backend, device)
        for n, d, v, chunk in cases:
            h32, w32 = torch.randn(n, d, generator=gen), torch.randn(v, d, generator=gen) / d**0.5
            t = torch.randint(0, v, (n,), generator=gen)
            t[::7] = -100
            wl = torch.rand(v, generator=gen) < (0.2 if small else 0.02)
            for dtype in dtypes:
                h, w = (x.to(device, dtype).requires_grad_() for x in (h32, w32))
                tt, wlt = t.to(device), wl.to(device)

                # keep every position's margin away from the hinge's edge, where rounding flips its gradient
                m = clear_margin(h.detach(), w.detach(), None, tt, gap=0.02, whitelist=wlt)

                def fwd_bwd():
                    out = linear_ce_quail(h, w, tt, wlt, margin=m, z_loss=1e-3, chunk_size=chunk, backend=backend)
                    return (out.loss, *torch.autograd.grad(out.loss, (h, w)))

                got, dt = _timed(fwd_bwd, device)
                hd, wd = (x.detach().double().requires_grad_() for x in (h, w))
                ref = full_logits_loss(hd, wd, tt, wlt, margin=m, z_loss=1e-3)
                want = (ref.loss, *torch.autograd.grad(ref.loss, (hd, wd)))
                err = _max_rel_error(got, want)
                rows.append(
                    Check(
                        "ce_quail",
                        backend,
                        str(device),
                        f"N{n} d{d} V{v} chunk {chunk} {str(dtype).removeprefix('torch.')} fwd+bwd",
                        err,
                        LOSS_BOUNDS[dtype],
                        dt,
                    )
                )
    return rows


# max |error| / max |reference| of y and of every gradient, per input dtype
LOWRANK_BOUNDS = tolerances("lowrank_linear")


def check_lowrank_linear(device: torch.device, gen: torch.Generator) -> list[Check]:
    """y = x Wᵀ + b + g (x Aᵀ) Bᵀ and dx, dW, dbias, dA, dB vs float64 autograd."""

    small = device.type == "cpu"
    cases = [(21, 37, 29, 8)] if small else [(4096, 1024, 2816, 64)]
    rows = []
    for backend in runnable_backends("lowrank_fwd", device):
        dtypes = _dtypes(backend, device)
        for m, k, n, r in cases:
            base = [
                torch.randn(m, k, generator=gen),
                torch.randn(n, k, generator=gen) / k**0.5,
                torch.randn(n, generator=gen) * 0.1,
                torch.randn(r, k, generator=gen) / k**0.5,
                torch.randn(n, r, generator=gen) / r**0.5,
            ]
            dy32 = torch.randn(m, n, generator=gen)
            for dtype in dtypes:
                x, w, bias, a, b = (t.to(device, dtype).requires_grad_() for t in base)
                dy = dy32.to(device, dtype)

                def fwd_bwd():
                    y = lowrank_linear(x, w, a, b, 0.75, bias=bias, backend=backend)
                    return (y, *torch.autograd.grad(y, (x, w, bias, a, b), dy))

                got, dt = _timed(fwd_bwd, device)
                xd, wd, bd, ad, bbd = (t.detach().double().requires_grad_() for t in (x, w, bias, a, b))
                yd = lowrank_textbook(xd, wd, [ad], [bbd], [0.75], bd)
                want = (yd, *torch.autograd.grad(yd, (xd, wd, bd, ad, bbd), dy.double()))
                err = _max_rel_error(got, want)
                rows.append(
                    Check(
                        "lowrank",
                        backend,
                        str(device),
                        f"M{m} in{k} out{n} r{r} {str(dtype).removeprefix('torch.')} fwd+bwd",
                        err,
                        LOWRANK_BOUNDS[dtype],
                        dt,
                    )
                )
    return rows


# the spoke: two chained low-rank products behind a rounded rmsnorm (4x the low-rank bound below fp32)
SPOKE_BOUNDS = tolerances("spoke_residual")


def check_spoke_residual(device: torch.device, gen: torch.Generator) -> list[Check]:
    """h + sigmoid(gb)/S W_up silu(W_down rmsnorm(h) g) and every gradient vs float64 autograd (4 spokes)."""

    small = device.type == "cpu"
    cases = [(21, 37, 4, 3)] if small else [(4096, 1024, 4, 64)]
    rows = []
    for backend in runnable_backends("spoke_fwd", device):
        for m, d, n, r in cases:
            base = [
                torch.randn(m, d, generator=gen),
                1 + 0.3 * torch.randn(d, generator=gen),
                torch.randn(n * r, d, generator=gen) / d**0.5,
                torch.randn(d, n * r, generator=gen) / (n * r) ** 0.5,
                torch.randn(1, generator=gen),
            ]
            dy32 = torch.randn(m, d, generator=gen)
            for dtype in _dtypes(backend, device):
                h, g, wd, wu, gb = (
                    t.to(device, dtype if i in (0, 2, 3) else torch.float32).requires_grad_()
                    for i, t in enumerate(base)
                )
                dy = dy32.to(device, dtype)

                def fwd_bwd():
                    y = spoke_residual(h, g, wd, wu, gb, n, 1e-5, backend=backend)
                    return (y - h.detach(), *torch.autograd.grad(y, (h, g, wd, wu, gb), dy))

                got, dt = _timed(fwd_bwd, device)
                hd, gd, wdd, wud, gbd = (t.detach().double().requires_grad_() for t in (h, g, wd, wu, gb))
                yd = spoke_textbook(hd, gd, wdd, wud, gbd, n, 1e-5)
                want = (yd - hd.detach(), *torch.autograd.grad(yd, (hd, gd, wdd, wud, gbd), dy.double()))
                # the update (y - h) is compared, so y's own rounding of |h| is not counted against the op
                err = _max_rel_error(got, want)
                rows.append(
                    Check(
                        "spoke",
                        backend,
                        str(device),
                        f"M{m} d{d} {n}x{r} {str(dtype).removeprefix('torch.')} fwd+bwd",
                        err,
                        SPOKE_BOUNDS[dtype],
                        dt,
                    )
                )
    return rows


CHECKS = {
    "codecs": check_codecs,
    "quant_matmul": check_quant_matmul,
    "attention": check_attention,
    "linear_ce_quail": check_linear_ce_quail,
    "lowrank_linear": check_lowrank_linear,
    "spoke_residual": check_spoke_residual,
}


def run(device: str | torch.device | None = None, ops: list[str] | None = None, seed: int = 0) -> list[Check]:
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for name in ops or list(CHECKS):
        if name not in CHECKS:
            raise ValueError(f"unknown selftest op {name!r}; ops: {', '.join(CHECKS)}")
        rows += CHECKS[name](device, gen)
    return rows


def format_table(rows: list[Check]) -> str:
    head = f"{'op':13} {'backend':9} {'device':7} {'case':40} {'max error':>10} {'bound':>9} {'result':6} {'ms':>8}"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r.op:13} {r.backend:9} {r.device:7} {r.case:40} {r.max_error:10.3g} {r.bound:9.3g} "
            f"{'pass' if r.passed else 'FAIL':6} {1e3 * r.seconds:8.2f}"
        )
    return "\n".join(lines)
