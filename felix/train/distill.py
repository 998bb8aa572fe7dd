"""Distillation as the seed planned it: multi-teacher data, per-prompt selection, teacher agreement, and SODA.

* **Teacher data, selection and agreement** live in felix.data.teachers (the data stage: they are facts about the
  teacher data alone, and `felix teacher-data` reports them): :func:`load_teacher_groups` (JSONL with several
  teachers per prompt, malformed lines named by ``path:line``), the built-in teachers (:func:`builtin_teacher_groups`:
  ``exact``, ``noisy``, ``sloppy``; felix.tasks.perturbations) and trained checkpoints as teachers
  (:func:`checkpoint_teacher`), per-prompt :func:`select_responses` (schema-valid first, then a swappable scorer)
  and :func:`teacher_agreement` with its report.
* **SODA** (:func:`train_soda`, ``felix train --soda``): semi-on-policy distillation, an objective of the one
  training loop (:class:`SodaObjective`; felix.train.loop runs it: run lock, checkpoints with the trainer state, exact
  resume, metrics.jsonl, autocast, the step guard). The student's greedy responses are snapshotted once
  (felix.model.generate.greedy_responses, batched, with progress); pairs (:func:`build_pairs`: prompt, chosen = the
  selected teacher response, rejected = the student's snapshot response) train with the DPO loss (:func:`dpo_loss`),
  the reference model being the snapshot's weights, frozen (its log-probabilities are computed once, before the
  first step), plus the QUAIL hinge on the chosen responses' whitelisted targets (and optionally an NLL anchor on
  them). Metrics: reward margin, chosen / rejected rewards and log-probabilities, preference accuracy, on training
  and held-out pairs.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from felix.core.files import atomic_write_text, jsonable, save_figure
from felix.core.quail import DEFAULT_LAMBDA_Q, DEFAULT_MARGIN
from felix.data import corpus as felix_data
from felix.data.teachers import (
    SCORERS,
    DistillError,
    Selection,
    builtin_teacher_groups,
    load_teacher_groups,
    select_responses,
    teacher_agreement,
    write_agreement_report,
)
from felix.model import chat
from felix.model import felix_lm as felix_model
from felix.model.generate import greedy_responses
from felix.model.tokenizer import Tokenizer
from felix.ops.loss import linear_ce_quail
from felix.tasks import MAKERS, TASKS, schema_check
from felix.train.config import TrainConfig
from felix.train.loop import CHECKPOINT_DIR, Objective, Run, train

PLOT_FILE, SNAPSHOT_FILE, SODA_FILE = (
    "soda_curve.png",
    "snapshot.jsonl",
    "soda.json",
)  # metrics: the loop's metrics.jsonl


# ===================================================================================== the snapshot
def write_snapshot(path, prompts: list[str], responses: list[str], meta: dict) -> Path:
    lines = [json.dumps({"meta": meta})] + [
        json.dumps({"prompt": p, "response": r}) for p, r in zip(prompts, responses)
    ]
    return atomic_write_text(Path(path), "\n".join(lines) + "\n")


# ======================================================================================= pairs + DPO
@dataclass
class PreferencePair:
    prompt: str
    task: str | None
    teacher: str
    chosen: str  # the selected teacher response
    rejected: str  # the student's snapshot response


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
                ids, learn = ids[: seq_len + 1], learn[: seq_len + 1]
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
    x = rows[:, : width - 1]
    y = rows[:, 1:width].masked_fill(~learn[:, 1:width], ignore_index)
    return x, y


def token_losses(
    model,
    x: torch.Tensor,
    y: torch.Tensor,
    whitelist=None,
    margin: float = DEFAULT_MARGIN,
    lambda_q: float = 0.0,
    chosen_rows: int | None = None,
):
    """Per-token -log p(target) [B, T] (0 at ignored targets, differentiable) through felix.linear_ce_quail (the
    logits never exist), and the QUAIL hinge term on the first `chosen_rows` rows: lambda_q times the mean over
    their whitelisted targets of max(0, margin - (z_target - max other z)), differentiable (0 when off)."""
    h = model.hidden_states(x)
    d = h.shape[-1]
    flat = h.reshape(-1, d)
    ce = linear_ce_quail(
        flat, model.head_weight, y.reshape(-1), None, margin=margin, lambda_q=0.0, reduction="none"
    ).loss.reshape(y.shape)
    hinge = ce.new_zeros(())
    if lambda_q and whitelist is not None and chosen_rows:
        yc = y[:chosen_rows]
        hc = h[:chosen_rows].reshape(-1, d)
        with_hinge = linear_ce_quail(
            hc, model.head_weight, yc.reshape(-1), whitelist, margin=margin, lambda_q=lambda_q, reduction="none"
        ).loss.reshape(yc.shape)
        n_wl = int((whitelist[yc.clamp_min(0)] & (yc != -100)).sum())
        if n_wl:
            hinge = (with_hinge - ce[:chosen_rows]).sum() / n_wl  # = lambda_q * mean hinge (the CE parts cancel)
    return ce, hinge


@dataclass
class DPOOutput:
    loss: torch.Tensor  # mean over pairs of -log sigmoid(beta * (policy - reference) log-ratio margin)
    reward_chosen: torch.Tensor  # beta * (log pi(chosen) - log ref(chosen)), per pair, detached
    reward_rejected: torch.Tensor
    margin: torch.Tensor  # reward_chosen - reward_rejected, per pair, detached
    accuracy: torch.Tensor  # fraction of pairs with margin > 0


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float = 0.1,
) -> DPOOutput:
    """The DPO loss (Rafailov et al. 2023, eq. 7) on sequence log-probabilities [B]:
    -log sigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r))), averaged over the batch; computed in fp32 or wider."""
    shapes = {t.shape for t in (policy_chosen, policy_rejected, ref_chosen, ref_rejected)}
    if len(shapes) != 1 or policy_chosen.dim() != 1:
        raise ValueError(f"dpo_loss takes four [B] log-probability tensors of one shape, got {sorted(shapes)}")
    if not beta > 0:
        raise ValueError(f"beta must be positive, got {beta}")
    for name, t in (
        ("policy_chosen", policy_chosen),
        ("policy_rejected", policy_rejected),
        ("ref_chosen", ref_chosen),
        ("ref_rejected", ref_rejected),
    ):
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
            x, y = response_targets(rows[s : s + batch_size], learn[s : s + batch_size])
            ce, _ = token_losses(model, x.to(device), y.to(device))
            out.append(-ce.float().sum(-1).cpu())
    model.train(was)
    return torch.cat(out)


# ============================================================================================= SODA run
@dataclass
class SodaConfig:
    init_from: str  # the student checkpoint (also the frozen reference: the snapshot's weights)
    out_dir: str = "runs/soda"
    teacher_data: list[str] = field(default_factory=list)  # teacher JSONL; empty = the built-in teachers
    n_records: int = 256  # built-in teachers: this many task records
    tasks: list[str] = field(default_factory=lambda: list(TASKS))
    teacher_scorer: str = "consensus"
    beta: float = 0.1
    nll_weight: float = 0.0  # + this x the chosen responses' mean token NLL (RPO's anchor; 0 = DPO alone)
    lambda_q: float = DEFAULT_LAMBDA_Q
    margin: float = DEFAULT_MARGIN
    seq_len: int | None = None  # None = the student's max_seq_len
    max_new_tokens: int = 192  # snapshot budget (also bounded by the context)
    snapshot_batch_size: int = 16
    batch_size: int = 8  # preference pairs per step
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
            problems.append(
                f"warmup_steps {self.warmup_steps} + decay steps {round(self.decay_fraction * self.steps)}"
                f" exceed steps {self.steps}"
            )
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
    metrics: list[dict]  # one record per evaluation (the first: step 0, before any update)
    step_metrics: list[dict]  # one record per optimizer step (training batch)
    pairs: int
    skipped: dict


class _PairCursor(felix_data.EpochCursor):
    def __init__(self, n: int, seed: int):
        self._start_cursor(n, seed)


def save_soda_curve(path: Path, step_metrics: list[dict], metrics: list[dict]) -> None:
    import matplotlib  # local: a heavy optional dependency, loaded only when a plot is drawn

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [m["step"] for m in step_metrics]
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    axes[0].plot(steps, [m["reward_margin"] for m in step_metrics], lw=0.8, alpha=0.6, label="train (per step)")
    axes[0].plot(
        [m["step"] for m in metrics], [m["val_reward_margin"] for m in metrics], "s-", ms=3, label="held-out pairs"
    )
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


class SodaObjective(Objective):
    """SODA as an objective of the one training loop (felix.train.loop): its data are preference pairs (chosen = the
    selected teacher response, rejected = the student's snapshot response), its loss DPO against the snapshot's
    frozen log-probabilities + the QUAIL hinge on the chosen responses + `nll_weight` x their mean token NLL.

    A fresh run snapshots the student's greedy responses (``snapshot.jsonl``), builds the pairs and computes the
    reference log-probabilities once, with the student's own weights, then evaluates the held-out pairs at step 0.
    The trainer state keeps the snapshot, the reference log-probabilities, the pair cursor and the per-step records,
    so a resumed run rebuilds exactly the same pairs without the student's original weights."""

    parts = (
        "dpo_loss",
        "hinge",
        "nll",
        "reward_margin",
        "reward_chosen",
        "reward_rejected",
        "accuracy",
        "chosen_logp",
        "rejected_logp",
    )
    state_keys = ("soda",)
    plot_file = PLOT_FILE

    def __init__(self, cfg: SodaConfig, seq_len: int, progress: bool):
        self.cfg, self.seq_len, self.progress = cfg, seq_len, progress
        self.run: Run | None = None
        self.selections, self.agreement, self.student = [], None, []
        self.train_pairs = self.val_pairs = None  # EncodedPairs
        self.ref: dict = {}  # "train" / "val" -> (chosen, rejected) reference log-probabilities
        self.cursor: _PairCursor | None = None
        self.step_metrics: list[dict] = []
        self.n_pairs, self.skipped = 0, {}

    def summary(self) -> dict:
        """``soda.json``: the config, and as they become known the teachers, pair counts and first / last metrics."""
        out = {"config": {k: v for k, v in asdict(self.cfg).items() if not callable(v)}}
        if self.agreement is not None:
            out.update(teachers=self.agreement["teachers"], selected=self.agreement["selection"]["selected"])
        if self.train_pairs is not None:
            out.update(
                pairs={"train": self.train_pairs.chosen.shape[0], "val": self.val_pairs.chosen.shape[0]},
                skipped=self.skipped,
            )
        if self.run is not None and self.run.metrics:
            out.update(first=self.run.metrics[0], last=self.run.metrics[-1])
        return out

    def write_config(self, directory: Path) -> None:
        atomic_write_text(Path(directory) / SODA_FILE, json.dumps(jsonable(self.summary()), indent=1))

    def open(self, out: Path, ckpt_dir: Path, resume: bool, par, device: torch.device, log) -> Tokenizer:
        cfg = self.cfg
        if par.world_size > 1:
            raise DistillError("SODA runs in one process: start it without torchrun")
        groups = (
            load_teacher_groups(cfg.teacher_data)
            if cfg.teacher_data
            else builtin_teacher_groups(cfg.n_records, cfg.seed, cfg.tasks)
        )
        self.selections = select_responses(groups, cfg.teacher_scorer)
        self.agreement = teacher_agreement(groups, self.selections)
        write_agreement_report(self.agreement, out)
        log(
            f"teacher data: {len(groups)} prompts, teachers {', '.join(self.agreement['teachers'])}; selected "
            + ", ".join(f"{t} {n}" for t, n in self.agreement["selection"]["selected"].items())
            + f"; {self.agreement['selection']['no_valid_response']} prompt(s) without a schema-valid response"
        )
        return Tokenizer.load(ckpt_dir if resume else cfg.init_from)

    def describe_data(self) -> str:
        return (
            f"data (SODA: DPO on preference pairs): {self.train_pairs.chosen.shape[0]} train / "
            f"{self.val_pairs.chosen.shape[0]} held-out pairs of at most {self.seq_len + 1} tokens"
        )

    def start(self, run: Run, state: dict | None) -> None:
        cfg, model, tokenizer = self.cfg, run.model, run.tokenizer
        self.run = run
        prompts = [s.prompt for s in self.selections]
        if state is None:  # the one-time snapshot of the student's greedy responses
            t0 = time.perf_counter()
            self.student = greedy_responses(
                model, tokenizer, prompts, cfg.max_new_tokens, cfg.snapshot_batch_size, self.progress, desc="snapshot"
            )
            write_snapshot(
                run.out / SNAPSHOT_FILE,
                prompts,
                self.student,
                {"init_from": str(cfg.init_from), "max_new_tokens": cfg.max_new_tokens},
            )
            run.log(
                f"snapshot: {len(self.student)} student responses in {time.perf_counter() - t0:.1f}s "
                f"({sum(schema_check(s.task, r)['compliant'] for s, r in zip(self.selections, self.student))} "
                f"schema-valid)"
            )
        else:
            soda = state["soda"]
            self.student, self.step_metrics = soda["student"], soda["step_metrics"]
            if len(self.student) != len(prompts):
                raise DistillError(
                    f"cannot resume: the checkpoint's snapshot answers {len(self.student)} prompts, the "
                    f"teacher data now has {len(prompts)}; resume with the same teacher data"
                )
        # pairs and their split (the same on resume: the snapshot and the teacher data decide them)
        pairs, self.skipped = build_pairs(self.selections, self.student)
        if len(pairs) < 2:
            raise DistillError(f"only {len(pairs)} preference pair(s) (skipped: {self.skipped}); need at least 2")
        self.n_pairs = len(pairs)
        train_pairs, val_pairs = felix_data.split_documents(pairs, cfg.val_fraction, cfg.seed, key=lambda p: p.prompt)
        self.train_pairs = encode_pairs(train_pairs, tokenizer, self.seq_len)
        self.val_pairs = encode_pairs(val_pairs, tokenizer, self.seq_len)
        self.skipped.update(
            truncated=self.train_pairs.truncated + self.val_pairs.truncated,
            dropped_too_long=self.train_pairs.dropped + self.val_pairs.dropped,
        )
        self.cursor = _PairCursor(self.train_pairs.chosen.shape[0], cfg.seed)
        if state is None:  # the reference: the snapshot's weights, computed once (it never changes)
            self.ref = {
                name: (
                    sequence_logps(model, e.chosen, e.chosen_learn),
                    sequence_logps(model, e.rejected, e.rejected_learn),
                )
                for name, e in (("train", self.train_pairs), ("val", self.val_pairs))
            }
            run.metrics.append({"step": 0, **self.evaluate(run, {})})  # policy == reference: margin 0
        else:
            self.ref = {name: tuple(soda["ref"][name]) for name in ("train", "val")}
            self.cursor.load_state_dict(soda["cursor"])
        run.log(
            f"pairs: {self.train_pairs.chosen.shape[0]} train / {self.val_pairs.chosen.shape[0]} held-out "
            f"(skipped {self.skipped}); beta {cfg.beta:g}, NLL weight {cfg.nll_weight:g}, QUAIL lambda_q "
            f"{cfg.lambda_q:g} margin {cfg.margin:g} on the chosen responses"
        )

    def state_dict(self) -> dict:
        return {
            "soda": {
                "student": self.student,
                "ref": self.ref,
                "cursor": self.cursor.state_dict(),
                "step_metrics": self.step_metrics,
            }
        }

    def _pair_forward(self, run: Run, e: EncodedPairs, idx, ref_c, ref_r, with_hinge: bool):
        cfg, device = self.cfg, run.device
        rows = torch.cat([e.chosen[idx], e.rejected[idx]])
        learn = torch.cat([e.chosen_learn[idx], e.rejected_learn[idx]])
        x, y = response_targets(rows, learn)
        with run.autocast():
            ce, hinge = token_losses(
                run.model,
                x.to(device),
                y.to(device),
                run.whitelist if with_hinge else None,
                cfg.margin,
                cfg.lambda_q if with_hinge else 0.0,
                chosen_rows=len(idx),
            )
        logps = -ce.float().sum(-1)
        b = len(idx)
        dpo = dpo_loss(logps[:b], logps[b:], ref_c[idx].to(device), ref_r[idx].to(device), cfg.beta)
        nll = ce[:b].float().sum() / (y[:b] != -100).sum().clamp_min(1)  # mean NLL per chosen response token
        return dpo, hinge, nll, logps[:b], logps[b:]

    def micro_batches(self, run: Run):
        return [torch.tensor(self.cursor.next_indices(self.cfg.batch_size)) for _ in range(run.cfg.grad_accum)]

    def loss(self, run: Run, batch) -> tuple[torch.Tensor, torch.Tensor]:
        dpo, hinge, nll, pc, pr = self._pair_forward(run, self.train_pairs, batch, *self.ref["train"], with_hinge=True)
        loss = dpo.loss + hinge + self.cfg.nll_weight * nll
        logged = [
            loss,
            dpo.loss,
            hinge,
            nll,
            dpo.margin.mean(),
            dpo.reward_chosen.mean(),
            dpo.reward_rejected.mean(),
            dpo.accuracy,
            pc.mean(),
            pr.mean(),
        ]
        return loss, torch.stack([t.detach().float() for t in logged])

    def on_step(self, run: Run, step: int, loss: float, parts: dict, skipped: bool) -> None:
        self.step_metrics.append(
            {"step": step, "lr": run.lr_at(step - 1), "loss": loss, **parts, **({"skipped": True} if skipped else {})}
        )

    @torch.no_grad()
    def evaluate(self, run: Run, interval: dict) -> dict:
        """The held-out pairs: DPO loss, reward margin, preference accuracy, policy log-probabilities."""
        model, e, n = run.model, self.val_pairs, self.val_pairs.chosen.shape[0]
        model.eval()
        outs, pcs, prs = [], [], []
        for s in range(0, n, self.cfg.batch_size):
            idx = torch.arange(s, min(n, s + self.cfg.batch_size))
            dpo, _, _, pc, pr = self._pair_forward(run, e, idx, *self.ref["val"], with_hinge=False)
            outs.append(dpo)
            pcs.append(pc)
            prs.append(pr)
        model.train()
        margin = torch.cat([o.margin for o in outs])
        return {
            "val_loss": float(sum(float(o.loss) * len(o.margin) for o in outs) / n),
            "val_reward_margin": float(margin.mean()),
            "val_accuracy": float((margin > 0).float().mean()),
            "val_chosen_logp": float(torch.cat(pcs).mean()),
            "val_rejected_logp": float(torch.cat(prs).mean()),
        }

    def describe(self, record: dict, lr: float) -> str:
        held_out = f"held-out reward margin {record['val_reward_margin']:.3f}, accuracy {record['val_accuracy']:.2f}"
        if record["train_dpo_loss"] is None:
            return f"train n/a (every step skipped), {held_out}"
        return (
            f"DPO {record['train_dpo_loss']:.4f} (+ hinge {record['train_hinge']:.4f}), reward margin "
            f"{record['train_reward_margin']:.3f} train / {record['val_reward_margin']:.3f} held-out, accuracy "
            f"{record['train_accuracy']:.2f} / {record['val_accuracy']:.2f}, log p chosen "
            f"{record['train_chosen_logp']:.1f} rejected {record['train_rejected_logp']:.1f}"
        )

    def finish(self, run: Run) -> None:
        out, metrics = run.out, run.metrics
        self.write_config(out)
        save_soda_curve(out / PLOT_FILE, self.step_metrics, metrics)
        run.log(
            f"SODA finished: held-out reward margin {metrics[0]['val_reward_margin']:.3f} -> "
            f"{metrics[-1]['val_reward_margin']:.3f}, accuracy {metrics[0]['val_accuracy']:.2f} -> "
            f"{metrics[-1]['val_accuracy']:.2f}"
        )


# the settings SODA shares with `felix train` (TrainConfig fields of the same name and meaning); seq_len is resolved
# against the student first
_LOOP_SETTINGS = tuple(
    f.name for f in fields(SodaConfig) if f.name in {g.name for g in fields(TrainConfig)} and f.name != "seq_len"
)


def train_soda(
    cfg: SodaConfig,
    log=None,
    progress: bool | None = None,
    resume: bool = False,
    stop_at: int | None = None,
    overwrite: bool = False,
    auto_resume: bool = False,
) -> SodaResult:
    """Run SODA (see the module docstring) as a run of the one training loop (felix.train.loop.train with a
    :class:`SodaObjective`): the run directory is locked and claimed as `felix train`'s is (`resume`, `auto_resume`,
    `overwrite`; another live process is refused), checkpoints are step directories behind ``checkpoint`` with the
    trainer state, and `stop_at` stops with a checkpoint that `resume` continues exactly. Writes into ``out_dir``
    besides: ``snapshot.jsonl`` (the student's one-time responses), ``teacher-agreement.{json,md,png}``,
    ``metrics.jsonl``, ``soda_curve.png`` and ``soda.json`` (config, pair counts, first and last metrics; also in each
    checkpoint)."""
    log = log or tqdm.write
    progress = sys.stderr.isatty() if progress is None else progress
    out, init = Path(cfg.out_dir), Path(cfg.init_from)
    if (out / CHECKPOINT_DIR).resolve() == init.resolve():
        raise DistillError(f"--out-dir {out} would overwrite the student checkpoint {init}; choose another")
    max_seq_len = felix_model.load_config(init).max_seq_len
    seq_len = cfg.seq_len or max_seq_len
    if seq_len > max_seq_len:
        raise DistillError(f"seq_len {seq_len} exceeds the student's max_seq_len {max_seq_len}")
    loop_cfg = TrainConfig(**{k: getattr(cfg, k) for k in _LOOP_SETTINGS}, seq_len=seq_len)
    objective = SodaObjective(cfg, seq_len, progress)
    result = train(
        loop_cfg,
        resume=resume,
        stop_at=stop_at,
        log=log,
        overwrite=overwrite,
        auto_resume=auto_resume,
        objective=objective,
        progress=progress,
    )
    return SodaResult(result.out_dir, result.metrics, objective.step_metrics, objective.n_pairs, objective.skipped)
