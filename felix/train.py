"""Felix-LM pretraining: AdamW + warmup-stable-decay, CE + QUAIL hinge from step 0, exact resume, metrics,
and the memorization-signature monitor. `felix train` (felix/cli.py) is a thin wrapper over :func:`train`.

One run directory holds:

* ``checkpoint/`` -- model.safetensors, config.json, tokenizer.json, trainer_state.pt (optimizer, step, data
  cursor, RNG, loss history), written atomically (felix.model.save_checkpoint);
* ``metrics.jsonl`` -- one JSON object per evaluation: step, lr, train/val loss, CE and hinge parts, tokens/s,
  MFU estimate, peak memory, corpus wraps, memorization flag;
* ``loss_curve.png`` -- train loss per step and validation loss per evaluation.

Memorization signature (from the seed project): when the corpus has wrapped several times and the
validation loss sits clearly BELOW the training loss, the model is reciting (validation text leaked into or
duplicates the training text), not learning -- the run warns loudly and flags the metrics line.
"""
from __future__ import annotations

import collections
import json
import math
import random
import resource
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from felix import data as felix_data
from felix import model as felix_model
from felix import qat as felix_qat
from felix.quail import DEFAULT_LAMBDA_Q, DEFAULT_MARGIN, DEFAULT_NOISE_QUANTILE, margin_from_fidelity
from felix.tokenizer import Tokenizer, json_structure_whitelist, train_tokenizer

CHECKPOINT_DIR, METRICS_FILE, PLOT_FILE, STATE_FILE = "checkpoint", "metrics.jsonl", "loss_curve.png", "trainer_state.pt"

# Dense bf16 peak FLOP/s for MFU estimates, by substring of the CUDA device name.
PEAK_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "4090": 165e12,
                   "MI300": 1307e12, "7900": 123e12, "7800": 74e12}


@dataclass
class TrainConfig:
    preset: str = "tiny"
    out_dir: str = "runs/felix-tiny"
    data: list[str] = field(default_factory=list)      # user files; empty = built-in corpus
    val_data: list[str] = field(default_factory=list)  # explicit validation files; empty = split from data
    teacher_data: list[str] = field(default_factory=list)  # distillation: {prompt, response, teacher} JSONL
    init_from: str | None = None   # start from this checkpoint directory (model + tokenizer), e.g. to distill
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
        if problems:
            raise ValueError("invalid TrainConfig: " + "; ".join(problems))
        if self.preset not in felix_model.PRESETS:
            raise ValueError(f"unknown preset {self.preset!r}; available presets: {', '.join(felix_model.PRESETS)}")
        if self.margin_from is not None:  # the calibrated margin replaces the given one (CalibrationError otherwise)
            self.margin = margin_from_fidelity(self.margin_from, self.margin_quantile)


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
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and ".splice." not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and ".splice." not in n)]
    return torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.95), eps=1e-8)


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


def train(cfg: TrainConfig, resume: bool = False, stop_at: int | None = None, log=None) -> TrainResult:
    """Run (or, with `resume`, continue from ``out_dir/checkpoint``) a training run. `stop_at` stops after that
    many optimizer steps with a checkpoint, as an interruption would (used to test exact resume)."""
    from tqdm import tqdm

    log = log or tqdm.write  # plays well with the progress bar
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ckpt_dir = out / CHECKPOINT_DIR
    device = _device(cfg.device)
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)

    distill = bool(cfg.teacher_data)
    if distill:  # black-box distillation: masked SFT on teacher responses
        records, skipped = felix_data.load_teacher_records(cfg.teacher_data)
        if skipped:
            log(f"WARNING: skipped {len(skipped)} malformed teacher line(s):\n  " + "\n  ".join(skipped[:20]))
        train_items, val_items = felix_data.split_documents(records, cfg.val_fraction, cfg.seed, key=json.dumps)
        texts = [felix_data.chat_text(r["prompt"], r["response"]) for r in train_items]
        teachers = collections.Counter(r["teacher"] for r in records)
        log("teacher records: " + ", ".join(f"{t} {n}" for t, n in teachers.most_common()))
    else:
        train_items, val_items = _documents(cfg, log)
        texts = train_items
    if resume:
        if not (ckpt_dir / STATE_FILE).is_file():
            raise FileNotFoundError(f"cannot resume: no {CHECKPOINT_DIR}/{STATE_FILE} in {out}")
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
    else:
        train_stream = felix_data.TokenStream.from_documents(train_items, tokenizer, cfg.seq_len, cfg.seed)
        val_stream = felix_data.TokenStream.from_documents(val_items, tokenizer, cfg.seq_len, cfg.seed + 1)
    val_batches = val_stream.fixed_batches(cfg.batch_size, cfg.eval_batches)
    train_eval_batches = train_stream.fixed_batches(cfg.batch_size, cfg.eval_batches)
    whitelist = torch.tensor(json_structure_whitelist(tokenizer), dtype=torch.long, device=device)

    if resume or cfg.init_from:
        model = felix_model.load_checkpoint(ckpt_dir if resume else Path(cfg.init_from), device)
        model.cfg.checkpoint_activations = cfg.checkpoint_activations
        if cfg.seq_len > model.cfg.max_seq_len:
            raise ValueError(f"seq_len {cfg.seq_len} exceeds the checkpoint's max_seq_len {model.cfg.max_seq_len}")
    else:
        mcfg = felix_model.preset(cfg.preset, vocab_size=tokenizer.vocab_size,
                                  max_seq_len=max(cfg.seq_len, felix_model.PRESETS[cfg.preset]["max_seq_len"]),
                                  checkpoint_activations=cfg.checkpoint_activations)
        model = felix_model.FelixLM(mcfg).to(device)
    mcfg = model.cfg
    counts = felix_model.parameter_counts(mcfg)
    if cfg.qat:  # fake-quant STE on what the export quantizes; checkpoints keep the latent weights (+ qat.json)
        felix_qat.apply_qat(model, cfg.qat)
        log(felix_qat.describe(model._felix_qat))
    optimizer = _optimizer(model, cfg)
    use_bf16 = device.type == "cuda"

    def autocast():
        return torch.autocast("cuda", dtype=torch.bfloat16) if use_bf16 else torch.autocast("cpu", enabled=False)

    step, step_losses, metrics = 0, [], []
    interval = {"ce": 0.0, "hinge": 0.0, "n": 0, "tokens": 0, "seconds": 0.0}
    monitor = MemorizationMonitor(cfg.memorization_gap, cfg.memorization_min_wraps)
    if resume:
        state = torch.load(ckpt_dir / STATE_FILE, map_location="cpu", weights_only=False)
        optimizer.load_state_dict(state["optimizer"])
        train_stream.load_state_dict(state["train_stream"])
        step, step_losses, metrics, interval = state["step"], state["step_losses"], state["metrics"], state["interval"]
        monitor.alerts = state["memorization_alerts"]
        changed = {k: (v, getattr(cfg, k)) for k, v in state["train_config"].items()
                   if k not in ("out_dir", "device") and getattr(cfg, k) != v}
        if changed:
            log("WARNING: resuming with settings that differ from the checkpoint's (the curve will not match an "
                "uninterrupted run): " + ", ".join(f"{k} {old!r} -> {new!r}" for k, (old, new) in changed.items()))
        torch.set_rng_state(state["torch_rng"])
        random.setstate(state["python_rng"])
        log(f"resumed {out} at step {step}")

    log(f"felix-lm {cfg.init_from or cfg.preset}: " + felix_model.format_parameter_counts(mcfg))
    log(f"QUAIL: lambda_q {cfg.lambda_q:g}, margin {cfg.margin:.4g}" + (
        f" (calibrated: -q{cfg.margin_quantile:g} of the margin change measured in {cfg.margin_from})"
        if cfg.margin_from else ""))
    log(f"data{' (distillation: masked SFT on responses)' if distill else ''}: {len(train_items)} train / "
        f"{len(val_items)} validation items, {train_stream.tokens.numel():,} train tokens"
        f"{' learned' if distill else ''} in {train_stream.n_windows} rows of {cfg.seq_len}; QUAIL whitelist {whitelist.numel()} "
        f"tokens; device {device}{' (bf16 autocast)' if use_bf16 else ' (fp32)'}")
    fpt, peak = flops_per_token(mcfg, cfg.seq_len), _peak_flops(cfg, device)
    decay_steps = round(cfg.decay_fraction * cfg.steps)

    def checkpoint():
        def write_state(path):
            torch.save({"optimizer": optimizer.state_dict(), "train_stream": train_stream.state_dict(),
                        "step": step, "step_losses": step_losses, "metrics": metrics, "interval": interval,
                        "memorization_alerts": monitor.alerts, "torch_rng": torch.get_rng_state(),
                        "python_rng": random.getstate(), "train_config": asdict(cfg)}, path)
        extra = {STATE_FILE: write_state}
        if cfg.qat:
            extra[felix_qat.QAT_FILE] = lambda path: felix_qat.write_qat_config(path, model)
        felix_model.save_checkpoint(ckpt_dir, model, tokenizer, extra)

    end = cfg.steps if stop_at is None else min(stop_at, cfg.steps)
    with open(out / METRICS_FILE, "w") as f:  # a resumed run keeps the records up to its checkpoint
        f.writelines(json.dumps(record) + "\n" for record in metrics)
    bar = tqdm(total=cfg.steps, initial=step, desc="train", unit="step", disable=not sys.stderr.isatty())
    model.train()
    while step < end:
        t0 = time.perf_counter()
        lr = wsd_lr(step, cfg.steps, cfg.lr, cfg.warmup_steps, decay_steps, cfg.final_lr_fraction)
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss_sum = 0.0
        for _ in range(cfg.grad_accum):
            x, y = train_stream.next_batch(cfg.batch_size)
            with autocast():
                parts = model.loss(x.to(device), y.to(device), whitelist, cfg.margin, cfg.lambda_q)
            (parts.loss / cfg.grad_accum).backward()
            loss_sum += float(parts.loss.detach())
            interval["ce"] += float(parts.ce.detach())
            interval["hinge"] += float(parts.hinge.detach())
            interval["n"] += 1
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        interval["seconds"] += time.perf_counter() - t0
        interval["tokens"] += cfg.grad_accum * cfg.batch_size * cfg.seq_len
        step += 1
        step_losses.append(loss_sum / cfg.grad_accum)
        bar.update(1)
        bar.set_postfix(loss=f"{step_losses[-1]:.3f}", lr=f"{lr:.2e}")

        if step % cfg.eval_every == 0 or step == cfg.steps:
            tokens_per_s = interval["tokens"] / max(interval["seconds"], 1e-9)
            record = {"step": step, "lr": lr, "train_loss": sum(step_losses[-cfg.eval_every:]) / min(cfg.eval_every, len(step_losses)),
                      "train_ce": interval["ce"] / interval["n"], "train_hinge": interval["hinge"] / interval["n"],
                      **evaluate(model, val_batches, device, whitelist, cfg, autocast),
                      "train_eval_ce": evaluate(model, train_eval_batches, device, whitelist, cfg, autocast)["val_ce"],
                      "tokens_per_s": tokens_per_s,
                      "mfu": tokens_per_s * fpt / peak if peak else None,
                      "peak_memory_mb": _peak_memory_mb(device),
                      "peak_memory_kind": "gpu_allocated" if device.type == "cuda" else "process_rss",
                      "corpus_wraps": train_stream.wraps,
                      "epoch_progress": train_stream.position / train_stream.n_windows}
            alert = monitor.check(step, record["train_eval_ce"], record["val_ce"], train_stream.wraps)
            record["memorization"] = alert is not None
            if alert:
                banner = "!" * 100
                log(f"{banner}\n{alert}\n{banner}")
                warnings.warn(alert, RuntimeWarning, stacklevel=2)
            metrics.append(record)
            with open(out / METRICS_FILE, "a") as f:  # appended as it happens, so a crashed run keeps its metrics
                f.write(json.dumps(record) + "\n")
            interval = {"ce": 0.0, "hinge": 0.0, "n": 0, "tokens": 0, "seconds": 0.0}
            mfu = f", MFU {100 * record['mfu']:.1f}%" if record["mfu"] is not None else ""
            log(f"step {step}: train CE {record['train_ce']:.4f} (hinge {record['train_hinge']:.4f}; now "
                f"{record['train_eval_ce']:.4f}), val CE "
                       f"{record['val_ce']:.4f}, lr {lr:.2e}, {tokens_per_s:,.0f} tok/s{mfu}, peak "
                       f"{record['peak_memory_mb']:.0f} MB, corpus wraps {train_stream.wraps}")
        if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step < end:
            checkpoint()
    bar.close()
    checkpoint()
    save_loss_curve(out / PLOT_FILE, step_losses, metrics)
    log(f"{'stopped' if step < cfg.steps else 'finished'} at step {step}; checkpoint {ckpt_dir}, metrics "
        f"{out / METRICS_FILE}, plot {out / PLOT_FILE}")
    return TrainResult(out, step_losses, metrics, list(monitor.alerts), counts)
