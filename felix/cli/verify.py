"""`felix fidelity`, `felix eval-tasks`: the verify stage (felix/verify) -- what a quantization keeps of a
checkpoint's decisions, and the task-suite report of students vs teachers."""

from __future__ import annotations

import sys

from felix.core.files import named_path
from felix.data.teachers import load_teacher_groups
from felix.model.felix_lm import CheckpointError, load_checkpoint
from felix.model.generate import greedy_responses
from felix.model.tokenizer import Tokenizer
from felix.ops.quant_policy import EXPORT_TYPES
from felix.tasks import SUITE_SEED, RuleGrader, TaskEvalError, builtin_task_suite
from felix.tasks.perturbations import BUILTIN_TEACHERS, builtin_teacher_responses
from felix.train.loop import resolve_device
from felix.verify import fidelity
from felix.verify.task_eval import evaluate_systems, teacher_outputs_from_groups, write_task_report


def cmd_fidelity(args) -> int:
    gate = fidelity.Gate(
        args.min_margin_survival, args.max_flips, args.max_kl_mean, args.max_kl_p99, args.min_top1_agreement
    )
    code, cache = 0, {}  # the reference model's logits and generations are shared by every --quant
    default = fidelity.FidelityOptions()  # --quant and --path append: their defaults are FidelityOptions'
    quants, paths = args.quant or [default.quant], args.path or list(default.paths)
    for quant in quants:
        opts = fidelity.FidelityOptions(
            quant=quant,
            paths=tuple(paths),
            embedding_type=args.embedding_type,
            probes_file=args.probes,
            n_probes=args.n_probes,
            probe_set=args.probe_set,
            whitelist_strings=tuple(args.whitelist_string),
            whitelist_tokens=tuple(args.whitelist_token),
            sensitivity=not args.no_sensitivity,
            compliance=not args.no_compliance,
            max_new_tokens=args.max_new_tokens,
            tokenizer=args.tokenizer,
            gguf_dir=args.gguf_dir,
            progress=sys.stderr.isatty(),
            sim_activations=args.sim_activations,
            constrained=args.constrained,
        )
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
            line = (
                f"{quant} {path}: margin survival {m['survived']}/{m['reference_correct']}, flips {m['flips']} "
                f"(lost {m['lost']}), KL mean {s['kl']['mean']:.5f} p99 {s['kl']['p99']:.5f}, top-1 agreement "
                f"{s['top1_agreement']:.4f}"
            )
            if "compliance" in res:
                c = res["compliance"]
                line += (
                    f", schema-compliant {c['reference']['compliant']} -> {c['quantized']['compliant']}"
                    f" of {c['quantized']['probes']}"
                )
            print(line)
        for sim, a in (report.get("agreement_by_sim_activations") or {}).items():
            print(
                f"{quant} simulated ({sim} activations) vs runtime ({report['runtime']}): top-1 agreement "
                f"{a['top1_agreement']:.4f}, max rel err {a['max_rel_err']:.4f}, KL mean {a['kl_mean']:.2e}, "
                f"|margin diff| mean {a['margin_abs_diff_mean']:.4f} max {a['margin_abs_diff_max']:.4f}"
            )
        if report.get("constrained"):
            c = report["constrained"]
            print(
                f"{quant} served: schema-compliant free {c['free']['compliant']} / constrained "
                f"{c['constrained']['compliant']} of {c['free']['probes']}, task score "
                f"{c['free']['task_score_mean']:.2f} / {c['constrained']['task_score_mean']:.2f}, "
                f"{c['changed_by_grammar']} answers changed by the grammar"
            )
        print(f"report: {files['markdown']} (+ {files['json'].name}, plots)")
        for f in failures:
            print(f"GATE FAILED: {quant} {f}", file=sys.stderr)
        code = code or (1 if failures else 0)
    return code


def add_fidelity_parser(sub) -> None:
    f = sub.add_parser("fidelity", help="do refusal / JSON-structure logit margins survive a quantization?")
    f.add_argument("checkpoint", help="checkpoint directory (model.safetensors, config.json, tokenizer.json)")
    f.add_argument(
        "--quant",
        action="append",
        choices=list(EXPORT_TYPES),
        help="quantization to test (repeatable; default rq4); per-tensor policy as in the exporter",
    )
    f.add_argument(
        "--path",
        action="append",
        choices=["simulated", "runtime"],
        help="simulated (PyTorch on dequantized weights, any format) and/or runtime (the exported GGUF "
        "in llama.cpp: stock llama.cpp for stock formats, the Felix fork for rq4); repeatable; "
        "default simulated",
    )
    f.add_argument(
        "--sim-activations",
        choices=["exact", "runtime"],
        default="exact",
        help="simulated path: exact activations (default), or rounded as llama.cpp's CPU matmuls do "
        "(Q8_0 blocks for 4/8-bit weights, f16 q/k/v), to predict what the deployment computes",
    )
    f.add_argument("--embedding-type", help="type of token_embd/output (default: Q8_0 for 4-bit formats)")
    f.add_argument("--probes", help="JSONL of {prompt, expected} (optional name, task, schema); default built-in")
    f.add_argument("--n-probes", type=int, default=24, help="number of built-in probes (default 24)")
    f.add_argument(
        "--probe-set",
        choices=list(fidelity.PROBE_SETS),
        default="builtin",
        help="built-in probes: builtin (the seed task shapes), hedged (flip regime: one qualifier, "
        "felix.data.corpus.HEDGES) or weighed (flip regime: three reviewers' evidence summed, "
        "felix.data.corpus.REVIEW_WEIGHTS)",
    )
    f.add_argument(
        "--whitelist-string",
        action="append",
        default=[],
        help="protect the tokens of this string too (field name, refusal phrase); repeatable",
    )
    f.add_argument(
        "--whitelist-token",
        action="append",
        default=[],
        help="protect this exact vocabulary token (reported if it is not one token); repeatable",
    )
    f.add_argument("--tokenizer", help="tokenizer.json (default: the checkpoint's)")
    f.add_argument("--no-sensitivity", action="store_true", help="skip per-tensor sensitivity")
    f.add_argument("--no-compliance", action="store_true", help="skip greedy generations / schema compliance")
    f.add_argument("--max-new-tokens", type=int, default=160)
    f.add_argument(
        "--constrained",
        action="store_true",
        help="also serve the quantized export (felix serve) and report schema compliance and task scores "
        "of its answers free and constrained by each probe's JSON-schema grammar",
    )
    f.add_argument("--gguf-dir", help="runtime path: keep the exported GGUF files here (default: a temp dir)")
    f.add_argument("--out-dir", default="fidelity", help="where the JSON / Markdown / PNG report goes")
    f.add_argument("--min-margin-survival", type=float, help="gate: fail below this fraction (0..1)")
    f.add_argument("--max-flips", type=int, help="gate: fail above this many flipped whitelisted decisions")
    f.add_argument("--max-kl-mean", type=float, help="gate: fail above this mean KL (nats)")
    f.add_argument("--max-kl-p99", type=float, help="gate: fail above this p99 KL (nats)")
    f.add_argument("--min-top1-agreement", type=float, help="gate: fail below this top-1 agreement (0..1)")
    f.set_defaults(func=cmd_fidelity)


def cmd_eval_tasks(args) -> int:
    try:
        items = builtin_task_suite(args.per_task, args.seed)
        outputs: dict[str, list[str]] = {}
        teachers: list[str] = []
        device = resolve_device(args.device)

        def generate(name, ckpt):
            if name in outputs:
                raise TaskEvalError(f"two systems are named {name!r}")
            model, tok = load_checkpoint(ckpt, device), Tokenizer.load(ckpt)
            outputs[name] = greedy_responses(
                model,
                tok,
                [i.prompt for i in items],
                args.max_new_tokens,
                args.batch_size,
                sys.stderr.isatty(),
                desc=name,
            )

        for name, ckpt in args.student:
            generate(name, ckpt)
        if args.teacher_data:
            for name, outs in teacher_outputs_from_groups(items, load_teacher_groups(args.teacher_data)).items():
                outputs[name] = outs
                teachers.append(name)
        if args.builtin_teachers or not (args.teacher_data or args.teacher_checkpoint):
            records = [{"prompt": i.prompt, "response": i.reference, "task": i.task} for i in items]
            for t in BUILTIN_TEACHERS:
                outputs[t] = builtin_teacher_responses(records, t, args.seed)
                teachers.append(t)
        for name, ckpt in args.teacher_checkpoint:
            generate(name, ckpt)
            teachers.append(name)
        meta = {
            "suite": f"built-in, {args.per_task} items per task, seed {args.seed}",
            "students": ", ".join(f"{n}={c}" for n, c in args.student) or "none",
            "max_new_tokens": args.max_new_tokens,
        }
        report = evaluate_systems(items, outputs, teachers, [RuleGrader()], meta)
        files = write_task_report(report, args.out_dir)
    except (ValueError, FileNotFoundError, CheckpointError) as e:
        print(f"felix eval-tasks: error: {e}", file=sys.stderr)
        return 2
    for name, s in report["systems"].items():
        print(
            f"{name:12} {s['role']:8} rubric mean {s['mean_joint']:.2f}, joint-min {s['joint_min']:.2f} "
            f"({s['worst_task']}), compliance {100 * s['compliance']:.0f}%"
        )
    print(f"report: {files['markdown']} (+ {files['json'].name}, {files['plot'].name})")
    return 0


def add_eval_tasks_parser(sub) -> None:
    p = sub.add_parser(
        "eval-tasks",
        help="task-suite report: student checkpoints vs teachers vs the teacher ensemble",
        description="Per task of the built-in suite: schema compliance and the rubric score (rule "
        "grader, joint min) of each system's outputs; the ensemble is the best teacher "
        "output per item. Writes task-eval.json, .md and .png.",
    )
    p.add_argument(
        "--student",
        action="append",
        type=named_path,
        default=[],
        metavar="NAME=DIR",
        help="a checkpoint evaluated by its greedy generations (repeatable)",
    )
    p.add_argument(
        "--teacher-data",
        action="append",
        default=[],
        help="teacher JSONL answering the suite prompts (felix teacher-data --suite); each teacher in it is a system",
    )
    p.add_argument(
        "--teacher-checkpoint",
        action="append",
        type=named_path,
        default=[],
        metavar="NAME=DIR",
        help="a trained Felix checkpoint as a teacher (repeatable)",
    )
    p.add_argument(
        "--builtin-teachers",
        action="store_true",
        help="add the built-in teachers (exact, noisy, sloppy; the default when no other teacher is given)",
    )
    p.add_argument("--per-task", type=int, default=8, help="suite items per task")
    p.add_argument("--seed", type=int, default=SUITE_SEED, help="suite seed")
    p.add_argument("--max-new-tokens", type=int, default=192)
    p.add_argument("--batch-size", type=int, default=16, help="prompts per generation batch")
    p.add_argument("--device", default="auto")
    p.add_argument("--out-dir", default="reports/task-eval")
    p.set_defaults(func=cmd_eval_tasks)
