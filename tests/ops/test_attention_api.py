"""The public attention API (reference backend): clear errors on bad input, dispatch, the reference
against plain float64 autograd math, and well-formed torch.library ops that torch.compile traces."""

import math

import pytest
import torch

import felix
from felix.ops.dispatch import resolve_backend
from felix.ops import attention as attn_ops
from felix.ops.reference.attention import attention_textbook


def qkv(gen, B=2, H=4, H_kv=2, T=9, D=32, dtype=torch.float32, T_k=None):
    T_k = T if T_k is None else T_k
    q = torch.randn(B, H, T, D, generator=gen).to(dtype)
    k = torch.randn(B, H_kv, T_k, D, generator=gen).to(dtype)
    v = torch.randn(B, H_kv, T_k, D, generator=gen).to(dtype)
    return q, k, v


# ------------------------------------------------------------------------------------ bad input
def test_bad_shapes_and_dtypes_are_refused_clearly(gen):
    q, k, v = qkv(gen)
    cases = [
        ((q[0], k, v), r"4-D \[batch, heads, seq, head_dim\].*q has shape \(4, 9, 32\)"),
        ((q, k.half(), v), "q, k, v must share a dtype"),
        ((q.int(), k, v), "float16/bfloat16/float32/float64, q is torch.int32"),
        ((q, k, v[:, :, :5]), r"k and v must have the same shape"),
        ((q, k[:1], v[:1]), "batch sizes differ: q has 2, k/v have 1"),
        ((q[..., :16], k, v), "head_dim differs"),
        ((q[:, :3], k, v), r"q heads \(3\) must be a multiple of the number of k/v heads \(2\)"),
        ((q[..., :16], k[..., :16], v[..., :16]), r"unsupported head_dim 16"),
        ((q[:, :, :0], k, v), "empty attention"),
        ((q, k[:, :, :5], v[:, :, :5]), "causal attention needs as many queries as keys, got T_q=9, T_k=5"),
        ((q, k, "v"), "v is str"),
    ]
    for args, match in cases:
        with pytest.raises(ValueError, match=match):
            felix.attention(*args)
    for scale in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="scale must be a finite positive number"):
            felix.attention(q, k, v, scale=scale)
    with pytest.raises(ValueError, match="unknown backend 'flash'"):
        felix.attention(q, k, v, backend="flash")


def test_triton_on_cpu_tensors_without_the_interpreter_is_refused(gen):
    q, k, v = qkv(gen)
    if felix.backends()["triton"].available and not torch.cuda.is_available():
        pytest.skip("the Triton interpreter is on in this process")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="backend 'triton' (is not available|needs GPU tensors)"):
            felix.attention(q, k, v, backend="triton")


def test_automatic_dispatch_on_cpu_is_the_reference():
    assert resolve_backend("attention_fwd", None, torch.device("cpu")) == "reference"


# ------------------------------------------------------------------------------------ behaviour
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("H,H_kv", [(4, 2), (2, 2), (3, 1)])
def test_reference_matches_float64_autograd_math(gen, causal, H, H_kv):
    q, k, v = qkv(gen, H=H, H_kv=H_kv, T=11, D=64, dtype=torch.float64)
    scale = 0.3
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out = felix.attention(*leaves, causal=causal, scale=scale, backend="reference")
    leaves2 = [t.clone().requires_grad_() for t in (q, k, v)]
    want, _ = attention_textbook(*leaves2, causal, scale)
    torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)
    dout = torch.randn(out.shape, generator=gen, dtype=torch.float64)
    out.backward(dout)
    want.backward(dout)
    for got, ref in zip(leaves, leaves2):
        torch.testing.assert_close(got.grad, ref.grad, rtol=1e-10, atol=1e-10)


def test_non_causal_cross_attention_lengths_and_default_scale(gen):
    q, k, v = qkv(gen, T=5, T_k=13, dtype=torch.float64)
    out = felix.attention(q, k, v, causal=False)
    torch.testing.assert_close(out, attention_textbook(q, k, v, False, 1 / math.sqrt(32))[0])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_output_dtype_follows_input_and_math_is_float32(gen, dtype):
    q, k, v = qkv(gen, dtype=dtype)
    out = felix.attention(q, k, v)
    assert out.dtype == dtype and out.shape == q.shape
    want = attention_textbook(q, k, v, True, 1 / math.sqrt(32))[0].to(dtype)
    # fp16/bf16: the rounding of the float32 result to the output dtype dominates (4 eps; measured <= 0.5 eps over
    # 1,500 seeds). float32: float32 accumulation over the keys itself is the error (measured <= 3.6 eps, relative to
    # 1 + |out|, over 1,500 seeds; an absolute 4 eps failed one element in 2304 on one seed), so 16 eps.
    eps = float(torch.finfo(dtype).eps) * (16 if dtype == torch.float32 else 4)
    torch.testing.assert_close(out, want, rtol=eps, atol=eps)


def test_lse_is_the_log_sum_exp_of_the_scaled_scores(gen):
    q, k, v = qkv(gen, dtype=torch.float64)
    out, lse = attn_ops._attention_fwd_op(q, k, v, True, 0.5, "reference")
    s = (q @ k.repeat_interleave(2, 1).transpose(-1, -2) * 0.5).masked_fill(
        torch.ones(9, 9, dtype=torch.bool).triu(1), float("-inf")
    )
    torch.testing.assert_close(lse, torch.logsumexp(s, -1))


# ----------------------------------------------------------------------------------- torch.library
def test_custom_ops_pass_opcheck(gen):
    q, k, v = qkv(gen, T=6)
    torch.library.opcheck(attn_ops._attention_fwd_op, (q, k, v, True, 0.25, "reference"))
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    torch.library.opcheck(attn_ops._attention_fwd_op, (*leaves, False, 0.25, "reference"))
    out, lse = attn_ops._attention_fwd_op(q, k, v, True, 0.25, "reference")
    torch.library.opcheck(
        attn_ops._attention_bwd_op, (torch.randn_like(out), q, k, v, out, lse, True, 0.25, "reference")
    )


def test_torch_compile_traces_forward_and_backward_without_graph_breaks(gen):
    q, k, v = qkv(gen, T=7)

    def loss(q, k, v):
        return (felix.attention(q * 1.5, k, v, backend="reference") ** 2).sum()

    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    a = [t.clone().requires_grad_() for t in (q, k, v)]
    b = [t.clone().requires_grad_() for t in (q, k, v)]
    torch.testing.assert_close(compiled(*a), loss(*b))
    compiled(*a).backward()
    loss(*b).backward()
    for x, y in zip(a, b):
        torch.testing.assert_close(x.grad, y.grad)


def test_launch_configs_keep_the_tile_invariants_the_kernels_rely_on():
    """Causal tile skipping assumes whole tiles on the diagonal: BLOCK_N | BLOCK_M for fwd and dq,
    BLOCK_M | BLOCK_N for dkdv; tiles are powers of two >= 16 (tl.dot's minimum)."""
    from felix.ops.kernels.attention import LAUNCH_CONFIGS, SUPPORTED_HEAD_DIMS

    assert SUPPORTED_HEAD_DIMS == attn_ops.SUPPORTED_HEAD_DIMS
    for arch, per_dim in LAUNCH_CONFIGS.items():
        assert set(per_dim) == set(SUPPORTED_HEAD_DIMS), arch
        for d, cfgs in per_dim.items():
            for kernel in ("fwd", "preprocess", "dkdv", "dq"):
                bm, bn = cfgs[kernel]["BLOCK_M"], cfgs[kernel]["BLOCK_N"]
                assert bm >= 16 and bn >= 16 and bm & (bm - 1) == 0 and bn & (bn - 1) == 0, (arch, d, kernel)
                if kernel in ("fwd", "dq"):
                    assert bm % bn == 0, (arch, d, kernel)
                if kernel == "dkdv":
                    assert bn % bm == 0, (arch, d, kernel)
                stream = cfgs[kernel].get("stream", 0)
                assert stream == 0 or (stream >= 16 and d % stream == 0), (arch, d, kernel)
