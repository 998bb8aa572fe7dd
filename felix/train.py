"""Felix-LM pretraining: AdamW + warmup-stable-decay, CE + QUAIL hinge from step 0, exact resume, metrics,
and the memorization-signature monitor. `felix train` (felix/cli.py) is a thin wrapper over :func:`train`.

One run directory holds:

* ``checkpoint/`` -- model.safetensors, config.json, tokenizer.json, trainer_state.pt (optimizer, step, data
  cursor, RNG, loss history), written atomically (felix.model.save_checkpoint);
* ``metrics.jsonl`` -- one JSON object per evaluation: step, lr, train/val loss, CE and hinge parts, tokens/s,
  MFU estimate, peak memory, corpus wraps, memorization flag;
* ``loss_curve.png`` -- train loss per step and validation loss per evaluation.
* ``run.yaml`` -- the resolved run config (felix.runconfig): ``felix train --resume --out-dir OUT`` reads it;
* ``data/`` -- data files and the built-in corpus prepared on the fly as token shards, and the run's tokenizer
  (felix.run_data); prepared directories given as sources are read in place.

Memorization signature (from the seed project): when the corpus has wrapped several times and the
validation loss sits clearly BELOW the training loss, the model is reciting (validation text leaked into or
duplicates the training text), not learning -- the run warns loudly and flags the metrics line.
"""
from __future__ import annotations

import collections
import json
import random
import re
import resource
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from felix import data as felix_data
from felix import distributed as felix_distributed
from felix import model as felix_model
from felix import qat as felix_qat
from felix import runconfig as felix_runconfig
from felix import spokes as spokes_lib
from felix.mix import MixError, normalize_weights
from felix.ops.loss import whitelist_mask
from felix.run_data import eval_batches, open_run_data
from felix.quail import DEFAULT_LAMBDA_Q, DEFAULT_MARGIN, DEFAULT_NOISE_QUANTILE, QuailConfig, margin_from_fidelity
from felix.tokenizer import Tokenizer, json_structure_whitelist, train_tokenizer

SOURCE_NAME = re.compile(r"[A-Za-z0-9_.-]+")  # a data source's name: a metrics key and a directory name
TRAIN_ONLY = (None, "spokes")  # what --train-only may name (None: everything trains)
CHECKPOINT_DIR, METRICS_FILE, PLOT_FILE, STATE_FILE = "checkpoint", "metrics.jsonl", "loss_curve.png", "trainer_state.pt"

# Dense bf16 peak FLOP/s for MFU estimates, by substring of the CUDA device name.
PEAK_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "4090": 165e12,
                   "MI300": 1307e12, "7900": 123e12, "7800": 74e12}


@dataclass
class TrainConfig:
    preset: str = "tiny"
    out_dir: str = "runs/felix-tiny"
    data: list[str] = field(default_factory=list)      # sources: prepared dirs or files; empty = built-in corpus
    data_weights: list[float] = field(default_factory=list)  # one per source (fractions of samples); empty = by tokens
    data_names: list[str] = field(default_factory=list)  # one per source (metrics, OUT/data/NAME); empty = from paths
    val_data: list[str] = field(default_factory=list)  # explicit validation files; empty = split from data
    teacher_data: list[str] = field(default_factory=list)  # distillation: {prompt, response, teacher} JSONL
    init_from: str | None = None   # start from this checkpoint directory (model + tokenizer), e.g. to distill
    spokes: int = 0                # spokes per layer (felix.spokes): from scratch, or added to an --init-from hub
    spoke_rank: int | None = None  # None = the preset's (or the checkpoint config's) spoke_rank
    train_only: str | None = None  # "spokes": freeze the hub, train (and keep optimizer state for) the spokes only
    n_records: int = 2000          # structured records added to the built-in corpus
    tasks: list[str] = field(default_factory=lambda: list(felix_data.TASKS))  # their task kinds (felix.data)
    prose: bool = True             # built-in corpus: include the prose (False: structured records only)
    val_fraction: float = 0.05
    tokenizer: str | None = None   # an existing tokenizer.json (or a directory holding one); None = train one
    vocab_size: int | None = None  # None = the preset's
    seq_len: int = 128
    batch_size: int = 16
    grad_accum: int = 1
    steps: int = 600
    lr: float = 3e-3
    warmup_steps: int = 50
    decay_fraction: float = 0.2    # WSD: the last 20% of steps decay linearly to final_lr_fraction * lr
    final_lr_fraction: float = 0.0
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    lambda_q: float = DEFAULT_LAMBDA_Q  # QUAIL hinge weight (0 = plain CE)
    margin: float = DEFAULT_MARGIN      # QUAIL logit margin for whitelisted (JSON structure) targets
    margin_from: str | None = None      # a `felix fidelity` JSON: margin = its measured noise (quail.margin_from_noise)
    margin_quantile: float = DEFAULT_NOISE_QUANTILE  # ... at this lower-tail quantile of the margin change
    eval_every: int = 50
    eval_batches: int = 8
    checkpoint_every: int = 0      # 0 = only at the end (and when stopped early)
    seed: int = 0
    device: str = "auto"
    checkpoint_activations: bool = False
    peak_tflops: float | None = None  # overrides the device table for MFU
    memorization_gap: float = 0.1     # val below train by this fraction of train loss ...
    memorization_min_wraps: int = 3   # ... after this many passes over the corpus
    parallel: str = "ddp"             # under torchrun: "ddp" or "fsdp" (FSDP2 fully_shard); felix/distributed.py
    qat: str | None = None            # quantization-aware training: a felix.qat mode (rq4 ... tq2_0, bitnet)

    def __post_init__(self):
        problems = []
        for name in ("seq_len", "batch_size", "grad_accum", "steps", "eval_every", "eval_batches"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.decay_fraction <= 1:
            problems.append(f"decay_fraction must be in [0, 1], got {self.decay_fraction}")
        if self.warmup_steps < 0 or self.warmup_steps + round(self.decay_fraction * self.steps) > self.steps:
            problems.append(f"warmup_steps {self.warmup_steps} + decay steps {round(self.decay_fraction * self.steps)}"
                            f" exceed steps {self.steps}")
        if self.teacher_data and (self.data or self.val_data):
            problems.append("--teacher-data (distillation) and --data/--val-data (pretraining) are separate runs; "
                            "give one or the other")
        problems += _source_problems(self)
        if self.spokes < 0 or (self.spoke_rank is not None and self.spoke_rank < 1):
            problems.append(f"spokes must be >= 0 and spoke_rank >= 1, got {self.spokes} and {self.spoke_rank}")
        if self.train_only not in TRAIN_ONLY:
            problems.append(f"train_only must be one of {[t for t in TRAIN_ONLY if t]}, got {self.train_only!r}")
        if self.lr <= 0:
            problems.append(f"lr must be positive, got {self.lr}")
        if self.margin < 0:
            problems.append(f"margin must be >= 0, got {self.margin}")
        unknown = [t for t in self.tasks if t not in felix_data._MAKERS]
        if unknown or not self.tasks:
            problems.append(f"unknown or no structured task(s) {unknown or self.tasks}; known: "
                            f"{', '.join(felix_data._MAKERS)}")
        if self.qat is not None and str(self.qat).lower() not in felix_qat.QAT_MODES:
            problems.append(f"unknown qat mode {self.qat!r}; choose from {', '.join(felix_qat.QAT_MODES)}")
        elif self.qat is not None and self.parallel == "fsdp":
            problems.append("--qat does not run under --parallel fsdp: FSDP2 shards the latent weights in place, and "
                            "the fake-quant parametrization (torch.nn.utils.parametrize) cannot read sharded storage; "
                            "use --parallel ddp")
        if problems:
            raise ValueError("invalid TrainConfig: " + "; ".join(problems))
        if self.preset not in felix_model.PRESETS:
            raise ValueError(f"unknown preset {self.preset!r}; available presets: {', '.join(felix_model.PRESETS)}")
        if self.margin_from is not None:  # the calibrated margin replaces the given one (CalibrationError otherwise)
            self.margin = margin_from_fidelity(self.margin_from, self.margin_quantile)
        try:
            QuailConfig(self.margin, self.lambda_q, self.margin_quantile)  # validates the three together
        except ValueError as e:
            raise ValueError(f"invalid TrainConfig: {e}") from None

    @property
    def quail(self) -> QuailConfig:
        """This run's QUAIL settings as the one config object (felix.quail.QuailConfig)."""
        return QuailConfig(self.margin, self.lambda_q, self.margin_quantile)


def _source_problems(cfg: TrainConfig) -> list[str]:
    """What is wrong with the data sources' weights and names (felix.mix checks the weights themselves)."""
    if cfg.data_weights and len(cfg.data_weights) != len(cfg.data):
        return [f"{len(cfg.data_weights)} data weights for {len(cfg.data)} data sources"]
    if cfg.data_names and len(cfg.data_names) != len(cfg.data):
        return [f"{len(cfg.data_names)} data source names for {len(cfg.data)} data sources"]
    problems = []
    if cfg.data_weights:
        try:
            normalize_weights(cfg.data_weights, cfg.data_names or cfg.data)
        except MixError as e:
            problems.append(str(e))
    bad = [n for n in cfg.data_names if not SOURCE_NAME.fullmatch(n)]
    if bad or len(set(cfg.data_names)) != len(cfg.data_names):
        problems.append(f"data source names must be unique and made of letters, digits, '.', '_' or '-': "
                        f"{cfg.data_names}")
    return problems


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
        msg = (f"MEMORIZATION SIGNATURE at step {step}: validation loss {val_loss:.4f} is "
               f"{100 * (1 - val_loss / train_loss):.0f}% below training loss {train_loss:.4f} after the corpus "
               f"wrapped {wraps} times. The model is reciting text it has seen (validation overlaps or duplicates "
               f"training data), not learning; check the split and add data before trusting these numbers.")
        self.alerts.append(msg)
        return msg


@dataclass
class TrainResult:
    out_dir: Path
    step_losses: list[float]      # training loss (CE + lambda_q * hinge) per optimizer step
    metrics: list[dict]
    memorization_alerts: list[str]
    parameter_counts: dict


def _device(name: str) -> torch.device:
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


def _documents(cfg: TrainConfig, log) -> tuple[list[str], list[str]]:
    if cfg.data:
        loaded = felix_data.load_user_data(cfg.data)
        if loaded.skipped:
            log(f"WARNING: skipped {len(loaded.skipped)} malformed line(s):\n  " + "\n  ".join(loaded.skipped[:20])
                + (f"\n  ... and {len(loaded.skipped) - 20} more" if len(loaded.skipped) > 20 else ""))
        docs = loaded.documents
    else:
        docs = felix_data.builtin_corpus(cfg.n_records, cfg.seed, tuple(cfg.tasks), cfg.prose)
    if cfg.val_data:
        return docs, felix_data.load_user_data(cfg.val_data).documents
    return felix_data.split_documents(docs, cfg.val_fraction, cfg.seed)


def _optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW over the parameters that train (a frozen hub gets no optimizer state)."""
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    decay = [p for n, p in params if p.dim() >= 2 and ".splice." not in n]
    no_decay = [p for n, p in params if not (p.dim() >= 2 and ".splice." not in n)]
    return torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.95), eps=1e-8)


def _setup_spokes(model, cfg: TrainConfig, resume: bool, log) -> str | None:
    """Give an --init-from model the spokes asked for (--spokes, or the seed recipe's count for --train-only
    spokes), then freeze the hub when only spokes train. Returns the frozen hub's fingerprint (None otherwise)."""
    mcfg = model.cfg
    wants_spokes = cfg.spokes or (cfg.train_only == "spokes" and not mcfg.n_spokes)
    if cfg.init_from and not resume and wants_spokes:
        n = cfg.spokes or spokes_lib.SEED_RECIPE["n_spokes"]
        rank = cfg.spoke_rank or mcfg.spoke_rank
        if mcfg.n_spokes and (mcfg.n_spokes, mcfg.spoke_rank) != (n, rank):
            raise ValueError(f"{cfg.init_from} already has {mcfg.n_spokes} spokes of rank {mcfg.spoke_rank}; "
                             f"asked for {n} of rank {rank}")
        if not mcfg.n_spokes:
            spokes_lib.add_spokes(model, n, rank)
            log(f"added {n} spokes of rank {rank} to every layer (W_up = 0: the model starts exactly as its hub)")
    if cfg.train_only != "spokes":
        return None
    trainable = spokes_lib.freeze_hub(model)
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log(f"hub frozen: training {len(trainable)} spoke tensors ({n_train:,} parameters) of "
        f"{sum(p.numel() for p in model.parameters()):,}")
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
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(range(1, len(step_losses) + 1), step_losses, lw=0.8, alpha=0.6, label="train loss (per step)")
    ax.plot([m["step"] for m in metrics], [m["train_ce"] for m in metrics], "o-", ms=3, label="train CE (interval mean)")
    ax.plot([m["step"] for m in metrics], [m["train_eval_ce"] for m in metrics], "^-", ms=3, label="train CE (at eval)")
    ax.plot([m["step"] for m in metrics], [m["val_ce"] for m in metrics], "s-", ms=3, label="validation CE")
    sources = list(metrics[-1].get("val_ce_by_source", {})) if metrics else []
    for name in sources if len(sources) > 1 else []:  # a mix: each source's validation CE
        steps = [m["step"] for m in metrics if name in m.get("val_ce_by_source", {})]
        ax.plot(steps, [m["val_ce_by_source"][name] for m in metrics if name in m.get("val_ce_by_source", {})],
                ".--", ms=3, lw=0.8, label=f"validation CE: {name}")
    for m in metrics:
        if m["memorization"]:
            ax.axvline(m["step"], color="red", alpha=0.3)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


@dataclass
class Run:
    """One training run between steps: what build_run prepared (data, model, optimizer, whitelist) and the state the
    loop advances (step, losses, metrics, the logging interval). train() is a small loop over train_step,
    evaluate_interval and save_run_checkpoint on it."""

    cfg: TrainConfig
    par: object                   # felix.distributed: one process, or this rank under torchrun
    log: object
    out: Path
    ckpt_dir: Path
    device: torch.device
    distill: bool
    train_items: list
    val_items: list
    tokenizer: Tokenizer
    train_stream: object
    val_batches: dict             # eval set (a source, or "val") -> its fixed validation batches
    train_eval_batches: dict      # source -> its fixed training batches (same weights as validation)
    model: torch.nn.Module
    module: torch.nn.Module       # the model, or its loss wrapped by DDP / FSDP2
    optimizer: torch.optim.Optimizer
    whitelist: torch.Tensor       # the QUAIL whitelist, a [V] bool mask on the device
    counts: dict
    hub_fp: str | None
    monitor: MemorizationMonitor
    flops_per_token: float
    peak_flops: float | None
    decay_steps: int
    step: int = 0
    step_losses: list = field(default_factory=list)
    metrics: list = field(default_factory=list)
    interval: dict = field(default_factory=lambda: _new_interval())
    pending: list = field(default_factory=list)  # per step, on the device: [mean loss, CE sum, hinge sum]
    per_step: torch.Tensor | None = None         # [1 / grad_accum, 1, 1] on the device, made at the first step
    run_data: object = None                      # pretraining: felix.run_data.RunData (sources, mix); None: distill
    val_weights: dict = field(default_factory=dict)    # eval set -> weight of its CE in val_ce
    train_weights: dict = field(default_factory=dict)  # source -> weight of its CE in train_eval_ce

    @property
    def use_bf16(self) -> bool:
        return self.device.type == "cuda"

    def autocast(self):
        return torch.autocast("cuda", dtype=torch.bfloat16) if self.use_bf16 else torch.autocast("cpu", enabled=False)


def _new_interval() -> dict:
    return {"ce": 0.0, "hinge": 0.0, "n": 0, "tokens": 0, "seconds": 0.0}


def build_run(cfg: TrainConfig, resume: bool = False, log=None) -> Run:
    """Everything a run needs before its first step: data and tokenizer, model (new, --init-from or resumed),
    spokes / QAT, optimizer, the QUAIL whitelist; with `resume`, the trainer state of ``out_dir/checkpoint``."""
    from tqdm import tqdm

    par = felix_distributed.from_environment(cfg.parallel)  # one process unless under torchrun
    log = (log or tqdm.write) if par.is_main else (lambda *args, **kwargs: None)  # rank-0 logging
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ckpt_dir = out / CHECKPOINT_DIR
    device = par.device(_device(cfg.device))
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)

    if cfg.train_only == "spokes" and not (resume or cfg.init_from):
        raise ValueError("--train-only spokes trains spokes on a trained hub: give --init-from CHECKPOINT")
    if par.is_main:  # the resolved config: `felix train --resume --out-dir OUT` needs nothing else
        felix_runconfig.write_resolved(cfg, out)
    if resume and not (ckpt_dir / STATE_FILE).is_file():
        raise FileNotFoundError(f"cannot resume: no {CHECKPOINT_DIR}/{STATE_FILE} in {out}")
    distill, run_data = bool(cfg.teacher_data), None
    if distill:  # black-box distillation: masked SFT on teacher responses (in memory: teacher sets are small)
        records, skipped = felix_data.load_teacher_records(cfg.teacher_data)
        if skipped:
            log(f"WARNING: skipped {len(skipped)} malformed teacher line(s):\n  " + "\n  ".join(skipped[:20]))
        train_items, val_items = felix_data.split_documents(records, cfg.val_fraction, cfg.seed, key=json.dumps)
        texts = [felix_data.chat_text(r["prompt"], r["response"]) for r in train_items]
        teachers = collections.Counter(r["teacher"] for r in records)
        log("teacher records: " + ", ".join(f"{t} {n}" for t, n in teachers.most_common()))
    else:  # pretraining: token shards, prepared once (felix/run_data.py), weighted by the mix (felix/mix.py)
        run_data = open_run_data(cfg, out, ckpt_dir, resume, par, device, log)
        train_items, val_items = run_data.sources, list(run_data.val_sets)
    if run_data is not None:
        tokenizer = run_data.tokenizer
    elif resume:
        tokenizer = Tokenizer.load(ckpt_dir)
    elif cfg.init_from:
        tokenizer = Tokenizer.load(cfg.init_from)
    elif cfg.tokenizer:
        tokenizer = Tokenizer.load(cfg.tokenizer)
    else:
        vocab = cfg.vocab_size or felix_model.PRESETS[cfg.preset]["vocab_size"]
        t0 = time.perf_counter()
        tokenizer = train_tokenizer(texts, vocab)
        log(f"trained a byte-level BPE tokenizer: {tokenizer.vocab_size} tokens in {time.perf_counter() - t0:.1f}s")

    if distill:
        train_stream = felix_data.SFTStream(train_items, tokenizer, cfg.seq_len, cfg.seed)
        val_stream = felix_data.SFTStream(val_items, tokenizer, cfg.seq_len, cfg.seed + 1)
        if train_stream.truncated or train_stream.dropped:
            log(f"WARNING: {train_stream.truncated} record(s) cut to seq_len {cfg.seq_len}, {train_stream.dropped} "
                f"dropped (prompt alone longer than seq_len)")
        val_batches = {"val": val_stream.fixed_batches(cfg.batch_size, cfg.eval_batches)}
        train_eval_batches = {"train": train_stream.fixed_batches(cfg.batch_size, cfg.eval_batches)}
        val_weights, train_weights = {"val": 1.0}, {"train": 1.0}
    else:
        train_stream = run_data.train_stream
        val_batches, train_eval_batches = eval_batches(run_data, cfg.seq_len, cfg.batch_size, cfg.eval_batches)
        val_weights, train_weights = run_data.val_weights, run_data.train_weights

    if resume or cfg.init_from:
        model = felix_model.load_checkpoint(ckpt_dir if resume else Path(cfg.init_from), device)
        model.cfg.checkpoint_activations = cfg.checkpoint_activations
        if cfg.seq_len > model.cfg.max_seq_len:
            raise ValueError(f"seq_len {cfg.seq_len} exceeds the checkpoint's max_seq_len {model.cfg.max_seq_len}")
    else:
        spoke_rank = {"spoke_rank": cfg.spoke_rank} if cfg.spoke_rank else {}
        mcfg = felix_model.preset(cfg.preset, vocab_size=tokenizer.vocab_size,
                                  max_seq_len=max(cfg.seq_len, felix_model.PRESETS[cfg.preset]["max_seq_len"]),
                                  checkpoint_activations=cfg.checkpoint_activations, n_spokes=cfg.spokes,
                                  **spoke_rank)
        model = felix_model.FelixLM(mcfg).to(device)
    hub_fp = _setup_spokes(model, cfg, resume, log)
    mcfg = model.cfg
    if tokenizer.vocab_size > mcfg.vocab_size:
        raise ValueError(f"the tokenizer has {tokenizer.vocab_size} tokens but the model's embedding only "
                         f"{mcfg.vocab_size} rows ({'the checkpoint' if resume else cfg.init_from}): token ids would "
                         f"fall outside it; use the tokenizer the model was trained with")
    # the QUAIL whitelist as a [V] bool mask on the device, built once: the loss gathers from it per step
    whitelist = whitelist_mask(json_structure_whitelist(tokenizer), mcfg.vocab_size, device)
    counts = felix_model.parameter_counts(mcfg)
    if cfg.qat:  # fake-quant STE on what the export quantizes; checkpoints keep the latent weights (+ qat.json)
        felix_qat.apply_qat(model, cfg.qat)
        log(felix_qat.describe(model._felix_qat))
    module = par.wrap(model)  # the model itself, or its loss under DDP / FSDP2 (parameters sharded in place)
    optimizer = _optimizer(model, cfg)
    use_bf16 = device.type == "cuda"

    step, step_losses, metrics = 0, [], []
    interval = {"ce": 0.0, "hinge": 0.0, "n": 0, "tokens": 0, "seconds": 0.0}
    monitor = MemorizationMonitor(cfg.memorization_gap, cfg.memorization_min_wraps)
    if resume:
        state = torch.load(ckpt_dir / STATE_FILE, map_location="cpu", weights_only=False)
        par.load_optimizer_state(module, optimizer, state["optimizer"])
        train_stream.load_state_dict(state["train_stream"])
        step, step_losses, metrics, interval = state["step"], state["step_losses"], state["metrics"], state["interval"]
        monitor.alerts = state["memorization_alerts"]
        changed = {k: (v, getattr(cfg, k)) for k, v in state["train_config"].items()
                   if k not in ("out_dir", "device") and getattr(cfg, k) != v}
        if changed:
            log("WARNING: resuming with settings that differ from the checkpoint's (the curve will not match an "
                "uninterrupted run): " + ", ".join(f"{k} {old!r} -> {new!r}" for k, (old, new) in changed.items()))
        if hub_fp is not None and state.get("hub_fingerprint") != hub_fp:
            raise ValueError(f"cannot resume: the frozen hub in {ckpt_dir} is not the one this run started from "
                             "(hub fingerprint changed)")
        torch.set_rng_state(state["torch_rng"])
        random.setstate(state["python_rng"])
        log(f"resumed {out} at step {step}")

    log(f"felix-lm {cfg.init_from or cfg.preset}: " + felix_model.format_parameter_counts(mcfg))
    log(f"QUAIL: lambda_q {cfg.lambda_q:g}, margin {cfg.margin:.4g}" + (
        f" (calibrated: -q{cfg.margin_quantile:g} of the margin change measured in {cfg.margin_from})"
        if cfg.margin_from else ""))
    if distill:
        log(f"data (distillation: masked SFT on responses): {len(train_items)} train / {len(val_items)} validation "
            f"items, {train_stream.tokens.numel():,} train tokens learned in {train_stream.n_windows} rows of "
            f"{cfg.seq_len}")
    else:
        log(f"data: {run_data.describe()}; rows of {cfg.seq_len}")
    log(f"QUAIL whitelist {int(whitelist.sum())} tokens; device {device}{' (bf16 autocast)' if use_bf16 else ' (fp32)'}")
    fpt, peak = flops_per_token(mcfg, cfg.seq_len), _peak_flops(cfg, device)
    decay_steps = round(cfg.decay_fraction * cfg.steps)

    return Run(cfg, par, log, out, ckpt_dir, device, distill, train_items, val_items, tokenizer, train_stream,
               val_batches, train_eval_batches, model, module, optimizer, whitelist, counts, hub_fp, monitor, fpt, peak,
               decay_steps, step, step_losses, metrics, interval, run_data=run_data, val_weights=val_weights,
               train_weights=train_weights)


def save_run_checkpoint(run: Run) -> None:
    """The model, tokenizer and trainer state (optimizer, data cursor, RNG, history) into ``out_dir/checkpoint``,
    consolidated: full tensors gathered from every rank, written by rank 0."""
    cfg, par, model = run.cfg, run.par, run.model
    full_model, full_optimizer = par.full_model_state(model, run.module), par.full_optimizer_state(run.module,
                                                                                                   run.optimizer)

    def write_state(path):
        torch.save({"optimizer": full_optimizer, "train_stream": run.train_stream.state_dict(),
                    "step": run.step, "step_losses": run.step_losses, "metrics": run.metrics, "interval": run.interval,
                    "memorization_alerts": run.monitor.alerts, "torch_rng": torch.get_rng_state(),
                    "python_rng": random.getstate(), "train_config": asdict(cfg), "hub_fingerprint": run.hub_fp}, path)
    if par.is_main:
        full = felix_distributed._StateView(full_model, model.cfg)
        extra = {STATE_FILE: write_state}
        if model.cfg.n_spokes:  # the spokes alone, tied to their hub: the per-task adapter file (felix.spokes)
            extra[spokes_lib.SPOKES_FILE] = lambda path: spokes_lib.save_spokes(path, full)
        if cfg.qat:  # which codec the forward used, for felix export / fidelity (felix.qat)
            extra[felix_qat.QAT_FILE] = lambda path: felix_qat.write_qat_config(path, model)
        felix_model.save_checkpoint(run.ckpt_dir, full, run.tokenizer, extra)
    par.barrier()


def train_step(run: Run) -> float:
    """One optimizer step (grad_accum micro-batches, clipping, AdamW at the WSD learning rate); its losses stay on the
    device in run.pending until read_pending. Returns the learning rate used."""
    cfg, par, device, quail = run.cfg, run.par, run.device, run.cfg.quail
    lr = wsd_lr(run.step, cfg.steps, cfg.lr, cfg.warmup_steps, run.decay_steps, cfg.final_lr_fraction)
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    sums = torch.zeros(3, device=device)
    for i, (x, y) in enumerate(par.my_micro_batches(run.train_stream, cfg.batch_size, cfg.grad_accum)):
        with par.gradient_sync(run.module, last=i == cfg.grad_accum - 1):  # no_sync but on the last
            with run.autocast():
                parts = run.module.loss(_to_device(x, device), _to_device(y, device), run.whitelist, quail.margin,
                                        quail.lambda_q)
            (parts.loss / cfg.grad_accum).backward()
        sums += torch.stack([parts.loss.detach(), parts.ce, parts.hinge]).float()
        run.interval["n"] += 1
    torch.nn.utils.clip_grad_norm_(run.model.parameters(), cfg.grad_clip)
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    if run.per_step is None:  # made once (a host-to-device copy): the loss is the mean over micro-batches
        run.per_step = torch.tensor([1.0 / cfg.grad_accum, 1.0, 1.0]).to(device)
    run.pending.append(sums * run.per_step)
    run.step += 1
    return lr


def read_pending(run: Run) -> None:
    """The one host sync of an interval (also what makes its seconds honest on a GPU): the pending per-step losses,
    averaged over ranks, into step_losses and the interval sums."""
    for loss, ce, hinge in (run.par.mean_over_ranks(torch.stack(run.pending)).tolist() if run.pending else []):
        run.step_losses.append(loss)
        run.interval["ce"] += ce
        run.interval["hinge"] += hinge
    run.pending.clear()


def evaluate_interval(run: Run, lr: float) -> dict:
    """The metrics record of the interval that ends at this step: train/val losses (validation and fixed train
    windows with the same weights), throughput, MFU, memory, corpus position and the memorization check; appended
    to metrics.jsonl as it happens. Starts a new interval."""
    cfg, par, device = run.cfg, run.par, run.device
    interval, stream = run.interval, run.train_stream
    tokens_per_s = interval["tokens"] / max(interval["seconds"], 1e-9)
    val = {n: evaluate(run.module, b, device, run.whitelist, cfg, run.autocast) for n, b in run.val_batches.items()}
    train_eval = {n: evaluate(run.module, b, device, run.whitelist, cfg, run.autocast)["val_ce"]
                  for n, b in run.train_eval_batches.items()}
    record = {"step": run.step, "lr": lr,
              "train_loss": sum(run.step_losses[-cfg.eval_every:]) / min(cfg.eval_every, len(run.step_losses)),
              "train_ce": interval["ce"] / interval["n"], "train_hinge": interval["hinge"] / interval["n"],
              # a mix's overall CE: the per-source CEs weighted as the mix weighs the sources
              "val_ce": sum(run.val_weights[n] * v["val_ce"] for n, v in val.items()),
              "val_hinge": sum(run.val_weights[n] * v["val_hinge"] for n, v in val.items()),
              "train_eval_ce": sum(run.train_weights[n] * ce for n, ce in train_eval.items()),
              "tokens_per_s": tokens_per_s,
              "mfu": tokens_per_s * run.flops_per_token / (run.peak_flops * par.world_size) if run.peak_flops else None,
              "peak_memory_mb": _peak_memory_mb(device),
              "peak_memory_kind": "gpu_allocated" if device.type == "cuda" else "process_rss",
              "corpus_wraps": stream.wraps,
              "epoch_progress": stream.epoch_progress}
    if run.run_data is not None:  # per source: validation CE, samples served so far (the realized mix), epochs
        record.update(val_ce_by_source={n: v["val_ce"] for n, v in val.items()}, source_samples=stream.source_counts(),
                      source_epochs=stream.source_epochs())
    alert = run.monitor.check(run.step, record["train_eval_ce"], record["val_ce"], stream.wraps)
    record["memorization"] = alert is not None
    if alert and par.is_main:
        banner = "!" * 100
        run.log(f"{banner}\n{alert}\n{banner}")
        warnings.warn(alert, RuntimeWarning, stacklevel=3)
    run.metrics.append(record)
    if par.is_main:
        with open(run.out / METRICS_FILE, "a") as f:  # appended as it happens: a crashed run keeps its metrics
            f.write(json.dumps(record) + "\n")
    run.interval = _new_interval()
    mfu = f", MFU {100 * record['mfu']:.1f}%" if record["mfu"] is not None else ""
    run.log(f"step {run.step}: train CE {record['train_ce']:.4f} (hinge {record['train_hinge']:.4f}; now "
            f"{record['train_eval_ce']:.4f}), val CE {record['val_ce']:.4f}, lr {lr:.2e}, {tokens_per_s:,.0f} tok/s"
            f"{mfu}, peak {record['peak_memory_mb']:.0f} MB, corpus wraps {stream.wraps}")
    return record


def train(cfg: TrainConfig, resume: bool = False, stop_at: int | None = None, log=None) -> TrainResult:
    """Run (or, with `resume`, continue from ``out_dir/checkpoint``) a training run. `stop_at` stops after that
    many optimizer steps with a checkpoint, as an interruption would (used to test exact resume)."""
    from tqdm import tqdm

    run = build_run(cfg, resume, log)
    par, out = run.par, run.out
    end = cfg.steps if stop_at is None else min(stop_at, cfg.steps)
    if par.is_main:
        with open(out / METRICS_FILE, "w") as f:  # a resumed run keeps the records up to its checkpoint
            f.writelines(json.dumps(record) + "\n" for record in run.metrics)
    bar = tqdm(total=cfg.steps, initial=run.step, desc="train", unit="step",
               disable=not (sys.stderr.isatty() and par.is_main))
    run.model.train()
    while run.step < end:
        t0 = time.perf_counter()
        lr = train_step(run)
        step = run.step
        if step % cfg.eval_every == 0 or step in (cfg.steps, end) or (cfg.checkpoint_every and
                                                                       step % cfg.checkpoint_every == 0):
            read_pending(run)
        run.interval["seconds"] += time.perf_counter() - t0
        run.interval["tokens"] += cfg.grad_accum * cfg.batch_size * cfg.seq_len * par.world_size
        bar.update(1)
        if run.step_losses and not bar.disable:
            bar.set_postfix(loss=f"{run.step_losses[-1]:.3f}", lr=f"{lr:.2e}")
        if step % cfg.eval_every == 0 or step == cfg.steps:
            evaluate_interval(run, lr)
        if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step < end:
            save_run_checkpoint(run)
    bar.close()
    save_run_checkpoint(run)
    if par.is_main:
        save_loss_curve(out / PLOT_FILE, run.step_losses, run.metrics)
    par.close()
    run.log(f"{'stopped' if run.step < cfg.steps else 'finished'} at step {run.step}; checkpoint {run.ckpt_dir}, "
            f"metrics {out / METRICS_FILE}, plot {out / PLOT_FILE}")
    return TrainResult(out, run.step_losses, run.metrics, list(run.monitor.alerts), run.counts)
