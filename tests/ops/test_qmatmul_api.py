"""The public quantized-matmul API on CPU (reference tier): clear errors on bad input, the layout read off
the reference decoder, the reference backend vs float64, the custom op (opcheck, x-gradient,
torch.compile), QuantLinear round trips and quantize_model_linears' policy, and a quantized tiny model
whose logits match its dequantized-weight twin."""

import pytest
import torch
from torch import nn

import felix
from felix.core.formats import get_format
from felix.ops import qmatmul as qmm_ops
from felix.ops.reference.qmatmul import QUANT_MATMUL_FORMATS, decode_table, four_bit_layout


def weights(gen, n, k):
    return torch.randn(n, k, generator=gen) * 0.05 * torch.exp(0.5 * torch.randn(n, 1, generator=gen))


# ---------------------------------------------------------------------------------- layout
def test_layout_matches_the_format_table():
    for fmt in QUANT_MATMUL_FORMATS:
        f, lay = get_format(fmt), four_bit_layout(fmt)
        if f.codebook is not None:
            assert torch.equal(decode_table(fmt), f.codebook_tensor())
        else:  # q4_0: x = d * (q - 8)
            assert lay.table == tuple(float(i - 8) for i in range(16))
    assert four_bit_layout("rq4").pairs and not four_bit_layout("q4_0").pairs and not four_bit_layout("iq4_nl").pairs


# ------------------------------------------------------------------------------- bad input
def test_refuses_bad_inputs_with_clear_errors(gen):
    w = weights(gen, 16, 64)
    b = felix.quantize(w, "rq4")
    x = torch.randn(2, 64, generator=gen)
    with pytest.raises(ValueError, match=r"K = x.shape\[-1\] = 48 must be a multiple of 32"):
        felix.quant_matmul(torch.randn(2, 48), b, "rq4", 16)
    with pytest.raises(ValueError, match=r"a \[16, 96\] rq4 weight needs 864 bytes .* has 576"):
        felix.quant_matmul(torch.randn(2, 96), b, "rq4", 16)
    with pytest.raises(ValueError, match=r"a \[17, 64\] rq4 weight needs 612 bytes"):
        felix.quant_matmul(x, b, "rq4", 17)
    with pytest.raises(ValueError, match="supports the 4-bit formats rq4|supports the 4-bit formats q4_0"):
        felix.quant_matmul(x, b, "q8_0", 16)
    with pytest.raises(ValueError, match="unknown quantization format 'q3_k'"):
        felix.quant_matmul(x, b, "q3_k", 16)
    with pytest.raises(ValueError, match="float32/float16/bfloat16 activations, got torch.int32"):
        felix.quant_matmul(x.to(torch.int32), b, "rq4", 16)
    with pytest.raises(ValueError, match="uint8 tensor of ggml blocks, got torch.int8"):
        felix.quant_matmul(x, b.to(torch.int8), "rq4", 16)
    with pytest.raises(ValueError, match="out_features must be a non-negative int"):
        felix.quant_matmul(x, b, "rq4", 16.0)
    with pytest.raises(ValueError, match="unknown backend 'cuda'"):
        felix.quant_matmul(x, b, "rq4", 16, backend="cuda")
    with pytest.raises(ValueError, match="backend 'hip' is not available|needs GPU tensors"):
        felix.quant_matmul(x, b, "rq4", 16, backend="hip")
    with pytest.raises(ValueError, match="op 'quant_matmul' has no 'cpu' backend"):
        felix.quant_matmul(x, b, "rq4", 16, backend="cpu")
    if not felix.backends()["triton"].available:
        with pytest.raises(ValueError, match="backend 'triton' is not available"):
            felix.quant_matmul(x, b, "rq4", 16, backend="triton")


# ------------------------------------------------------------------------------- behaviour
@pytest.mark.parametrize("fmt", QUANT_MATMUL_FORMATS)
def test_reference_matches_float64_for_every_dtype_and_shape(gen, fmt):
    w = weights(gen, 37, 96)
    b = felix.quantize(w, fmt)
    wd = felix.dequantize(b, fmt, w.shape).double()
    for lead in [(1,), (5,), (2, 3), ()]:
        x = torch.randn(*lead, 96, generator=gen)
        ref = x.double() @ wd.t()
        for dtype, rel in [(torch.float32, 1e-6), (torch.float16, 2.0**-11), (torch.bfloat16, 2.0**-8)]:
            xd = x.to(dtype)
            y = felix.quant_matmul(xd, b, fmt, 37)
            assert y.dtype == dtype and y.shape == (*lead, 37)
            ref = xd.double() @ wd.t()
            assert ((y.double() - ref).abs() <= rel * ref.abs() + 1e-6 * (xd.double().abs() @ wd.abs().t())).all()


def test_empty_and_degenerate_shapes(gen):
    b = felix.quantize(weights(gen, 8, 32), "q4_0")
    assert felix.quant_matmul(torch.zeros(0, 32), b, "q4_0", 8).shape == (0, 8)
    assert felix.quant_matmul(torch.randn(3, 32), b[:0], "q4_0", 0).shape == (3, 0)


def test_custom_op_opcheck_gradient_and_compile(gen):
    w = weights(gen, 24, 64)
    b = felix.quantize(w, "rq4")
    x = torch.randn(5, 64, generator=gen, requires_grad=True)
    torch.library.opcheck(qmm_ops._quant_matmul_op, (x, b.view(-1), "rq4", 24, "reference"))
    y = felix.quant_matmul(x, b, "rq4", 24)
    g = torch.randn_like(y)
    y.backward(g)
    wd = felix.dequantize(b, "rq4", w.shape)
    assert torch.allclose(x.grad, g @ wd, atol=1e-5)
    compiled = torch.compile(lambda t: felix.quant_matmul(t, b, "rq4", 24) * 2, fullgraph=True, backend="eager")
    assert torch.allclose(compiled(x.detach()), 2 * y.detach())


# ------------------------------------------------------------------------------ QuantLinear
@pytest.mark.parametrize("fmt", QUANT_MATMUL_FORMATS)
def test_quant_linear_equals_linear_on_dequantized_weight(gen, fmt):
    lin = nn.Linear(64, 48)
    with torch.no_grad():
        lin.weight.copy_(weights(gen, 48, 64))
    q = felix.QuantLinear.from_linear(lin, fmt)
    assert torch.equal(q.blocks, felix.quantize(lin.weight.detach(), fmt))
    x = torch.randn(4, 7, 64, generator=gen)
    want = nn.functional.linear(x, q.dequantized_weight(), lin.bias)
    assert torch.allclose(q(x), want, atol=1e-5, rtol=1e-5)
    sd = q.state_dict()
    assert set(sd) == {"blocks", "bias"} and sd["blocks"].dtype == torch.uint8
    q2 = felix.QuantLinear(64, 48, fmt)
    q2.load_state_dict(sd)
    assert torch.equal(q2(x), q(x))
    nobias = felix.QuantLinear.from_linear(nn.Linear(64, 48, bias=False), fmt)
    assert nobias.bias is None and "bias=False" in repr(nobias)


def test_quant_linear_refuses_bad_geometry():
    with pytest.raises(ValueError, match=r"in_features \(40\) must be a multiple of 32"):
        felix.QuantLinear(40, 8)
    with pytest.raises(ValueError, match="QuantLinear supports"):
        felix.QuantLinear(64, 8, "tq2_0")
    with pytest.raises(ValueError, match="expects an nn.Linear"):
        felix.QuantLinear.from_linear(nn.Conv1d(4, 4, 1))


class TinyLM(nn.Module):
    """Embedding -> 2 x (RMSNorm -> SwiGLU MLP, residual) -> norm -> tied output head."""

    def __init__(self, vocab=96, d=64, ffn=128):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.layers = nn.ModuleList()
        for _ in range(2):
            blk = nn.Module()
            blk.norm = nn.RMSNorm(d)
            blk.gate, blk.up, blk.down = nn.Linear(d, ffn, bias=False), nn.Linear(d, ffn, bias=False), nn.Linear(ffn, d)
            blk.tiny = nn.Linear(d, 8)  # 512 weights: below the fork's 1024-element threshold
            self.layers.append(blk)
        self.norm = nn.RMSNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, ids):
        h = self.embed(ids)
        for blk in self.layers:
            z = blk.norm(h)
            h = h + blk.down(nn.functional.silu(blk.gate(z)) * blk.up(z)) + blk.tiny(z).mean(-1, keepdim=True)
        return self.head(self.norm(h))


def test_quantize_model_linears_follows_the_fork_policy_and_logits_match(gen):
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=gen)))
    model = TinyLM()
    report = felix.quantize_model_linears(model, "rq4")
    assert report["layers.0.gate"] == report["layers.1.down"] == "quantized"
    assert "fewer than 1024" in report["layers.0.tiny"]
    assert "embedding" in report["head"]
    assert isinstance(model.layers[0].up, felix.QuantLinear) and isinstance(model.head, nn.Linear)
    assert isinstance(model.layers[0].tiny, nn.Linear)
    # the dequantized-weight twin: every QuantLinear replaced by an nn.Linear holding its decoded weight
    twin = TinyLM()
    twin.load_state_dict({k: v for k, v in model.state_dict().items() if "blocks" not in k}, strict=False)
    for i, blk in enumerate(model.layers):
        for name in ("gate", "up", "down"):
            q = getattr(blk, name)
            getattr(twin.layers[i], name).weight.data.copy_(q.dequantized_weight())
    ids = torch.randint(0, 96, (2, 11), generator=gen)
    with torch.no_grad():
        got, want = model(ids), twin(ids)
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()
    everything = felix.quantize_model_linears(TinyLM(), "q4_0", include_embeddings=True)
    assert everything["head"] == "quantized"
    custom = felix.quantize_model_linears(TinyLM(), "rq4", policy=lambda n, m, t: None if n.endswith("up") else "no")
    assert [n for n, r in custom.items() if r == "quantized"] == ["layers.0.up", "layers.1.up"]
