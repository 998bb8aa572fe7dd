"""Logit sources: a FelixLM in PyTorch (felix.model.generate.TorchSource) or a GGUF in llama.cpp, behind one `logits(seqs)`
interface, and probes scored through one in context-sized windows."""

from __future__ import annotations

import torch

from tqdm import tqdm

from felix.verify.fidelity.common import FidelityError
from felix.verify.fidelity.probes import EncodedProbe
from felix.model.generate import TorchSource  # noqa: F401 (re-exported: the PyTorch logit source lives with the decoder)
from felix.ship.llamacpp import LlamaCppModel  # light: llama_cpp itself is imported only when a model is loaded


class LlamaCppSource:
    """Logits from a GGUF file in llama.cpp (felix.ship.llamacpp over llama-cpp-python), one sequence at a time."""

    def __init__(self, gguf_path, n_ctx: int, adapter=None):
        """`adapter`: a LoRA adapter GGUF (the splices of a quantization-aware file), applied at scale 1."""
        self.runtime = LlamaCppModel(gguf_path, n_ctx=n_ctx, adapter=adapter)
        self.n_ctx, self.n_vocab = n_ctx, self.runtime.n_vocab

    def logits(self, seqs: list[list[int]]) -> list[torch.Tensor]:
        return [torch.from_numpy(self.runtime.logits(x)) for x in seqs]

    def greedy(self, prompt: list[int], budget: int, stop_ids) -> list[int]:
        """Greedy continuation on llama.cpp's KV cache (prompt evaluated once), the stop token not included."""
        out = self.runtime.greedy(prompt, budget, stop=sorted(stop_ids))
        return out[:-1] if out and out[-1] in stop_ids else out

    def close(self):
        self.runtime.close()


def windows(length: int, n_ctx: int) -> list[tuple[int, int]]:
    """Windows [start, end) covering a sequence of `length` tokens so that every target t >= 1 (predicted
    from tokens < t) is scored once, from a window giving it at least n_ctx // 2 tokens of context (or all of
    them when t < n_ctx)."""
    if n_ctx < 2:
        raise FidelityError(f"context window {n_ctx} is too small")
    out, end = [(0, min(length, n_ctx))], min(length, n_ctx)
    while end < length:
        start = end - n_ctx // 2
        out.append((start, min(start + n_ctx, length)))
        end = out[-1][1]
    return out


def score_probes(source, encoded: list[EncodedProbe], progress: bool = False, desc: str = "scoring") -> torch.Tensor:
    """Logits predicting every expected token of every probe, concatenated in probe order: [positions, vocab]."""
    jobs = []  # (probe index, window start, first target scored, end)
    for k, e in enumerate(encoded):
        scored = e.n_prompt
        for start, end in windows(len(e.ids), source.n_ctx):
            lo = max(scored, start + 1)
            if lo < end:
                jobs.append((k, start, lo, end))
                scored = end
    chunks: dict[int, list] = {k: [] for k in range(len(encoded))}
    step = 16
    for s in tqdm(range(0, len(jobs), step), desc=desc, unit="batch", disable=not progress, leave=False):
        part = jobs[s : s + step]
        logits = source.logits([encoded[k].ids[start:end] for k, start, _, end in part])
        for (k, start, lo, end), z in zip(part, logits):
            chunks[k].append(z[lo - 1 - start : end - 1 - start])  # logits at t-1 predict target t
    return torch.cat([z for k in range(len(encoded)) for z in chunks[k]])
