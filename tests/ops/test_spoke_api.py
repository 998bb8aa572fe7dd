"""felix.spoke_residual, the fused spoke op, on its reference backend (the spec) against float64 autograd of the
fork's formula; the custom op's registration (opcheck); bad input; the exact no-op of a zero W_up; the spoke config
on the model (gate schedule, counts, validation)."""

import pytest
import torch

import felix
from felix.model import spokes
from felix.model.felix_lm import PRESETS, FelixConfig, FelixLM, parameter_counts, preset
from felix.ops.spoke import _spoke_fwd_op
from felix.ops.reference.spoke import SPOKE_INPUTS, truth_grads
from felix.ops.reference.tolerances import max_relative_error
from felix.testing.spoke_cases import make_case


@pytest.mark.parametrize(
    "shape",
    [
        dict(lead=(3, 7), d=37, n_spokes=4, rank=3),
        dict(lead=(1,), d=8, n_spokes=1, rank=1),
        dict(lead=(2, 5), d=64, n_spokes=4, rank=64),
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_reference_matches_float64_truth(seed, shape, dtype):
    case = make_case(seed, dtype=dtype, **shape)
    dy = torch.randn(case["h"].shape, generator=torch.Generator().manual_seed(seed + 1)).to(dtype)
    leaves = [case[k].detach().clone().requires_grad_() for k in SPOKE_INPUTS]
    y = felix.spoke_residual(*leaves, case["n_spokes"], case["eps"], backend="reference")
    grads = torch.autograd.grad(y, leaves, dy)
    want_y, want = truth_grads(case, dy)
    # fp32: ~1e-7 per op, sums of <= 256 terms; fp64 input with fp32 norm weight / gate: those grads are fp32
    bar = 2e-6 if dtype == torch.float32 else 1e-12
    assert max_relative_error(y, want_y) <= bar
    for k, g in zip(SPOKE_INPUTS, grads):
        assert g.dtype == case[k].dtype
        assert max_relative_error(g, want[k]) <= (2e-6 if g.dtype == torch.float32 else bar), k


def test_opcheck_and_compile(seed):
    case = make_case(seed, lead=(6,), d=16, n_spokes=2, rank=4)
    args = [case[k].detach().clone().requires_grad_() for k in SPOKE_INPUTS]
    torch.library.opcheck(_spoke_fwd_op, (*args, 2, 1e-5, "reference"))
    compiled = torch.compile(lambda *t: felix.spoke_residual(*t, 2, 1e-5), fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(*args), felix.spoke_residual(*args, 2, 1e-5), rtol=0, atol=0)


def test_zero_w_up_is_an_exact_no_op(seed):
    case = make_case(seed, lead=(4, 9), d=40)
    case["w_up"] = torch.zeros_like(case["w_up"])
    y = felix.spoke_residual(*(case[k] for k in SPOKE_INPUTS), case["n_spokes"], case["eps"])
    assert torch.equal(y, case["h"])


def test_bad_input_is_named(seed):
    c = make_case(seed, lead=(2,), d=16, n_spokes=2, rank=4)
    args = {k: c[k] for k in SPOKE_INPUTS}

    def call(**kw):
        a = {**args, **kw}
        n = a.pop("n_spokes", 2)
        return felix.spoke_residual(*(a[k] for k in SPOKE_INPUTS), n)

    with pytest.raises(ValueError, match="spoke shapes do not fit"):
        call(w_down=c["w_down"][:, :5])
    with pytest.raises(ValueError, match="spoke shapes do not fit"):
        call(w_up=c["w_up"][:, :3])
    with pytest.raises(ValueError, match="norm_weight must be"):
        call(norm_weight=torch.ones(3))
    with pytest.raises(ValueError, match="gate_bias must hold one value"):
        call(gate_bias=torch.zeros(2))
    with pytest.raises(ValueError, match="must have h's dtype"):
        call(w_up=c["w_up"].double())
    with pytest.raises(ValueError, match="n_spokes must be a positive int dividing"):
        call(n_spokes=3)
    with pytest.raises(ValueError, match="float tensor"):
        call(h=torch.ones(2, 16, dtype=torch.int32))


def test_every_preset_carries_a_spoke_config():
    for name, p in PRESETS.items():
        cfg = preset(name)
        assert "spoke_rank" in p and cfg.n_spokes == 0, name  # off until asked for
        on = preset(name, n_spokes=4)
        assert on.resolved_spoke_layers() == list(range(on.n_layer))
        assert parameter_counts(on)["spokes"] == on.n_layer * (2 * 4 * on.spoke_rank * on.d_model + on.d_model + 1)
    assert preset("felix-300m").spoke_rank == 64  # the seed's 4 x 64


def test_gate_schedule_and_fresh_spokes_are_an_exact_no_op(seed):
    torch.manual_seed(seed)
    cfg = preset("tiny", n_spokes=4, spoke_rank=8)
    model = FelixLM(cfg)
    gates = [float(b.spoke.gate_bias) for b in model.blk]
    assert gates == pytest.approx([-2 + 4 * i / (cfg.n_layer - 1) for i in range(cfg.n_layer)])
    assert all(not b.spoke.w_up_fused.weight.any() and b.spoke.w_down_fused.weight.std() > 0 for b in model.blk)
    assert spokes.gate_init_schedule(1) == [-2.0]
    # the same hub with and without (fresh) spokes: bit-identical logits
    hub = FelixLM(preset("tiny"))
    hub.load_state_dict({k: v for k, v in model.state_dict().items() if ".spoke." not in k})
    x = torch.randint(0, cfg.vocab_size, (2, 24))
    assert torch.equal(hub(x), model(x))
    spokes.add_spokes(hub, 4, 8)
    assert torch.equal(hub(x), model(x))
    with pytest.raises(spokes.SpokeError, match="already has"):
        spokes.add_spokes(hub, 4, 8)


def test_spoke_config_validation():
    with pytest.raises(ValueError, match="> 256"):
        FelixConfig(n_spokes=8, spoke_rank=64)
    with pytest.raises(ValueError, match="spoke layer"):
        FelixConfig(n_spokes=2, spoke_layers=[9])
    with pytest.raises(ValueError, match="n_spokes must be >= 0"):
        FelixConfig(n_spokes=-1)
    with pytest.raises(ValueError, match="spoke_rank must be >= 1"):
        FelixConfig(n_spokes=1, spoke_rank=0)
    with pytest.raises(ValueError, match="spoke_gate_init"):
        FelixConfig(n_spokes=1, spoke_gate_init=[float("nan"), 1.0])
    model = FelixLM(preset("tiny"))
    with pytest.raises(ValueError, match="> 256"):
        spokes.add_spokes(model, 5, 64)
    assert model.cfg.n_spokes == 0 and all(b.spoke is None for b in model.blk)
