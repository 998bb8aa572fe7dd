"""Felix's chat format has one table (felix.model.chat.ROLE_MARKERS): chat_text / chat_prompt (the training data's one-turn
format, checked against its original f-string definition), chat_messages (any number of turns), the Jinja template
every export writes (rendered here with jinja2's sandbox under both whitespace settings; tests/ship/test_serve_llamacpp.py
renders it with llama-cpp-python), its inverse messages_from_prompt, the exporter's special-token metadata for
every arch and type, and the probe schemas as JSON Schema."""

from __future__ import annotations

import json

import pytest
import torch
from jinja2.sandbox import ImmutableSandboxedEnvironment

from felix.tasks import records as task_records
from felix.model import chat
from felix.model.chat import ASSISTANT, END, SYSTEM, USER
from felix.ship.export import export_gguf
from felix.verify.fidelity import builtin_probes, builtin_schemas, check_compliance
from felix.verify.fidelity.constrained import json_schema
from felix.core.formats import FORMATS
from felix.tasks import KINDS, MOODS
from felix.ship.gguf_file import metadata, open_gguf
from felix.model.felix_lm import FelixConfig, FelixLM, save_checkpoint
from felix.ops.quant_policy import EXPORT_TYPES
from felix.model.tokenizer import BOS, train_tokenizer

PROMPTS = [
    "Encode this observation.\nObservation: x",
    "",
    'naïve café 日本語 🙂 {"a": [1, 2]}\n\n  tail  ',
    "<|user|> inside text",
]
CONVERSATIONS = [
    [{"role": "user", "content": "q"}],
    [{"role": "system", "content": "be brief"}, {"role": "user", "content": "q"}],
    [{"role": "system", "content": ""}, {"role": "user", "content": "q"}],
    [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1"}, {"role": "user", "content": "q2"}],
    [{"role": "system", "content": "s"}, {"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1"}],
    [],
]


def original_chat_text(prompt, response, system=None):  # felix.data.corpus before the table, as the data was made
    head = f"{SYSTEM}\n{system}{END}\n" if system else ""
    return f"{head}{USER}\n{prompt}{END}\n{ASSISTANT}\n{response}{END}"


def original_chat_prompt(prompt, system=None):
    head = f"{SYSTEM}\n{system}{END}\n" if system else ""
    return f"{head}{USER}\n{prompt}{END}\n{ASSISTANT}\n"


@pytest.mark.parametrize("system", [None, "", "You answer in JSON.", "multi\nline"])
def test_one_turn_format_is_unchanged(system):
    for prompt in PROMPTS:
        assert chat.chat_text(prompt, '{"r": 1}', system) == original_chat_text(prompt, '{"r": 1}', system)
        assert chat.chat_prompt(prompt, system) == original_chat_prompt(prompt, system)


@pytest.mark.parametrize("trim", [True, False])
def test_template_renders_the_formatter(trim):
    env = ImmutableSandboxedEnvironment(trim_blocks=trim, lstrip_blocks=trim)
    template = env.from_string(chat.CHAT_TEMPLATE)

    def raise_exception(message):
        raise ValueError(message)

    for messages in CONVERSATIONS + [[{"role": "user", "content": p}] for p in PROMPTS]:
        for gen in (True, False):
            got = template.render(
                messages=messages, add_generation_prompt=gen, bos_token=BOS, raise_exception=raise_exception
            )
            assert got == BOS + chat.chat_messages(messages, gen)
    with pytest.raises(ValueError, match="unknown role"):
        template.render(messages=[{"role": "tool", "content": "x"}], bos_token=BOS, raise_exception=raise_exception)
    with pytest.raises(ValueError, match="string"):
        template.render(
            messages=[{"role": "user", "content": [{"type": "text"}]}], bos_token=BOS, raise_exception=raise_exception
        )
    with pytest.raises(ValueError, match="role 'tool'"):
        chat.chat_messages([{"role": "tool", "content": "x"}])


def test_messages_from_prompt_inverts_the_generation_prompt():
    for messages in CONVERSATIONS:
        kept = [m for m in messages if not (m["role"] == "system" and not m["content"])]
        assert chat.messages_from_prompt(chat.chat_messages(messages, True)) == kept
    assert chat.messages_from_prompt("raw text, no chat format") is None
    assert chat.messages_from_prompt(chat.chat_text("q", "a")) is None  # no generation prompt
    for p in builtin_probes(8):
        assert chat.chat_prompt(chat.messages_from_prompt(p.prompt)[0]["content"]) == p.prompt


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    texts = [chat.chat_text(r["prompt"], r["response"]) for r in task_records.structured_records(40, 3)]
    tok = train_tokenizer(texts, 320)
    torch.manual_seed(0)
    cfg = FelixConfig(
        vocab_size=tok.vocab_size,
        n_layer=1,
        d_model=32,
        n_head=2,
        n_kv_head=1,
        ffn_hidden=64,
        max_seq_len=64,
        splice_layers=[],
    )
    return save_checkpoint(tmp_path_factory.mktemp("chat") / "ck", FelixLM(cfg), tok), tok


@pytest.mark.parametrize(
    "arch,quant",
    [("llama", q) for q in EXPORT_TYPES if q not in FORMATS or FORMATS[q].runtime == "stock"]
    + [("felix", q) for q in EXPORT_TYPES],
)
def test_every_export_carries_the_chat_metadata(tiny_checkpoint, tmp_path, arch, quant):
    directory, tok = tiny_checkpoint
    out = export_gguf(directory, tmp_path / "m.gguf", arch=arch, quant=quant).path
    meta = metadata(open_gguf(out))
    assert meta["tokenizer.chat_template"] == chat.CHAT_TEMPLATE
    assert meta["tokenizer.ggml.bos_token_id"] == tok.bos_id
    assert meta["tokenizer.ggml.eos_token_id"] == tok.eos_id
    assert meta["tokenizer.ggml.eot_token_id"] == tok.token_id(END)
    assert meta["tokenizer.ggml.add_bos_token"] is True and meta["tokenizer.ggml.add_eos_token"] is False


def test_probe_schemas_as_json_schema():
    schemas = builtin_schemas()
    enc = json_schema(schemas["encoding"])
    assert list(enc["properties"]) == [
        "gist",
        "summary",
        "concepts",
        "structured_concepts",
        "significance",
        "salience",
        "emotional_tone",
    ]
    assert enc["required"] == list(enc["properties"]) and enc["additionalProperties"] is False
    sc = enc["properties"]["structured_concepts"]
    assert sc["type"] == "object" and list(sc["properties"]) == ["people", "systems", "actions", "kind"]
    assert sc["properties"]["kind"] == {"type": "string", "enum": list(KINDS)}
    assert enc["properties"]["emotional_tone"]["enum"] == list(MOODS)
    assert json_schema(schemas["principle"])["properties"]["has_principle"] == {"type": "boolean"}
    # the training records' key order is the schema's: a grammar that writes fields in schema order fits them
    for p in builtin_probes(12):
        answer = json.loads(p.expected.removesuffix(END))
        assert list(answer) == list(json_schema(p.schema)["properties"]), p.name
        assert check_compliance(json.dumps(answer), p.schema)["compliant"]
