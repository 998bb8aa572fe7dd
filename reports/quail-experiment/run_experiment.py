"""The QUAIL on/off experiment, end to end: train the same small model twice (identical seed, data, steps; only
`--lambda-q` differs), run the fidelity harness on both for rq4, iq4_nl, q4_0 and tq2_0, and write the side-by-side
summary (summary.md, summary.json, comparison.png) next to this script. Each seed is one pair of runs; the
per-run reports (JSON, Markdown, plots) go to seed<N>/off and seed<N>/on.

    python reports/quail-experiment/run_experiment.py                # ~1 h on a 2-core CPU, most of it training
    python reports/quail-experiment/run_experiment.py --seeds 0 1 2  # more pairs

Checkpoints stay in --work-dir (not committed: 20 MB each). A checkpoint already present there is reused.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from felix.ship.llamacpp import available
from felix.train.runs import read_metrics
from felix.verify import fidelity

HERE = Path(__file__).resolve().parent
FORMATS = ("rq4", "iq4_nl", "q4_0", "tq2_0")
# Identical except --lambda-q. tiny-256: every row length divides 256, so TQ2_0 (256-element blocks) applies to
# every matrix, as it does for the real model.
TRAIN_ARGS = ["--preset", "tiny-256", "--steps", "300", "--warmup-steps", "30", "--eval-every", "100"]
ARMS = {"off": ["--lambda-q", "0"], "on": ["--lambda-q", "0.1", "--margin", "1.0"]}


def train(arm: str, seed: int, work: Path) -> Path:
    run_dir = work / f"seed{seed}" / arm
    ckpt = run_dir / "checkpoint"
    if (ckpt / "model.safetensors").exists():
        print(f"[seed {seed} {arm}] reusing {ckpt}", flush=True)
        return ckpt
    cmd = [
        sys.executable,
        "-m",
        "felix",
        "train",
        *TRAIN_ARGS,
        "--seed",
        str(seed),
        *ARMS[arm],
        "--out-dir",
        str(run_dir),
    ]
    print(f"[seed {seed} {arm}] {' '.join(cmd)}", flush=True)
    subprocess.run(cmd, check=True)
    return ckpt


def last_eval(run_dir: Path) -> dict:
    rows = read_metrics(run_dir)
    evals = [r for r in rows if r.get("val_ce") is not None]
    r = evals[-1]
    return {"step": r["step"], "val_ce": r["val_ce"], "val_hinge": r["val_hinge"], "train_ce": r["train_ce"]}


def row(seed: int, arm: str, quant: str, path: str, res: dict) -> dict:
    s, m = res["summary"], res["summary"]["margin"]
    out = {
        "seed": seed,
        "arm": arm,
        "quant": quant,
        "path": path,
        "whitelisted": s["whitelisted_positions"],
        "reference_correct": m["reference_correct"],
        "survived": m["survived"],
        "survival": m["survival"],
        "low_reference_correct": m["low_reference_correct"],
        "low_survived": m["low_survived"],
        "flips": m["flips"],
        "lost": m["lost"],
        "gained": m["gained"],
        "margin_ref_mean": m["reference_mean"],
        "margin_quant_mean": m["quantized_mean"],
        "margin_change_mean": m["change_mean"],
        "margin_change_p01": m["change_p01"],
        "kl_mean": s["kl"]["mean"],
        "kl_p99": s["kl"]["p99"],
        "kl_max": s["kl"]["max"],
        "top1_agreement": s["top1_agreement"],
        "delta_p_rms": s["delta_p"]["rms"],
    }
    if "compliance" in res:
        c = res["compliance"]
        out.update(
            compliant_ref=c["reference"]["compliant"],
            compliant_quant=c["quantized"]["compliant"],
            valid_json_ref=c["reference"]["valid_json"],
            valid_json_quant=c["quantized"]["valid_json"],
            probes=c["quantized"]["probes"],
        )
    return out


SUMMED = (
    "reference_correct",
    "survived",
    "low_reference_correct",
    "low_survived",
    "flips",
    "lost",
    "gained",
    "compliant_ref",
    "compliant_quant",
    "valid_json_ref",
    "valid_json_quant",
    "probes",
)
AVERAGED = (
    "margin_ref_mean",
    "margin_quant_mean",
    "margin_change_mean",
    "margin_change_p01",
    "kl_mean",
    "kl_p99",
    "top1_agreement",
)


def pooled(rows: list[dict]) -> list[dict]:
    """Per (format, path, arm): counts summed over seeds, the other numbers averaged."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["quant"], r["path"], r["arm"]), []).append(r)
    out = []
    for (quant, path, arm), rs in groups.items():
        p = {"quant": quant, "path": path, "arm": arm, "seeds": len(rs)}
        p.update({k: sum(r[k] for r in rs) for k in SUMMED if all(k in r for r in rs)})
        p.update({k: sum(r[k] for r in rs) / len(rs) for k in AVERAGED})
        p["survival"] = p["survived"] / p["reference_correct"] if p["reference_correct"] else float("nan")
        p["low_survival"] = p["low_survived"] / p["low_reference_correct"] if p["low_reference_correct"] else 1.0
        out.append(p)
    return out


def _table(rows: list[dict], with_seed: bool) -> list[str]:
    lines = [
        ("| seed " if with_seed else "")
        + "| format | path | arm | ref. correct | survived | survival | low-margin (<1) survived | flips "
        "(lost/gained) | mean margin ref -> quant | margin change p01 | KL mean | KL p99 | top-1 agr. | "
        "schema-compliant ref -> quant | valid JSON ref -> quant |",
        ("|---" if with_seed else "") + "|---" * 15 + "|",
    ]
    for r in rows:
        comp = f"{r['compliant_ref']} -> {r['compliant_quant']} / {r['probes']}" if "probes" in r else "-"
        vj = f"{r['valid_json_ref']} -> {r['valid_json_quant']}" if "probes" in r else "-"
        lines.append(
            (f"| {r['seed']} " if with_seed else "")
            + f"| {r['quant']} | {r['path']} | {r['arm']} | {r['reference_correct']} | {r['survived']} | "
            f"{r['survival']:.4f} | {r['low_survived']}/{r['low_reference_correct']} | {r['flips']} "
            f"({r['lost']}/{r['gained']}) | {r['margin_ref_mean']:.2f} -> {r['margin_quant_mean']:.2f} | "
            f"{r['margin_change_p01']:.3f} | {r['kl_mean']:.5f} | {r['kl_p99']:.5f} | {r['top1_agreement']:.4f} | "
            f"{comp} | {vj} |"
        )
    return lines


def markdown(rows: list[dict], training: list[dict], agreement: list[dict], seeds: list[int]) -> str:
    lines = [
        "# QUAIL on/off: summary (generated by run_experiment.py)",
        "",
        f"Training: tiny-256 (2 x 256, 1.7M parameters), 300 steps, built-in data; per seed the two arms are "
        f"identical except QUAIL (on = lambda 0.1, margin 1.0). Seeds: {', '.join(map(str, seeds))}.",
        "",
        "| seed | arm | val CE | val hinge (m=1) | train CE |",
        "|---|---|---|---|---|",
    ]
    for t in training:
        lines.append(f"| {t['seed']} | {t['arm']} | {t['val_ce']:.3f} | {t['val_hinge']:.3f} | {t['train_ce']:.3f} |")
    lines += [
        "",
        f"## Pooled over {len(seeds)} seed(s) (counts summed, the rest averaged)",
        "",
        "Whitelisted decisions = every probe position whose expected token is whitelisted (teacher-forced); "
        "schema compliance = greedy generations of the probes, checked against their schema.",
        "",
    ]
    lines += _table(pooled(rows), with_seed=False)
    lines += ["", "## Per seed", ""] + _table(rows, with_seed=True)
    if agreement:
        lines += [
            "",
            "## Simulated vs runtime (llama.cpp) on the same quantized model",
            "",
            "| seed | format | arm | top-1 agreement | max rel. err | max abs margin diff | decision disagreements |",
            "|---|---|---|---|---|---|---|",
        ]
        for a in agreement:
            lines.append(
                f"| {a['seed']} | {a['quant']} | {a['arm']} | {a['top1_agreement']:.4f} | "
                f"{a['max_rel_err']:.4f} | {a['margin_abs_diff_max']:.4f} | {a['decision_disagreements']} |"
            )
    lines += ["", "![comparison](comparison.png)", ""]
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib  # heavy optional dependency (the plot only); the Agg backend is chosen before pyplot loads

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sim = [r for r in pooled(rows) if r["path"] == "simulated"]
    metrics = [
        ("flips", "flipped whitelisted decisions"),
        ("margin_change_p01", "margin change, 1st percentile"),
        ("kl_mean", "KL mean (nats)"),
        ("compliant_quant", "schema-compliant generations (quantized)"),
    ]
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.3 * len(metrics), 3.6))
    width = 0.38
    for ax, (key, label) in zip(axes, metrics):
        for k, (arm, color) in enumerate((("off", "tab:gray"), ("on", "tab:blue"))):
            vals = [next(r[key] for r in sim if r["arm"] == arm and r["quant"] == q) for q in FORMATS]
            ax.bar([i + (k - 0.5) * width for i in range(len(FORMATS))], vals, width, label=f"QUAIL {arm}", color=color)
        ax.set_xticks(range(len(FORMATS)), FORMATS)
        ax.set_title(label, fontsize=10)
    axes[0].legend()
    seeds = sim[0]["seeds"]
    fig.suptitle(f"QUAIL on vs off, simulated path, pooled over {seeds} seed(s) (same data and steps per seed)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="one pair of runs per seed")
    ap.add_argument(
        "--work-dir", default="/tmp/felix-quail-experiment", help="training runs and checkpoints (reused when present)"
    )
    ap.add_argument("--out-dir", default=str(HERE), help="where the reports go (default: next to this script)")
    ap.add_argument("--no-runtime", action="store_true", help="skip the llama.cpp runtime path")
    args = ap.parse_args()

    work, out = Path(args.work_dir), Path(args.out_dir)
    rows, agreement, training = [], [], []
    for seed in args.seeds:
        for arm in ARMS:
            ckpt = train(arm, seed, work)
            training.append({"seed": seed, "arm": arm, **last_eval(ckpt.parent)})
            cache = {}
            for quant in FORMATS:
                runs = not args.no_runtime and available(fidelity.runtime_of(quant))[0]  # rq4: the fork
                paths = ("simulated",) + (("runtime",) if runs else ())
                print(f"[seed {seed} {arm}] fidelity {quant} ({', '.join(paths)})", flush=True)
                opts = fidelity.FidelityOptions(quant=quant, paths=paths, progress=True)
                report = fidelity.run_fidelity(ckpt, opts, cache)
                report["checkpoint"] = f"seed {seed}, QUAIL {arm} (see run_experiment.py)"
                fidelity.write_report(report, out / f"seed{seed}" / arm)
                rows += [row(seed, arm, quant, p, res) for p, res in report["results"].items()]
                if report.get("agreement"):
                    agreement.append({"seed": seed, "arm": arm, "quant": quant, **report["agreement"]})
    rows.sort(key=lambda r: (FORMATS.index(r["quant"]), r["path"] != "simulated", r["seed"], r["arm"] != "off"))
    (out / "summary.json").write_text(
        json.dumps(
            {
                "train_args": TRAIN_ARGS,
                "arms": ARMS,
                "seeds": args.seeds,
                "training": training,
                "rows": rows,
                "pooled": pooled(rows),
                "agreement": agreement,
            },
            indent=1,
        )
    )
    plot(rows, out / "comparison.png")
    (out / "summary.md").write_text(markdown(rows, training, agreement, args.seeds))
    print(f"wrote {out / 'summary.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
