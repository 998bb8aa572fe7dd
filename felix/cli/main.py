"""The `felix` command line (also `python -m felix`).

    felix quantize      codec demo on a built-in weight-like matrix: error and speed per format and backend
    felix backends      which backends run here, and why not where they do not
    felix aot-report    compile every Triton kernel for gfx1101 and sm_90 and print registers / LDS / spills
    felix selftest      run every op against its torch reference on this machine's best device; exit 1 on failure
    felix train         train Felix-LM (default: the tiny preset on the built-in corpus, CPU, a few minutes)
    felix fidelity      which logit margins / decisions of a checkpoint survive a quantization (exit 1: gate failed)
    felix export        a checkpoint to GGUF: stock llama.cpp (`llama`) or the fork (`felix` arch, RQ4)
    felix inspect       metadata and tensor table of any GGUF file
    felix prune         structured pruning of a checkpoint to a smaller Felix config (recover: train --init-from)
    felix edit          write (prompt -> target) edits into a checkpoint's splice surface; list and undo them
    felix teacher-data  multi-teacher JSONL from the built-in task records (+ checkpoints); teacher agreement report
    felix eval-tasks    task-suite report: student checkpoints vs teachers vs the teacher ensemble, per task
    felix tokenizer     train a byte-level BPE tokenizer on a bounded sample of pretraining sources
    felix data          prepare pretraining sources once into memory-mappable token shards
    felix serve         a checkpoint or GGUF on llama.cpp's OpenAI-compatible chat API (127.0.0.1 by default)
"""
from __future__ import annotations

import argparse
import signal
import sys
import time

import torch

from felix.core.formats import FORMATS, LARGEST_BLOCK


def builtin_weights(rows: int, cols: int, seed: int) -> torch.Tensor:
    """A weight-like matrix that needs no download: Student-t (heavy tails, like trained LLM weights)
    with per-row scales and a few planted outlier columns."""
    g = torch.Generator().manual_seed(seed)
    t = torch.distributions.StudentT(torch.tensor(5.0))
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        x = t.sample((rows, cols))
    x *= 0.02 * torch.exp(0.3 * torch.randn(rows, 1, generator=g))
    outliers = torch.randint(0, cols, (max(1, cols // 512),), generator=g)
    x[:, outliers] *= 8.0
    return x.float()


def _timed(fn, repeats: int):
    fn()  # warm-up (Triton JIT, caches)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        if isinstance(out, torch.Tensor) and out.is_cuda:
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return out, best


def cmd_quantize(args) -> int:
    import felix
    from tqdm import tqdm

    device = torch.device(args.device)
    x = builtin_weights(args.rows, args.cols, args.seed).to(device)
    status = felix.backends()
    from felix.ops.dispatch import _IMPLS

    backends = args.backend or [b for b, s in status.items() if s.available and b in _IMPLS["quantize"]
                                and not (b == "cpu" and device.type != "cpu")
                                and not (b == "triton" and device.type == "cpu")]
    formats = args.format or list(felix.FORMATS)
    print(f"felix {felix.__version__}: built-in weight matrix {args.rows}x{args.cols} (Student-t, outlier "
          f"columns, seed {args.seed}) on {device}; backends: {', '.join(backends)}")
    rows = []
    jobs = [(fmt, b) for fmt in formats for b in backends]
    reference_bytes = {}
    for fmt, backend in tqdm(jobs, desc="quantizing", unit="case", disable=not sys.stderr.isatty()):
        f = felix.get_format(fmt)
        blocks, tq = _timed(lambda: felix.quantize(x, fmt, backend=backend), args.repeats)
        y, td = _timed(lambda: felix.dequantize(blocks, fmt, x.shape, backend=backend), args.repeats)
        err = (x - y).abs()
        snr = 10 * torch.log10(x.pow(2).sum() / (x - y).pow(2).sum().clamp_min(1e-30))
        same = reference_bytes.setdefault(fmt, blocks.cpu())
        nbytes = x.numel() * 4 + blocks.numel()
        rows.append((fmt, backend, f.bits_per_weight, float(err.max()), float(err.mean()),
                     float(err.sum() / x.abs().sum()), float(snr), nbytes / tq / 1e9, nbytes / td / 1e9,
                     "yes" if torch.equal(same, blocks.cpu()) else "NO"))
    head = (f"{'format':8} {'backend':9} {'bits/w':>6} {'max|err|':>9} {'mean|err|':>9} {'rel err':>8} "
            f"{'SNR dB':>7} {'quant GB/s':>10} {'deq GB/s':>9} {'same bytes':>10}")
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r[0]:8} {r[1]:9} {r[2]:6.3f} {r[3]:9.5f} {r[4]:9.6f} {r[5]:8.4f} {r[6]:7.2f} {r[7]:10.2f} "
              f"{r[8]:9.2f} {r[9]:>10}")
    print("'same bytes' compares each backend with the first one listed: every backend writes ggml's exact bytes.")
    return 0 if all(r[9] == "yes" for r in rows) else 1


def cmd_backends(args) -> int:
    import felix
    from felix.ship import llamacpp

    print("op backends:")
    for name, s in felix.backends().items():
        print(f"  {name:10} {'yes' if s.available else 'no ':3}  {s.reason}")
    print("GGUF runtimes (felix.ship.llamacpp):")
    for name in llamacpp.RUNTIMES:
        ok, why = llamacpp.available(name)
        print(f"  {name:10} {'yes' if ok else 'no ':3}  {why}")
    return 0


def cmd_aot_report(args) -> int:
    import importlib

    from felix.ops import aot

    reports = []
    for module in args.modules or aot.kernel_modules():
        mod = importlib.import_module(f"felix.ops.kernels.{module}")
        for target in args.target:
            for spec in mod.aot_specs(aot.ARCH_KEYS[target]):
                reports.append(aot.resource_report(spec, target))
    print(aot.format_reports(reports))
    spilled = [r for r in reports if r.spill_bytes]
    for r in spilled:
        print(f"SPILLS: {r.kernel} on {r.target}: {r.spill_bytes} bytes", file=sys.stderr)
    return 1 if spilled else 0


def selftest_checks():
    from felix.ops.selftest import CHECKS

    return CHECKS


def cmd_selftest(args) -> int:
    import felix
    from felix.ops import selftest

    device = torch.device(args.device)
    print(f"felix {felix.__version__} selftest on {device} "
          f"({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}), torch {torch.__version__}")
    for name, s in felix.backends().items():
        print(f"  backend {name:9} {'yes' if s.available else 'no ':3} {s.reason}")
    rows = selftest.run(device, args.op, args.seed)
    print(selftest.format_table(rows))
    failed = [r for r in rows if not r.passed]
    print(f"{len(rows) - len(failed)}/{len(rows)} checks passed" + (f"; {len(failed)} FAILED" if failed else ""))
    return 1 if failed or not rows else 0


def cmd_train(args) -> int:
    from felix.data.corpus import DataError
    from felix.train.distill import SODA_ARGS, cmd_soda
    from felix.model.felix_lm import CheckpointError
    from felix.train.config import resolve
    from felix.train.loop import TrainingHalted, train

    if args.soda:  # semi-on-policy distillation: its own loop (felix.train.distill.train_soda)
        return cmd_soda(args)
    run_actions = ("resume", "stop_at", "overwrite", "auto_resume", "config", "overrides")  # not TrainConfig fields
    options = {k: v for k, v in vars(args).items() if k not in ("command", "func", *run_actions, *SODA_ARGS)}
    if options.get("margin_from") is not None and options.get("margin") is not None:
        print("felix train: error: give --margin or --margin-from (which measures it), not both", file=sys.stderr)
        return 2
    try:  # defaults (or the resumed run's run.yaml) < --config < --set section.key=value < the flags given
        flags = {k: v for k, v in options.items() if v is not None and v != []}
        cfg = resolve(args.config, args.overrides, flags, resume=args.resume or args.auto_resume)
        result = train(cfg, resume=args.resume, stop_at=args.stop_at, overwrite=args.overwrite,
                       auto_resume=args.auto_resume)
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


def _add_train_parser(sub) -> None:
    from felix.tasks import MAKERS
    from felix.train.distill import add_soda_arguments
    from felix.train.distributed import PARALLEL_MODES
    from felix.model.felix_lm import PRESETS
    from felix.model.qat import QAT_MODES
    from felix.train.loop import TRAIN_ONLY, TrainConfig

    d = TrainConfig()
    t = sub.add_parser("train", help="train Felix-LM: WSD + QUAIL, metrics, checkpoints, exact resume",
                       description="Train Felix-LM. Settings come from TrainConfig's defaults (with --resume: the "
                                   "run's own OUT_DIR/run.yaml), then --config, then --set overrides, then the "
                                   "flags given; the resolved config is written to OUT_DIR/run.yaml "
                                   "(felix/train/config.py).")
    t.add_argument("--config", help="a YAML run config (sections run, model, data, optimizer, schedule, quail, eval, "
                   "checkpoint, parallel; examples in configs/)")
    t.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one config value (YAML syntax), e.g. --set optimizer.lr=1e-3 or "
                        "--set data.sources.web.weight=0.6; repeatable; the flags below override these")
    t.add_argument("--preset", choices=list(PRESETS), help=f"model size (default {d.preset})")
    t.add_argument("--out-dir", help=f"run directory: checkpoint/, metrics.jsonl, loss_curve.png (default {d.out_dir})")
    t.add_argument("--data", action="append", default=[], help="a data source: a directory prepared by `felix data "
                   "prepare`, or a JSONL ({text} or {prompt, response}) or text file (prepared into OUT_DIR/data); "
                   "repeatable (sources weigh by their tokens; weights: --config); default: the built-in corpus")
    t.add_argument("--val-data", action="append", default=[], help="validation files (default: a held-out split)")
    t.add_argument("--resume", action="store_true", help="continue from OUT_DIR/checkpoint exactly, with the settings "
                   "of OUT_DIR/run.yaml (--out-dir alone is enough)")
    t.add_argument("--stop-at", type=int, help="stop (with a checkpoint) after this many steps")
    t.add_argument("--auto-resume", action="store_true", help="continue OUT_DIR's latest checkpoint if it has "
                   "one, else start fresh (for a job scheduler that restarts the same command)")
    t.add_argument("--overwrite", action="store_true", help="replace the run in OUT_DIR (checkpoints, metrics), "
                   "saying what is replaced; without it (or --resume) a directory holding a run is refused")
    for name in ("n_records", "vocab_size", "seq_len", "batch_size", "grad_accum", "steps", "warmup_steps",
                 "eval_every", "eval_batches", "checkpoint_every", "seed", "memorization_min_wraps", "keep_last",
                 "milestone_every", "max_skipped_in_a_row", "loss_spike_window"):
        t.add_argument("--" + name.replace("_", "-"), type=int, help=f"default {getattr(d, name)}")
    for name in ("val_fraction", "lr", "decay_fraction", "final_lr_fraction", "weight_decay", "grad_clip",
                 "lambda_q", "margin", "peak_tflops", "memorization_gap", "loss_spike_threshold"):
        t.add_argument("--" + name.replace("_", "-"), type=float, help=f"default {getattr(d, name)}")
    t.add_argument("--task", dest="tasks", action="append", choices=list(MAKERS),
                   help=f"structured record task of the built-in corpus (repeatable; default: {', '.join(d.tasks)})")
    t.add_argument("--no-prose", dest="prose", action="store_false", default=None,
                   help="built-in corpus without the prose: structured records only")
    t.add_argument("--margin-from", help="a `felix fidelity` JSON report: set the QUAIL margin to the measured lower "
                   "tail of the margin change (margin = -quantile; felix.core.quail.margin_from_noise); excludes --margin")
    t.add_argument("--margin-quantile", type=float, help=f"quantile for --margin-from (default "
                   f"{d.margin_quantile:g}; one of the report's change_quantiles)")
    t.add_argument("--teacher-data", action="append", default=[], help="distillation: JSONL of {prompt, response, "
                   "teacher} trained as masked SFT on the responses (repeatable; several teachers welcome)")
    t.add_argument("--init-from", help="start from this checkpoint directory (model + tokenizer)")
    t.add_argument("--spokes", type=int, help="spokes per layer (the fork's felix arch; W_up = 0 at init): from "
                   "scratch, or added to the --init-from hub (default: none; 4 with --train-only spokes)")
    t.add_argument("--spoke-rank", type=int, help="rank of each spoke (default: the preset's / checkpoint's)")
    t.add_argument("--train-only", choices=[m for m in TRAIN_ONLY if m], help="freeze the hub (--init-from) and train only the "
                   "spokes; the optimizer holds state for the spokes alone")
    t.add_argument("--tokenizer", help="an existing tokenizer.json (default: train one on the data)")
    t.add_argument("--device", help=f"default {d.device}: auto (cuda if present), cpu, cuda, cuda:1, ...")
    t.add_argument("--parallel", choices=list(PARALLEL_MODES), help="under torchrun: DDP (default) or FSDP2 (sharded)")
    t.add_argument("--skip-loss-spikes", action="store_true", default=None, help="skip the update of a step whose "
                   "loss is a spike (z-score over --loss-spike-window steps above --loss-spike-threshold); "
                   "spikes are always logged")
    t.add_argument("--tensorboard", action="store_true", default=None, help="also log metrics to "
                   "OUT_DIR/tensorboard (needs the tensorboard package: pip install felix[tensorboard])")
    t.add_argument("--checkpoint-activations", action="store_true", default=None,
                   help="recompute each layer in the backward pass (less memory)")
    t.add_argument("--qat", choices=list(QAT_MODES), help="quantization-aware training (felix.model.qat): fake-quant STE "
                   "with the export codec of this format on every tensor the export quantizes; bitnet = BitNet b1.58 "
                   "ternary (absmean, int8 activations), shipped as TQ2_0. With --init-from: a QAT phase")
    add_soda_arguments(t)
    t.set_defaults(func=cmd_train)


def cmd_fidelity(args) -> int:
    from felix.verify import fidelity
    from felix.model.felix_lm import CheckpointError

    gate = fidelity.Gate(args.min_margin_survival, args.max_flips, args.max_kl_mean, args.max_kl_p99,
                         args.min_top1_agreement)
    code, cache = 0, {}  # the reference model's logits and generations are shared by every --quant
    for quant in args.quant:
        opts = fidelity.FidelityOptions(
            quant=quant, paths=tuple(args.path), embedding_type=args.embedding_type, probes_file=args.probes,
            n_probes=args.n_probes, probe_set=args.probe_set, whitelist_strings=tuple(args.whitelist_string),
            whitelist_tokens=tuple(args.whitelist_token), sensitivity=not args.no_sensitivity,
            compliance=not args.no_compliance, max_new_tokens=args.max_new_tokens, tokenizer=args.tokenizer,
            gguf_dir=args.gguf_dir, progress=sys.stderr.isatty(), sim_activations=args.sim_activations,
            constrained=args.constrained)
        try:
            report = fidelity.run_fidelity(args.checkpoint, opts, cache)
        except (ValueError, CheckpointError, FileNotFoundError) as e:
            print(f"felix fidelity: error: {e}", file=sys.stderr)
            return 2
        failures = gate.check(report)
        report["gate"] = {"thresholds": vars(gate), "passed": not failures, "failures": failures}
        files = fidelity.write_report(report, args.out_dir)
        for path, res in report["results"].items():
            s, m = res["summary"], res["summary"]["margin"]
            line = (f"{quant} {path}: margin survival {m['survived']}/{m['reference_correct']}, flips {m['flips']} "
                    f"(lost {m['lost']}), KL mean {s['kl']['mean']:.5f} p99 {s['kl']['p99']:.5f}, top-1 agreement "
                    f"{s['top1_agreement']:.4f}")
            if "compliance" in res:
                c = res["compliance"]
                line += f", schema-compliant {c['reference']['compliant']} -> {c['quantized']['compliant']}" \
                        f" of {c['quantized']['probes']}"
            print(line)
        for sim, a in (report.get("agreement_by_sim_activations") or {}).items():
            print(f"{quant} simulated ({sim} activations) vs runtime ({report['runtime']}): top-1 agreement "
                  f"{a['top1_agreement']:.4f}, max rel err {a['max_rel_err']:.4f}, KL mean {a['kl_mean']:.2e}, "
                  f"|margin diff| mean {a['margin_abs_diff_mean']:.4f} max {a['margin_abs_diff_max']:.4f}")
        if report.get("constrained"):
            c = report["constrained"]
            print(f"{quant} served: schema-compliant free {c['free']['compliant']} / constrained "
                  f"{c['constrained']['compliant']} of {c['free']['probes']}, task score "
                  f"{c['free']['task_score_mean']:.2f} / {c['constrained']['task_score_mean']:.2f}, "
                  f"{c['changed_by_grammar']} answers changed by the grammar")
        print(f"report: {files['markdown']} (+ {files['json'].name}, plots)")
        for f in failures:
            print(f"GATE FAILED: {quant} {f}", file=sys.stderr)
        code = code or (1 if failures else 0)
    return code


def fidelity_probe_sets() -> tuple[str, ...]:
    from felix.verify.fidelity import PROBE_SETS

    return PROBE_SETS


def _add_fidelity_parser(sub) -> None:
    from felix.ops.quant_policy import EXPORT_TYPES

    f = sub.add_parser("fidelity", help="do refusal / JSON-structure logit margins survive a quantization?")
    f.add_argument("checkpoint", help="checkpoint directory (model.safetensors, config.json, tokenizer.json)")
    f.add_argument("--quant", action="append", choices=list(EXPORT_TYPES),
                   help="quantization to test (repeatable; default rq4); per-tensor policy as in the exporter")
    f.add_argument("--path", action="append", choices=["simulated", "runtime"],
                   help="simulated (PyTorch on dequantized weights, any format) and/or runtime (the exported GGUF "
                        "in llama.cpp: stock llama.cpp for stock formats, the Felix fork for rq4); repeatable; "
                        "default simulated")
    f.add_argument("--sim-activations", choices=["exact", "runtime"], default="exact",
                   help="simulated path: exact activations (default), or rounded as llama.cpp's CPU matmuls do "
                        "(Q8_0 blocks for 4/8-bit weights, f16 q/k/v), to predict what the deployment computes")
    f.add_argument("--embedding-type", help="type of token_embd/output (default: Q8_0 for 4-bit formats)")
    f.add_argument("--probes", help="JSONL of {prompt, expected} (optional name, task, schema); default built-in")
    f.add_argument("--n-probes", type=int, default=24, help="number of built-in probes (default 24)")
    f.add_argument("--probe-set", choices=list(fidelity_probe_sets()), default="builtin",
                   help="built-in probes: builtin (the seed task shapes), hedged (flip regime: one qualifier, "
                        "felix.data.corpus.HEDGES) or weighed (flip regime: three reviewers' evidence summed, "
                        "felix.data.corpus.REVIEW_WEIGHTS)")
    f.add_argument("--whitelist-string", action="append", default=[],
                   help="protect the tokens of this string too (field name, refusal phrase); repeatable")
    f.add_argument("--whitelist-token", action="append", default=[],
                   help="protect this exact vocabulary token (reported if it is not one token); repeatable")
    f.add_argument("--tokenizer", help="tokenizer.json (default: the checkpoint's)")
    f.add_argument("--no-sensitivity", action="store_true", help="skip per-tensor sensitivity")
    f.add_argument("--no-compliance", action="store_true", help="skip greedy generations / schema compliance")
    f.add_argument("--max-new-tokens", type=int, default=160)
    f.add_argument("--constrained", action="store_true",
                   help="also serve the quantized export (felix serve) and report schema compliance and task scores "
                        "of its answers free and constrained by each probe's JSON-schema grammar")
    f.add_argument("--gguf-dir", help="runtime path: keep the exported GGUF files here (default: a temp dir)")
    f.add_argument("--out-dir", default="fidelity", help="where the JSON / Markdown / PNG report goes")
    f.add_argument("--min-margin-survival", type=float, help="gate: fail below this fraction (0..1)")
    f.add_argument("--max-flips", type=int, help="gate: fail above this many flipped whitelisted decisions")
    f.add_argument("--max-kl-mean", type=float, help="gate: fail above this mean KL (nats)")
    f.add_argument("--max-kl-p99", type=float, help="gate: fail above this p99 KL (nats)")
    f.add_argument("--min-top1-agreement", type=float, help="gate: fail below this top-1 agreement (0..1)")
    f.set_defaults(func=cmd_fidelity)


def cmd_export(args) -> int:
    from felix.ship.export import ExportError, export_gguf
    from felix.ship.gguf_file import GGUFError
    from felix.model.felix_lm import CheckpointError

    try:
        result = export_gguf(args.checkpoint, args.out, arch=args.arch, quant=args.quant, splice=args.splice,
                             force=args.force, embedding_type=args.embedding_type, adapter_out=args.adapter_out,
                             progress=sys.stderr.isatty(), spokes=args.spokes)
    except (ExportError, CheckpointError, GGUFError, FileNotFoundError) as e:
        print(f"felix export: error: {e}", file=sys.stderr)
        return 2
    print(result.table())
    return 0


def cmd_inspect(args) -> int:
    from felix.ship.gguf_file import GGUFError, metadata, open_gguf, torch_shape

    try:
        reader = open_gguf(args.file)
        meta = metadata(reader, args.file)
    except GGUFError as e:
        print(f"felix inspect: error: {e}", file=sys.stderr)
        return 2
    print(f"{args.file}: GGUF v{int(reader.fields['GGUF.version'].parts[-1][0])}, {len(meta)} metadata keys, "
          f"{len(reader.tensors)} tensors")
    for key, value in meta.items():
        if isinstance(value, list) and len(value) > args.max_items:
            value = f"[{', '.join(map(repr, value[:args.max_items]))}, ... ({len(value)} items)]"
        print(f"  {key} = {value}")
    rows = [(t.name, "x".join(map(str, torch_shape(t))), t.tensor_type.name, t.n_bytes) for t in reader.tensors]
    if rows:
        w = [max(len(str(r[i])) for r in rows) for i in range(3)]
        print(f"\n  {'tensor'.ljust(w[0])}  {'shape'.ljust(w[1])}  {'type'.ljust(w[2])}  bytes")
        for name, shape, typ, nbytes in rows:
            print(f"  {name.ljust(w[0])}  {shape.ljust(w[1])}  {typ.ljust(w[2])}  {nbytes:,}")
        total = sum(r[3] for r in rows)
        weights = sum(int(t.n_elements) for t in reader.tensors)
        print(f"\n  {total / 2**20:.2f} MiB of tensor data, {weights / 1e6:.2f}M weights, "
              f"{8 * total / max(1, weights):.2f} bits/weight")
    return 0


def _add_export_parsers(sub) -> None:
    from felix.ship.export import ARCHES, SPLICE_MODES
    from felix.ops.quant_policy import EXPORT_TYPES

    e = sub.add_parser("export", help="export a checkpoint to GGUF (llama.cpp or the felix fork)",
                       description="Export a Felix checkpoint directory (config.json, model.safetensors, "
                                   "tokenizer.json) to GGUF. Per-tensor types follow felix.ops.quant_policy: norms, "
                                   "gates, splices and small tensors F32, embeddings Q8_0 for 4-bit exports, "
                                   "rows that do not fit the block size fall back (reported).")
    e.add_argument("checkpoint", help="checkpoint directory (e.g. runs/tiny/checkpoint)")
    e.add_argument("out", help="output .gguf path (written atomically)")
    e.add_argument("--arch", choices=ARCHES, default="llama", help="llama: stock llama.cpp; felix: the fork")
    e.add_argument("--quant", choices=EXPORT_TYPES, default="f16", help="type of the large 2-D tensors")
    e.add_argument("--splice", choices=SPLICE_MODES, default="merge",
                   help="merge into the weights, or a separate LoRA adapter GGUF (both runtimes apply it, with a live scale)")
    e.add_argument("--embedding-type", choices=EXPORT_TYPES, help="type of token_embd/output (default: Q8_0 "
                   "for 4-bit and ternary exports, else --quant)")
    e.add_argument("--adapter-out", help="adapter path for --splice adapter (default: OUT stem + .splice-lora.gguf)")
    e.add_argument("--spokes", help="a spoke file (spokes.safetensors of a --train-only spokes run) to attach to "
                   "the checkpoint's hub; refused when it was trained on another hub (--arch felix)")
    e.add_argument("--force", action="store_true", help="overwrite existing output files")
    e.set_defaults(func=cmd_export)

    i = sub.add_parser("inspect", help="metadata and tensor table of any GGUF file")
    i.add_argument("file")
    i.add_argument("--max-items", type=int, default=8, help="array values longer than this are shortened")
    i.set_defaults(func=cmd_inspect)


def cmd_prune(args) -> int:
    from felix.model.felix_lm import CheckpointError
    from felix.tools.prune import prune_checkpoint

    try:
        result = prune_checkpoint(args.checkpoint, args.out, preset=args.to_preset, method=args.method,
                                  calib_batches=args.calib_batches, batch_size=args.batch_size, seq_len=args.seq_len,
                                  data=args.data or None, hc_steps=args.hc_steps, hc_lr=args.hc_lr, seed=args.seed,
                                  progress=sys.stderr.isatty(), n_layer=args.layers, n_head=args.heads,
                                  n_kv_head=args.kv_heads, ffn_hidden=args.ffn_hidden, d_model=args.d_model)
    except (ValueError, CheckpointError, FileNotFoundError) as e:
        print(f"felix prune: error: {e}", file=sys.stderr)
        return 2
    c = result.model.cfg
    print(f"pruned {args.checkpoint} ({result.source_params / 1e6:.3f}M parameters) -> {args.out} "
          f"({result.pruned_params / 1e6:.3f}M): {c.n_layer} layers x {c.d_model}, {c.n_head}:{c.n_kv_head} heads of "
          f"{c.head_dim}, FFN {c.ffn_hidden}; method {args.method}; kept layers "
          f"{[lp.source_layer for lp in result.plan.layers]}. Recover: felix train --init-from {args.out}")
    return 0


def _add_prune_parser(sub) -> None:
    from felix.model.felix_lm import PRESETS
    from felix.tools.prune import METHODS

    p = sub.add_parser("prune", help="structured pruning to a smaller Felix config (then felix train --init-from)",
                       description="Prune a Felix checkpoint to a smaller shape: importance-scored coupled groups "
                                   "(layers, kv heads, query heads, value dims, FFN channels, residual channels), "
                                   "spliced into a normal Felix checkpoint (felix/tools/prune.py). Target: --to-preset's "
                                   "shape, each field overridable; unspecified fields keep the source's.")
    p.add_argument("checkpoint", help="source checkpoint directory")
    p.add_argument("out", help="output checkpoint directory (written atomically; holds prune_plan.json too)")
    p.add_argument("--to-preset", choices=list(PRESETS), help="target shape of this preset (vocabulary kept)")
    p.add_argument("--layers", type=int, help="target n_layer")
    p.add_argument("--heads", type=int, help="target n_head")
    p.add_argument("--kv-heads", type=int, help="target n_kv_head")
    p.add_argument("--ffn-hidden", type=int, help="target SwiGLU width")
    p.add_argument("--d-model", type=int, help="target residual width")
    p.add_argument("--method", choices=METHODS, default="taylor",
                   help="taylor: first-order |dL/dmask|; activation: activation norms; hard-concrete: learned "
                        "Sheared-LLaMA masks with a target-shape constraint (small models)")
    p.add_argument("--calib-batches", type=int, default=8, help="calibration batches (train split)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, help="calibration window (default: the model's max_seq_len)")
    p.add_argument("--data", action="append", default=[], help="calibration files (default: built-in corpus)")
    p.add_argument("--hc-steps", type=int, default=200, help="hard-concrete: mask training steps")
    p.add_argument("--hc-lr", type=float, default=0.1, help="hard-concrete: mask learning rate")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_prune)


def cmd_tokenizer_train(args) -> int:
    from felix.data.corpus import DataError
    from felix.core.files import file_sha256
    from felix.model.tokenizer import save_tokenizer_file
    from felix.data.tokenizer_training import train_tokenizer_from_sources

    t0 = time.perf_counter()
    try:
        if args.out.exists() and not args.force:
            raise FileExistsError(f"{args.out} exists; use --force to overwrite it")
        tok, sample = train_tokenizer_from_sources(args.sources, args.vocab_size, max_chars=int(args.max_chars),
                                                   doc_cap=args.doc_cap, text_field=args.text_field)
        save_tokenizer_file(tok, args.out, force=args.force)
    except (ValueError, DataError, FileExistsError, FileNotFoundError) as e:
        print(f"felix tokenizer train: error: {e}", file=sys.stderr)
        return 2
    print(f"trained on {sample.describe()}")
    print(f"wrote {args.out}: vocabulary {tok.vocab_size:,}, sha256 {file_sha256(args.out)[:16]}..., "
          f"{time.perf_counter() - t0:.1f} s")
    return 0


def cmd_data_prepare(args) -> int:
    from felix.data.corpus import DataError
    from felix.data.shards import prepare_corpus

    t0 = time.perf_counter()
    try:
        corpus = prepare_corpus(args.sources, args.tokenizer, args.out, workers=args.workers,
                                val_fraction=args.val_fraction, shard_tokens=int(args.shard_tokens),
                                text_field=args.text_field, force=args.force, progress=sys.stderr.isatty())
    except (ValueError, DataError, FileNotFoundError) as e:
        print(f"felix data prepare: error: {e}", file=sys.stderr)
        return 2
    m, run = corpus.manifest, corpus.manifest["last_run"]
    print(f"{args.out}: {len(m['sources'])} source file(s), dtype {m['dtype']} ({m['bytes_per_token']} bytes/token)")
    for split in ("train", "val"):
        info = m["splits"][split]
        print(f"  {split}: {info['documents']:,} documents, {info['tokens']:,} tokens in "
              f"{len(info['shards'])} shard(s)")
    print(f"  {time.perf_counter() - t0:.1f} s; the run that finished it encoded {run['tokens_encoded']:,} tokens in "
          f"{run['seconds']:.1f} s ({run['tokens_encoded'] / max(run['seconds'], 1e-9):,.0f} tokens/s, "
          f"{run['workers']} worker(s)); fingerprint {corpus.fingerprint[:16]}")
    if m["splits"]["val"]["documents"] == 0:
        print("felix data prepare: warning: the validation split is empty (few documents for --val-fraction "
              f"{args.val_fraction}); raise it for a validation loss", file=sys.stderr)
    return 0


def _add_data_parsers(sub) -> None:
    """`felix tokenizer train` and `felix data prepare` (felix/model/tokenizer.py, felix/data/shards.py, docs/data-format.md)."""
    from pathlib import Path

    from felix.data.sources import SUPPORTED_SUFFIXES
    from felix.data.shards import DEFAULT_SHARD_TOKENS, DEFAULT_VAL_FRACTION
    from felix.data.tokenizer_training import DEFAULT_DOC_CAP, DEFAULT_MAX_CHARS

    sources_help = (f"files ({', '.join(SUPPORTED_SUFFIXES)}), folders (searched recursively) or glob patterns; "
                    "JSONL lines are {\"text\": ...} or {\"prompt\", \"response\"}, a .txt file is one document")
    tk = sub.add_parser("tokenizer", help="train a byte-level BPE tokenizer on a bounded sample of sources")
    tk_sub = tk.add_subparsers(dest="tokenizer_command", required=True)
    tt = tk_sub.add_parser("train", help="byte-level BPE (HF tokenizers) from a streamed, bounded sample",
                           description="Train Felix's byte-level BPE tokenizer (special tokens at ids 0-6) on the "
                                       "first --max-chars characters of SOURCES, each document cut to --doc-cap "
                                       "characters, streamed: memory does not grow with the corpus size.")
    tt.add_argument("sources", nargs="+", help=sources_help)
    tt.add_argument("--vocab-size", type=int, required=True, help="vocabulary size, the 7 special tokens included")
    tt.add_argument("--out", type=Path, required=True, help="the tokenizer JSON file to write (atomically)")
    tt.add_argument("--max-chars", type=float, default=DEFAULT_MAX_CHARS,
                    help=f"characters sampled in all (default {DEFAULT_MAX_CHARS:.0e})")
    tt.add_argument("--doc-cap", type=int, default=DEFAULT_DOC_CAP,
                    help=f"characters kept per document (default {DEFAULT_DOC_CAP:,})")
    tt.add_argument("--text-field", default="text", help="JSONL key / parquet column holding the text")
    tt.add_argument("--force", action="store_true", help="overwrite an existing --out")
    tt.set_defaults(func=cmd_tokenizer_train)

    da = sub.add_parser("data", help="prepare pretraining sources into token shards")
    da_sub = da.add_subparsers(dest="data_command", required=True)
    dp = da_sub.add_parser("prepare", help="tokenize sources once, in parallel, into memory-mappable token shards",
                           description="Tokenize SOURCES once into token shards in --out (docs/data-format.md): "
                                       "uint16/uint32 shards of bos+document+eos, a train/val split by document "
                                       "content, manifest.json written last. An interrupted prepare continues when "
                                       "rerun with the same arguments.")
    dp.add_argument("sources", nargs="+", help=sources_help)
    dp.add_argument("--tokenizer", type=Path, required=True, help="tokenizer JSON file (felix tokenizer train)")
    dp.add_argument("--out", type=Path, required=True, help="output directory (one per source is the usual use)")
    dp.add_argument("--workers", type=int, default=None, help="tokenizer processes (default: every core)")
    dp.add_argument("--val-fraction", type=float, default=DEFAULT_VAL_FRACTION,
                    help=f"share of documents in the validation split (default {DEFAULT_VAL_FRACTION})")
    dp.add_argument("--shard-tokens", type=float, default=DEFAULT_SHARD_TOKENS,
                    help=f"tokens per shard file (default {DEFAULT_SHARD_TOKENS:.0e})")
    dp.add_argument("--text-field", default="text", help="JSONL key / parquet column holding the text")
    dp.add_argument("--force", action="store_true", help="replace a different prepared corpus in --out")
    dp.set_defaults(func=cmd_data_prepare)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="felix", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    q = sub.add_parser("quantize", help="codec demo on a built-in weight matrix: error and speed per format")
    q.add_argument("--format", action="append", choices=list(FORMATS),
                   help="format to run (repeatable; default: all)")
    q.add_argument("--backend", action="append", choices=["reference", "triton", "cpu"],
                   help="backend to run (repeatable; default: every available one)")
    q.add_argument("--rows", type=int, default=1024)
    q.add_argument("--cols", type=int, default=4096,
                   help=f"a multiple of {LARGEST_BLOCK} (the largest block) so every format applies")
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--repeats", type=int, default=3, help="timed repeats (best is reported)")
    q.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    q.set_defaults(func=cmd_quantize)

    b = sub.add_parser("backends", help="which backends run on this machine")
    b.set_defaults(func=cmd_backends)

    a = sub.add_parser("aot-report", help="compile Triton kernels for real targets and report resources")
    a.add_argument("--target", action="append", choices=["gfx1101", "sm_90"], help="default: both")
    a.add_argument("--modules", nargs="+", help="kernel modules under felix.ops.kernels (default: all of them)")
    a.set_defaults(func=cmd_aot_report)

    t = sub.add_parser("selftest", help="every op vs its torch reference on this machine; exit 1 on failure")
    t.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    t.add_argument("--op", action="append", choices=list(selftest_checks()), help="default: all")
    t.add_argument("--seed", type=int, default=0)
    t.set_defaults(func=cmd_selftest)

    _add_train_parser(sub)
    _add_fidelity_parser(sub)
    _add_export_parsers(sub)
    _add_prune_parser(sub)
    from felix.cli.edit import add_edit_parser

    add_edit_parser(sub)
    from felix.train.distill import add_teacher_data_parser
    from felix.verify.task_eval import add_eval_tasks_parser

    add_teacher_data_parser(sub)
    add_eval_tasks_parser(sub)
    _add_data_parsers(sub)
    from felix.ship.serve import add_serve_parser

    add_serve_parser(sub)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "quantize" and args.cols % LARGEST_BLOCK:
        build_parser().error(f"--cols {args.cols} must be a multiple of {LARGEST_BLOCK} (the largest block)")
    if args.command == "fidelity":
        args.quant, args.path = args.quant or ["rq4"], args.path or ["simulated"]
    if args.command == "aot-report" and not args.target:
        args.target = ["gfx1101", "sm_90"]
    try:
        return args.func(args)
    except ValueError as e:  # the last net: a bad input file or option that a command did not map itself (the
        # project's rule: bad input raises a ValueError subclass naming the file; the command line exits 2)
        print(f"felix {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
