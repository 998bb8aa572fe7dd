"""DPO (the loss of SODA, felix.train.distill.dpo_loss): its independent float64 textbook truth.

For log-probabilities of the chosen and rejected responses under the policy (pc, pr) and the reference (rc, rr),
``x = beta ((pc - rc) - (pr - rr))`` and the loss is the batch mean of ``-log sigmoid(x)``. Written here in plain
Python floats (no torch, no shared helper with the implementation), with its gradient with respect to pc in closed
form, so tests compare felix.train.distill.dpo_loss and its autograd against it.
"""

from __future__ import annotations

import math


def textbook_dpo(pc, pr, rc, rr, beta: float) -> tuple[float, list[float]]:
    """(mean loss, d loss / d pc per pair) in Python float64: -log sigmoid(x) evaluated stably on both signs of x,
    and d/d pc = -beta sigmoid(-x) / B."""
    losses, grads = [], []
    for a, b, c, d in zip(pc, pr, rc, rr):
        x = beta * ((a - c) - (b - d))
        losses.append(math.log1p(math.exp(-x)) if x > 0 else -x + math.log1p(math.exp(x)))
        grads.append(-beta / (1.0 + math.exp(x)) / len(pc))
    return sum(losses) / len(losses), grads
