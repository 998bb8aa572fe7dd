"""SODA on built-in data, end to end on a CPU (issue 24): a tiny student, the built-in teachers, a SODA run, and the
task-suite comparison of student (before / after SODA) vs teachers vs their ensemble.

    python3 reports/distill/run_experiment.py [--work-dir /tmp/felix-distill] [--student-steps 150] [--soda-steps 60]

Each stage is the `felix` command a user runs (printed before it runs); this script only chains them and writes
summary.json / summary.md / soda_curve.png / task-eval.* into reports/distill/.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

from felix.cli.main import main as felix_main
from felix.train.runs import read_metrics

HERE = Path(__file__).resolve().parent


def run(argv: list[str]) -> None:
    print("$ felix " + " ".join(argv), flush=True)
    t0 = time.perf_counter()
    code = felix_main(argv)
    print(f"  ({time.perf_counter() - t0:.0f}s, exit {code})", flush=True)
    if code:
        sys.exit(code)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work-dir", default="/tmp/felix-distill")
    ap.add_argument("--student-steps", type=int, default=150)
    ap.add_argument("--soda-steps", type=int, default=60)
    ap.add_argument("--soda-records", type=int, default=64)
    ap.add_argument("--per-task", type=int, default=6)
    ap.add_argument("--max-new-tokens", type=int, default=160)
    ap.add_argument("--seq-len", type=int, default=192)
    ap.add_argument("--nll-weight", type=float, default=1.0, help="the anchored arm's --nll-weight")
    a = ap.parse_args()
    work = Path(a.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    student = work / "student"
    arms = {"soda": ["--nll-weight", "0"], "soda-nll": ["--nll-weight", str(a.nll_weight)]}
    # 1. a weak student: the tiny preset on the task records alone, briefly (room left to learn)
    run(
        [
            "train",
            "--preset",
            "tiny",
            "--no-prose",
            "--n-records",
            "2000",
            "--seq-len",
            str(a.seq_len),
            "--batch-size",
            "8",
            "--steps",
            str(a.student_steps),
            "--warmup-steps",
            str(min(10, a.student_steps // 2)),
            "--eval-every",
            "50",
            "--eval-batches",
            "2",
            "--device",
            "cpu",
            "--out-dir",
            str(student),
        ]
    )
    # 2. SODA from it, on the built-in teachers (exact, noisy, sloppy) over task records: DPO alone, and DPO with
    #    the NLL anchor on the chosen responses
    for arm, extra in arms.items():
        run(
            [
                "train",
                "--soda",
                "--init-from",
                str(student / "checkpoint"),
                "--n-records",
                str(a.soda_records),
                "--steps",
                str(a.soda_steps),
                "--batch-size",
                "8",
                "--eval-every",
                "10",
                "--max-new-tokens",
                str(a.max_new_tokens),
                "--device",
                "cpu",
                "--out-dir",
                str(work / arm),
                *extra,
            ]
        )
    # 3. the task suite: student before / after SODA vs the built-in teachers and their ensemble
    run(
        [
            "eval-tasks",
            "--student",
            f"student={student / 'checkpoint'}",
            *[x for arm in arms for x in ("--student", f"student+{arm}={work / arm / 'checkpoint'}")],
            "--builtin-teachers",
            "--per-task",
            str(a.per_task),
            "--max-new-tokens",
            str(a.max_new_tokens),
            "--device",
            "cpu",
            "--out-dir",
            str(HERE),
        ]
    )
    for name in ("teacher-agreement.json", "teacher-agreement.md", "teacher-agreement.png"):
        shutil.copy(work / "soda" / name, HERE / name)
    for arm in arms:
        shutil.copy(work / arm / "soda_curve.png", HERE / f"{arm}_curve.png")
    metrics = {arm: read_metrics(work / arm) for arm in arms}
    soda_summary = {arm: json.loads((work / arm / "soda.json").read_text()) for arm in arms}
    task = json.loads((HERE / "task-eval.json").read_text())
    summary = {
        "command": "python3 reports/distill/run_experiment.py " + " ".join(sys.argv[1:]),
        "wall_seconds": round(time.perf_counter() - t_start),
        "soda": {
            arm: {
                "nll_weight": soda_summary[arm]["config"]["nll_weight"],
                "pairs": soda_summary[arm]["pairs"],
                "skipped": soda_summary[arm]["skipped"],
                "selected": soda_summary[arm]["selected"],
                "metrics": metrics[arm],
            }
            for arm in arms
        },
        "task_eval": {
            n: {k: s[k] for k in ("role", "mean_joint", "joint_min", "worst_task", "compliance")}
            | {
                "per_task": {
                    t: {"joint": v["joint"], "compliant": v["compliant"], "items": v["items"]}
                    for t, v in s["per_task"].items()
                }
            }
            for n, s in task["systems"].items()
        },
    }
    (HERE / "summary.json").write_text(json.dumps(summary, indent=1))
    lines = ["# SODA on built-in data: summary", "", f"`{summary['command']}` ({summary['wall_seconds']} s)", ""]
    for arm in arms:
        sm = soda_summary[arm]
        lines += [
            f"## {arm} (--nll-weight {sm['config']['nll_weight']:g})",
            "",
            f"Pairs: {sm['pairs']}, skipped {sm['skipped']}; chosen teacher per prompt: {sm['selected']}.",
            "",
            "| step | train DPO loss | train reward margin | held-out reward margin | held-out accuracy | "
            "held-out log p chosen | held-out log p rejected |",
            "|---|---|---|---|---|---|---|",
        ]
        for m in metrics[arm]:
            lines.append(
                f"| {m['step']} | {m.get('train_dpo_loss', float('nan')):.4f} | "
                f"{m.get('train_reward_margin', float('nan')):.3f} | {m['val_reward_margin']:.3f} | "
                f"{m['val_accuracy']:.2f} | {m['val_chosen_logp']:.1f} | {m['val_rejected_logp']:.1f} |"
            )
        lines += ["", f"![{arm} curves]({arm}_curve.png)", ""]
    lines += [
        "## Task suite",
        "",
        "| system | role | mean rubric | joint-min (worst task) | compliance |",
        "|---|---|---|---|---|",
    ]
    for n, s in task["systems"].items():
        lines.append(
            f"| {n} | {s['role']} | {s['mean_joint']:.2f} | {s['joint_min']:.2f} ({s['worst_task']}) | "
            f"{100 * s['compliance']:.0f}% |"
        )
    lines += ["", "Per task: task-eval.md / task-eval.png."]
    (HERE / "summary.md").write_text("\n".join(lines) + "\n")
    print(f"done in {summary['wall_seconds']} s; {HERE / 'summary.md'}")


if __name__ == "__main__":
    main()
