"""Splice edits deployed: an edited model exported as base GGUF + splice LoRA adapter hot-swaps in llama.cpp (stock
via llama-cpp-python, and the fork) and reproduces the edit: the runtime's logits equal PyTorch's on the same
weights (f32 bound of tests/ship/test_export_llamacpp.py), the edited target is the argmax at scale 1 and not at scale 0."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_edit import REQS, make_model, one_thread, tok  # noqa: F401  (fixtures)

from felix.tools.edit import SpliceEditor, target_sequence, tokenize_request
from felix.ship.export import export_gguf
from felix.ship.llamacpp import LlamaCppModel, available

F32_BOUND = 3e-3  # max |logit error| / max |logit| of an f32 export (tests/ship/test_export_llamacpp.py)


@pytest.fixture(scope="module")
def edited(tok, tmp_path_factory):  # noqa: F811
    model = make_model(tok, seed=3)
    x_ids, pos = target_sequence(*tokenize_request(tok, model, REQS[2]))
    with torch.no_grad():
        before = model(torch.tensor([x_ids]))[0, pos[0]].double().numpy()
    ed = SpliceEditor(model, tok, null_space=False)
    ed.apply(REQS[:3])
    with torch.no_grad():
        after = model(torch.tensor([x_ids]))[0, pos[0]].double().numpy()
    target = tokenize_request(tok, model, REQS[2])[1][0]
    assert int(np.argmax(before)) != target and int(np.argmax(after)) == target
    d = tmp_path_factory.mktemp("edited")
    res = export_gguf(d, d / "base.gguf", quant="f32", splice="adapter", model=model, tokenizer=tok)
    return res, x_ids, pos[0], before, after, target


@pytest.mark.parametrize("runtime", ["stock", "fork"])
def test_edit_adapter_hot_swaps_in_llamacpp(edited, runtime):
    ok, why = available(runtime)
    if not ok:
        pytest.skip(why)
    res, ids, pos, before, after, target = edited
    with LlamaCppModel(res.path, adapter=res.adapter_path, runtime=runtime) as llm:
        got = llm.logits(ids)[pos]
        assert np.abs(got - after).max() / np.abs(after).max() <= F32_BOUND
        assert int(np.argmax(got)) == target
        llm.set_adapter_scale(0.0)  # the edit switched off live: the unedited model
        got0 = llm.logits(ids)[pos]
        assert np.abs(got0 - before).max() / np.abs(before).max() <= F32_BOUND
        assert int(np.argmax(got0)) != target
        llm.set_adapter_scale(1.0)
        assert int(np.argmax(llm.logits(ids)[pos])) == target
