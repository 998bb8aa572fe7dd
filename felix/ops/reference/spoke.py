"""The spoke residual of the fork's ``felix`` arch, in torch: the spec of ``felix.spoke_residual``.

For every row h (d features) of the hub's residual stream, after the layer's FFN residual::

    n = rmsnorm(h) * norm_weight               (fp32: h * rsqrt(mean(h^2) + eps) * g)
    z = n W_downᵀ                              W_down [R, d], R = n_spokes * rank (the spokes side by side)
    u = silu(z) W_upᵀ                          W_up   [d, R]
    y = h + sigmoid(gate_bias) / n_spokes * u

(src/models/felix.cpp's fused path: ``ggml_mul_mat`` / ``ggml_silu`` / ``ggml_mul_mat`` / ``ggml_scale(1/S)`` then
the sigmoid gate.) The matmul operands are rounded to h's dtype where a kernel feeds them to matrix units (n and
silu(z)); everything else is fp32 (fp64 for fp64 inputs). The forward also returns what the backward reuses:
z (fp32) and the per-row reciprocal RMS.

Backward for an output gradient dy (c = sigmoid(gate_bias) / S, a = silu(z), P = dy W_up)::

    dW_up = c dyᵀ a            dgate_bias = Σ_rows (a · P) * c (1 - sigmoid(gate_bias))
    dz = c P ⊙ silu'(z)        dW_down = (dz ⊙ rs)ᵀ h ⊙ g      (columns scaled by g)
    q = (dz W_down) ⊙ g        dnorm_weight = Σ_rows (dz W_down) ⊙ h ⊙ rs
    dh = dy + rs q - h rs³ (q · h) / d
"""

from __future__ import annotations

import torch

# n_spokes * rank the Triton kernel holds in one register tile (kernels/spoke.py); the op layer checks it for that
# backend, the model and the exporter for every Felix-LM
MAX_WIDTH = 256


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def silu_grad(z: torch.Tensor) -> torch.Tensor:
    s = torch.sigmoid(z)
    return s * (1 + z * (1 - s))


def spoke_forward(h, norm_weight, w_down, w_up, gate_bias, n_spokes: int, eps: float):
    """h [M, d] -> (y [M, d] in h's dtype, z [M, R] accumulation dtype, rs [M] accumulation dtype)."""
    acc = _acc(h.dtype)
    hf = h.to(acc)
    rs = torch.rsqrt(hf.pow(2).mean(-1) + eps)
    n = (hf * rs[:, None] * norm_weight.to(acc)).to(h.dtype).to(acc)
    z = n @ w_down.to(acc).t()
    a = torch.nn.functional.silu(z).to(h.dtype).to(acc)
    u = a @ w_up.to(acc).t()
    c = torch.sigmoid(gate_bias.to(acc).reshape(())) / n_spokes
    return (hf + c * u).to(h.dtype), z, rs


def spoke_backward(dy, h, norm_weight, w_down, w_up, gate_bias, z, rs, n_spokes: int):
    """Gradients (dh, dnorm_weight, dW_down, dW_up, dgate_bias) of spoke_forward for output gradient dy."""
    acc = _acc(h.dtype)
    dyf, hf, g = dy.to(acc), h.to(acc), norm_weight.to(acc)
    wd, wu = w_down.to(acc), w_up.to(acc)
    sig = torch.sigmoid(gate_bias.to(acc).reshape(()))
    c = sig / n_spokes
    a = torch.nn.functional.silu(z).to(h.dtype).to(acc)
    p = dyf @ wu  # [M, R]
    dgate = (a * p).sum() * c * (1 - sig)
    dz = c * p * silu_grad(z)
    dn = dz @ wd  # [M, d]
    q = dn * g
    d = h.shape[-1]
    dh = dyf + rs[:, None] * q - hf * rs[:, None] ** 3 * (q * hf).sum(-1, keepdim=True) / d
    dg = (dn * hf * rs[:, None]).sum(0)
    dwd = ((dz * rs[:, None]).t() @ hf) * g[None, :]
    dwu = c * (dyf.t() @ a)
    return (
        dh.to(h.dtype),
        dg.to(norm_weight.dtype),
        dwd.to(w_down.dtype),
        dwu.to(w_up.dtype),
        dgate.reshape(gate_bias.shape).to(gate_bias.dtype),
    )


# ------------------------------------------------------------------------------- the truth
SPOKE_INPUTS = ("h", "norm_weight", "w_down", "w_up", "gate_bias")


def spoke_textbook(h, norm_weight, w_down, w_up, gate_bias, n_spokes, eps):
    """The independent truth: the fork's formula written naively (rms_norm * weight, mul_mat, silu, mul_mat,
    scale 1/S, sigmoid gate; src/models/felix.cpp), no rounding and no hand-written backward: autograd in float64."""
    normed = h / torch.sqrt((h * h).mean(-1, keepdim=True) + eps) * norm_weight
    up = torch.nn.functional.silu(normed @ w_down.t()) @ w_up.t()
    return h + torch.sigmoid(gate_bias) * up / n_spokes


def truth_grads(case, dy):
    """(y, {input name: gradient}) of `spoke_textbook` in float64 for a case dict (the SPOKE_INPUTS tensors plus
    n_spokes and eps; felix.testing.spoke_cases.make_case) and output gradient dy."""
    leaves = [case[k].detach().double().requires_grad_() for k in SPOKE_INPUTS]
    y = spoke_textbook(*leaves, case["n_spokes"], case["eps"])
    return y.detach(), dict(zip(SPOKE_INPUTS, torch.autograd.grad(y, leaves, dy.double())))
