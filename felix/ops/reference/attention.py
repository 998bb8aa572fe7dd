"""Scaled dot-product attention in plain torch: the spec the Triton kernels are tested against.

Math in float32 (float64 for float64 input) whatever the input dtype, results cast back to it.
Grouped-query attention expands K/V per q head here (the kernels never do). Causal: query i sees
keys j <= i (T_q == T_k, checked by the op layer).
"""

from __future__ import annotations

import torch

# the head dims felix.attention accepts: the op layer checks them, the Triton kernels have launch configs for each
SUPPORTED_HEAD_DIMS = (32, 64, 128)


def _math_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _expand_kv(t: torch.Tensor, group: int) -> torch.Tensor:
    return t if group == 1 else t.repeat_interleave(group, dim=1)


def _scores(q, k, causal: bool, scale: float) -> torch.Tensor:
    s = (q @ k.transpose(-1, -2)) * scale
    if causal:
        t_q, t_k = s.shape[-2], s.shape[-1]
        future = torch.ones(t_q, t_k, dtype=torch.bool, device=s.device).triu(1)
        s = s.masked_fill(future, float("-inf"))
    return s


def attention_forward(q, k, v, causal: bool, scale: float):
    """(out in q's dtype, lse [B, H, T_q] in float32 or float64): softmax(q k^T * scale) v, logsumexp."""
    dt = _math_dtype(q.dtype)
    group = q.shape[1] // k.shape[1]
    qf, kf, vf = q.to(dt), _expand_kv(k.to(dt), group), _expand_kv(v.to(dt), group)
    s = _scores(qf, kf, causal, scale)
    lse = torch.logsumexp(s, dim=-1)
    out = torch.exp(s - lse[..., None]) @ vf
    return out.to(q.dtype), lse


def attention_backward(dout, q, k, v, out, lse, causal: bool, scale: float):
    """(dq, dk, dv) in the input dtype, from the saved output and log-sum-exp (the FlashAttention
    backward in closed form: dS = P * (dP - rowsum(dO * O))); dk/dv summed over each kv head's group."""
    dt = _math_dtype(q.dtype)
    B, H, T_q, D = q.shape
    H_kv, T_k = k.shape[1], k.shape[2]
    group = H // H_kv
    qf, kf, vf = q.to(dt), _expand_kv(k.to(dt), group), _expand_kv(v.to(dt), group)
    dof, of = dout.to(dt), out.to(dt)
    p = torch.exp(_scores(qf, kf, causal, scale) - lse.to(dt)[..., None])
    dv = p.transpose(-1, -2) @ dof
    dp = dof @ vf.transpose(-1, -2)
    ds = p * (dp - (dof * of).sum(-1, keepdim=True))
    dq = (ds @ kf) * scale
    dk = (ds.transpose(-1, -2) @ qf) * scale
    dk = dk.view(B, H_kv, group, T_k, D).sum(2)
    dv = dv.view(B, H_kv, group, T_k, D).sum(2)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def attention_textbook(q, k, v, causal: bool, scale: float | None = None):
    """The independent float64 truth: textbook softmax(q kᵀ * scale) v with K/V repeated per q head, written
    with plain torch ops (no shared helper with the spec above) so autograd gives its gradients.
    Returns (out, lse) in float64; scale defaults to 1/sqrt(head_dim). Tests, `felix selftest` and the GPU tier
    all compare against this one function."""
    q, k, v = q.double(), k.double(), v.double()
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    s = q @ k.transpose(-1, -2) * scale
    if causal:
        s = s.masked_fill(torch.ones(s.shape[-2:], dtype=torch.bool, device=s.device).triu(1), float("-inf"))
    return torch.softmax(s, dim=-1) @ v, torch.logsumexp(s, dim=-1)
