"""felix.lowrank_linear (reference backend) against float64 autograd of the term-by-term formula; clear
errors; torch.library well-formedness and torch.compile; the SpliceCore modules and the name API; the
spoke residual of the fork's `felix` arch."""

import pytest
import torch

import felix
from felix.model import splice
from felix.ops import lowrank as lr_ops
from felix.ops.reference.lowrank import grad_errors, leaves_of, truth_grads
from felix.testing.lowrank_cases import make_case


@pytest.mark.parametrize(
    "kw",
    [
        dict(ranks=(8,)),
        dict(ranks=(1,), per_output_gate=(True,), frozen=True, bias=False),
        dict(ranks=(64,), in_f=70, out_f=45),
        dict(ranks=(8, 3), per_output_gate=(True, False)),
    ],
    ids=["r8", "r1-frozen", "r64", "two-terms"],
)
@pytest.mark.parametrize("dtype,bar", [(torch.float64, 1e-12), (torch.float32, 2e-5), (torch.bfloat16, 3e-2)])
def test_reference_matches_float64(seed, kw, dtype, bar):
    case = make_case(seed, dtype=dtype, **kw)
    t, names, leaves = leaves_of(case)
    y = felix.lowrank_linear(t["x"], t["weight"], t["a"], t["b"], t["gate"], bias=t["bias"], backend="reference")
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed)).to(dtype)
    grads = dict(zip(names, torch.autograd.grad(y, leaves, dy)))
    want_y, want = truth_grads(case, dy)
    assert y.dtype == dtype
    assert float((y.detach().double() - want_y).abs().max() / want_y.abs().max()) <= bar
    for k, e in grad_errors(grads, want, case, dy).items():
        # the gates stay fp32 parameters: their gradients carry fp32 rounding even for float64 inputs
        assert e <= (max(bar, 1e-6) if k.startswith("gate") else bar), (k, e)


def test_frozen_weight_gets_no_gradient_and_costs_no_weight_gemm(seed, monkeypatch):
    case = make_case(seed, frozen=True)
    t, names, leaves = leaves_of(case)
    seen = []
    real = lr_ops.reference_backward
    monkeypatch.setitem(
        felix.ops.dispatch._IMPLS["lowrank_bwd"], "reference", lambda *args: seen.append(args[6]) or real(*args)
    )
    felix.lowrank_linear(t["x"], t["weight"], t["a"], t["b"], t["gate"], bias=t["bias"]).sum().backward()
    assert seen == [False] and t["weight"].grad is None and t["a"][0].grad is not None


def test_fresh_splice_is_the_identity(gen):
    layer = splice.SplicedLinear(40, 24, bias=True, layer=3, projection="ffn_down")
    core = layer.add_term("splice", rank=8)
    x = torch.randn(5, 40, generator=gen)
    assert torch.equal(core.b, torch.zeros(24, 8))
    torch.testing.assert_close(layer(x), torch.nn.functional.linear(x, layer.weight, layer.bias), rtol=1e-6, atol=1e-6)


def test_bad_input_is_refused_clearly(gen):
    x, w = torch.randn(4, 16, generator=gen), torch.randn(8, 16, generator=gen)
    a, b = torch.randn(4, 16, generator=gen), torch.randn(8, 4, generator=gen)
    cases = [
        (dict(x=x[:, :15]), r"x has 15 input features, weight \(8, 16\) expects 16"),
        (dict(weight=w.double()), "x and weight must share a float dtype"),
        (dict(a=torch.randn(4, 15)), r"a\[0\] must be \[r, 16\]"),
        (dict(b=torch.randn(8, 3)), r"b\[0\] must be \[8, 4\]"),
        (dict(a=torch.randn(65, 16), b=torch.randn(8, 65)), r"total rank .* \[1, 64\], got 65"),
        (dict(a=[a, a], b=[b]), "2 A tensors but 1 B tensors"),
        (dict(gate=torch.ones(7)), r"gate\[0\] must be a number, a 1-element tensor or a \[8\]"),
        (dict(gate=[1.0, 2.0]), "2 gates for 1 low-rank terms"),
        (dict(bias=torch.zeros(7)), r"bias must be a \[8\] tensor"),
        (dict(a=a.half()), r"a\[0\] and b\[0\] must have x's dtype"),
        (dict(backend="nope"), "unknown backend"),
    ]
    for override, msg in cases:
        kw = dict(x=x, weight=w, a=a, b=b, gate=0.5) | override
        with pytest.raises(ValueError, match=msg):
            felix.lowrank_linear(**kw)
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        felix.lowrank_linear(x, w, a, b, 0.5, backend="triton")


def test_custom_ops_are_well_formed(gen):
    x, w = torch.randn(6, 16, generator=gen, requires_grad=True), torch.randn(8, 16, generator=gen, requires_grad=True)
    a, b = torch.randn(4, 16, generator=gen, requires_grad=True), torch.randn(8, 4, generator=gen, requires_grad=True)
    bias = torch.randn(8, generator=gen, requires_grad=True)
    torch.library.opcheck(lr_ops._lowrank_fwd_op, (x, w, bias, a, b, "reference"))
    y, u = lr_ops._lowrank_fwd_op(x, w, bias, a, b, "reference")
    torch.library.opcheck(
        lr_ops._lowrank_bwd_op,
        (torch.randn_like(y), x.detach(), w.detach(), a.detach(), b.detach(), u.detach(), True, True, "reference"),
    )


def test_torch_compile_traces_a_spliced_layer(gen):
    layer = splice.SplicedLinear(32, 24, layer=7, projection="ffn_down")
    core = layer.add_term("splice", rank=8)
    with torch.no_grad():
        core.b.normal_()
    x = torch.randn(3, 5, 32, generator=gen)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    got = compiled(x)
    got.sum().backward()
    want = x @ layer.weight.t() + core.gate * ((x @ core.a.t()) @ core.b.t())
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert core.a.grad is not None and core.gate.grad is not None


def test_gradcheck_float64(seed):
    case = make_case(seed, lead=(4,), in_f=9, out_f=7, ranks=(2, 3), per_output_gate=(True, False), dtype=torch.float64)
    t, names, leaves = leaves_of(case, torch.float64)

    def fn(*args):
        d = dict(zip(names, args))
        return felix.lowrank_linear(
            d["x"], d["weight"], [d["a0"], d["a1"]], [d["b0"], d["b1"]], [d["gate0"], d["gate1"]], bias=d["bias"]
        )

    assert torch.autograd.gradcheck(fn, tuple(leaves))


# ------------------------------------------------------------------------------------- name API
def spliced_model():
    model = torch.nn.ModuleDict({f"l{i}": splice.SplicedLinear(16, 12, layer=i, projection="ffn_down") for i in (3, 7)})
    model["l3"].add_term("splice", rank=8)
    model["l7"].add_term("splice", rank=8)
    model["l7"].add_term("adapter", rank=4, per_output_gate=True)
    return model


def test_list_read_write_snapshot_restore(gen):
    model = spliced_model()
    names = splice.list_splices(model)
    assert names["blk.3.splice.ffn_down.a"] == ((8, 16), torch.float32)
    assert names["blk.7.adapter.ffn_down.gate"] == ((12,), torch.float32)
    assert len(names) == 9
    snap = splice.snapshot_splices(model)
    new_b = torch.randn(12, 8, generator=gen)
    splice.write_splice(model, "blk.3.splice.ffn_down.b", new_b)
    assert torch.equal(splice.read_splice(model, "blk.3.splice.ffn_down.b"), new_b)
    x = torch.randn(2, 16, generator=gen)
    assert not torch.allclose(model["l3"](x), x @ model["l3"].weight.t())
    splice.restore_splices(model, snap)
    assert torch.equal(splice.read_splice(model, "blk.3.splice.ffn_down.b"), torch.zeros(12, 8))
    torch.testing.assert_close(model["l3"](x), x @ model["l3"].weight.t())


def test_bare_splicecores_are_named_by_their_module_path():
    model = torch.nn.Module()
    model.blk = torch.nn.ModuleList(torch.nn.Module() for _ in range(4))
    model.blk[3].splice = torch.nn.ModuleDict({"ffn_down": splice.SpliceCore(16, 12, rank=8)})
    assert list(splice.list_splices(model)) == [
        "blk.3.splice.ffn_down.a",
        "blk.3.splice.ffn_down.b",
        "blk.3.splice.ffn_down.gate",
    ]


def test_bad_writes_are_refused_and_change_nothing(gen):
    model = spliced_model()
    before = splice.snapshot_splices(model)
    with pytest.raises(ValueError, match=r"shape \(8, 12\) does not match the splice tensor's \(12, 8\)"):
        splice.write_splice(model, "blk.3.splice.ffn_down.b", torch.zeros(8, 12))
    with pytest.raises(ValueError, match="dtype torch.float16 does not match"):
        splice.write_splice(model, "blk.3.splice.ffn_down.b", torch.zeros(12, 8, dtype=torch.float16))
    with pytest.raises(ValueError, match="NaN or Inf"):
        splice.write_splice(model, "blk.3.splice.ffn_down.b", torch.full((12, 8), float("nan")))
    with pytest.raises(KeyError, match="no splice tensor named 'blk.3.splice.attn_q.a'"):
        splice.read_splice(model, "blk.3.splice.attn_q.a")
    bad_snapshot = dict(before) | {"blk.7.splice.ffn_down.a": torch.zeros(3, 3)}
    bad_snapshot["blk.3.splice.ffn_down.b"] = torch.ones(12, 8)
    with pytest.raises(ValueError, match="does not match"):
        splice.restore_splices(model, bad_snapshot)
    after = splice.snapshot_splices(model)
    assert all(torch.equal(before[k], after[k]) for k in before), "a refused restore must not write anything"


def test_spoke_residual_matches_the_fork_formula(gen):
    d, s, r = 32, 4, 8
    h = torch.randn(3, 5, d, generator=gen, dtype=torch.float64)
    norm_w = torch.rand(d, generator=gen, dtype=torch.float64) + 0.5
    w_down, w_up = (
        torch.randn(s * r, d, generator=gen, dtype=torch.float64),
        torch.randn(d, s * r, generator=gen, dtype=torch.float64),
    )
    gate = torch.tensor([-1.0], dtype=torch.float64)
    got = felix.spoke_residual(h, norm_w, w_down, w_up, gate, n_spokes=s)
    normed = h / torch.sqrt((h * h).mean(-1, keepdim=True) + 1e-6) * norm_w
    want = h + torch.sigmoid(gate) * (torch.nn.functional.silu(normed @ w_down.t()) @ w_up.t()) / s
    torch.testing.assert_close(got, want.to(got.dtype), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="spoke shapes do not fit"):
        felix.spoke_residual(h, norm_w, w_down[:, :5], w_up, gate, n_spokes=s)
