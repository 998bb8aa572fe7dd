"""A QAT-trained model exported as trained runs in llama.cpp with the logits of its own forward.

A tiny model is trained quantization-aware (felix.model.qat) for a few steps, saved with qat.json, exported by `felix export`
and run in llama.cpp: BitNet b1.58 ternary as TQ2_0 in stock llama.cpp, RQ4 in the fork. The PyTorch side is the QAT
model's forward with llama.cpp's activation numerics modelled (felix.ops.activation_rounding: Q8_K / Q8_0 matmul inputs,
f16 KV cache and probabilities), since those are part of what the runtime computes. The bounds, derived:

* position 0 (attention is a copy of V, nothing crosses positions): both sides apply the same roundings to the same
  inputs and differ only in fp32 summation order, so the logits agree to gamma_K = K * 2^-24 relative, K = 512 the
  longest dot product (measured ~6e-7);
* every position: where an fp32-ulp difference moves an activation across an int8 / f16 rounding boundary, the
  runtime realizes that rounding differently; it cannot be further from the forward than the whole activation
  rounding is, i.e. the largest relative distance between the forward with and without the modelled activation
  numerics (measured ~6e-3 against ~9e-3);
* contrast (ternary): the same latent weights through ggml's own TQ2_0 codec (post-training quantization) are far
  outside that bound (measured ~1.5 relative): the file holds the QAT forward's bytes, not a re-rounding.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import SEED

from felix.model import qat
from felix.ops.activation_rounding import ActivationRounding
from felix.data.corpus import builtin_corpus
from felix.ship.export import export_gguf
from felix.ship.llamacpp import LlamaCppModel, available
from felix.model.felix_lm import FelixConfig, FelixLM, save_checkpoint
from felix.ops.quant_policy import plan_tensor_types
from felix.model.tokenizer import train_tokenizer

GAMMA_K = 512 * 2.0**-24  # fp32 summation-order bound for dot products of up to 512 terms (ffn_hidden)


def rel_err_per_position(x: np.ndarray, ref: np.ndarray) -> np.ndarray:
    return np.abs(x - ref).max(-1) / np.abs(ref).max(-1)


def train_qat(directory, mode: str):
    torch.manual_seed(SEED)
    texts = builtin_corpus(300, seed=SEED)
    tok = train_tokenizer(texts, 1024)
    cfg = FelixConfig(
        vocab_size=tok.vocab_size,
        n_layer=2,
        d_model=256,
        n_head=4,
        n_kv_head=2,
        ffn_hidden=512,
        max_seq_len=128,
        splice_layers=[],
        init_std=0.08,
    )
    model = qat.apply_qat(FelixLM(cfg), mode)
    ids = torch.tensor([i for t in texts[:100] for i in tok.encode(t)])
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(SEED)
    for _ in range(30):
        starts = torch.randint(0, len(ids) - 65, (8,), generator=g).tolist()
        rows = torch.stack([ids[s : s + 65] for s in starts])
        model.loss(rows[:, :-1], rows[:, 1:]).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    ck = save_checkpoint(directory, model.eval(), tok, {qat.QAT_FILE: lambda p: qat.write_qat_config(p, model)})
    prompt = tok.encode(texts[150][:400])[:100]
    assert len(prompt) >= 60
    return ck, model, prompt


def forward(model, prompt, rounding) -> np.ndarray:
    model.set_activation_rounding(rounding)
    with torch.no_grad():
        return model(torch.tensor([prompt]))[0].double().numpy()


@pytest.mark.parametrize("mode", ["bitnet", "rq4"])
def test_exported_qat_model_matches_its_forward_in_llamacpp(tmp_path, mode):
    quant = qat.export_type(mode)
    arch = "felix" if quant == "rq4" else "llama"
    ok, why = available("fork" if arch == "felix" else "stock")
    if not ok:
        pytest.skip(why)
    ck, model, prompt = train_qat(tmp_path / "ck", mode)
    out = tmp_path / f"qat-{quant}.gguf"
    res = export_gguf(ck, out, arch=arch, quant=quant)
    assert sum(t.type == quant and t.note.startswith("QAT") for t in res.tensors) == 14
    with LlamaCppModel(out) as llm:
        got = llm.logits(prompt)

    plan = plan_tensor_types({k: tuple(v.shape) for k, v in model.state_dict().items()}, quant)
    runtime_numerics = forward(model, prompt, ActivationRounding.from_plan(plan))
    exact_activations = forward(model, prompt, None)
    activation_effect = float(rel_err_per_position(runtime_numerics, exact_activations).max())
    err = rel_err_per_position(got, runtime_numerics)
    assert err[0] <= GAMMA_K, (err[0], GAMMA_K)
    assert err.max() <= activation_effect, (float(err.max()), activation_effect)
    clear = np.sort(runtime_numerics, -1)[:, -1] - np.sort(runtime_numerics, -1)[
        :, -2
    ] > 2 * activation_effect * np.abs(runtime_numerics).max(-1)
    assert clear.sum() >= len(prompt) // 4 and (got.argmax(-1) == runtime_numerics.argmax(-1))[clear].all()

    if mode == "bitnet":  # the same latent weights re-rounded by ggml's TQ2_0 codec: far outside the bound
        ptq = tmp_path / "ptq.gguf"
        export_gguf(ck, ptq, quant="tq2_0", model=qat.remove_qat(model))
        with LlamaCppModel(ptq) as llm:
            ptq_err = rel_err_per_position(llm.logits(prompt), runtime_numerics).max()
        assert ptq_err > 10 * activation_effect, (ptq_err, activation_effect)


def test_fidelity_runtime_path_on_a_qat_checkpoint_with_live_splices(tmp_path):
    """A quantization-aware RQ4 checkpoint with a live splice cannot be a merged file (the exporter refuses to
    re-quantize W + gate B A). The harness's runtime path runs it as the base file plus the splice adapter at scale
    1, which is what its forward computes: llama.cpp's LoRA matmuls are F32 on the unrounded input, the base RQ4
    matmul takes Q8_0 activations, and the simulation models exactly that. Bounds as in the test above: position 0
    within GAMMA_K of the forward with runtime numerics, every position within the activation-rounding effect.
    Contrast: the same file without the adapter is far outside them (the splice is live; the adapter carries it)."""
    from felix.verify import fidelity as F
    from felix.verify.fidelity.sources import LlamaCppSource

    ok, why = available("fork")
    if not ok:
        pytest.skip(why)
    torch.manual_seed(SEED)
    texts = builtin_corpus(300, seed=SEED)
    tok = train_tokenizer(texts, 1024)
    cfg = FelixConfig(
        vocab_size=tok.vocab_size,
        n_layer=2,
        d_model=256,
        n_head=4,
        n_kv_head=2,
        ffn_hidden=512,
        max_seq_len=128,
        splice_layers=[1],
        init_std=0.08,
    )
    model = qat.apply_qat(FelixLM(cfg), "rq4")
    with torch.no_grad():  # a live, non-trivial splice
        for core in model.blk[1].splice.values():
            core.b.normal_(0, 0.3)
            core.gate.fill_(1.0)
    model.eval()
    ck = save_checkpoint(tmp_path / "ck", model, tok, {qat.QAT_FILE: lambda p: qat.write_qat_config(p, model)})
    gguf_dir = tmp_path / "gguf"
    report = F.run_fidelity(
        ck,
        F.FidelityOptions(
            quant="rq4",
            paths=("simulated", "runtime"),
            n_probes=2,
            sensitivity=False,
            compliance=False,
            gguf_dir=str(gguf_dir),
            sim_activations="runtime",
        ),
    )
    base, adapter = gguf_dir / "quantized-rq4.gguf", gguf_dir / "quantized-rq4.splice-lora.gguf"
    assert adapter.is_file()
    a = report["agreement"]
    # the harness's own view over its probes (a random-init model has near-tied top-2 tokens, so top-1 agreement is
    # not a bound here; the per-position logit bounds below are): same decisions, the quantization effect predicted
    assert a["decision_disagreements"] == 0, a
    assert abs(report["agreement_by_sim_activations"]["runtime"]["kl_mean_ratio"] - 1) < 0.02, a

    prompt = tok.encode(texts[150][:400])[:100]
    plan = plan_tensor_types({k: tuple(v.shape) for k, v in model.state_dict().items()}, "rq4")
    runtime_numerics = forward(model, prompt, ActivationRounding.from_plan(plan))
    activation_effect = float(rel_err_per_position(runtime_numerics, forward(model, prompt, None)).max())
    sources = LlamaCppSource(base, 128, adapter=adapter), LlamaCppSource(base, 128)
    try:
        got, without = (src.logits([prompt])[0].double().numpy() for src in sources)
    finally:
        for src in sources:
            src.close()
    err = rel_err_per_position(got, runtime_numerics)
    assert err[0] <= GAMMA_K, (err[0], GAMMA_K)
    assert err.max() <= activation_effect, (float(err.max()), activation_effect)
    assert rel_err_per_position(without, runtime_numerics)[0] > 10 * activation_effect
