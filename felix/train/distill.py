"""Distillation as the seed planned it: multi-teacher data, per-prompt selection, teacher agreement, and SODA.

* **Teacher data** (felix.data.teachers, re-exported here: :func:`load_teacher_groups`): JSONL with several teachers per
  prompt, either one line per prompt ``{"prompt", "task"?, "responses": {teacher: response, ...}}`` or one line per
  teacher response ``{"prompt", "response", "teacher", "task"?}`` (felix.data.corpus.load_teacher_records' format),
  grouped by prompt. Any malformed line is an error naming ``path:line``; so is one teacher giving two different
  responses to a prompt.
* **Selection** (:func:`select_responses`): per prompt, the schema-valid responses first (felix.tasks' schema
  check of the prompt's task), then the best of that tier by a swappable scorer (``consensus``: agreement
  with the other teachers; ``shortest``; or any callable ``(group, teacher) -> float``); ties go to the teacher
  listed first.
* **Agreement** (:func:`teacher_agreement`): per teacher validity and how often it was selected; per teacher pair
  exact agreement, word F1, and agreement on the principle task's ``has_principle`` decision; overall and per task.
* **Built-in teachers** (:func:`builtin_teacher_groups`; felix.tasks.perturbations): made from the task records, no
  download:
  ``exact`` (the record's own response: the strong teacher), ``noisy`` (content perturbed, format kept, the
  refusal decision sometimes flipped) and ``sloppy`` (half of its answers break the format). A trained Felix
  checkpoint is a teacher too (:func:`checkpoint_teacher`: its greedy responses).
* **SODA** (:func:`train_soda`, ``felix train --soda``): semi-on-policy distillation. The student's greedy
  responses are snapshotted once (felix.model.generate.greedy_responses, batched, with progress); pairs (prompt, chosen = the
  selected teacher response, rejected = the student's snapshot response) train with the DPO loss
  (:func:`dpo_loss`), the reference model being the snapshot's weights, frozen (its log-probabilities are computed
  once, before the first step), plus the QUAIL hinge on the chosen responses' whitelisted targets. Metrics: reward
  margin, chosen / rejected rewards and log-probabilities, preference accuracy, on training and held-out pairs.
"""
from __future__ import annotations

import collections
import json
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from felix.data import corpus as felix_data
from felix.model import chat
from felix.model import felix_lm as felix_model
from felix.core.files import atomic_write_text, save_figure
from felix.model.generate import greedy_responses
from felix.ops.loss import linear_ce_quail, whitelist_mask
from felix.core.quail import DEFAULT_LAMBDA_Q, DEFAULT_MARGIN
from felix.tasks import MAKERS, TASKS, schema_check, word_f1
from felix.tasks.perturbations import BUILTIN_TEACHERS, builtin_teacher_responses  # noqa: F401 (re-exported)
from felix.data.teachers import (  # noqa: F401 (write_teacher_groups: re-exported)
    DistillError, TeacherGroup, builtin_teacher_groups, load_teacher_groups, write_teacher_groups)
from felix.model.tokenizer import Tokenizer, json_structure_whitelist
from felix.train.loop import _device, _optimizer, wsd_lr

METRICS_FILE, PLOT_FILE, SNAPSHOT_FILE, SODA_FILE = "metrics.jsonl", "soda_curve.png", "snapshot.jsonl", "soda.json"
AGREEMENT_STEM = "teacher-agreement"


# ========================================================================================== selection
def consensus_score(group: TeacherGroup, teacher: str) -> float:
    """Mean word F1 of the teacher's response with every other teacher's response to the same prompt (0 alone)."""
    others = [r for t, r in group.responses.items() if t != teacher]
    return sum(word_f1(group.responses[teacher], r) for r in others) / len(others) if others else 0.0


def shortest_score(group: TeacherGroup, teacher: str) -> float:
    """Prefer the most concise answer (minus its length in characters)."""
    return -float(len(group.responses[teacher]))


SCORERS = {"consensus": consensus_score, "shortest": shortest_score}


@dataclass
class Selection:
    prompt: str
    task: str | None
    teacher: str
    response: str
    valid: bool            # the chosen response passes its task's schema check
    score: float
    n_valid: int           # how many teachers gave a schema-valid response
    validity: dict         # teacher -> schema-valid


def _resolve_scorer(scorer):
    if callable(scorer):
        return scorer
    if scorer not in SCORERS:
        raise DistillError(f"unknown teacher scorer {scorer!r}; choose from {', '.join(SCORERS)} or pass a callable")
    return SCORERS[scorer]


def select_responses(groups: list[TeacherGroup], scorer="consensus") -> list[Selection]:
    """Per prompt: the schema-valid responses first, then the best by `scorer` (a name in SCORERS or a callable
    ``(group, teacher) -> float``); ties go to the teacher listed first. With no valid response the best invalid
    one is returned, marked ``valid=False``."""
    score_fn = _resolve_scorer(scorer)
    out = []
    for g in groups:
        validity = {t: schema_check(g.task, r)["compliant"] for t, r in g.responses.items()}
        teachers = list(g.responses)
        tier = [t for t in teachers if validity[t]] or teachers
        scores = {t: float(score_fn(g, t)) for t in tier}
        best = max(tier, key=lambda t: (scores[t], -teachers.index(t)))
        out.append(Selection(g.prompt, g.task, best, g.responses[best], validity[best], scores[best],
                             sum(validity.values()), validity))
    return out


# ========================================================================================== agreement
def _decision(text: str):
    try:
        obj = json.loads(text)
    except json.JSONDecodeError:
        return None
    return obj.get("has_principle") if isinstance(obj, dict) and isinstance(obj.get("has_principle"), bool) else None


def _pair_stats(groups: list[TeacherGroup], a: str, b: str) -> dict:
    common = [g for g in groups if a in g.responses and b in g.responses]
    if not common:
        return {"prompts": 0, "exact": None, "word_f1": None, "both_valid": None, "decision_agreement": None,
                "decisions": 0}
    decisions = [(da, db) for g in common for da, db in [(_decision(g.responses[a]), _decision(g.responses[b]))]
                 if da is not None and db is not None]
    return {"prompts": len(common),
            "exact": sum(g.responses[a].strip() == g.responses[b].strip() for g in common) / len(common),
            "word_f1": sum(word_f1(g.responses[a], g.responses[b]) for g in common) / len(common),
            "both_valid": sum(schema_check(g.task, g.responses[a])["compliant"]
                              and schema_check(g.task, g.responses[b])["compliant"] for g in common) / len(common),
            "decision_agreement": (sum(da == db for da, db in decisions) / len(decisions)) if decisions else None,
            "decisions": len(decisions)}


def teacher_agreement(groups: list[TeacherGroup], selections: list[Selection] | None = None) -> dict:
    """How far the teachers agree: per teacher (responses, schema-valid rate, times selected), per teacher pair
    (exact agreement, word F1, both valid, has_principle agreement), overall and per task."""
    teachers = list(dict.fromkeys(t for g in groups for t in g.responses))
    tasks = list(dict.fromkeys(g.task or "(none)" for g in groups))
    picked = collections.Counter(s.teacher for s in selections or [])

    def section(gs):
        per_teacher = {}
        for t in teachers:
            answered = [g for g in gs if t in g.responses]
            per_teacher[t] = {"responses": len(answered),
                              "valid": (sum(schema_check(g.task, g.responses[t])["compliant"] for g in answered)
                                        / len(answered)) if answered else None}
        pairs = {f"{a} vs {b}": _pair_stats(gs, a, b) for i, a in enumerate(teachers) for b in teachers[i + 1:]}
        return {"prompts": len(gs), "teachers": per_teacher, "pairs": pairs}

    report = {"schema": "felix-teacher-agreement", "version": 1, "teachers": teachers, "tasks": tasks,
              "overall": section(groups),
              "per_task": {task: section([g for g in groups if (g.task or "(none)") == task]) for task in tasks}}
    if selections is not None:
        report["selection"] = {
            "selected": {t: picked.get(t, 0) for t in teachers},
            "no_valid_response": sum(not s.valid for s in selections),
            "per_task": {task: dict(collections.Counter(s.teacher for s in selections
                                                        if (s.task or "(none)") == task)) for task in tasks}}
    return report


def agreement_markdown(report: dict, plot_name: str | None = None) -> str:
    o = report["overall"]
    lines = ["# Teacher agreement", "", f"{o['prompts']} prompts, teachers: {', '.join(report['teachers'])}", "",
             "| teacher | responses | schema-valid | selected |", "|---|---|---|---|"]
    sel = (report.get("selection") or {}).get("selected", {})
    for t, s in o["teachers"].items():
        valid = f"{100 * s['valid']:.0f}%" if s["valid"] is not None else "-"
        lines.append(f"| {t} | {s['responses']} | {valid} | {sel.get(t, '-')} |")

    def fmt(x):
        return "-" if x is None else f"{x:.2f}"
    lines += ["", "| pair | task | prompts | exact | word F1 | both valid | has_principle agreement |",
              "|---|---|---|---|---|---|---|"]
    for scope, sec in [("all", o)] + list(report["per_task"].items()):
        for pair, s in sec["pairs"].items():
            lines.append(f"| {pair} | {scope} | {s['prompts']} | {fmt(s['exact'])} | {fmt(s['word_f1'])} | "
                         f"{fmt(s['both_valid'])} | {fmt(s['decision_agreement'])} |")
    if "selection" in report:
        lines += ["", f"Prompts with no schema-valid teacher response: {report['selection']['no_valid_response']}."]
    if plot_name:
        lines += ["", f"![pairwise word F1]({plot_name})"]
    return "\n".join(lines) + "\n"


def write_agreement_report(report: dict, out_dir, stem: str = AGREEMENT_STEM) -> dict[str, Path]:
    """``<stem>.json``, ``<stem>.md`` and ``<stem>.png`` (pairwise word-F1 heatmap), each written atomically."""
    import matplotlib  # local: a heavy optional dependency, loaded only when a plot is drawn

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt


    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    teachers = report["teachers"]
    m = [[1.0 if a == b else (report["overall"]["pairs"].get(f"{a} vs {b}") or
                              report["overall"]["pairs"].get(f"{b} vs {a}"))["word_f1"] or 0.0
          for b in teachers] for a in teachers]
    fig, ax = plt.subplots(figsize=(1.2 * len(teachers) + 2, 1.0 * len(teachers) + 1.5))
    im = ax.imshow(m, vmin=0, vmax=1, cmap="viridis")
    ax.set_xticks(range(len(teachers)))
    ax.set_xticklabels(teachers)
    ax.set_yticks(range(len(teachers)))
    ax.set_yticklabels(teachers)
    for i in range(len(teachers)):
        for j in range(len(teachers)):
            ax.text(j, i, f"{m[i][j]:.2f}", ha="center", va="center", color="w" if m[i][j] < 0.6 else "k")
    fig.colorbar(im, ax=ax, label="word F1")
    ax.set_title("teacher agreement")
    fig.tight_layout()
    png = save_figure(fig, out / f"{stem}.png", dpi=100)
    plt.close(fig)
    return {"json": atomic_write_text(out / f"{stem}.json", json.dumps(report, indent=1)),
            "markdown": atomic_write_text(out / f"{stem}.md", agreement_markdown(report, png.name)), "plot": png}


# ===================================================================================== the snapshot
def write_snapshot(path, prompts: list[str], responses: list[str], meta: dict) -> Path:
    lines = [json.dumps({"meta": meta})] + [json.dumps({"prompt": p, "response": r}) for p, r in zip(prompts, responses)]
    return atomic_write_text(Path(path), "\n".join(lines) + "\n")


# ======================================================================================= pairs + DPO
@dataclass
class PreferencePair:
    prompt: str
    task: str | None
    teacher: str
    chosen: str     # the selected teacher response
    rejected: str   # the student's snapshot response


def build_pairs(selections: list[Selection], student: list[str], require_valid: bool = True) -> tuple[list, dict]:
    """(prompt, chosen = teacher, rejected = student) pairs, and counts of what was left out: prompts with no
    schema-valid teacher response (when `require_valid`) and prompts the student already answers exactly as the
    chosen teacher (no preference to learn)."""
    if len(selections) != len(student):
        raise DistillError(f"{len(selections)} selections but {len(student)} student responses")
    pairs, skipped = [], {"no_valid_teacher": 0, "student_equals_teacher": 0}
    for s, r in zip(selections, student):
        if require_valid and not s.valid:
            skipped["no_valid_teacher"] += 1
        elif s.response.strip() == r.strip():
            skipped["student_equals_teacher"] += 1
        else:
            pairs.append(PreferencePair(s.prompt, s.task, s.teacher, s.response, r))
    return pairs, skipped


@dataclass
class EncodedPairs:
    """Token rows of chosen and rejected sequences, ``bos + chat_prompt + response + END + eos`` padded to
    ``seq_len + 1``; `*_learn` marks the response tokens (the ones whose log-probability counts)."""

    chosen: torch.Tensor
    chosen_learn: torch.Tensor
    rejected: torch.Tensor
    rejected_learn: torch.Tensor
    truncated: int
    dropped: int


def encode_pairs(pairs: list[PreferencePair], tokenizer, seq_len: int) -> EncodedPairs:
    """Rows as felix.data.corpus.SFTStream builds them. A response that runs past ``seq_len + 1`` tokens is cut there;
    a pair whose prompt leaves no room for a response is dropped."""
    rows = {"chosen": [], "chosen_learn": [], "rejected": [], "rejected_learn": []}
    truncated = dropped = 0
    for p in pairs:
        prompt = [tokenizer.bos_id, *tokenizer.encode(chat.chat_prompt(p.prompt))]
        if len(prompt) >= seq_len:
            dropped += 1
            continue
        for side, text in (("chosen", p.chosen), ("rejected", p.rejected)):
            ids = prompt + [*tokenizer.encode(text + chat.END), tokenizer.eos_id]
            learn = [False] * len(prompt) + [True] * (len(ids) - len(prompt))
            if len(ids) > seq_len + 1:
                truncated += 1
                ids, learn = ids[:seq_len + 1], learn[:seq_len + 1]
            pad = seq_len + 1 - len(ids)
            rows[side].append(ids + [tokenizer.pad_id] * pad)
            rows[side + "_learn"].append(learn + [False] * pad)
    if not rows["chosen"]:
        raise DistillError(f"no preference pair fits seq_len {seq_len}")
    t = {k: torch.tensor(v) for k, v in rows.items()}
    return EncodedPairs(t["chosen"], t["chosen_learn"], t["rejected"], t["rejected_learn"], truncated, dropped)


def response_targets(rows: torch.Tensor, learn: torch.Tensor, ignore_index: int = -100):
    """(inputs, targets) for sequence log-probabilities: targets are the next tokens on response positions and
    `ignore_index` elsewhere; both trimmed to the longest real row."""
    width = int(learn.nonzero()[:, 1].max()) + 1 if learn.any() else 2
    x = rows[:, :width - 1]
    y = rows[:, 1:width].masked_fill(~learn[:, 1:width], ignore_index)
    return x, y


def token_losses(model, x: torch.Tensor, y: torch.Tensor, whitelist=None, margin: float = DEFAULT_MARGIN,
                 lambda_q: float = 0.0, chosen_rows: int | None = None):
    """Per-token -log p(target) [B, T] (0 at ignored targets, differentiable) through felix.linear_ce_quail (the
    logits never exist), and the QUAIL hinge term on the first `chosen_rows` rows: lambda_q times the mean over
    their whitelisted targets of max(0, margin - (z_target - max other z)), differentiable (0 when off)."""
    h = model.hidden_states(x)
    d = h.shape[-1]
    flat = h.reshape(-1, d)
    ce = linear_ce_quail(flat, model.head_weight, y.reshape(-1), None, margin=margin, lambda_q=0.0,
                               reduction="none").loss.reshape(y.shape)
    hinge = ce.new_zeros(())
    if lambda_q and whitelist is not None and chosen_rows:
        yc = y[:chosen_rows]
        hc = h[:chosen_rows].reshape(-1, d)
        with_hinge = linear_ce_quail(hc, model.head_weight, yc.reshape(-1), whitelist, margin=margin,
                                           lambda_q=lambda_q, reduction="none").loss.reshape(yc.shape)
        n_wl = int((whitelist[yc.clamp_min(0)] & (yc != -100)).sum())
        if n_wl:
            hinge = (with_hinge - ce[:chosen_rows]).sum() / n_wl  # = lambda_q * mean hinge (the CE parts cancel)
    return ce, hinge


@dataclass
class DPOOutput:
    loss: torch.Tensor            # mean over pairs of -log sigmoid(beta * (policy - reference) log-ratio margin)
    reward_chosen: torch.Tensor   # beta * (log pi(chosen) - log ref(chosen)), per pair, detached
    reward_rejected: torch.Tensor
    margin: torch.Tensor          # reward_chosen - reward_rejected, per pair, detached
    accuracy: torch.Tensor        # fraction of pairs with margin > 0


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float = 0.1) -> DPOOutput:
    """The DPO loss (Rafailov et al. 2023, eq. 7) on sequence log-probabilities [B]:
    -log sigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r))), averaged over the batch; computed in fp32 or wider."""
    shapes = {t.shape for t in (policy_chosen, policy_rejected, ref_chosen, ref_rejected)}
    if len(shapes) != 1 or policy_chosen.dim() != 1:
        raise ValueError(f"dpo_loss takes four [B] log-probability tensors of one shape, got {sorted(shapes)}")
    if not beta > 0:
        raise ValueError(f"beta must be positive, got {beta}")
    for name, t in (("policy_chosen", policy_chosen), ("policy_rejected", policy_rejected),
                    ("ref_chosen", ref_chosen), ("ref_rejected", ref_rejected)):
        if not torch.isfinite(t).all():
            raise ValueError(f"dpo_loss: {name} has NaN or Inf")
    dt = torch.promote_types(policy_chosen.dtype, torch.float32)
    rc = beta * (policy_chosen.to(dt) - ref_chosen.to(dt))
    rr = beta * (policy_rejected.to(dt) - ref_rejected.to(dt))
    logits = rc - rr
    loss = -F.logsigmoid(logits).mean()
    m = logits.detach()
    return DPOOutput(loss, rc.detach(), rr.detach(), m, (m > 0).to(dt).mean())


def sequence_logps(model, rows: torch.Tensor, learn: torch.Tensor, batch_size: int = 32) -> torch.Tensor:
    """Sum of response-token log-probabilities per row [N] (no gradient), in batches."""
    out = []
    device = next(model.parameters()).device
    was = model.training
    model.eval()
    with torch.no_grad():
        for s in range(0, rows.shape[0], batch_size):
            x, y = response_targets(rows[s:s + batch_size], learn[s:s + batch_size])
            ce, _ = token_losses(model, x.to(device), y.to(device))
            out.append(-ce.float().sum(-1).cpu())
    model.train(was)
    return torch.cat(out)


# ============================================================================================= SODA run
@dataclass
class SodaConfig:
    init_from: str                 # the student checkpoint (also the frozen reference: the snapshot's weights)
    out_dir: str = "runs/soda"
    teacher_data: list[str] = field(default_factory=list)   # teacher JSONL; empty = the built-in teachers
    n_records: int = 256           # built-in teachers: this many task records
    tasks: list[str] = field(default_factory=lambda: list(TASKS))
    teacher_scorer: str = "consensus"
    beta: float = 0.1
    nll_weight: float = 0.0        # + this x the chosen responses' mean token NLL (RPO's anchor; 0 = DPO alone)
    lambda_q: float = DEFAULT_LAMBDA_Q
    margin: float = DEFAULT_MARGIN
    seq_len: int | None = None     # None = the student's max_seq_len
    max_new_tokens: int = 192      # snapshot budget (also bounded by the context)
    snapshot_batch_size: int = 16
    batch_size: int = 8            # preference pairs per step
    steps: int = 60
    lr: float = 3e-4
    warmup_steps: int = 5
    decay_fraction: float = 0.2
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    val_fraction: float = 0.1
    eval_every: int = 10
    seed: int = 0
    device: str = "auto"

    def __post_init__(self):
        problems = []
        for name in ("batch_size", "steps", "eval_every", "max_new_tokens", "snapshot_batch_size", "n_records"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.beta > 0 or not self.lr > 0:
            problems.append(f"beta and lr must be positive, got {self.beta} and {self.lr}")
        if self.nll_weight < 0:
            problems.append(f"nll_weight must be >= 0, got {self.nll_weight}")
        if self.lambda_q < 0 or self.margin < 0:
            problems.append(f"lambda_q and margin must be >= 0, got {self.lambda_q} and {self.margin}")
        if not 0 < self.val_fraction < 1:
            problems.append(f"val_fraction must be in (0, 1), got {self.val_fraction}")
        if self.warmup_steps < 0 or self.warmup_steps + round(self.decay_fraction * self.steps) > self.steps:
            problems.append(f"warmup_steps {self.warmup_steps} + decay steps {round(self.decay_fraction * self.steps)}"
                            f" exceed steps {self.steps}")
        if not callable(self.teacher_scorer) and self.teacher_scorer not in SCORERS:
            problems.append(f"unknown teacher scorer {self.teacher_scorer!r}; choose from {', '.join(SCORERS)}")
        unknown = [t for t in self.tasks if t not in MAKERS]
        if unknown:
            problems.append(f"unknown task(s) {unknown}; known: {', '.join(MAKERS)}")
        if not self.init_from:
            problems.append("SODA trains an existing student: give --init-from CHECKPOINT")
        if problems:
            raise ValueError("invalid SodaConfig: " + "; ".join(problems))


@dataclass
class SodaResult:
    out_dir: Path
    metrics: list[dict]       # one record per evaluation
    step_metrics: list[dict]  # one record per optimizer step (training batch)
    pairs: int
    skipped: dict


class _PairCursor(felix_data.EpochCursor):
    def __init__(self, n: int, seed: int):
        self._start_cursor(n, seed)


def _pair_metrics(out: DPOOutput, pc, pr) -> dict:
    return {"reward_margin": float(out.margin.mean()), "reward_chosen": float(out.reward_chosen.mean()),
            "reward_rejected": float(out.reward_rejected.mean()), "accuracy": float(out.accuracy),
            "chosen_logp": float(pc.detach().mean()), "rejected_logp": float(pr.detach().mean())}


def save_soda_curve(path: Path, step_metrics: list[dict], metrics: list[dict]) -> None:
    import matplotlib  # local: a heavy optional dependency, loaded only when a plot is drawn

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt


    steps = [m["step"] for m in step_metrics]
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    axes[0].plot(steps, [m["reward_margin"] for m in step_metrics], lw=0.8, alpha=0.6, label="train (per step)")
    axes[0].plot([m["step"] for m in metrics], [m["val_reward_margin"] for m in metrics], "s-", ms=3,
                 label="held-out pairs")
    axes[0].set_title("reward margin (beta x log-ratio)")
    axes[1].plot(steps, [m["accuracy"] for m in step_metrics], lw=0.8, alpha=0.6, label="train (per step)")
    axes[1].plot([m["step"] for m in metrics], [m["val_accuracy"] for m in metrics], "s-", ms=3, label="held-out")
    axes[1].set_title("preference accuracy")
    axes[1].set_ylim(-0.05, 1.05)
    axes[2].plot(steps, [m["chosen_logp"] for m in step_metrics], lw=0.8, label="chosen (teacher)")
    axes[2].plot(steps, [m["rejected_logp"] for m in step_metrics], lw=0.8, label="rejected (student snapshot)")
    axes[2].set_title("policy log-prob per sequence (train)")
    for ax in axes:
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path, dpi=110)
    plt.close(fig)


def train_soda(cfg: SodaConfig, log=None, progress: bool | None = None) -> SodaResult:
    """Run SODA (see the module docstring). Writes into ``out_dir``: ``checkpoint/`` (the trained student),
    ``snapshot.jsonl`` (the student's one-time responses), ``teacher-agreement.{json,md,png}``, ``metrics.jsonl``,
    ``soda_curve.png`` and ``soda.json`` (config, pair counts, final metrics)."""
    log = log or tqdm.write
    progress = sys.stderr.isatty() if progress is None else progress
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    device = _device(cfg.device)
    torch.manual_seed(cfg.seed)
    init = Path(cfg.init_from)
    if (out / "checkpoint").resolve() == init.resolve():
        raise DistillError(f"--out-dir {out} would overwrite the student checkpoint {init}; choose another")
    model = felix_model.load_checkpoint(init, device)
    tokenizer = Tokenizer.load(init)
    seq_len = cfg.seq_len or model.cfg.max_seq_len
    if seq_len > model.cfg.max_seq_len:
        raise DistillError(f"seq_len {seq_len} exceeds the student's max_seq_len {model.cfg.max_seq_len}")

    # 1. teacher data, selection, agreement
    groups = (load_teacher_groups(cfg.teacher_data) if cfg.teacher_data
              else builtin_teacher_groups(cfg.n_records, cfg.seed, cfg.tasks))
    selections = select_responses(groups, cfg.teacher_scorer)
    agreement = teacher_agreement(groups, selections)
    write_agreement_report(agreement, out)
    log(f"teacher data: {len(groups)} prompts, teachers {', '.join(agreement['teachers'])}; selected "
        + ", ".join(f"{t} {n}" for t, n in agreement["selection"]["selected"].items())
        + f"; {agreement['selection']['no_valid_response']} prompt(s) without a schema-valid response")

    # 2. the one-time snapshot of the student's greedy responses
    t0 = time.perf_counter()
    prompts = [s.prompt for s in selections]
    student = greedy_responses(model, tokenizer, prompts, cfg.max_new_tokens, cfg.snapshot_batch_size, progress,
                               desc="snapshot")
    write_snapshot(out / SNAPSHOT_FILE, prompts, student, {"init_from": str(init), "max_new_tokens": cfg.max_new_tokens})
    log(f"snapshot: {len(student)} student responses in {time.perf_counter() - t0:.1f}s "
        f"({sum(schema_check(s.task, r)['compliant'] for s, r in zip(selections, student))} schema-valid)")

    # 3. pairs, split, reference log-probs (the snapshot's weights, computed once: the reference never changes)
    pairs, skipped = build_pairs(selections, student)
    if len(pairs) < 2:
        raise DistillError(f"only {len(pairs)} preference pair(s) (skipped: {skipped}); need at least 2")
    train_pairs, val_pairs = felix_data.split_documents(pairs, cfg.val_fraction, cfg.seed, key=lambda p: p.prompt)
    enc_train, enc_val = encode_pairs(train_pairs, tokenizer, seq_len), encode_pairs(val_pairs, tokenizer, seq_len)
    skipped.update(truncated=enc_train.truncated + enc_val.truncated, dropped_too_long=enc_train.dropped + enc_val.dropped)
    ref = {name: (sequence_logps(model, e.chosen, e.chosen_learn), sequence_logps(model, e.rejected, e.rejected_learn))
           for name, e in (("train", enc_train), ("val", enc_val))}
    log(f"pairs: {enc_train.chosen.shape[0]} train / {enc_val.chosen.shape[0]} held-out (skipped {skipped}); "
        f"beta {cfg.beta:g}, NLL weight {cfg.nll_weight:g}, QUAIL lambda_q {cfg.lambda_q:g} margin {cfg.margin:g} on the chosen responses")

    whitelist = whitelist_mask(json_structure_whitelist(tokenizer), model.cfg.vocab_size, device)
    optimizer = _optimizer(model, cfg)
    cursor = _PairCursor(enc_train.chosen.shape[0], cfg.seed)
    use_bf16 = device.type == "cuda"

    def autocast():
        return torch.autocast("cuda", dtype=torch.bfloat16) if use_bf16 else torch.autocast("cpu", enabled=False)

    def pair_forward(e: EncodedPairs, idx, ref_c, ref_r, with_hinge: bool):
        rows = torch.cat([e.chosen[idx], e.rejected[idx]])
        learn = torch.cat([e.chosen_learn[idx], e.rejected_learn[idx]])
        x, y = response_targets(rows, learn)
        with autocast():
            ce, hinge = token_losses(model, x.to(device), y.to(device), whitelist if with_hinge else None,
                                     cfg.margin, cfg.lambda_q if with_hinge else 0.0, chosen_rows=len(idx))
        logps = -ce.float().sum(-1)
        b = len(idx)
        dpo = dpo_loss(logps[:b], logps[b:], ref_c[idx].to(device), ref_r[idx].to(device), cfg.beta)
        nll = ce[:b].float().sum() / (y[:b] != -100).sum().clamp_min(1)  # mean NLL per chosen response token
        return dpo, hinge, nll, logps[:b], logps[b:]

    @torch.no_grad()
    def evaluate_val() -> dict:
        model.eval()
        n = enc_val.chosen.shape[0]
        outs, pcs, prs = [], [], []
        for s in range(0, n, cfg.batch_size):
            idx = torch.arange(s, min(n, s + cfg.batch_size))
            dpo, _, _, pc, pr = pair_forward(enc_val, idx, *ref["val"], with_hinge=False)
            outs.append(dpo)
            pcs.append(pc)
            prs.append(pr)
        model.train()
        margin = torch.cat([o.margin for o in outs])
        return {"val_loss": float(sum(float(o.loss) * len(o.margin) for o in outs) / n),
                "val_reward_margin": float(margin.mean()), "val_accuracy": float((margin > 0).float().mean()),
                "val_chosen_logp": float(torch.cat(pcs).mean()), "val_rejected_logp": float(torch.cat(prs).mean())}

    metrics, step_metrics = [], []
    decay_steps = round(cfg.decay_fraction * cfg.steps)
    first = {"step": 0, **evaluate_val()}
    metrics.append(first)
    with open(out / METRICS_FILE, "w") as f:
        f.write(json.dumps(first) + "\n")
    model.train()
    bar = tqdm(total=cfg.steps, desc="soda", unit="step", disable=not progress)
    for step in range(1, cfg.steps + 1):
        lr = wsd_lr(step - 1, cfg.steps, cfg.lr, cfg.warmup_steps, decay_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        idx = torch.tensor(cursor.next_indices(cfg.batch_size))
        dpo, hinge, nll, pc, pr = pair_forward(enc_train, idx, *ref["train"], with_hinge=True)
        loss = dpo.loss + hinge + cfg.nll_weight * nll
        if not torch.isfinite(loss):
            raise FloatingPointError(f"SODA loss is {float(loss)} at step {step}; lower --lr or --beta")
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step_metrics.append({"step": step, "lr": lr, "loss": float(loss.detach()), "dpo_loss": float(dpo.loss.detach()),
                             "hinge": float(hinge.detach()), "nll": float(nll.detach()), **_pair_metrics(dpo, pc, pr)})
        bar.update(1)
        if step % cfg.eval_every == 0 or step == cfg.steps:
            window = step_metrics[-cfg.eval_every:]
            record = {"step": step, "lr": lr, **{f"train_{k}": sum(m[k] for m in window) / len(window)
                                                  for k in ("loss", "dpo_loss", "hinge", "nll", "reward_margin",
                                                            "reward_chosen", "reward_rejected", "accuracy",
                                                            "chosen_logp", "rejected_logp")}, **evaluate_val()}
            metrics.append(record)
            with open(out / METRICS_FILE, "a") as f:
                f.write(json.dumps(record) + "\n")
            log(f"step {step}: DPO {record['train_dpo_loss']:.4f} (+ hinge {record['train_hinge']:.4f}), reward margin "
                f"{record['train_reward_margin']:.3f} train / {record['val_reward_margin']:.3f} held-out, accuracy "
                f"{record['train_accuracy']:.2f} / {record['val_accuracy']:.2f}, log p chosen "
                f"{record['train_chosen_logp']:.1f} rejected {record['train_rejected_logp']:.1f}")
    bar.close()
    model.eval()
    summary = {"config": {k: v for k, v in asdict(cfg).items() if not callable(v)},
               "teachers": agreement["teachers"], "selected": agreement["selection"]["selected"],
               "pairs": {"train": enc_train.chosen.shape[0], "val": enc_val.chosen.shape[0]}, "skipped": skipped,
               "first": metrics[0], "last": metrics[-1]}
    felix_model.save_checkpoint(out / "checkpoint", model, tokenizer,
                                {SODA_FILE: lambda p: Path(p).write_text(json.dumps(summary, indent=1))})
    atomic_write_text(out / SODA_FILE, json.dumps(summary, indent=1))
    save_soda_curve(out / PLOT_FILE, step_metrics, metrics)
    log(f"SODA finished: held-out reward margin {metrics[0]['val_reward_margin']:.3f} -> "
        f"{metrics[-1]['val_reward_margin']:.3f}, accuracy {metrics[0]['val_accuracy']:.2f} -> "
        f"{metrics[-1]['val_accuracy']:.2f}; checkpoint {out / 'checkpoint'}, metrics {out / METRICS_FILE}")
    return SodaResult(out, metrics, step_metrics, len(pairs), skipped)
