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

HERE = Path(__file__).resolve().parent


def run(argv: list[str]) -> None:
    from felix.cli import main

    print("$ felix " + " ".join(argv), flush=True)
    t0 = time.perf_counter()
    code = main(argv)
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
    a = ap.parse_args()
    work = Path(a.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    student, soda = work / "student", work / "soda"
    # 1. a weak student: the tiny preset on the task records alone, briefly (room left to learn)
    run(["train", "--preset", "tiny", "--no-prose", "--n-records", "2000", "--seq-len", str(a.seq_len),
         "--batch-size", "8", "--steps", str(a.student_steps), "--warmup-steps", str(min(10, a.student_steps // 2)), "--eval-every", "50",
         "--eval-batches", "2", "--device", "cpu", "--out-dir", str(student)])
    # 2. SODA from it, on the built-in teachers (exact, noisy, sloppy) over task records
    run(["train", "--soda", "--init-from", str(student / "checkpoint"), "--n-records", str(a.soda_records),
         "--steps", str(a.soda_steps), "--batch-size", "8", "--eval-every", "10", "--max-new-tokens",
         str(a.max_new_tokens), "--device", "cpu", "--out-dir", str(soda)])
    # 3. the task suite: student before / after SODA vs the built-in teachers and their ensemble
    run(["eval-tasks", "--student", f"student={student / 'checkpoint'}", "--student", f"student+soda={soda / 'checkpoint'}",
         "--builtin-teachers", "--per-task", str(a.per_task), "--max-new-tokens", str(a.max_new_tokens),
         "--device", "cpu", "--out-dir", str(HERE)])
    for name in ("soda_curve.png", "teacher-agreement.json", "teacher-agreement.md", "teacher-agreement.png"):
        shutil.copy(soda / name, HERE / name)
    metrics = [json.loads(s) for s in (soda / "metrics.jsonl").read_text().splitlines()]
    soda_summary = json.loads((soda / "soda.json").read_text())
    task = json.loads((HERE / "task-eval.json").read_text())
    summary = {"command": "python3 reports/distill/run_experiment.py " + " ".join(sys.argv[1:]),
               "wall_seconds": round(time.perf_counter() - t_start),
               "soda": {"pairs": soda_summary["pairs"], "skipped": soda_summary["skipped"],
                        "selected": soda_summary["selected"], "metrics": metrics},
               "task_eval": {n: {k: s[k] for k in ("role", "mean_joint", "joint_min", "worst_task", "compliance")}
                             | {"per_task": {t: {"joint": v["joint"], "compliant": v["compliant"], "items": v["items"]}
                                             for t, v in s["per_task"].items()}}
                             for n, s in task["systems"].items()}}
    (HERE / "summary.json").write_text(json.dumps(summary, indent=1))
    first, last = metrics[0], metrics[-1]
    lines = ["# SODA on built-in data: summary", "", f"`{summary['command']}` ({summary['wall_seconds']} s)", "",
             f"Pairs: {soda_summary['pairs']}, skipped {soda_summary['skipped']}; chosen teacher per prompt: "
             f"{soda_summary['selected']}.", "",
             "| step | train DPO loss | train reward margin | held-out reward margin | held-out accuracy | "
             "held-out log p chosen | held-out log p rejected |", "|---|---|---|---|---|---|---|"]
    for m in metrics:
        lines.append(f"| {m['step']} | {m.get('train_dpo_loss', float('nan')):.4f} | "
                     f"{m.get('train_reward_margin', float('nan')):.3f} | {m['val_reward_margin']:.3f} | "
                     f"{m['val_accuracy']:.2f} | {m['val_chosen_logp']:.1f} | {m['val_rejected_logp']:.1f} |")
    lines += ["", f"Held-out reward margin {first['val_reward_margin']:.3f} -> {last['val_reward_margin']:.3f}.", "",
              "Task suite: see task-eval.md.", "", "![SODA curves](soda_curve.png)"]
    (HERE / "summary.md").write_text("\n".join(lines) + "\n")
    print(f"done in {summary['wall_seconds']} s; {HERE / 'summary.md'}")


if __name__ == "__main__":
    main()
