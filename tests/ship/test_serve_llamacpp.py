"""Felix served the way its users call it: the GGUF's chat template (rendered by llama-cpp-python's own
Jinja2ChatFormatter) against felix.data.corpus's formatter, create_chat_completion and `felix serve`'s OpenAI chat endpoint
against greedy decoding in Felix's own format (LlamaCppModel.greedy on token ids), JSON-schema constrained
decoding, LoRA adapters through the server, the fork's RQ4 file, and the failures (bad files, busy port, a schema
without a grammar, a request beyond the context) with no server process left behind.

The truth for "answers like greedy decoding" is llama.cpp itself fed Felix's token ids ([BOS] + chat_prompt + greedy
on the KV cache, stopping at END or EOS): the same file in the same runtime, so the answers must be equal, not
close. The fixture model has learned the probes (tests/serve_fixtures.py), so those answers are the task JSON."""

from __future__ import annotations

import copy
import json
import os
import socket
from pathlib import Path

import gguf
import pytest
from conftest import SEED
from serve_fixtures import memorized_checkpoint

from felix.model import chat
from felix.ship.export import export_gguf
from felix.verify.fidelity import check_compliance
from felix.verify.fidelity.constrained import json_schema, response_format
from felix.ship.llamacpp import LlamaCppModel, available

ok, why = available()
pytestmark = pytest.mark.skipif(not ok, reason=why)
serve = pytest.importorskip("felix.ship.serve")
for _module in serve.SERVER_PACKAGES:
    pytest.importorskip(_module, reason="llama-cpp-python's server extras are not installed")

MESSAGE_SETS = [
    [{"role": "user", "content": "Encode this observation as a memory (JSON).\nObservation: it rained."}],
    [{"role": "system", "content": "You answer in JSON."}, {"role": "user", "content": "Is it safe?"}],
    [{"role": "system", "content": ""}, {"role": "user", "content": "an empty system message is no turn"}],
    [
        {"role": "user", "content": "first"},
        {"role": "assistant", "content": '{"a": 1}'},
        {"role": "user", "content": "second, naïve café 日本語 🙂\n  with  spaces\t"},
    ],
    [{"role": "system", "content": "s"}, {"role": "user", "content": "q"}, {"role": "assistant", "content": "r"}],
]


def children() -> set[int]:
    """This process's child processes (Linux /proc), to prove no server outlives a failure."""
    out = set()
    for task in Path(f"/proc/{os.getpid()}/task").iterdir():
        try:
            out |= {int(x) for x in (task / "children").read_text().split()}
        except OSError:
            pass
    return out


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    directory, model, tok, probes = memorized_checkpoint(root / "checkpoint")
    gguf = export_gguf(directory, root / "model-q8_0.gguf", quant="q8_0").path
    return {"root": root, "checkpoint": directory, "model": model, "tok": tok, "probes": probes, "gguf": gguf}


@pytest.fixture(scope="module")
def truth(trained):
    return greedy_answers(trained["gguf"], trained["tok"], trained["probes"])


@pytest.fixture(scope="module")
def server(trained):
    with serve.Server(trained["gguf"], port=0, n_threads=1) as s:
        yield s
    assert not s.alive()


def stops(tok) -> list[int]:
    return [tok.eos_id, tok.token_id(chat.END)]


def greedy_answers(gguf, tok, probes, adapter=None, must_stop=True) -> dict[str, tuple[str, int]]:
    """Felix's own format in llama.cpp: [BOS] + chat_prompt token ids, greedy on the KV cache until END / EOS.
    Returns probe name -> (answer text without the stop token, the token budget used). One thread: ggml's threads
    spin at barriers, which costs 10x on a busy 2-core machine."""
    out = {}
    with LlamaCppModel(gguf, n_ctx=trained_ctx(gguf), adapter=adapter, n_threads=1) as llm:
        for p in probes:
            ids = [tok.bos_id, *tok.encode(p.prompt)]
            budget = len(tok.encode(p.expected)) + 16
            new = llm.greedy(ids, budget, stop=stops(tok))
            stopped = new[-1] in stops(tok)
            assert stopped or not must_stop, f"{p.name}: no END within {budget} tokens"
            out[p.name] = (tok.decode(new[:-1] if stopped else new), budget)
    return out


def trained_ctx(gguf) -> int:
    return serve.gguf_facts(gguf)["n_ctx"]


# ------------------------------------------------------------------------------------ the chat template
def test_gguf_chat_template_renders_felix_format_in_llama_cpp(trained):
    """llama-cpp-python picks the GGUF's template (not its llama-2 fallback) and its Jinja2ChatFormatter renders
    exactly BOS + felix.model.chat.chat_messages; tokenized as create_chat_completion does, that is Felix's token ids."""
    from llama_cpp import Llama
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    tok = trained["tok"]
    llm = Llama(model_path=str(trained["gguf"]), vocab_only=True, verbose=False)
    try:
        assert llm.chat_format == "chat_template.default"
        meta = llm.metadata
        assert meta["tokenizer.chat_template"] == chat.CHAT_TEMPLATE
        assert int(meta["tokenizer.ggml.eot_token_id"]) == tok.token_id(chat.END)
        assert int(meta["tokenizer.ggml.bos_token_id"]) == tok.bos_id
        assert int(meta["tokenizer.ggml.eos_token_id"]) == tok.eos_id
        assert meta["tokenizer.ggml.add_bos_token"] == "true"
        bos = llm._model.token_get_text(llm.token_bos())
        eos = llm._model.token_get_text(llm.token_eos())
        for add_generation_prompt in (True, False):
            fmt = Jinja2ChatFormatter(
                template=meta["tokenizer.chat_template"],
                eos_token=eos,
                bos_token=bos,
                add_generation_prompt=add_generation_prompt,
            )
            for messages in MESSAGE_SETS:
                got = fmt(messages=messages).prompt
                assert got == bos + chat.chat_messages(messages, add_generation_prompt), messages
                ids = llm.tokenize(got.encode(), add_bos=False, special=True)
                assert ids == [tok.bos_id, *tok.encode(chat.chat_messages(messages, add_generation_prompt))]
        # the one-turn formatter of the training data, byte for byte
        fmt = Jinja2ChatFormatter(template=meta["tokenizer.chat_template"], eos_token=eos, bos_token=bos)
        assert fmt(messages=MESSAGE_SETS[1][:]).prompt == bos + chat.chat_prompt("Is it safe?", "You answer in JSON.")
        assert fmt(messages=MESSAGE_SETS[0]).prompt == bos + chat.chat_prompt(MESSAGE_SETS[0][0]["content"])
        no_gen = Jinja2ChatFormatter(
            template=meta["tokenizer.chat_template"], eos_token=eos, bos_token=bos, add_generation_prompt=False
        )
        assert no_gen(messages=MESSAGE_SETS[4]).prompt == bos + chat.chat_text("q", "r", "s")
        with pytest.raises(ValueError, match="unknown role"):
            fmt(messages=[{"role": "tool", "content": "x"}])
    finally:
        llm.close()


def test_create_chat_completion_answers_like_greedy(trained, truth):
    """The issue's symptom: without a template create_chat_completion prompted in llama-2 [INST] format and the
    model answered in prose. With it, the answer is greedy decoding in Felix's format: the task JSON."""
    from llama_cpp import Llama

    llm = Llama(model_path=str(trained["gguf"]), n_ctx=trained_ctx(trained["gguf"]), n_threads=1, verbose=False)
    try:
        for p in trained["probes"]:
            answer, budget = truth[p.name]
            got = llm.create_chat_completion(
                chat.messages_from_prompt(p.prompt), temperature=0.0, repeat_penalty=1.0, max_tokens=budget
            )
            assert got["choices"][0]["message"]["content"] == answer, p.name
            assert got["choices"][0]["finish_reason"] == "stop"
            assert json.loads(answer) == json.loads(p.expected.removesuffix(chat.END))
    finally:
        llm.close()


# ------------------------------------------------------------------------------------ the served path
def test_served_chat_equals_greedy_in_felix_format(trained, truth, server):
    """The bar: the OpenAI chat endpoint at temperature 0 (no other sampling field sent, as an OpenAI client does)
    returns the greedy answer of Felix's own format, which is the probe's task JSON."""
    models = server.request("/v1/models")
    assert models["data"], models
    for p in trained["probes"]:
        answer, budget = truth[p.name]
        reply = server.chat(chat.messages_from_prompt(p.prompt), temperature=0, max_tokens=budget)
        assert reply["choices"][0]["message"]["content"] == answer, p.name
        assert reply["choices"][0]["finish_reason"] == "stop"
        assert json.loads(answer) == json.loads(p.expected.removesuffix(chat.END)), p.name
        assert reply["usage"]["prompt_tokens"] == 1 + len(trained["tok"].encode(p.prompt))


def test_temperature_zero_is_greedy_by_default(server):
    """llama-cpp-python's server defaults repeat_penalty to 1.1, which is not greedy decoding; felix serve's default
    is 1.0 (llama-server's), as its published request schema says."""
    schemas = server.request("/openapi.json")["components"]["schemas"]
    assert schemas["CreateChatCompletionRequest"]["properties"]["repeat_penalty"]["default"] == 1.0
    assert schemas["CreateCompletionRequest"]["properties"]["repeat_penalty"]["default"] == 1.0


def test_served_json_schema_constrained(trained, truth, server):
    """response_format json_schema (OpenAI's form) and json_object + schema (llama-cpp-python's): the grammar lets
    the learned answer through unchanged (every greedy token is allowed), and the answer is schema-compliant."""
    for p in trained["probes"]:
        answer, budget = truth[p.name]
        messages = chat.messages_from_prompt(p.prompt)
        for fmt in (
            response_format(p.schema),
            {"type": "json_object", "schema": json_schema(p.schema)},
            {"type": "json_object"},
        ):
            got = server.chat_text(messages, temperature=0, max_tokens=budget, response_format=fmt)
            assert got == answer, (p.name, fmt["type"])
            assert check_compliance(got, p.schema)["compliant"]


def test_grammar_forces_the_schema_on_an_answer_that_breaks_it(trained, server):
    """Where the model's own answer breaks the schema (an enum it never produces), the grammar carries the
    structure: the constrained answer complies, the free one does not."""
    p = next(p for p in trained["probes"] if p.task == "encoding")
    spec = {"required": dict(p.schema["required"]), "enums": {**p.schema["enums"], "emotional_tone": ["serene"]}}
    messages, budget = chat.messages_from_prompt(p.prompt), 1 + len(trained["tok"].encode(p.expected)) + 16
    free = server.chat_text(messages, temperature=0, max_tokens=budget)
    forced = server.chat_text(messages, temperature=0, max_tokens=budget, response_format=response_format(spec))
    assert not check_compliance(free, spec)["enum_values"]
    assert check_compliance(forced, spec)["compliant"], forced
    assert json.loads(forced)["emotional_tone"] == "serene"


def test_schema_without_a_grammar_is_a_400(server):
    bad = {"type": "object", "properties": {"x": {"$ref": "https://example.com/remote.json"}}}
    with pytest.raises(serve.RequestError) as e:
        server.chat(
            [{"role": "user", "content": "hi"}],
            temperature=0,
            max_tokens=4,
            response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": bad}},
        )
    assert e.value.status == 400 and "cannot become a grammar" in e.value.message
    with pytest.raises(serve.RequestError) as e:
        server.chat([{"role": "user", "content": "hi"}], response_format={"type": "json_schema"})
    assert e.value.status == 400 and "json_schema.schema" in e.value.message


def test_request_beyond_the_context_is_a_400(server):
    """A prompt that does not fit the context: HTTP 400 context_length_exceeded (llama-cpp-python's own check). A
    max_tokens beyond what is left is capped there (the answer ends with finish_reason "length" at the context)."""
    n_ctx = server.n_ctx
    with pytest.raises(serve.RequestError) as e:
        server.chat([{"role": "user", "content": "word " * (2 * n_ctx)}], temperature=0, max_tokens=4)
    assert e.value.status == 400 and e.value.body["error"]["code"] == "context_length_exceeded", e.value.body
    assert f"maximum context length is {n_ctx}" in e.value.message
    reply = server.chat([{"role": "user", "content": "hi"}], temperature=0, max_tokens=10 * n_ctx)
    assert reply["usage"]["total_tokens"] <= n_ctx
    assert server.alive()


# ------------------------------------------------------------------------------------ bad input
def test_unservable_files_fail_cleanly(trained, tmp_path):
    from felix.cli import main as cli

    before = children()
    text = tmp_path / "notes.gguf"
    text.write_text("not a model")
    with pytest.raises(serve.ServeError, match="not a GGUF"):
        serve.Server(text)
    corrupt = tmp_path / "corrupt.gguf"
    corrupt.write_bytes(trained["gguf"].read_bytes()[: trained["gguf"].stat().st_size // 2])
    with pytest.raises(serve.ServeError, match="corrupt|truncated|exited|cannot serve"):
        serve.Server(corrupt)
    empty = tmp_path / "no-tensors.gguf"  # a well-formed GGUF that llama.cpp itself refuses to load
    w = gguf.GGUFWriter(str(empty), "llama")
    w.add_context_length(64)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(serve.ServeError, match="cannot serve .*no-tensors.gguf: ValueError: Failed to load model"):
        serve.Server(empty)
    assert cli.main(["serve", str(text), "--port", "0"]) == 2
    assert cli.main(["serve", str(tmp_path / "missing"), "--port", "0"]) == 2
    assert children() == before


def test_busy_port_is_a_clear_error(trained):
    before = children()
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        with pytest.raises(serve.ServeError, match=f"cannot listen on 127.0.0.1:{port}"):
            serve.Server(trained["gguf"], port=port)
    assert children() == before


# ------------------------------------------------------------------------------------ adapters and the fork
def test_lora_adapter_through_the_server_matches_the_direct_path(trained):
    """--splice adapter: base GGUF + LoRA adapter. Served with --lora, the answers are the direct path's
    (LlamaCppModel with the adapter, as the fidelity harness runs it) and differ from the base alone."""
    import torch

    from felix.model.felix_lm import save_checkpoint

    root, tok, probes = trained["root"], trained["tok"], trained["probes"]
    model = copy.deepcopy(trained["model"])
    g = torch.Generator().manual_seed(SEED)
    with torch.no_grad():  # a splice that matters (the learned one is too small to change a greedy answer)
        for name, p in model.named_parameters():
            if ".splice." in name and name.endswith(".b"):
                p.copy_(5.0 * torch.randn(p.shape, generator=g))
    spliced = save_checkpoint(root / "spliced", model, tok)
    res = export_gguf(spliced, root / "base-q8_0.gguf", quant="q8_0", splice="adapter", force=True)
    direct = greedy_answers(res.path, tok, probes, adapter=res.adapter_path, must_stop=False)
    base = greedy_answers(res.path, tok, probes, must_stop=False)
    assert any(direct[p.name][0] != base[p.name][0] for p in probes), "the adapter changes nothing: no test"
    with serve.Server(res.path, port=0, lora=res.adapter_path, n_threads=1) as s:
        for p in probes:
            answer, budget = direct[p.name]
            assert s.chat_text(chat.messages_from_prompt(p.prompt), temperature=0, max_tokens=budget) == answer
    with pytest.raises(serve.ServeError, match="not a LoRA adapter"):
        serve.Server(res.path, lora=res.path)


def test_fork_serves_the_rq4_felix_arch_file(trained):
    from felix.core import fork

    ok_fork, why_fork = fork.available()
    if not ok_fork:
        pytest.skip(why_fork)
    gguf = export_gguf(
        trained["checkpoint"], trained["root"] / "model-rq4.gguf", arch="felix", quant="rq4", force=True
    ).path
    truth = greedy_answers(gguf, trained["tok"], trained["probes"])  # the fork, in felix.ship.llamacpp's worker
    with serve.Server(gguf, port=0, n_threads=1) as s:
        assert s.runtime == "fork" and s.arch == "felix"
        for p in trained["probes"]:
            answer, budget = truth[p.name]
            assert s.chat_text(chat.messages_from_prompt(p.prompt), temperature=0, max_tokens=budget) == answer


# ------------------------------------------------------------------------------------ fidelity --constrained
def test_fidelity_constrained_reports_free_and_grammar(trained, tmp_path):
    from felix.verify import fidelity

    report = fidelity.run_fidelity(
        trained["checkpoint"],
        fidelity.FidelityOptions(
            quant="q8_0",
            paths=("simulated",),
            n_probes=len(trained["probes"]),
            sensitivity=False,
            compliance=False,
            constrained=True,
            gguf_dir=str(tmp_path),
        ),
    )
    c = report["constrained"]
    n = len(trained["probes"])
    assert c["free"]["probes"] == c["constrained"]["probes"] == n and not c["skipped"]
    assert c["free"]["compliant"] == c["constrained"]["compliant"] == n  # the model carries the structure
    assert c["changed_by_grammar"] == 0
    assert c["free"]["task_score_mean"] == c["constrained"]["task_score_mean"] == 5.0
    md = fidelity.markdown_report(report, {})
    assert "free vs constrained" in md
