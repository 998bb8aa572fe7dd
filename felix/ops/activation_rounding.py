"""How llama.cpp's CPU backend rounds *activations*, so the PyTorch simulation of a quantized model can do the same.

A quantized GGUF changes more than the weights. In ggml's CPU matmul ``mul_mat(W, x)`` the activations ``x`` are
first converted to the weight type's ``vec_dot_type`` (ggml-cpu's type traits; felix.core.formats records it per
format) and the dot products run on those:

=============================  ===============  ===================================================================
weight type                    activations as   rounding
=============================  ===============  ===================================================================
f32                            f32              none
f16 / bf16                     f16 / bf16       round to nearest even
q8_0, q4_0, iq4_nl, rq4 (fork)  Q8_0             blocks of 32 along the row: d = amax/127 stored as fp16,
                                                 q = round(x * 127/amax) (to nearest even, as ggml's x86 path);
                                                 the dot product sees q * fp16(d)
tq2_0                          Q8_K             blocks of 256: d = 1/iscale in float32, iscale = -127/max
                                                 (max = the signed value of largest magnitude), q = round(iscale x)
                                                 capped at 127
=============================  ===============  ===================================================================

Attention (llama.cpp's CPU graph without flash attention, llama-cpp-python's default): K and V come from the KV
cache, kept in f16; ``K·Q`` (K f16) converts Q to f16; the softmax runs in f32; ``V·P`` (V f16) converts the
probabilities P to f16. :meth:`ActivationRounding.attention` computes exactly that.

Why the attention matters as much as the Q8_0 rounding: rounding to 8 bits is discontinuous, so an upstream
difference of one f16 ulp moves a few elements across a rounding boundary and decorrelates the whole Q8_0 noise
from the runtime's. Measured on a tiny RQ4 model against the fork (60 tokens): Q8_0 rounding with Felix's exact
attention leaves the mean relative logit error where exact activations leave it (~4e-3), because the runtime's
noise realization is not reproduced; with the f16 attention as well it falls to ~4e-5 (position 0, where attention
is a copy of V, is exact to 1e-7 either way).

:class:`ActivationRounding` is what :meth:`felix.model.felix_lm.FelixLM.set_activation_rounding` takes: called with the
matmul's weight tensor name (``blk.0.attn_q.weight``, ``token_embd.weight`` for a tied head...) and the tensor, it
returns the tensor as the runtime computes with it; its ``attention(q, k, v)`` replaces the model's attention. The fidelity harness (``felix fidelity --sim-activations runtime``) uses it to predict what the
deployment computes, not only what its weights are; tests/ship/test_fork_llamacpp.py measures how much closer to the
fork's logits that brings the simulated path.
"""

from __future__ import annotations

import math

import torch

from felix.core.formats import FORMATS, get_format

KV_CACHE_TYPE = "f16"  # llama.cpp's default KV cache type (and so the type Q and P meet in K·Q and V·P)
# block sizes of ggml's activation formats (Q8_0 shares Q8_0-weight geometry; Q8_K is the k-quant super-block)
Q8_K_BLOCK = 256


def vec_dot_type(weight_type: str) -> str | None:
    """The type ggml's CPU matmul converts activations to for weights of `weight_type` (None: f32, no rounding)."""
    if weight_type == "f32":
        return None
    if weight_type in ("f16", "bf16"):
        return weight_type
    return get_format(weight_type).vec_dot_type


def _div(numerator: float, t: torch.Tensor) -> torch.Tensor:
    """numerator / t, correctly rounded like C's float division (torch's `scalar / tensor` multiplies by a
    reciprocal, one ulp off at times)."""
    return torch.div(torch.full_like(t, numerator), t)


def _blocks(x: torch.Tensor, block: int) -> torch.Tensor:
    if x.shape[-1] % block:
        raise ValueError(f"activations with rows of {x.shape[-1]} do not divide into blocks of {block}")
    return x.float().reshape(*x.shape[:-1], x.shape[-1] // block, block)


def round_q8_0(x: torch.Tensor) -> torch.Tensor:
    """x as ggml's quantize_row_q8_0 stores it and its vec_dot reads it back (float32, same shape)."""
    b = _blocks(x, FORMATS["q8_0"].block_size)
    amax = b.abs().amax(-1, keepdim=True)
    d16 = (amax / 127.0).half().float()
    inv = torch.where(amax > 0, _div(127.0, amax), torch.zeros_like(amax))
    q = torch.round(b * inv)  # torch.round: half to even, like _mm256_round_ps(_MM_ROUND_NEAREST)
    return (q * d16).reshape(x.shape)


def round_q8_k(x: torch.Tensor) -> torch.Tensor:
    """x as ggml's quantize_row_q8_K stores it (float32 scale, signed-max convention), read back."""
    b = _blocks(x, Q8_K_BLOCK)
    idx = b.abs().argmax(-1, keepdim=True)
    mx = b.gather(-1, idx)
    nonzero = mx != 0
    iscale = torch.where(nonzero, _div(-127.0, torch.where(nonzero, mx, torch.ones_like(mx))), torch.zeros_like(mx))
    q = torch.round(b * iscale).clamp(max=127.0)
    d = torch.where(nonzero, _div(1.0, torch.where(nonzero, iscale, torch.ones_like(iscale))), torch.zeros_like(iscale))
    return (q * d).reshape(x.shape)


def round_activations(x: torch.Tensor, activation_type: str | None) -> torch.Tensor:
    """`x` rounded to `activation_type` (None, "f16", "bf16", "q8_0", "q8_k") and back, in x's dtype."""
    if activation_type is None:
        return x
    if activation_type == "f16":
        y = x.half()
    elif activation_type == "bf16":
        y = x.bfloat16()
    elif activation_type == "q8_0":
        y = round_q8_0(x)
    elif activation_type == "q8_k":
        y = round_q8_k(x)
    else:
        raise ValueError(f"unknown activation type {activation_type!r}")
    return y.to(x.dtype)


def runtime_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_type: str | None = KV_CACHE_TYPE, causal: bool = True
) -> torch.Tensor:
    """Causal GQA attention [B, H, T, D] as llama.cpp's CPU graph computes it (no flash attention): q, k, v and the
    softmax probabilities rounded to the KV cache type, scores and softmax in float32, scale 1/sqrt(D)."""
    B, H, T, D = q.shape
    group = H // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    r = lambda t: round_activations(t.float(), kv_type)  # noqa: E731
    scores = (r(q) @ r(k).transpose(-1, -2)) * (1.0 / math.sqrt(D))
    if causal:
        scores = scores.masked_fill(torch.ones(T, k.shape[2], dtype=torch.bool, device=q.device).triu(1), float("-inf"))
    p = torch.softmax(scores, -1)
    return (r(p) @ r(v)).to(q.dtype)


class ActivationRounding:
    """Rounds each matmul input as llama.cpp would for the weight types of one export plan, and computes attention
    as its CPU graph does (f16 KV cache and probabilities). `weight_types`: tensor name -> GGUF type
    (felix.ops.quant_policy's plan)."""

    # a live splice is deployed as a LoRA adapter, whose F32 matmuls take the unrounded input (felix.model.felix_lm.Block.proj)
    splice_takes_raw_input = True

    def __init__(self, weight_types: dict[str, str], kv_cache_type: str | None = KV_CACHE_TYPE):
        self.activation_types = {name: vec_dot_type(t) for name, t in weight_types.items()}
        self.kv_cache_type = kv_cache_type

    @classmethod
    def from_plan(cls, plan, **kw) -> ActivationRounding:
        """From felix.ops.quant_policy.plan_tensor_types' choices."""
        return cls({c.name: c.type for c in plan}, **kw)

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return runtime_attention(q, k, v, self.kv_cache_type)

    def __call__(self, site: str, x: torch.Tensor) -> torch.Tensor:
        if site not in self.activation_types:
            raise KeyError(f"no weight type known for matmul site {site!r}")
        return round_activations(x, self.activation_types[site])
