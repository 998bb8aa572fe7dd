"""Fidelity harness, runtime path: the simulated path (PyTorch on dequantized weights) agrees with the exported
GGUF in llama.cpp within a measured bound on every stock format, which is what lets us trust the simulated path
for RQ4 (which stock llama.cpp cannot run).

ggml quantizes activations to Q8 inside its matmuls, so the paths cannot agree exactly. Measured on this tiny
random-init model (2 x 256, vocab 400, 2 built-in probes; max relative logit error = max |difference| / max
|logit| per position): f32 ~1e-4, q8_0 / q4_0 / iq4_nl ~7e-3, tq2_0 ~1.2e-2; KL(runtime -> simulated) <= 2e-5,
no whitelisted decision differs. The bounds below leave ~3x headroom, and require the paths' disagreement to be
far below the quantization's own effect (else the simulated path could not tell formats apart)."""

from __future__ import annotations

import pytest
import torch

from felix.tasks import records as task_records
from felix.model import chat
from felix.verify import fidelity as F
from felix.model import felix_lm as M
from felix.model.tokenizer import train_tokenizer

llama_cpp = pytest.importorskip("llama_cpp")

# format: (max relative logit error, max |margin difference| at whitelisted positions)
BOUNDS = {
    "f32": (1e-3, 5e-3),
    "q8_0": (0.025, 0.05),
    "q4_0": (0.025, 0.05),
    "iq4_nl": (0.025, 0.05),
    "tq2_0": (0.04, 0.06),
}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    texts = [chat.chat_text(r["prompt"], r["response"]) for r in task_records.structured_records(120, 5)]
    tok = train_tokenizer(texts, 400)
    torch.manual_seed(0)
    model = M.FelixLM(M.preset("tiny-256", vocab_size=tok.vocab_size))
    path = tmp_path_factory.mktemp("fid-rt") / "ck"
    M.save_checkpoint(path, model, tok)
    return path


@pytest.mark.parametrize("quant", list(BOUNDS))
def test_simulated_agrees_with_llamacpp(checkpoint, quant, tmp_path):
    report = F.run_fidelity(
        checkpoint,
        F.FidelityOptions(
            quant=quant,
            paths=("simulated", "runtime"),
            n_probes=2,
            sensitivity=False,
            compliance=False,
            gguf_dir=str(tmp_path),
        ),
    )
    a = report["agreement"]
    rel_bound, margin_bound = BOUNDS[quant]
    print(f"{quant}: simulated vs runtime {a}")
    assert (tmp_path / f"quantized-{quant}.gguf").is_file()
    assert a["max_rel_err"] <= rel_bound, a
    assert a["margin_abs_diff_max"] <= margin_bound, a
    assert a["top1_agreement"] >= 0.99 and a["decision_disagreements"] == 0, a
    sim, rt = report["results"]["simulated"]["summary"], report["results"]["runtime"]["summary"]
    assert sim["whitelisted_positions"] == rt["whitelisted_positions"] > 10
    if quant in ("q4_0", "iq4_nl", "tq2_0"):
        # the paths differ by far less than quantization moves the model
        assert a["kl_mean"] < 0.1 * sim["kl"]["mean"], (a, sim["kl"])
        assert rt["kl"]["mean"] == pytest.approx(sim["kl"]["mean"], rel=0.3)
