"""Edit metrics on a model: whether targets are its greedy continuation and their log-probability, the mean token
KL from a reference on neutral text (locality), and cross-entropy on validation windows."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from felix.tools.edit.edit_requests import pad_batch, target_sequence


@torch.no_grad()
def target_stats(model, items: list[tuple[list[int], list[int]]], batch_size: int = 64) -> list[dict]:
    """Per (prompt ids, target ids): whether every target token is the argmax (teacher-forced), and the target's
    log-probability."""
    out = []
    for i in range(0, len(items), batch_size):
        chunk = items[i : i + batch_size]
        seqs = [target_sequence(p, t) for p, t in chunk]
        logits = model(pad_batch([s for s, _ in seqs])).float()
        for j, ((_, t), (_, pos)) in enumerate(zip(chunk, seqs)):
            lg = logits[j, pos]
            tgt = torch.tensor(t)
            out.append(
                {
                    "top1": bool((lg.argmax(-1) == tgt).all()),
                    "logprob": float(F.log_softmax(lg, -1)[torch.arange(len(t)), tgt].sum()),
                }
            )
    return out


@torch.no_grad()
def mean_kl(model, seqs: list[list[int]], reference_logprobs: list[torch.Tensor]) -> float:
    """Mean over tokens of KL(reference || model) on `seqs`."""
    total, n = 0.0, 0
    logits = model(pad_batch(seqs)).float()
    for j, s in enumerate(seqs):
        lp = F.log_softmax(logits[j, : len(s)], -1)
        ref = reference_logprobs[j]
        total += float((ref.exp() * (ref - lp)).sum())
        n += len(s)
    return total / n


@torch.no_grad()
def logprobs(model, seqs: list[list[int]]) -> list[torch.Tensor]:
    logits = model(pad_batch(seqs)).float()
    return [F.log_softmax(logits[j, : len(s)], -1) for j, s in enumerate(seqs)]


@torch.no_grad()
def validation_ce(model, windows: list[list[int]]) -> float:
    x = torch.tensor(windows)
    return float(model.loss(x[:, :-1], x[:, 1:]).ce)
