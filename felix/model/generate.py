"""Felix's one greedy decoder: continuations of token-id prompts from any logit source, and chat responses of a model.

* :class:`TorchSource` -- the logits of a FelixLM (any weights) for a batch of token-id sequences, right-padded
  (causal attention keeps the padding out of the real positions), on the model's device.
* :func:`greedy_generate` -- greedy continuations of several prompts at once from a logit source: batched, each
  prompt recomputed over its last n_ctx tokens per step (a sliding window), or, for a source with its own KV cache
  (``greedy``: llama.cpp, felix.verify.fidelity.LlamaCppSource), decoded there when prompt + budget fit its context.
* :func:`greedy_responses` -- a model's greedy responses to chat prompts (felix.data.corpus's chat format), each stopping at
  END / EOS or where prompt + response would leave the context: the SODA snapshot, checkpoint teachers and the
  task-suite students all generate through it.

Deterministic: the argmax of float32 logits, ties to the lowest token id.
"""

from __future__ import annotations

import torch
from tqdm import tqdm

from felix.model.chat import END, chat_prompt


class TorchSource:
    """Logits of a FelixLM (any weights) for a batch of token-id sequences, each <= the context window.
    `pad_id` fills the right padding (any id: causal attention keeps it out of the real positions)."""

    def __init__(self, model, batch_size: int = 16, pad_id: int = 0):
        self.model, self.batch_size, self.pad_id = model.eval(), batch_size, pad_id
        self.n_ctx, self.n_vocab = model.cfg.max_seq_len, model.cfg.vocab_size
        self.device = next(model.parameters()).device

    def _batches(self, seqs: list[list[int]]):
        for s in range(0, len(seqs), self.batch_size):
            chunk = seqs[s : s + self.batch_size]
            width = max(len(x) for x in chunk)
            batch = torch.full((len(chunk), width), self.pad_id, dtype=torch.long)
            for i, x in enumerate(chunk):  # right padding: causal attention keeps it out of real positions
                batch[i, : len(x)] = torch.tensor(x)
            yield chunk, self.model(batch.to(self.device)).float()

    @torch.no_grad()
    def logits(self, seqs: list[list[int]]) -> list[torch.Tensor]:
        """Per sequence, its logits at every position [len, vocab] (float32)."""
        out = []
        for chunk, z in self._batches(seqs):
            out += [z[i, : len(x)].clone() for i, x in enumerate(chunk)]
        return out

    @torch.no_grad()
    def last_logits(self, seqs: list[list[int]]) -> list[torch.Tensor]:
        """Per sequence, its logits at the last position [vocab] (float32): what a greedy step needs."""
        out = []
        for chunk, z in self._batches(seqs):
            last = torch.tensor([len(x) - 1 for x in chunk], device=z.device)
            out += list(z[torch.arange(len(chunk), device=z.device), last])
        return out


def greedy_generate(source, prompts: list[list[int]], budgets: list[int], stop_ids) -> list[list[int]]:
    """Greedy continuations of several prompts at once (batched), each recomputed over its last n_ctx tokens per
    step (a sliding window: the tiny presets' contexts are shorter than some records). A continuation stops at a
    token in `stop_ids` (not included) or after its budget of new tokens. A source with its own KV-cache
    ``greedy`` (llama.cpp) decodes each prompt there when prompt + budget fit its context (no window needed).
    A source needs ``n_ctx`` and ``logits(seqs)`` (``last_logits(seqs)`` too, when it can give only those)."""
    if hasattr(source, "greedy") and all(len(p) + b <= source.n_ctx for p, b in zip(prompts, budgets)):
        return [source.greedy(list(p), b, set(stop_ids)) if b > 0 else [] for p, b in zip(prompts, budgets)]
    step_logits = getattr(source, "last_logits", None) or (lambda seqs: [z[-1] for z in source.logits(seqs)])
    seqs, new = [list(p) for p in prompts], [[] for _ in prompts]
    active = [i for i, b in enumerate(budgets) if b > 0]
    while active:
        logits = step_logits([seqs[i][-source.n_ctx :] for i in active])
        still = []
        for i, z in zip(active, logits):
            nxt = int(z.argmax())
            if nxt in stop_ids:
                continue
            seqs[i].append(nxt)
            new[i].append(nxt)
            if len(new[i]) < budgets[i]:
                still.append(i)
        active = still
    return new


def greedy_responses(
    model,
    tokenizer,
    prompts: list[str],
    max_new_tokens: int,
    batch_size: int = 16,
    progress: bool = False,
    desc: str = "generating",
) -> list[str]:
    """Greedy responses of `model` to chat prompts, batched, each stopping at END / EOS or when prompt + response
    would not fit the context (so its log-probability can later be computed on exactly the context it was generated
    in: room for the response, its END and EOS within max_seq_len + 1 tokens). Restores the model's training mode.
    Deterministic."""
    if max_new_tokens < 1 or batch_size < 1:
        raise ValueError(f"max_new_tokens and batch_size must be >= 1, got {max_new_tokens} and {batch_size}")
    was_training = model.training
    source = TorchSource(model, batch_size, tokenizer.pad_id)
    stop = {tokenizer.eos_id, tokenizer.token_id(END)}
    encoded = [[tokenizer.bos_id, *tokenizer.encode(chat_prompt(p))] for p in prompts]
    budgets = [max(0, min(max_new_tokens, source.n_ctx - 1 - len(e))) for e in encoded]
    outs: list[list[int]] = []
    for s in tqdm(range(0, len(prompts), batch_size), desc=desc, unit="batch", disable=not progress, leave=False):
        outs += greedy_generate(source, encoded[s : s + batch_size], budgets[s : s + batch_size], stop)
    model.train(was_training)
    return [tokenizer.decode(o) for o in outs]
