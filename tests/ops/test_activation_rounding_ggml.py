"""felix.ops.activation_rounding against ggml's own C: the activation formats a CPU matmul converts its input to.

* Q8_0 (the activations of Q8_0 / Q4_0 / IQ4_NL / RQ4 matmuls): ggml_quantize_chunk + dequantize_row_q8_0.
  Felix models the x86 path (x * 127/amax, rounded half to even); the C reference computes x * (1/d) and rounds
  half away from zero. The two can differ only where x * 127/amax sits within float32 rounding of a half-integer,
  and there by exactly one step: asserted element by element.
* Q8_K (the activations of TQ2_0 matmuls): quantize_row_q8_K_ref + dequantize_row_q8_K, which both round half to
  even (nearest_int): asserted equal.
* The model hook: with exact activations the model is unchanged; rounding a q4_0 plan touches every matmul input.
"""

from __future__ import annotations

import ctypes

import numpy as np
import pytest
import torch

from felix.ops import activation_rounding as AR
from felix.core.formats import get_format
from felix.testing import ggml_c

ok, why = ggml_c.available()
pytestmark = pytest.mark.skipif(not ok, reason=why)
Q8_K_BYTES = 4 + AR.Q8_K_BLOCK + 2 * (AR.Q8_K_BLOCK // 16)  # float d, int8 qs[256], int16 bsums[16]


def activations(gen, rows: int, cols: int) -> torch.Tensor:
    """Activation-like rows: Gaussian with per-row scales over 4 decades and a few outliers, as after RMSNorm/SwiGLU."""
    x = torch.randn(rows, cols, generator=gen) * torch.logspace(-2, 2, rows)[:, None]
    spikes = torch.rand(rows, cols, generator=gen) < 0.01
    return torch.where(spikes, x * 20, x)


def test_q8_0_matches_ggml_except_at_float32_ties(gen):
    x = activations(gen, 64, 8 * get_format("q8_0").block_size)
    got = AR.round_q8_0(x)
    n = x.numel()
    blocks = ggml_c.quantize(x.numpy(), "q8_0")
    want = torch.from_numpy(ggml_c.dequantize(blocks, "q8_0", n).reshape(x.shape).copy())
    b = x.reshape(-1, 32)
    amax = b.abs().amax(-1, keepdim=True)
    scaled = (b * (127.0 / amax)).reshape(x.shape)
    near_tie = ((scaled - scaled.floor()) - 0.5).abs() < 1e-4
    d16 = (amax / 127.0).half().float().expand_as(b).reshape(x.shape)
    diff = (got - want).abs()
    assert torch.equal(got[~near_tie], want[~near_tie])
    assert (diff[near_tie] <= d16[near_tie] * 1.0001).all()
    assert (got != 0).float().mean() > 0.9  # not a vacuous comparison of zeros


def test_q8_k_matches_ggml_quantize_row_q8_k_ref(gen):
    lib = ggml_c.library()
    quant, dequant = lib.quantize_row_q8_K_ref, lib.dequantize_row_q8_K
    for fn in (quant, dequant):
        fn.restype, fn.argtypes = None, [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
    x = activations(gen, 16, 4 * AR.Q8_K_BLOCK)
    x[3] = 0.0  # an all-zero row: d = 0
    x[5, 7] = -x[5].abs().max() * 3  # the signed max is negative in some blocks
    xs = np.ascontiguousarray(x.numpy(), dtype=np.float32)
    buf = np.empty(xs.size // AR.Q8_K_BLOCK * Q8_K_BYTES, dtype=np.uint8)
    quant(xs.ctypes.data, buf.ctypes.data, xs.size)
    want = np.empty(xs.size, dtype=np.float32)
    dequant(buf.ctypes.data, want.ctypes.data, xs.size)
    got = AR.round_q8_k(x).numpy().reshape(-1)
    np.testing.assert_array_equal(got, want)


def test_round_activations_types_and_errors(gen):
    x = activations(gen, 4, 64)
    assert AR.round_activations(x, None) is x
    assert torch.equal(AR.round_activations(x, "f16"), x.half().float())
    assert torch.equal(AR.round_activations(x, "bf16"), x.bfloat16().float())
    with pytest.raises(ValueError, match="blocks of 256"):
        AR.round_q8_k(x)
    with pytest.raises(ValueError, match="unknown activation type"):
        AR.round_activations(x, "q4_0")
    assert [AR.vec_dot_type(t) for t in ("f32", "f16", "q4_0", "iq4_nl", "rq4", "q8_0", "tq2_0")] == [
        None,
        "f16",
        "q8_0",
        "q8_0",
        "q8_0",
        "q8_0",
        "q8_k",
    ]


def test_model_hook_rounds_every_matmul_input_and_none_restores(gen):
    from felix.model import felix_lm as M
    from felix.ops.quant_policy import plan_tensor_types

    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=gen)))
    model = M.FelixLM(M.preset("tiny", vocab_size=512)).eval()
    tokens = torch.randint(0, 512, (2, 24), generator=gen)
    plan = plan_tensor_types({k: tuple(v.shape) for k, v in model.state_dict().items()}, "q4_0")
    rounding = AR.ActivationRounding.from_plan(plan)
    seen = []

    class Recording(AR.ActivationRounding):
        def __call__(self, site, x):
            seen.append(site)
            return super().__call__(site, x)

        def attention(self, q, k, v):
            seen.append("attention")
            return super().attention(q, k, v)

    model.set_activation_rounding(Recording.from_plan(plan))
    with torch.no_grad():
        rounded = model(tokens)
        model.set_activation_rounding(None)
        exact = model(tokens)
    want_sites = {f"blk.{i}.{p}.weight" for i in range(model.cfg.n_layer) for p in M.PROJECTIONS}
    assert set(seen) == want_sites | {"attention", model.head_weight_name}
    assert 0 < (rounded - exact).abs().max() < 0.05 * exact.abs().max()
    with pytest.raises(KeyError, match="no weight type"):
        rounding("blk.99.attn_q.weight", tokens.float())


def test_runtime_attention_is_causal_gqa_attention_up_to_f16(gen):
    """llama.cpp's attention numerics against the float64 spec: equal within f16 rounding of q, k, v and P."""
    from felix.ops.reference.attention import attention_forward

    q = torch.randn(2, 4, 37, 32, generator=gen)
    k, v = torch.randn(2, 2, 37, 32, generator=gen), torch.randn(2, 2, 37, 32, generator=gen)
    want = attention_forward(q.double(), k.double(), v.double(), causal=True, scale=32**-0.5)[0]
    got = AR.runtime_attention(q, k, v)
    exact = AR.runtime_attention(q, k, v, kv_type=None)
    assert (exact.double() - want).abs().max() < 1e-5
    err = (got.double() - want).abs().max()
    assert 1e-5 < err < 8 * 2.0**-11 * want.abs().max()  # a few f16 ulps, and not zero: it does round
