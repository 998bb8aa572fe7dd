"""Per-position comparison of two models' logits at the probes' expected tokens: margins, flips, KL, top-1,
delta-p, the minority option, their summary; and how closely one path reproduces another (agreement)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from felix.core.quail import DEFAULT_QUAIL, NOISE_QUANTILES, quantile_key
from felix.verify.fidelity.common import FidelityError


def _check_logits(ref: torch.Tensor, quant: torch.Tensor | None = None, targets: torch.Tensor | None = None):
    for name, t in (("reference logits", ref), ("quantized logits", quant)):
        if t is None:
            continue
        if not isinstance(t, torch.Tensor) or t.dim() != 2 or not t.is_floating_point():
            raise FidelityError(
                f"{name} must be a 2-D float tensor [positions, vocab], got "
                f"{getattr(t, 'shape', type(t).__name__)} {getattr(t, 'dtype', '')}".rstrip()
            )
        if t.shape[1] < 2:
            raise FidelityError(f"{name} have a vocabulary of {t.shape[1]}: a margin needs at least 2 tokens")
        if not torch.isfinite(t).all():
            raise FidelityError(f"{name} contain NaN or Inf")
    if quant is not None and quant.shape != ref.shape:
        raise FidelityError(
            f"reference logits {tuple(ref.shape)} and quantized logits {tuple(quant.shape)} differ in shape"
        )
    if targets is not None:
        if targets.dim() != 1 or targets.shape[0] != ref.shape[0] or targets.dtype not in (torch.int64, torch.int32):
            raise FidelityError(
                f"targets must be integer token ids [{ref.shape[0]}], got {tuple(targets.shape)} {targets.dtype}"
            )
        if targets.numel() and (targets.min() < 0 or targets.max() >= ref.shape[1]):
            raise FidelityError(
                f"target ids must lie in 0..{ref.shape[1] - 1}, got {int(targets.min())}..{int(targets.max())}"
            )


def margins(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Target logit minus the best other logit, per position (float64). > 0: the target is the strict top-1;
    a tie is 0 (undecided), as in the QUAIL hinge."""
    _check_logits(logits, targets=targets)
    z = logits.double()
    target = z.gather(1, targets.long()[:, None])[:, 0]
    other = z.scatter(1, targets.long()[:, None], float("-inf")).max(1).values
    return target - other


def kl_divergence(ref_logits: torch.Tensor, quant_logits: torch.Tensor) -> torch.Tensor:
    """KL(P_ref || P_quant) per position, in nats (float64): sum p_ref (log p_ref - log p_quant)."""
    _check_logits(ref_logits, quant_logits)
    lp, lq = torch.log_softmax(ref_logits.double(), -1), torch.log_softmax(quant_logits.double(), -1)
    return (lp.exp() * (lp - lq)).sum(-1).clamp_min(0.0)


@dataclass
class PositionStats:
    """Per-position comparison of reference and quantized logits (all tensors [positions])."""

    targets: torch.Tensor
    whitelisted: torch.Tensor  # bool: the expected token is whitelisted
    ref_margin: torch.Tensor
    quant_margin: torch.Tensor
    kl: torch.Tensor
    top1_agree: torch.Tensor  # bool: same argmax
    delta_p: torch.Tensor  # p_quant(expected) - p_ref(expected)
    # the reference's best token other than the expected one (the minority option when the reference is right)
    runner_up: torch.Tensor | None = None
    runner_up_whitelisted: torch.Tensor | None = None  # bool
    runner_up_logp_ref: torch.Tensor | None = None  # log p_ref(runner-up)
    runner_up_logp_quant: torch.Tensor | None = None  # log p_quant(runner-up)

    @property
    def flipped(self) -> torch.Tensor:
        """The decision changed sides: margin > 0 on one side, <= 0 on the other."""
        return (self.ref_margin > 0) != (self.quant_margin > 0)

    @property
    def lost(self) -> torch.Tensor:
        """The reference decided correctly and the quantized model does not."""
        return (self.ref_margin > 0) & (self.quant_margin <= 0)


def compare_logits(
    ref_logits: torch.Tensor, quant_logits: torch.Tensor, targets: torch.Tensor, whitelist: torch.Tensor
) -> PositionStats:
    """Every metric of the module docstring, per position. `whitelist`: a bool mask over the vocabulary."""
    _check_logits(ref_logits, quant_logits, targets)
    if whitelist.dtype != torch.bool or whitelist.dim() != 1 or whitelist.numel() < ref_logits.shape[1]:
        raise FidelityError(
            f"whitelist must be a bool mask over the vocabulary ({ref_logits.shape[1]}), got "
            f"{tuple(whitelist.shape)} {whitelist.dtype}"
        )
    t = targets.long()
    lp_ref, lp_q = torch.log_softmax(ref_logits.double(), -1), torch.log_softmax(quant_logits.double(), -1)
    p_ref, p_q = lp_ref.gather(1, t[:, None])[:, 0].exp(), lp_q.gather(1, t[:, None])[:, 0].exp()
    ru = ref_logits.double().scatter(1, t[:, None], float("-inf")).argmax(-1)
    return PositionStats(
        targets=t,
        whitelisted=whitelist[t],
        ref_margin=margins(ref_logits, t),
        quant_margin=margins(quant_logits, t),
        kl=kl_divergence(ref_logits, quant_logits),
        top1_agree=ref_logits.argmax(-1) == quant_logits.argmax(-1),
        delta_p=p_q - p_ref,
        runner_up=ru,
        runner_up_whitelisted=whitelist[ru],
        runner_up_logp_ref=lp_ref.gather(1, ru[:, None])[:, 0],
        runner_up_logp_quant=lp_q.gather(1, ru[:, None])[:, 0],
    )


def _quantile(x: torch.Tensor, q: float) -> float:
    return float(torch.quantile(x.double(), q)) if x.numel() else float("nan")


MINORITY_BUCKETS = ((0.0, 0.01), (0.01, 0.1), (0.1, 0.5))  # p_ref of the minority option


def minority_summary(stats: PositionStats) -> dict:
    """p(whitelisted token) where it is the minority option: at whitelisted positions the reference decides
    correctly, its runner-up token when that is whitelisted too (e.g. the refusal ``false`` against the expected
    ``true``). Per bucket of the runner-up's reference probability: count, median p_ref, and the log-ratio
    log p_quant / p_ref of the runner-up (mean, p01, p99): > 0 means quantization made the minority option more
    likely."""
    if stats.runner_up is None:
        return {}
    sel = stats.whitelisted & stats.runner_up_whitelisted & (stats.ref_margin > 0)
    p_ref = stats.runner_up_logp_ref[sel].exp()
    ratio = (stats.runner_up_logp_quant - stats.runner_up_logp_ref)[sel]
    out = {}
    for lo, hi in MINORITY_BUCKETS:
        b = (p_ref >= lo) & (p_ref < hi)
        out[f"{lo:g}-{hi:g}"] = {
            "count": int(b.sum()),
            "p_ref_median": _quantile(p_ref[b], 0.5),
            "log_ratio_mean": float(ratio[b].mean()) if b.any() else float("nan"),
            "log_ratio_p01": _quantile(ratio[b], 0.01),
            "log_ratio_p99": _quantile(ratio[b], 0.99),
        }
    return out


def summarize(stats: PositionStats, low_margin: float | None = None) -> dict:
    """The report's summary numbers (plain floats/ints; NaN where a set is empty). `low_margin` (default
    felix.core.quail.DEFAULT_MARGIN, the QUAIL hinge's margin): reference-correct whitelisted positions with a margin
    below it are also counted on their own: they are the decisions a 4-bit rounding can plausibly flip.
    ``margin.change_quantiles`` (felix.core.quail.NOISE_QUANTILES) is the measured margin noise that
    ``felix train --margin-from`` calibrates from."""
    low_margin = DEFAULT_QUAIL.margin if low_margin is None else low_margin
    w = stats.whitelisted
    ref_m, q_m = stats.ref_margin[w], stats.quant_margin[w]
    change = q_m - ref_m
    correct = ref_m > 0
    n_w = int(w.sum())
    low = correct & (ref_m < low_margin)
    mean = lambda x: float(x.double().mean()) if x.numel() else float("nan")  # noqa: E731
    return {
        "positions": int(stats.targets.numel()),
        "whitelisted_positions": n_w,
        "margin": {
            "reference_correct": int(correct.sum()),
            "survived": int((correct & (q_m > 0)).sum()),
            "survival": float((correct & (q_m > 0)).sum() / correct.sum()) if correct.any() else float("nan"),
            "flips": int(stats.flipped[w].sum()),
            "lost": int(stats.lost[w].sum()),
            "gained": int(((ref_m <= 0) & (q_m > 0)).sum()),
            "reference_mean": mean(ref_m),
            "quantized_mean": mean(q_m),
            "reference_min_correct": float(ref_m[correct].min()) if correct.any() else float("nan"),
            "change_mean": mean(change),
            "change_p01": _quantile(change, 0.01),
            "change_min": float(change.min()) if n_w else float("nan"),
            "change_quantiles": {quantile_key(q): _quantile(change, q) for q in NOISE_QUANTILES},
            "change_abs_max": float(change.abs().max()) if n_w else float("nan"),
            "low_threshold": low_margin,
            "low_reference_correct": int(low.sum()),
            "low_survived": int((low & (q_m > 0)).sum()),
        },
        "kl": {
            "mean": mean(stats.kl),
            "median": _quantile(stats.kl, 0.5),
            "p99": _quantile(stats.kl, 0.99),
            "max": float(stats.kl.max()) if stats.kl.numel() else float("nan"),
        },
        "minority": minority_summary(stats),
        "kl_whitelisted_mean": mean(stats.kl[w]),
        "top1_agreement": mean(stats.top1_agree.double()),
        "delta_p": {
            "mean": mean(stats.delta_p),
            "rms": math.sqrt(mean(stats.delta_p.pow(2))) if stats.delta_p.numel() else float("nan"),
            "p01": _quantile(stats.delta_p, 0.01),
            "p99": _quantile(stats.delta_p, 0.99),
            "min": float(stats.delta_p.min()) if stats.delta_p.numel() else float("nan"),
        },
    }


def agreement(
    sim_logits: torch.Tensor, runtime_logits: torch.Tensor, targets: torch.Tensor, whitelist: torch.Tensor
) -> dict:
    """How closely the simulated path reproduces the runtime one on the same quantized model."""
    stats = compare_logits(runtime_logits, sim_logits, targets, whitelist)
    w = stats.whitelisted
    scale = runtime_logits.double().abs().max(-1).values.clamp_min(1e-6)
    rel = (sim_logits.double() - runtime_logits.double()).abs().max(-1).values / scale
    margin_diff = (stats.ref_margin[w] - stats.quant_margin[w]).abs()
    return {
        "top1_agreement": float(stats.top1_agree.double().mean()),
        "kl_mean": float(stats.kl.mean()),
        "kl_p99": _quantile(stats.kl, 0.99),
        "kl_max": float(stats.kl.max()),
        "max_rel_err": float(rel.max()),
        "mean_rel_err": float(rel.mean()),
        "margin_abs_diff_max": float(margin_diff.max()) if w.any() else 0.0,
        "margin_abs_diff_mean": float(margin_diff.mean()) if w.any() else 0.0,
        "decision_disagreements": int(stats.flipped[w].sum()),
    }


def predicted_effect(sim: PositionStats, runtime: PositionStats) -> dict:
    """How well a simulation predicts the runtime's quantization effect (each path against its own reference):
    mean KL and the RMS of the whitelisted margin change, simulated / runtime (1.0 = predicted exactly)."""

    def rms_change(st: PositionStats) -> float:
        w = st.whitelisted
        return float((st.quant_margin[w] - st.ref_margin[w]).pow(2).mean().sqrt()) if w.any() else float("nan")

    kl_sim, kl_rt = float(sim.kl.mean()), float(runtime.kl.mean())
    m_sim, m_rt = rms_change(sim), rms_change(runtime)
    return {
        "sim_kl_mean": kl_sim,
        "runtime_kl_mean": kl_rt,
        "kl_mean_ratio": kl_sim / kl_rt if kl_rt else float("nan"),
        "sim_margin_change_rms": m_sim,
        "runtime_margin_change_rms": m_rt,
        "margin_change_rms_ratio": m_sim / m_rt if m_rt else float("nan"),
    }
