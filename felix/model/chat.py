"""Felix's chat format: the role markers and one table that every renderer reads (the training data's chat text, the
prompts the decoder and the fidelity probes build, the Jinja template exported GGUFs carry, and its inverse for chat
requests). The tokenizer registers the markers as special tokens (felix/model/tokenizer.py)."""

from __future__ import annotations

# Chat role markers. The tokenizer registers them as special tokens (felix/model/tokenizer.py).
SYSTEM, USER, ASSISTANT, END = "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"


# Felix's chat format, one table for every renderer (chat_messages here, CHAT_TEMPLATE in exported GGUFs): a turn is
# its role's marker on a line of its own, then the content, then END; turns are joined by TURN_SEPARATOR ("\n"); a
# generation prompt opens the assistant's turn (separator + ASSISTANT + "\n"). An empty system message is no turn
# (as chat_text's system=None or ""). The token stream puts BOS in front (the template writes {{ bos_token }}).
ROLE_MARKERS = {"system": SYSTEM, "user": USER, "assistant": ASSISTANT}
TURN_SEPARATOR = "\n"


def chat_messages(messages, add_generation_prompt: bool = False) -> str:
    """OpenAI-style messages (``{"role": system|user|assistant, "content": str}``) in Felix's chat format, any
    number of turns; `add_generation_prompt` ends with the assistant's header, where its response begins."""
    turns = []
    for i, m in enumerate(messages):
        role, content = m.get("role"), m.get("content")
        if not isinstance(content, str):
            raise ValueError(f"message {i}: content must be a string (Felix's chat format has text turns only)")
        if role == "system" and not content:
            continue
        if role not in ROLE_MARKERS:
            raise ValueError(f"message {i}: role {role!r} is not one of Felix's chat roles {', '.join(ROLE_MARKERS)}")
        turns.append(f"{ROLE_MARKERS[role]}\n{content}{END}")
    text = TURN_SEPARATOR.join(turns)
    if add_generation_prompt:
        text += (TURN_SEPARATOR if turns else "") + f"{ASSISTANT}\n"
    return text


def messages_from_prompt(prompt: str) -> list[dict] | None:
    """The messages whose generation prompt (:func:`chat_messages` with add_generation_prompt) is `prompt`, or None
    when `prompt` is not exactly such a prompt (a raw-text prompt): how a chat-format probe becomes a chat request."""
    header = f"{ASSISTANT}\n"
    if not prompt.endswith(header):
        return None
    body, messages = prompt[: -len(header)], []
    if body:
        if not body.endswith(END + TURN_SEPARATOR):
            return None
        by_marker = {f"{marker}\n": role for role, marker in ROLE_MARKERS.items()}
        for turn in body.split(END + TURN_SEPARATOR)[:-1]:
            head = next((h for h in by_marker if turn.startswith(h)), None)
            if head is None:
                return None
            messages.append({"role": by_marker[head], "content": turn[len(head) :]})
    return messages if chat_messages(messages, add_generation_prompt=True) == prompt else None


def _jinja_literal(s: str) -> str:
    """`s` as a single-quoted Jinja string literal."""
    return "'" + s.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n") + "'"


def _chat_template() -> str:
    """The Jinja chat template (GGUF ``tokenizer.chat_template``) that renders BOS + :func:`chat_messages`, built
    from ROLE_MARKERS. All text is in Jinja expressions and every tag trims the whitespace around it, so the output
    does not depend on trim_blocks / lstrip_blocks (llama-cpp-python's Jinja2ChatFormatter sets both)."""
    q = _jinja_literal
    out = [
        "{{- bos_token -}}",
        "{%- set ns = namespace(turns=0) -%}",
        "{%- for message in messages -%}",
        "{%- if message['content'] is not string -%}",
        "{{- raise_exception('Felix chat format: message content must be a string') -}}",
        "{%- elif message['role'] == 'system' and message['content'] == '' -%}",  # no turn, as chat_messages
        "{%- else -%}",
        f"{{%- if ns.turns > 0 -%}}{{{{- {q(TURN_SEPARATOR)} -}}}}{{%- endif -%}}",
    ]
    for i, (role, marker) in enumerate(ROLE_MARKERS.items()):
        out.append(
            f"{{%- {'if' if i == 0 else 'elif'} message['role'] == {q(role)} -%}}{{{{- {q(marker + chr(10))} -}}}}"
        )
    out += [
        "{%- else -%}{{- raise_exception('Felix chat format: unknown role ' + message['role']) -}}{%- endif -%}",
        f"{{{{- message['content'] + {q(END)} -}}}}",
        "{%- set ns.turns = ns.turns + 1 -%}",
        "{%- endif -%}",
        "{%- endfor -%}",
        f"{{%- if add_generation_prompt -%}}{{%- if ns.turns > 0 -%}}{{{{- {q(TURN_SEPARATOR)} -}}}}{{%- endif -%}}"
        f"{{{{- {q(ASSISTANT + chr(10))} -}}}}{{%- endif -%}}",
    ]
    return "\n".join(out)


CHAT_TEMPLATE = _chat_template()


def chat_text(prompt: str, response: str, system: str | None = None) -> str:
    """One chat exchange in Felix's chat format (role markers on their own lines, END closes each turn)."""
    return chat_messages(
        [
            {"role": "system", "content": system or ""},
            {"role": "user", "content": prompt},
            {"role": "assistant", "content": response},
        ]
    )


def chat_prompt(prompt: str, system: str | None = None) -> str:
    """The prompt part of :func:`chat_text`, ending where the assistant's response begins."""
    return chat_messages(
        [{"role": "system", "content": system or ""}, {"role": "user", "content": prompt}], add_generation_prompt=True
    )
