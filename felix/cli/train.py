"""`felix train`: Felix-LM training (felix.train.loop.train) and, with --soda, semi-on-policy distillation
(felix.train.distill.train_soda)."""

from __future__ import annotations

import signal
import sys

from felix.data.corpus import DataError
from felix.model.felix_lm import PRESETS, CheckpointError
from felix.model.qat import QAT_MODES
from felix.tasks import MAKERS
from felix.train.config import resolve
from felix.data.teachers import SCORERS
from felix.train.distill import SodaConfig, train_soda
from felix.train.distributed import PARALLEL_MODES
from felix.train.loop import TRAIN_ONLY, TrainConfig, TrainingHalted, train

# `felix train --soda` options of its own; the rest of `felix train`'s options it shares are SODA_SHARED.
SODA_ARGS = ("soda", "beta", "nll_weight", "teacher_scorer", "max_new_tokens", "snapshot_batch_size")
SODA_SHARED = (
    "out_dir",
    "teacher_data",
    "init_from",
    "n_records",
    "tasks",
    "lambda_q",
    "margin",
    "seq_len",
    "batch_size",
    "steps",
    "lr",
    "warmup_steps",
    "decay_fraction",
    "weight_decay",
    "grad_clip",
    "val_fraction",
    "eval_every",
    "seed",
    "device",
)
# the run-directory actions SODA takes as `felix train` does (one loop, one run directory): not SodaConfig fields
SODA_RUN_ACTIONS = ("resume", "stop_at", "overwrite", "auto_resume")


def add_soda_arguments(parser) -> None:
    """`felix train --soda` and its options (add_train_parser)."""
    d = SodaConfig(init_from="-")
    g = parser.add_argument_group(
        "SODA (--soda): DPO on (teacher, student snapshot) pairs",
        "felix train --soda --init-from STUDENT [--teacher-data T.jsonl ...]: the student's "
        "greedy responses are snapshotted once, then chosen = the selected teacher response, "
        "rejected = the student's, reference = the snapshot's weights (frozen); QUAIL stays "
        f"on. Defaults under --soda: steps {d.steps}, lr {d.lr:g}, batch-size {d.batch_size} "
        f"pairs, eval-every {d.eval_every}, n-records {d.n_records} (built-in teachers when no "
        f"--teacher-data), out-dir {d.out_dir}",
    )
    g.add_argument("--soda", action="store_true", help="semi-on-policy distillation (felix.train.distill.train_soda)")
    g.add_argument("--beta", type=float, help=f"DPO temperature (default {d.beta:g})")
    g.add_argument(
        "--nll-weight",
        type=float,
        help=f"+ this x the mean token NLL of the chosen (teacher) responses, "
        f"an anchor against DPO lowering both likelihoods (RPO; default {d.nll_weight:g} = DPO alone)",
    )
    g.add_argument(
        "--teacher-scorer",
        choices=list(SCORERS),
        help=f"picks among the schema-valid teacher responses (default {d.teacher_scorer})",
    )
    g.add_argument("--max-new-tokens", type=int, help=f"snapshot: response budget (default {d.max_new_tokens})")
    g.add_argument(
        "--snapshot-batch-size", type=int, help=f"snapshot: prompts per batch (default {d.snapshot_batch_size})"
    )


def cmd_soda(args) -> int:
    given = {
        k: v
        for k, v in vars(args).items()
        if k not in ("command", "func", "soda") and v is not None and v is not False and v != []
    }
    unused = sorted(k for k in given if k not in SODA_SHARED and k not in SODA_ARGS and k not in SODA_RUN_ACTIONS)
    if unused:
        print(
            "felix train: error: not used by --soda: " + ", ".join("--" + k.replace("_", "-") for k in unused),
            file=sys.stderr,
        )
        return 2
    try:
        cfg = SodaConfig(**{k: v for k, v in given.items() if k in SODA_SHARED or k in SODA_ARGS})
        train_soda(cfg, **{k: given.get(k, None if k == "stop_at" else False) for k in SODA_RUN_ACTIONS})
    except (ValueError, FileNotFoundError) as e:  # DistillError, CheckpointError, DataError are ValueErrors
        print(f"felix train: error: {e}", file=sys.stderr)
        return 2
    return 0


def cmd_train(args) -> int:
    if args.soda:  # semi-on-policy distillation: a mode of the one loop (felix.train.distill.train_soda)
        return cmd_soda(args)
    run_actions = ("resume", "stop_at", "overwrite", "auto_resume", "config", "overrides")  # not TrainConfig fields
    options = {k: v for k, v in vars(args).items() if k not in ("command", "func", *run_actions, *SODA_ARGS)}
    if options.get("margin_from") is not None and options.get("margin") is not None:
        print("felix train: error: give --margin or --margin-from (which measures it), not both", file=sys.stderr)
        return 2
    try:  # defaults (or the resumed run's run.yaml) < --config < --set section.key=value < the flags given
        flags = {k: v for k, v in options.items() if v is not None and v != []}
        cfg = resolve(args.config, args.overrides, flags, resume=args.resume or args.auto_resume)
        result = train(
            cfg, resume=args.resume, stop_at=args.stop_at, overwrite=args.overwrite, auto_resume=args.auto_resume
        )
    except (ValueError, DataError, CheckpointError, FileNotFoundError) as e:
        print(f"felix train: error: {e}", file=sys.stderr)
        return 2
    except TrainingHalted as e:
        print(f"felix train: halted: {e}", file=sys.stderr)
        return 1
    if result.memorization_alerts:
        print(f"felix train: {len(result.memorization_alerts)} memorization warning(s); see above", file=sys.stderr)
    if result.stop_signal == signal.SIGINT:
        return 130  # the shell's code for an interrupted command; SIGTERM (a scheduler's stop) is a clean exit
    return 0


def add_train_parser(sub) -> None:
    d = TrainConfig()
    t = sub.add_parser(
        "train",
        help="train Felix-LM: WSD + QUAIL, metrics, checkpoints, exact resume",
        description="Train Felix-LM. Settings come from TrainConfig's defaults (with --resume: the "
        "run's own OUT_DIR/run.yaml), then --config, then --set overrides, then the "
        "flags given; the resolved config is written to OUT_DIR/run.yaml "
        "(felix/train/config.py).",
    )
    t.add_argument(
        "--config",
        help="a YAML run config (sections run, model, data, optimizer, schedule, quail, eval, "
        "checkpoint, parallel; examples in configs/)",
    )
    t.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override one config value (YAML syntax), e.g. --set optimizer.lr=1e-3 or "
        "--set data.sources.web.weight=0.6; repeatable; the flags below override these",
    )
    t.add_argument("--preset", choices=list(PRESETS), help=f"model size (default {d.preset})")
    t.add_argument("--out-dir", help=f"run directory: checkpoint/, metrics.jsonl, loss_curve.png (default {d.out_dir})")
    t.add_argument(
        "--data",
        action="append",
        default=[],
        help="a data source: a directory prepared by `felix data "
        "prepare`, or a JSONL ({text} or {prompt, response}) or text file (prepared into OUT_DIR/data); "
        "repeatable (sources weigh by their tokens; weights: --config); default: the built-in corpus",
    )
    t.add_argument("--val-data", action="append", default=[], help="validation files (default: a held-out split)")
    t.add_argument(
        "--resume",
        action="store_true",
        help="continue from OUT_DIR/checkpoint exactly, with the settings "
        "of OUT_DIR/run.yaml (--out-dir alone is enough)",
    )
    t.add_argument("--stop-at", type=int, help="stop (with a checkpoint) after this many steps")
    t.add_argument(
        "--auto-resume",
        action="store_true",
        help="continue OUT_DIR's latest checkpoint if it has "
        "one, else start fresh (for a job scheduler that restarts the same command)",
    )
    t.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the run in OUT_DIR (checkpoints, metrics), "
        "saying what is replaced; without it (or --resume) a directory holding a run is refused",
    )
    for name in (
        "n_records",
        "vocab_size",
        "seq_len",
        "batch_size",
        "grad_accum",
        "steps",
        "warmup_steps",
        "eval_every",
        "eval_batches",
        "checkpoint_every",
        "seed",
        "memorization_min_wraps",
        "keep_last",
        "milestone_every",
        "max_skipped_in_a_row",
        "loss_spike_window",
    ):
        t.add_argument("--" + name.replace("_", "-"), type=int, help=f"default {getattr(d, name)}")
    for name in (
        "val_fraction",
        "lr",
        "decay_fraction",
        "final_lr_fraction",
        "weight_decay",
        "grad_clip",
        "lambda_q",
        "margin",
        "peak_tflops",
        "memorization_gap",
        "loss_spike_threshold",
    ):
        t.add_argument("--" + name.replace("_", "-"), type=float, help=f"default {getattr(d, name)}")
    t.add_argument(
        "--task",
        dest="tasks",
        action="append",
        choices=list(MAKERS),
        help=f"structured record task of the built-in corpus (repeatable; default: {', '.join(d.tasks)})",
    )
    t.add_argument(
        "--no-prose",
        dest="prose",
        action="store_false",
        default=None,
        help="built-in corpus without the prose: structured records only",
    )
    t.add_argument(
        "--margin-from",
        help="a `felix fidelity` JSON report: set the QUAIL margin to the measured lower "
        "tail of the margin change (margin = -quantile; felix.core.quail.margin_from_noise); excludes --margin",
    )
    t.add_argument(
        "--margin-quantile",
        type=float,
        help=f"quantile for --margin-from (default {d.margin_quantile:g}; one of the report's change_quantiles)",
    )
    t.add_argument(
        "--teacher-data",
        action="append",
        default=[],
        help="distillation: JSONL of {prompt, response, "
        "teacher} trained as masked SFT on the responses (repeatable; several teachers welcome)",
    )
    t.add_argument("--init-from", help="start from this checkpoint directory (model + tokenizer)")
    t.add_argument(
        "--spokes",
        type=int,
        help="spokes per layer (the fork's felix arch; W_up = 0 at init): from "
        "scratch, or added to the --init-from hub (default: none; 4 with --train-only spokes)",
    )
    t.add_argument("--spoke-rank", type=int, help="rank of each spoke (default: the preset's / checkpoint's)")
    t.add_argument(
        "--train-only",
        choices=[m for m in TRAIN_ONLY if m],
        help="freeze the hub (--init-from) and train only the spokes; the optimizer holds state for the spokes alone",
    )
    t.add_argument("--tokenizer", help="an existing tokenizer.json (default: train one on the data)")
    t.add_argument("--device", help=f"default {d.device}: auto (cuda if present), cpu, cuda, cuda:1, ...")
    t.add_argument("--parallel", choices=list(PARALLEL_MODES), help="under torchrun: DDP (default) or FSDP2 (sharded)")
    t.add_argument(
        "--skip-loss-spikes",
        action="store_true",
        default=None,
        help="skip the update of a step whose "
        "loss is a spike (z-score over --loss-spike-window steps above --loss-spike-threshold); "
        "spikes are always logged",
    )
    t.add_argument(
        "--tensorboard",
        action="store_true",
        default=None,
        help="also log metrics to OUT_DIR/tensorboard (needs the tensorboard package: pip install felix[tensorboard])",
    )
    t.add_argument(
        "--checkpoint-activations",
        action="store_true",
        default=None,
        help="recompute each layer in the backward pass (less memory)",
    )
    t.add_argument(
        "--qat",
        choices=list(QAT_MODES),
        help="quantization-aware training (felix.model.qat): fake-quant STE "
        "with the export codec of this format on every tensor the export quantizes; bitnet = BitNet b1.58 "
        "ternary (absmean, int8 activations), shipped as TQ2_0. With --init-from: a QAT phase",
    )
    add_soda_arguments(t)
    t.set_defaults(func=cmd_train)
