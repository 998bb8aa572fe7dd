"""The one training loop of Felix-LM: AdamW + warmup-stable-decay, exact resume, metrics, checkpoints, the step
guard, for every objective (:class:`Objective`: pretraining and masked SFT here, with CE + the QUAIL hinge from step 0
and the memorization-signature monitor; SODA's DPO on preference pairs in felix.train.distill). `felix train`
(felix/cli/train.py) is a thin wrapper over :func:`train`.

One run directory holds:

* ``checkpoints/step-NNNNNNNN/`` -- model.safetensors, config.json, tokenizer.json, trainer_state.json +
  trainer_state.safetensors (optimizer, step, data cursor, RNG, loss history; no pickle), one directory per save
  (the last --keep-last and the --milestone-every milestones are kept), and ``checkpoint`` -> the latest, a
  symlink replaced atomically (felix.train.runs: crash-safe at every filesystem operation);
* ``.lock`` -- the live trainer's lock (felix.train.runs.RunLock): a second process on the directory is refused;
* ``metrics.jsonl`` -- one JSON object per evaluation: step, lr, train loss and the objective's parts (CE and hinge;
  SODA: DPO, NLL, rewards), its validation numbers (tokens/s, MFU estimate, corpus wraps, memorization flag), peak
  memory, skipped steps and loss spikes;
* ``loss_curve.png`` -- train loss per step and validation loss per evaluation (SODA: ``soda_curve.png``).
* ``run.yaml`` -- the resolved run config (felix.train.config): ``felix train --resume --out-dir OUT`` reads it
  (SODA keeps its config in ``soda.json``);
* ``data/`` -- data files and the built-in corpus prepared on the fly as token shards, and the run's tokenizer
  (felix.train.run_data); prepared directories given as sources are read in place.

Memorization signature (from the seed project): when the corpus has wrapped several times and the
validation loss sits clearly BELOW the training loss, the model is reciting (validation text leaked into or
duplicates the training text), not learning -- the run warns loudly and flags the metrics line.
"""

from __future__ import annotations

import abc
import collections
import datetime
import json
import math
import random
import resource
import signal
import sys
import threading
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from felix.data import corpus as felix_data
from felix.model import chat
from felix.train import distributed as felix_distributed
from felix.model import felix_lm as felix_model
from felix.model import qat as felix_qat
from felix.train import config as felix_runconfig
from felix.train.config import RUN_KEEPING, TRAIN_ONLY, TrainConfig  # noqa: F401  (TRAIN_ONLY: the CLI's import)
from felix.train import runs as felix_runs
from felix.model import spokes as spokes_lib
from felix.core.files import atomic_write_text, jsonable, save_figure
from felix.ops.loss import whitelist_mask
from felix.train.run_data import eval_batches, open_run_data
from felix.model.tokenizer import Tokenizer, json_structure_whitelist, train_tokenizer

CHECKPOINT_DIR, METRICS_FILE, PLOT_FILE = felix_runs.POINTER, "metrics.jsonl", "loss_curve.png"
STATE_FILE, STATE_TENSORS_FILE = felix_runs.STATE_JSON, felix_runs.STATE_TENSORS  # trainer state: JSON + safetensors
TENSORBOARD_DIR = "tensorboard"

# Dense bf16 peak FLOP/s for MFU estimates, by substring of the CUDA device name.
PEAK_BF16_FLOPS = {
    "H200": 989e12,
    "H100": 989e12,
    "A100": 312e12,
    "L40S": 362e12,
    "4090": 165e12,
    "MI300": 1307e12,
    "7900": 123e12,
    "7800": 74e12,
}


def wsd_lr(step: int, total: int, peak: float, warmup: int, decay_steps: int, final_fraction: float = 0.0) -> float:
    """Warmup-stable-decay: linear warmup to `peak` over `warmup` steps, flat, then a linear decay over the
    last `decay_steps` steps down to ``final_fraction * peak`` at the final step."""
    if step < warmup:
        return peak * (step + 1) / warmup
    decay_start = total - decay_steps
    if step < decay_start or decay_steps == 0:
        return peak
    progress = (step - decay_start + 1) / decay_steps
    return peak * (1.0 - (1.0 - final_fraction) * progress)


class MemorizationMonitor:
    """Flags the memorization signature: corpus wrapped >= `min_wraps` times and val loss below train loss by
    more than `gap` (a fraction of the train loss). The trainer passes the train loss measured on fixed train
    windows with the SAME weights as the validation loss: the running mean over the last interval lags while
    the loss falls and would sit above validation loss for an innocent reason."""

    def __init__(self, gap: float = 0.1, min_wraps: int = 3):
        self.gap, self.min_wraps = gap, min_wraps
        self.alerts: list[str] = []

    def check(self, step: int, train_loss: float, val_loss: float, wraps: int) -> str | None:
        if wraps < self.min_wraps or not val_loss < train_loss * (1.0 - self.gap):
            return None
        msg = (
            f"MEMORIZATION SIGNATURE at step {step}: validation loss {val_loss:.4f} is "
            f"{100 * (1 - val_loss / train_loss):.0f}% below training loss {train_loss:.4f} after the corpus "
            f"wrapped {wraps} times. The model is reciting text it has seen (validation overlaps or duplicates "
            f"training data), not learning; check the split and add data before trusting these numbers."
        )
        self.alerts.append(msg)
        return msg


class StepGuard:
    """The step guard of a long run, all on the device (no host sync): a step whose loss or gradient norm is not
    finite -- or, with `skip_spikes`, whose loss spikes -- is skipped through fused AdamW's ``found_inf`` (no
    update and no step count, as under a GradScaler: torch.optim.adam._fused_adam). A spike is a loss more than
    `threshold` standard deviations above the mean of the last `window` kept step losses (llm.c's outlier
    detector); nothing is flagged before the window is full. The trainer reads the per-step flags and z-scores
    with the interval's losses (read_pending)."""

    def __init__(self, device: torch.device, window: int = 128, threshold: float = 5.0, skip_spikes: bool = False):
        self.window, self.threshold, self.skip_spikes = window, threshold, skip_spikes
        self.losses = torch.zeros(window, device=device)
        self.count = torch.zeros((), dtype=torch.long, device=device)  # losses kept so far

    def __call__(self, loss: torch.Tensor, grad_norm: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(skip, z): 0-d float tensors for a step's mean loss and total gradient norm."""
        loss, grad_norm = loss.float(), grad_norm.float()
        finite = torch.isfinite(loss) & torch.isfinite(grad_norm)
        std, mean = torch.std_mean(self.losses, correction=0)
        valid = finite & (self.count >= self.window) & (std > 0)
        z = torch.where(valid, (loss - mean) / std, torch.zeros_like(loss))
        skip = ~finite | (valid & (z > self.threshold)) if self.skip_spikes else ~finite
        slot = (self.count % self.window).view(1)
        self.losses.index_copy_(0, slot, torch.where(skip, self.losses.index_select(0, slot), loss.view(1)))
        self.count += (~skip).long()
        return skip.float(), z

    def state_dict(self) -> dict:
        return {"losses": self.losses, "count": self.count}

    def load_state_dict(self, state: dict) -> None:
        if state["losses"].shape != self.losses.shape:  # --loss-spike-window changed: the window starts over
            return
        self.losses.copy_(state["losses"])
        self.count.copy_(state["count"])


class TrainingHalted(RuntimeError):
    """The run stopped itself (too many skipped steps in a row), after saving a checkpoint of its last good state."""


@dataclass
class TrainResult:
    out_dir: Path
    step_losses: list[float]  # training loss (CE + lambda_q * hinge) per optimizer step
    metrics: list[dict]
    memorization_alerts: list[str]
    parameter_counts: dict
    stop_signal: int | None = None  # signal.SIGTERM / SIGINT when a signal stopped the run (with a checkpoint)


def resolve_device(name: str) -> torch.device:
    """A --device value as a torch device: "auto" is CUDA when there is one, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _peak_flops(cfg: TrainConfig, device: torch.device) -> float | None:
    if cfg.peak_tflops:
        return cfg.peak_tflops * 1e12
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        return next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)
    return None


def flops_per_token(mcfg: felix_model.FelixConfig, seq_len: int) -> float:
    """Training FLOPs per token (PaLM appendix B): 6 x matmul parameters + 12 x layers x d_model x seq_len
    (attention scores and values). The embedding lookup is not a matmul; the output head is."""
    counts = felix_model.parameter_counts(mcfg)
    matmul_params = counts["total"] - counts["norms"] - (0 if mcfg.tie_embeddings else counts["embedding"])
    return 6 * matmul_params + 12 * mcfg.n_layer * mcfg.d_model * seq_len


def _to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A CPU batch onto `device` without a host sync (a pageable host-to-GPU copy waits for the stream)."""
    return t.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else t.to(device)


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB (process peak RSS)


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW over the parameters that train (a frozen hub gets no optimizer state); `cfg` gives lr and weight_decay."""
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    decay = [p for n, p in params if p.dim() >= 2 and ".splice." not in n]
    no_decay = [p for n, p in params if not (p.dim() >= 2 and ".splice." not in n)]
    # fused: one kernel, and it honours found_inf (StepGuard): a skipped step changes no weight and no step count
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr,
        betas=(0.9, 0.95),
        eps=1e-8,
        fused=True,
    )


def _tokenizer_for_records(cfg: TrainConfig, resume: bool, ckpt_dir: Path, texts, log) -> Tokenizer:
    """The tokenizer of a run on text records: the checkpoint's (resume), the --init-from model's, --tokenizer's, or
    a byte-level BPE trained on `texts` (a callable giving them: only called when one is trained)."""
    if resume:
        return Tokenizer.load(ckpt_dir)
    if cfg.init_from:
        return Tokenizer.load(cfg.init_from)
    if cfg.tokenizer:
        return Tokenizer.load(cfg.tokenizer)
    vocab = cfg.vocab_size or felix_model.PRESETS[cfg.preset]["vocab_size"]
    t0 = time.perf_counter()
    tokenizer = train_tokenizer(texts(), vocab)
    log(f"trained a byte-level BPE tokenizer: {tokenizer.vocab_size} tokens in {time.perf_counter() - t0:.1f}s")
    return tokenizer


def _setup_spokes(model, cfg: TrainConfig, resume: bool, log) -> str | None:
    """Give an --init-from model the spokes asked for (--spokes, or the seed recipe's count for --train-only
    spokes), then freeze the hub when only spokes train. Returns the frozen hub's fingerprint (None otherwise)."""
    mcfg = model.cfg
    wants_spokes = cfg.spokes or (cfg.train_only == "spokes" and not mcfg.n_spokes)
    if cfg.init_from and not resume and wants_spokes:
        n = cfg.spokes or spokes_lib.SEED_RECIPE["n_spokes"]
        rank = cfg.spoke_rank or mcfg.spoke_rank
        if mcfg.n_spokes and (mcfg.n_spokes, mcfg.spoke_rank) != (n, rank):
            raise ValueError(
                f"{cfg.init_from} already has {mcfg.n_spokes} spokes of rank {mcfg.spoke_rank}; "
                f"asked for {n} of rank {rank}"
            )
        if not mcfg.n_spokes:
            spokes_lib.add_spokes(model, n, rank)
            log(f"added {n} spokes of rank {rank} to every layer (W_up = 0: the model starts exactly as its hub)")
    if cfg.train_only != "spokes":
        return None
    trainable = spokes_lib.freeze_hub(model)
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log(
        f"hub frozen: training {len(trainable)} spoke tensors ({n_train:,} parameters) of "
        f"{sum(p.numel() for p in model.parameters()):,}"
    )
    return spokes_lib.hub_fingerprint(model)


@torch.no_grad()
def evaluate(model, batches, device, whitelist, cfg: TrainConfig, autocast) -> dict:
    model.eval()
    ce = hinge = 0.0
    for x, y in batches:
        with autocast():
            parts = model.loss(x.to(device), y.to(device), whitelist, cfg.margin, cfg.lambda_q)
        ce, hinge = ce + float(parts.ce), hinge + float(parts.hinge)
    model.train()
    return {"val_ce": ce / len(batches), "val_hinge": hinge / len(batches)}


def save_loss_curve(path: Path, step_losses: list[float], metrics: list[dict]) -> None:
    import matplotlib  # local: a heavy optional dependency, loaded only when a plot is drawn

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(range(1, len(step_losses) + 1), step_losses, lw=0.8, alpha=0.6, label="train loss (per step)")
    ax.plot(
        [m["step"] for m in metrics],
        [math.nan if m["train_ce"] is None else m["train_ce"] for m in metrics],
        "o-",
        ms=3,
        label="train CE (interval mean)",
    )
    ax.plot([m["step"] for m in metrics], [m["train_eval_ce"] for m in metrics], "^-", ms=3, label="train CE (at eval)")
    ax.plot([m["step"] for m in metrics], [m["val_ce"] for m in metrics], "s-", ms=3, label="validation CE")
    sources = list(metrics[-1].get("val_ce_by_source", {})) if metrics else []
    for name in sources if len(sources) > 1 else []:  # a mix: each source's validation CE
        steps = [m["step"] for m in metrics if name in m.get("val_ce_by_source", {})]
        ax.plot(
            steps,
            [m["val_ce_by_source"][name] for m in metrics if name in m.get("val_ce_by_source", {})],
            ".--",
            ms=3,
            lw=0.8,
            label=f"validation CE: {name}",
        )
    for m in metrics:
        if m["memorization"]:
            ax.axvline(m["step"], color="red", alpha=0.3)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    save_figure(fig, path, dpi=110)
    plt.close(fig)


# ================================================================================================ objectives
class Objective(abc.ABC):
    """What a run optimizes: its data, its loss, and what an evaluation measures. Everything around it is the one
    loop of this module, the same for every objective: the run directory and its lock, the WSD schedule, autocast,
    gradient accumulation and clipping, the step guard (found_inf skips), metrics.jsonl, checkpoints with the trainer
    state, exact resume, SIGTERM saves, the log and the progress bar.

    * :class:`Pretraining` -- next-token CE + the QUAIL hinge on token shards (felix.train.run_data);
    * :class:`TeacherSFT` -- the same loss on teacher responses only (black-box distillation, --teacher-data);
    * felix.train.distill.SodaObjective -- DPO (+ NLL) on (teacher, student snapshot) preference pairs (--soda).

    :func:`objective_for` picks between the first two from the config; SODA's entry point (felix.train.distill.
    train_soda) hands its objective to :func:`train`. QAT and spokes-only change what trains (the model's setup),
    not the objective: every objective runs with them.

    The hooks, in the order the loop calls them: :meth:`write_config` (the run directory, then every checkpoint),
    :meth:`open` (data and tokenizer, before the model exists), :meth:`start` (the model is built: a fresh run
    prepares, a resumed one restores its part of the trainer state), then per step :meth:`micro_batches` and
    :meth:`loss`, per logged step :meth:`on_step`, per evaluation :meth:`evaluate` and :meth:`describe`, per
    checkpoint :meth:`state_dict`, and :meth:`finish` at the end."""

    parts: tuple[str, ...] = ()  # loss parts logged per step after the loss (metrics: train_<part>, interval means)
    state_keys: tuple[str, ...] = ()  # the keys state_dict adds to the trainer state (a resume checks them)
    plot_file = PLOT_FILE  # the curve finish() draws into the run directory
    tokens_per_step = 0  # tokens one optimizer step trains on, for the progress bar (0: not counted)

    @property
    def alerts(self) -> list[str]:
        """Warnings of the run's monitors (TrainResult.memorization_alerts)."""
        return []

    @abc.abstractmethod
    def write_config(self, directory: Path) -> None:
        """Write this run's settings into `directory` (the run directory, and each checkpoint)."""

    @abc.abstractmethod
    def open(self, out: Path, ckpt_dir: Path, resume: bool, par, device: torch.device, log) -> Tokenizer:
        """Read the data; return the run's tokenizer."""

    @abc.abstractmethod
    def describe_data(self) -> str:
        """The log line saying what the run trains on."""

    def start(self, run: Run, state: dict | None) -> None:
        """The model and optimizer exist: prepare a fresh run (`state` None) or restore a resumed one's
        :meth:`state_dict` part of the trainer `state`."""

    def state_dict(self) -> dict:
        return {}

    @abc.abstractmethod
    def micro_batches(self, run: Run):
        """This rank's cfg.grad_accum micro-batches of the next optimizer step."""

    @abc.abstractmethod
    def loss(self, run: Run, batch) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss to backpropagate, 1-D detached [loss, *parts] to log), under the run's autocast; no host sync
        needed: the logged values stay on the device until the interval is read."""

    def on_step(self, run: Run, step: int, loss: float, parts: dict, skipped: bool) -> None:
        """A step's logged values, once read to the host."""

    @abc.abstractmethod
    def evaluate(self, run: Run, interval: dict) -> dict:
        """The objective's fields of the metrics record that ends `interval` (validation, throughput, ...)."""

    @abc.abstractmethod
    def describe(self, record: dict, lr: float) -> str:
        """The log line of a metrics record (after "step N: ")."""

    def finish(self, run: Run) -> None:
        """The run ended (rank 0): its plots and summaries."""


class TokenObjective(Objective):
    """Next-token CE + the QUAIL hinge on rows of tokens (FelixLM.loss). An evaluation measures CE on fixed validation
    rows and on fixed training rows with the same weights, throughput and MFU, the corpus position, and runs the
    memorization check. Subclasses say where the rows come from (:meth:`open`)."""

    parts = ("ce", "hinge")
    state_keys = ("train_stream", "memorization_alerts")

    def __init__(self, cfg: TrainConfig):
        self.cfg, self.quail = cfg, cfg.quail
        self.monitor = MemorizationMonitor(cfg.memorization_gap, cfg.memorization_min_wraps)
        self.train_stream = self.run_data = None
        self.val_batches: dict = {}  # eval set (a source, or "val") -> its fixed validation batches
        self.train_eval_batches: dict = {}  # source -> its fixed training batches (same weights as validation)
        self.val_weights: dict = {}  # eval set -> weight of its CE in val_ce
        self.train_weights: dict = {}  # source -> weight of its CE in train_eval_ce
        self.flops_per_token, self.peak_flops = 0.0, None

    @property
    def alerts(self) -> list[str]:
        return self.monitor.alerts

    def write_config(self, directory: Path) -> None:
        felix_runconfig.write_resolved(self.cfg, directory)  # `felix train --resume --out-dir OUT` needs nothing else

    def start(self, run: Run, state: dict | None) -> None:
        cfg = self.cfg
        self.tokens_per_step = cfg.grad_accum * cfg.batch_size * cfg.seq_len * run.par.world_size
        self.flops_per_token, self.peak_flops = (
            flops_per_token(run.model.cfg, cfg.seq_len),
            _peak_flops(cfg, run.device),
        )
        if state is not None:
            self.train_stream.load_state_dict(state["train_stream"])
            self.monitor.alerts = state["memorization_alerts"]

    def state_dict(self) -> dict:
        return {"train_stream": self.train_stream.state_dict(), "memorization_alerts": self.monitor.alerts}

    def micro_batches(self, run: Run):
        return run.par.my_micro_batches(self.train_stream, self.cfg.batch_size, self.cfg.grad_accum)

    def loss(self, run: Run, batch) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = batch
        parts = run.module.loss(
            _to_device(x, run.device), _to_device(y, run.device), run.whitelist, self.quail.margin, self.quail.lambda_q
        )
        return parts.loss, torch.stack([parts.loss.detach(), parts.ce, parts.hinge])

    def evaluate(self, run: Run, interval: dict) -> dict:
        cfg, par, device, stream = self.cfg, run.par, run.device, self.train_stream
        tokens_per_s = interval["tokens"] / max(interval["seconds"], 1e-9)
        val = {
            n: evaluate(run.module, b, device, run.whitelist, cfg, run.autocast) for n, b in self.val_batches.items()
        }
        train_eval = {
            n: evaluate(run.module, b, device, run.whitelist, cfg, run.autocast)["val_ce"]
            for n, b in self.train_eval_batches.items()
        }
        record = {  # a mix's overall CE: the per-source CEs weighted as the mix weighs the sources
            "val_ce": sum(self.val_weights[name] * v["val_ce"] for name, v in val.items()),
            "val_hinge": sum(self.val_weights[name] * v["val_hinge"] for name, v in val.items()),
            "train_eval_ce": sum(self.train_weights[name] * ce for name, ce in train_eval.items()),
            "tokens_per_s": tokens_per_s,
            "mfu": tokens_per_s * self.flops_per_token / (self.peak_flops * par.world_size)
            if self.peak_flops
            else None,
            "corpus_wraps": stream.wraps,
            "epoch_progress": stream.epoch_progress,
            "tokens_seen": run.step * cfg.grad_accum * cfg.batch_size * cfg.seq_len * par.world_size,
        }
        if self.run_data is not None:  # per source: validation CE, samples served so far (the realized mix), epochs
            record.update(
                val_ce_by_source={name: v["val_ce"] for name, v in val.items()},
                source_samples=stream.source_counts(),
                source_epochs=stream.source_epochs(),
            )
        alert = (
            self.monitor.check(run.step, record["train_eval_ce"], record["val_ce"], stream.wraps)
            if record["train_eval_ce"] is not None and math.isfinite(record["train_eval_ce"])
            else None
        )
        record["memorization"] = alert is not None
        if alert and par.is_main:
            banner = "!" * 100
            run.log(f"{banner}\n{alert}\n{banner}")
            warnings.warn(alert, RuntimeWarning, stacklevel=4)
        return record

    def describe(self, record: dict, lr: float) -> str:
        mfu = f", MFU {100 * record['mfu']:.1f}%" if record["mfu"] is not None else ""
        ce = (
            "n/a (every step skipped"
            if record["train_ce"] is None
            else f"{record['train_ce']:.4f} (hinge {record['train_hinge']:.4f}"
        )
        return (
            f"train CE {ce}; now {record['train_eval_ce']:.4f}), val CE {record['val_ce']:.4f}, lr {lr:.2e}, "
            f"{record['tokens_per_s']:,.0f} tok/s{mfu}, peak {record['peak_memory_mb']:.0f} MB, corpus wraps "
            f"{record['corpus_wraps']}, tokens seen {record['tokens_seen']:,}"
        )

    def finish(self, run: Run) -> None:
        save_loss_curve(run.out / self.plot_file, run.step_losses, run.metrics)


class Pretraining(TokenObjective):
    """Pretraining: token shards prepared once (felix/train/run_data.py), weighted by the mix (felix/data/mix.py)."""

    def open(self, out: Path, ckpt_dir: Path, resume: bool, par, device: torch.device, log) -> Tokenizer:
        cfg = self.cfg
        self.run_data = open_run_data(cfg, out, ckpt_dir, resume, par, device, log)
        self.train_stream = self.run_data.train_stream
        self.val_batches, self.train_eval_batches = eval_batches(
            self.run_data, cfg.seq_len, cfg.batch_size, cfg.eval_batches
        )
        self.val_weights, self.train_weights = self.run_data.val_weights, self.run_data.train_weights
        return self.run_data.tokenizer

    def describe_data(self) -> str:
        return f"data: {self.run_data.describe()}; rows of {self.cfg.seq_len}"


class TeacherSFT(TokenObjective):
    """Black-box distillation: masked SFT on teacher responses (--teacher-data; in memory: teacher sets are small);
    only the response tokens are learned (felix.data.corpus.SFTStream)."""

    def open(self, out: Path, ckpt_dir: Path, resume: bool, par, device: torch.device, log) -> Tokenizer:
        cfg = self.cfg
        records, skipped = felix_data.load_teacher_records(cfg.teacher_data)
        if skipped:
            log(f"WARNING: skipped {len(skipped)} malformed teacher line(s):\n  " + "\n  ".join(skipped[:20]))
        self.train_items, self.val_items = felix_data.split_documents(
            records, cfg.val_fraction, cfg.seed, key=json.dumps
        )
        teachers = collections.Counter(r["teacher"] for r in records)
        log("teacher records: " + ", ".join(f"{t} {n}" for t, n in teachers.most_common()))
        tokenizer = _tokenizer_for_records(
            cfg, resume, ckpt_dir, lambda: [chat.chat_text(r["prompt"], r["response"]) for r in self.train_items], log
        )
        self.train_stream = felix_data.SFTStream(self.train_items, tokenizer, cfg.seq_len, cfg.seed)
        val_stream = felix_data.SFTStream(self.val_items, tokenizer, cfg.seq_len, cfg.seed + 1)
        if self.train_stream.truncated or self.train_stream.dropped:
            log(
                f"WARNING: {self.train_stream.truncated} record(s) cut to seq_len {cfg.seq_len}, "
                f"{self.train_stream.dropped} dropped (prompt alone longer than seq_len)"
            )
        self.val_batches = {"val": val_stream.fixed_batches(cfg.batch_size, cfg.eval_batches)}
        self.train_eval_batches = {"train": self.train_stream.fixed_batches(cfg.batch_size, cfg.eval_batches)}
        self.val_weights, self.train_weights = {"val": 1.0}, {"train": 1.0}
        return tokenizer

    def describe_data(self) -> str:
        return (
            f"data (distillation: masked SFT on responses): {len(self.train_items)} train / {len(self.val_items)} "
            f"validation items, {self.train_stream.tokens.numel():,} train tokens learned in "
            f"{self.train_stream.n_windows} rows of {self.cfg.seq_len}"
        )


def objective_for(cfg: TrainConfig) -> Objective:
    """The objective a `felix train` config asks for: masked SFT with --teacher-data, else pretraining."""
    return TeacherSFT(cfg) if cfg.teacher_data else Pretraining(cfg)


# ================================================================================================ the loop
@dataclass
class Run:
    """One training run between steps: what build_run prepared (the objective with its data, model, optimizer,
    whitelist) and the state the loop advances (step, losses, metrics, the logging interval). train() is a small loop
    over train_step, evaluate_interval and save_run_checkpoint on it."""

    cfg: TrainConfig
    par: object  # felix.train.distributed: one process, or this rank under torchrun
    log: object
    out: Path
    ckpt_dir: Path
    device: torch.device
    objective: Objective
    tokenizer: Tokenizer
    model: torch.nn.Module
    module: torch.nn.Module  # the model, or its loss wrapped by DDP / FSDP2
    optimizer: torch.optim.Optimizer
    whitelist: torch.Tensor  # the QUAIL whitelist, a [V] bool mask on the device
    counts: dict
    hub_fp: str | None
    decay_steps: int
    step: int = 0
    step_losses: list = field(default_factory=list)
    metrics: list = field(default_factory=list)
    interval: dict = field(default_factory=dict)
    pending: list = field(default_factory=list)  # per step, on the device: [mean loss, *objective parts (sums),
    #                                              skipped, loss z-score, gradient norm]
    per_step: torch.Tensor | None = None  # [1 / grad_accum, 1, ...] on the device, made at the first step
    lock: object = None  # felix.train.runs.RunLock on the run directory (rank 0)
    guard: StepGuard | None = None
    skip_streak: int = 0  # skipped steps in a row, as of the last read
    skipped_steps: int = 0  # skipped steps in the whole run, as of the last read
    halted: str | None = None  # why the run stops itself (too many skipped steps in a row)
    saved_step: int | None = None  # the step of the last checkpoint written or resumed from
    tensorboard: object = None  # a torch.utils.tensorboard SummaryWriter (rank 0, --tensorboard)
    progress: bool = False  # draw the progress bar (rank 0)

    @property
    def use_bf16(self) -> bool:
        return self.device.type == "cuda"

    def autocast(self):
        return torch.autocast("cuda", dtype=torch.bfloat16) if self.use_bf16 else torch.autocast("cpu", enabled=False)

    def lr_at(self, step: int) -> float:
        """The learning rate of optimizer step `step` (0-based): WSD."""
        cfg = self.cfg
        return wsd_lr(step, cfg.steps, cfg.lr, cfg.warmup_steps, self.decay_steps, cfg.final_lr_fraction)


def _new_interval(parts: tuple[str, ...]) -> dict:
    return {**{p: 0.0 for p in parts}, "n": 0, "tokens": 0, "seconds": 0.0, "steps": 0, "skipped": 0, "spikes": []}


def build_run(
    cfg: TrainConfig,
    resume: bool = False,
    log=None,
    overwrite: bool = False,
    auto_resume: bool = False,
    objective: Objective | None = None,
    progress: bool | None = None,
) -> Run:
    """Everything a run needs before its first step: the run directory (locked and claimed: felix.train.runs), the
    objective (`objective`, else the config's: :func:`objective_for`) with its data and the tokenizer, model (new,
    --init-from or resumed), spokes / QAT, optimizer, the QUAIL whitelist; with `resume` (or `auto_resume` finding a
    checkpoint), the trainer state of ``out_dir/checkpoint``. The caller releases ``run.lock`` (train() does)."""
    par = felix_distributed.from_environment(cfg.parallel)  # one process unless under torchrun
    log = (log or tqdm.write) if par.is_main else (lambda *args, **kwargs: None)  # rank-0 logging
    progress = (sys.stderr.isatty() if progress is None else progress) and par.is_main
    objective = objective or objective_for(cfg)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ckpt_dir = out / CHECKPOINT_DIR
    device = par.device(resolve_device(cfg.device))
    lock, claim_error = None, None
    if par.is_main:  # rank 0 locks and claims the directory; every rank learns whether it could
        try:
            lock, resume = felix_runs.claim_run_directory(out, resume, overwrite, auto_resume, log)
        except (ValueError, OSError) as e:
            claim_error = e
    if par.any_rank(claim_error is not None, device):
        raise claim_error or felix_runs.RunDirectoryError(f"rank 0 could not claim run directory {out}")
    if not par.is_main and auto_resume and not overwrite:
        resume = felix_runs.pointer_target(out) is not None
    try:
        return _build_run(cfg, objective, resume, log, par, out, ckpt_dir, device, lock, progress)
    except BaseException:
        if lock is not None:
            lock.release()
        raise


def _build_run(
    cfg: TrainConfig,
    objective: Objective,
    resume: bool,
    log,
    par,
    out: Path,
    ckpt_dir: Path,
    device,
    lock,
    progress: bool,
) -> Run:
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)

    if cfg.train_only == "spokes" and not (resume or cfg.init_from):
        raise ValueError("--train-only spokes trains spokes on a trained hub: give --init-from CHECKPOINT")
    if par.is_main:  # the resolved config: a resumed run needs nothing else
        objective.write_config(out)
    if resume:
        felix_runs.check_trainer_state(ckpt_dir)  # a pickled trainer_state.pt is refused, never loaded
    tokenizer = objective.open(out, ckpt_dir, resume, par, device, log)

    if resume or cfg.init_from:
        model = felix_model.load_checkpoint(ckpt_dir if resume else Path(cfg.init_from), device)
        model.cfg.checkpoint_activations = cfg.checkpoint_activations
        if cfg.seq_len > model.cfg.max_seq_len:
            raise ValueError(f"seq_len {cfg.seq_len} exceeds the checkpoint's max_seq_len {model.cfg.max_seq_len}")
    else:
        spoke_rank = {"spoke_rank": cfg.spoke_rank} if cfg.spoke_rank else {}
        mcfg = felix_model.preset(
            cfg.preset,
            vocab_size=tokenizer.vocab_size,
            max_seq_len=max(cfg.seq_len, felix_model.PRESETS[cfg.preset]["max_seq_len"]),
            checkpoint_activations=cfg.checkpoint_activations,
            n_spokes=cfg.spokes,
            **spoke_rank,
        )
        model = felix_model.FelixLM(mcfg).to(device)
    hub_fp = _setup_spokes(model, cfg, resume, log)
    mcfg = model.cfg
    if tokenizer.vocab_size > mcfg.vocab_size:
        raise ValueError(
            f"the tokenizer has {tokenizer.vocab_size} tokens but the model's embedding only "
            f"{mcfg.vocab_size} rows ({'the checkpoint' if resume else cfg.init_from}): token ids would "
            f"fall outside it; use the tokenizer the model was trained with"
        )
    # the QUAIL whitelist as a [V] bool mask on the device, built once: the loss gathers from it per step
    whitelist = whitelist_mask(json_structure_whitelist(tokenizer), mcfg.vocab_size, device)
    counts = felix_model.parameter_counts(mcfg)
    if cfg.qat:  # fake-quant STE on what the export quantizes; checkpoints keep the latent weights (+ qat.json)
        felix_qat.apply_qat(model, cfg.qat)
        log(felix_qat.describe(model._felix_qat))
    module = par.wrap(model)  # the model itself, or its loss under DDP / FSDP2 (parameters sharded in place)
    optimizer = build_optimizer(model, cfg)

    step, step_losses, metrics = 0, [], []
    interval = _new_interval(objective.parts)
    guard = StepGuard(device, cfg.loss_spike_window, cfg.loss_spike_threshold, cfg.skip_loss_spikes)
    skip_streak = skipped_steps = 0
    state = None
    if resume:
        state = felix_runs.load_trainer_state(ckpt_dir)  # safetensors + JSON: nothing in it can run code
        missing = sorted(
            {
                "optimizer",
                "step",
                "step_losses",
                "metrics",
                "interval",
                "torch_rng",
                "python_rng",
                "train_config",
                *objective.state_keys,
            }
            - set(state)
        )
        if missing:
            raise felix_model.CheckpointError(
                f"{ckpt_dir / STATE_FILE} is not a Felix trainer state: missing {', '.join(missing)}"
            )
        par.load_optimizer_state(module, optimizer, state["optimizer"])
        step, step_losses, metrics, interval = state["step"], state["step_losses"], state["metrics"], state["interval"]
        changed = {
            k: (v, getattr(cfg, k))
            for k, v in state["train_config"].items()
            if k not in ("out_dir", "device", *RUN_KEEPING) and hasattr(cfg, k) and getattr(cfg, k) != v
        }
        if changed:
            log(
                "WARNING: resuming with settings that differ from the checkpoint's (the curve will not match an "
                "uninterrupted run): " + ", ".join(f"{k} {old!r} -> {new!r}" for k, (old, new) in changed.items())
            )
        if hub_fp is not None and state.get("hub_fingerprint") != hub_fp:
            raise ValueError(
                f"cannot resume: the frozen hub in {ckpt_dir} is not the one this run started from "
                "(hub fingerprint changed)"
            )
        torch.set_rng_state(state["torch_rng"])
        random.setstate(state["python_rng"])
        guard.load_state_dict(state.get("guard", guard.state_dict()))
        skip_streak, skipped_steps = state.get("skip_streak", 0), state.get("skipped_steps", 0)
        interval = {**_new_interval(objective.parts), **interval}
        log(f"resumed {out} at step {step}")

    log(f"felix-lm {cfg.init_from or cfg.preset}: " + felix_model.format_parameter_counts(mcfg))
    log(
        f"QUAIL: lambda_q {cfg.lambda_q:g}, margin {cfg.margin:.4g}"
        + (
            f" (calibrated: -q{cfg.margin_quantile:g} of the margin change measured in {cfg.margin_from})"
            if cfg.margin_from
            else ""
        )
    )
    tensorboard = None
    if cfg.tensorboard and par.is_main:
        try:  # local: tensorboard is a heavy optional dependency, needed only with --tensorboard
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:
            raise ValueError(f"--tensorboard needs the tensorboard package (pip install tensorboard): {e}") from None
        tensorboard = SummaryWriter(str(out / TENSORBOARD_DIR), purge_step=step + 1 if resume else None)

    run = Run(
        cfg,
        par,
        log,
        out,
        ckpt_dir,
        device,
        objective,
        tokenizer,
        model,
        module,
        optimizer,
        whitelist,
        counts,
        hub_fp,
        round(cfg.decay_fraction * cfg.steps),
        step,
        step_losses,
        metrics,
        interval,
        lock=lock,
        guard=guard,
        skip_streak=skip_streak,
        skipped_steps=skipped_steps,
        saved_step=step if resume else None,
        tensorboard=tensorboard,
        progress=progress,
    )
    try:
        objective.start(run, state)
    except BaseException:
        if tensorboard is not None:
            tensorboard.close()
        raise
    log(objective.describe_data())
    log(
        f"QUAIL whitelist {int(whitelist.sum())} tokens; device {device}"
        f"{' (bf16 autocast)' if run.use_bf16 else ' (fp32)'}"
    )
    return run


def trainer_state(run: Run, full_optimizer: dict) -> dict:
    """Everything besides the model that an exact resume needs, as a nested dict of tensors and plain values
    (stored by felix.train.runs.save_trainer_state: tensors -> safetensors, the rest -> JSON; add keys freely): the
    loop's own, and the objective's (its data cursor, monitors, ...)."""
    return {
        "optimizer": full_optimizer,
        "step": run.step,
        "step_losses": run.step_losses,
        "metrics": run.metrics,
        "interval": run.interval,
        "torch_rng": torch.get_rng_state(),
        "python_rng": random.getstate(),
        "train_config": asdict(run.cfg),
        "hub_fingerprint": run.hub_fp,
        "guard": run.guard.state_dict(),
        "skip_streak": run.skip_streak,
        "skipped_steps": run.skipped_steps,
        **run.objective.state_dict(),
    }


def save_run_checkpoint(run: Run) -> None:
    """The model, tokenizer and trainer state (optimizer, data cursor, RNG, history) as a new step directory of
    the run, pointed at by ``out_dir/checkpoint`` (felix.train.runs.commit_checkpoint: crash-safe, with retention),
    consolidated: full tensors gathered from every rank, written by rank 0."""
    cfg, par, model = run.cfg, run.par, run.model
    t0 = time.perf_counter()
    full_model, full_optimizer = (
        par.full_model_state(model, run.module),
        par.full_optimizer_state(run.module, run.optimizer),
    )
    if par.is_main:
        full = felix_distributed.StateView(full_model, model.cfg)
        extra = {}
        if model.cfg.n_spokes:  # the spokes alone, tied to their hub: the per-task adapter file (felix.model.spokes)
            extra[spokes_lib.SPOKES_FILE] = lambda path: spokes_lib.save_spokes(path, full)
        if cfg.qat:  # which codec the forward used, for felix export / fidelity (felix.model.qat)
            extra[felix_qat.QAT_FILE] = lambda path: felix_qat.write_qat_config(path, model)
        state = trainer_state(run, full_optimizer)

        def write(directory):
            felix_model.write_checkpoint_files(directory, full, run.tokenizer, extra)
            felix_runs.save_trainer_state(directory, state)
            run.objective.write_config(directory)  # the config this checkpoint was trained with

        where = felix_runs.commit_checkpoint(run.out, run.step, write, cfg.keep_last, cfg.milestone_every, run.log)
        run.log(f"checkpoint {where.relative_to(run.out)} ({time.perf_counter() - t0:.2f}s)")
    run.saved_step = run.step
    par.barrier()


def train_step(run: Run) -> float:
    """One optimizer step (grad_accum micro-batches of the objective, clipping, AdamW at the WSD learning rate); its
    logged values stay on the device in run.pending until read_pending. Returns the learning rate used."""
    cfg, par, objective = run.cfg, run.par, run.objective
    lr = run.lr_at(run.step)
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    sums = torch.zeros(1 + len(objective.parts), device=run.device)
    for i, batch in enumerate(objective.micro_batches(run)):
        with par.gradient_sync(run.module, last=i == cfg.grad_accum - 1):  # no_sync but on the last
            with run.autocast():
                loss, logged = objective.loss(run, batch)
            (loss / cfg.grad_accum).backward()
        sums += logged.float()
        run.interval["n"] += 1
    grad_norm = torch.nn.utils.clip_grad_norm_(run.model.parameters(), cfg.grad_clip)
    if hasattr(grad_norm, "full_tensor"):  # FSDP2: a replicated DTensor
        grad_norm = grad_norm.full_tensor()
    if run.per_step is None:  # made once (a host-to-device copy): the loss is the mean over micro-batches
        run.per_step = torch.tensor([1.0 / cfg.grad_accum] + [1.0] * len(objective.parts)).to(run.device)
    parts = sums * run.per_step
    # the same decision on every rank: the gradient norm is global, the loss averaged over ranks (a collective,
    # no host sync); a skipped step leaves weights and optimizer state as they were
    skip, z = run.guard(par.mean_over_ranks(parts[0]) if par.world_size > 1 else parts[0], grad_norm)
    run.optimizer.found_inf = skip
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    run.pending.append(torch.cat([parts, torch.stack([skip, z, grad_norm.float()])]))
    run.step += 1
    return lr


def read_pending(run: Run) -> None:
    """The one host sync of an interval (also what makes its seconds honest on a GPU): the pending per-step losses,
    averaged over ranks, into step_losses and the interval sums; skipped steps and loss spikes are logged here,
    and a run with --max-skipped-in-a-row skipped steps in a row is marked to halt."""
    cfg, names = run.cfg, run.objective.parts
    rows = run.par.mean_over_ranks(torch.stack(run.pending)).tolist() if run.pending else []
    first = run.step - len(rows) + 1
    for i, row in enumerate(rows):
        step, loss, parts = first + i, row[0], dict(zip(names, row[1 : 1 + len(names)]))
        skipped, z, grad_norm = row[1 + len(names) :]
        run.step_losses.append(loss)
        run.interval["steps"] += 1
        if z > cfg.loss_spike_threshold:
            run.interval["spikes"].append({"step": step, "loss": loss, "z": z, "skipped": bool(skipped)})
            run.log(
                f"step {step}: loss spike: {loss:.4f} is {z:.1f} standard deviations above the mean of the last "
                f"{cfg.loss_spike_window} steps ({'update skipped' if skipped else 'kept'})"
            )
        if skipped:
            run.skip_streak += 1
            run.skipped_steps += 1
            run.interval["skipped"] += 1
            run.interval["n"] -= cfg.grad_accum  # the interval means leave skipped steps out
            if not math.isfinite(loss) or not math.isfinite(grad_norm):
                run.log(
                    f"step {step}: update skipped: loss {loss:.4g}, gradient norm {grad_norm:.4g} "
                    f"({run.skip_streak} in a row, {run.skipped_steps} in the run)"
                )
            if run.skip_streak >= cfg.max_skipped_in_a_row and run.halted is None:
                run.halted = (
                    f"{run.skip_streak} steps in a row skipped (non-finite loss or gradient norm, or loss "
                    f"spikes) up to step {step}: stopping with a checkpoint of the last good state "
                    f"(skipped steps change no weight); lower --lr, check the data, or resume to retry"
                )
        else:
            run.skip_streak = 0
            for name, value in parts.items():
                run.interval[name] += value
        run.objective.on_step(run, step, loss, parts, bool(skipped))
        if run.tensorboard is not None:
            run.tensorboard.add_scalar("train/step_loss", loss, step)
    run.pending.clear()


def evaluate_interval(run: Run, lr: float) -> dict:
    """The metrics record of the interval that ends at this step: the training loss and the objective's parts
    (interval means), what the objective's evaluation measures, and peak memory and the step guard's counts;
    appended to metrics.jsonl as it happens. Starts a new interval."""
    cfg, par, interval = run.cfg, run.par, run.interval
    recent = [x for x in run.step_losses[-cfg.eval_every :] if math.isfinite(x)]
    n = interval["n"]
    record = {
        "step": run.step,
        "lr": lr,
        "train_loss": sum(recent) / len(recent) if recent else None,
        **{f"train_{p}": interval[p] / n if n else None for p in run.objective.parts},
        **run.objective.evaluate(run, interval),
        "peak_memory_mb": _peak_memory_mb(run.device),
        "peak_memory_kind": "gpu_allocated" if run.device.type == "cuda" else "process_rss",
        "skipped_steps": interval["skipped"],
        "loss_spikes": interval["spikes"],
    }
    run.metrics.append(record)
    if par.is_main:
        with open(run.out / METRICS_FILE, "a") as f:  # appended as it happens: a crashed run keeps its metrics
            f.write(json.dumps(jsonable(record)) + "\n")
        if run.tensorboard is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                    run.tensorboard.add_scalar(f"metrics/{key}", value, run.step)
            run.tensorboard.flush()
    seconds_per_step = interval["seconds"] / max(interval["steps"], 1)
    eta = datetime.timedelta(seconds=round(seconds_per_step * (cfg.steps - run.step)))
    run.interval = _new_interval(run.objective.parts)
    skipped = f", {record['skipped_steps']} step(s) skipped" if record["skipped_steps"] else ""
    run.log(f"step {run.step}: {run.objective.describe(record, lr)}, ETA {eta}{skipped}")
    return record


def _stop_on_signals(log):
    """SIGTERM / SIGINT set a flag the loop reads after each step (finish it, save, exit); the first signal puts
    the previous handlers back, so a second one acts as usual. Returns (flag dict, restore callable)."""
    flag = {"signal": None}
    if threading.current_thread() is not threading.main_thread():
        return flag, lambda: None
    previous = {}

    def handler(signum, frame):
        flag["signal"] = signum
        restore()
        log(
            f"{signal.Signals(signum).name}: finishing this step, then saving a checkpoint and exiting "
            f"(send it again to stop at once)"
        )

    def restore():
        for signum, old in previous.items():
            signal.signal(signum, old)

    for signum in (signal.SIGTERM, signal.SIGINT):
        previous[signum] = signal.signal(signum, handler)
    return flag, restore


def train(
    cfg: TrainConfig,
    resume: bool = False,
    stop_at: int | None = None,
    log=None,
    overwrite: bool = False,
    auto_resume: bool = False,
    objective: Objective | None = None,
    progress: bool | None = None,
) -> TrainResult:
    """Run (or, with `resume`, continue from ``out_dir/checkpoint``) a training run of `objective` (default: the
    config's, :func:`objective_for`). `stop_at` stops after that many optimizer steps with a checkpoint, as an
    interruption would (used to test exact resume). A directory holding a run needs `resume`, `auto_resume`
    (continue it when it has a checkpoint, else start fresh) or `overwrite`; a directory another process is training
    in is refused (felix.train.runs). SIGTERM / SIGINT finish the step, save a checkpoint and return
    (TrainResult.stop_signal); too many skipped steps in a row save a checkpoint and raise TrainingHalted.
    `progress`: draw a progress bar (default: when stderr is a terminal)."""
    run = build_run(
        cfg, resume, log, overwrite=overwrite, auto_resume=auto_resume, objective=objective, progress=progress
    )
    par = run.par
    stop, restore_signals = _stop_on_signals(run.log)
    try:
        return _train_loop(run, stop, stop_at)
    finally:
        restore_signals()
        if run.tensorboard is not None:
            run.tensorboard.close()
        if run.lock is not None:
            run.lock.release()
        par.close()


def _train_loop(run: Run, stop: dict, stop_at: int | None) -> TrainResult:
    cfg, par, out, objective = run.cfg, run.par, run.out, run.objective
    end = cfg.steps if stop_at is None else min(stop_at, cfg.steps)
    if par.is_main:  # a resumed run keeps the records up to its checkpoint (rewritten atomically)
        atomic_write_text(out / METRICS_FILE, "".join(json.dumps(jsonable(r)) + "\n" for r in run.metrics))
    bar = tqdm(total=cfg.steps, initial=run.step, desc="train", unit="step", disable=not run.progress)
    run.model.train()
    while run.step < end:
        t0 = time.perf_counter()
        lr = train_step(run)
        step = run.step
        # one process reads the stop flag every step (a host flag: no sync); ranks agree on it when they sync anyway
        signalled = stop["signal"] is not None if par.world_size == 1 else False
        read_now = (
            step % cfg.eval_every == 0
            or step in (cfg.steps, end)
            or signalled
            or (cfg.checkpoint_every and step % cfg.checkpoint_every == 0)
        )
        if read_now:
            read_pending(run)
            if par.world_size > 1:
                signalled = par.any_rank(stop["signal"] is not None, run.device)
        run.interval["seconds"] += time.perf_counter() - t0
        run.interval["tokens"] += objective.tokens_per_step
        bar.update(1)
        if run.step_losses and not bar.disable:
            bar.set_postfix(
                loss=f"{run.step_losses[-1]:.3f}",
                lr=f"{lr:.2e}",
                **(
                    {"tokens": f"{run.step * objective.tokens_per_step / 1e6:.1f}M"}
                    if objective.tokens_per_step
                    else {}
                ),
            )
        if step % cfg.eval_every == 0 or step == cfg.steps:
            evaluate_interval(run, lr)
        if signalled or run.halted:
            break
        if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step < end:
            save_run_checkpoint(run)
    bar.close()
    if run.pending:
        read_pending(run)
    if run.saved_step != run.step:  # nothing new since the checkpoint resumed from: it stays as it is
        save_run_checkpoint(run)
    if par.is_main:
        objective.finish(run)
    if run.halted:
        run.log(f"HALTED: {run.halted}; checkpoint {run.ckpt_dir}")
        raise TrainingHalted(run.halted)
    signum = stop["signal"]
    how = f"stopped by {signal.Signals(signum).name}" if signum else "stopped" if run.step < cfg.steps else "finished"
    run.log(
        f"{how} at step {run.step}; checkpoint {run.ckpt_dir}, metrics {out / METRICS_FILE}, plot "
        f"{out / objective.plot_file}"
    )
    return TrainResult(out, run.step_losses, run.metrics, list(objective.alerts), run.counts, signum)
