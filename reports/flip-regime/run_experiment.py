"""The flip regime: decisions whose margins are small because the data makes them hard, 4-bit deployment, and
whether QUAIL keeps them. One command reproduces everything in this folder:

    python reports/flip-regime/run_experiment.py                 # 5 seeds x 3 arms, ~40 min on a 2-core CPU
    python reports/flip-regime/run_experiment.py --seeds 0 1 --steps 60 --work-dir /tmp/fr-smoke   # a smoke run

Data: felix.data's hedged principle abstraction (`--task principle-hedged`, structured records only): three
memories, two sharing a failure and one not, and a reviewer's note whose qualifier word ("clearly", "probably",
"loosely", ...) predicts `has_principle` with the reliability in felix.data.HEDGES (0.99 ... 0.08). The Bayes
margin of the majority answer is log(p / (1 - p)): 0.41-0.85 logits for the four borderline qualifiers.

Arms (per seed: the same data, tokenizer seed, steps and initialisation; only the loss differs):
  plain      --lambda-q 0
  quail      the QUAIL default (felix.quail.DEFAULT_MARGIN, DEFAULT_LAMBDA_Q)
  quail-cal  --margin-from <the plain arm's fidelity-rq4.json>: the margin measured from RQ4's margin noise
QAT arms (fake-quant STE) are not run: the QAT issue has not landed.

Each checkpoint is measured by `felix fidelity` (simulated path: PyTorch on the export policy's dequantized weights)
on the hedged probe set for rq4 (with greedy generations + schema compliance), q4_0 and iq4_nl. Statistics:
bootstrap over seeds, and over probe positions within each resampled seed, with fixed generator seeds. Outputs:
summary.json, summary.md and the plots next to this script; checkpoints and per-run reports stay in --work-dir.
"""
from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ARMS = ("plain", "quail", "quail-cal")
FORMATS = ("rq4", "q4_0", "iq4_nl")
COMPLIANCE_FORMATS = ("rq4",)
BORDERLINE = 1.0  # decision classes: Bayes margin of the qualifier below / above this many logits
MARGIN_BINS = (-math.inf, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, math.inf)
N_BOOT = 2000


def train_args(args) -> list[str]:
    return ["--preset", args.preset, "--task", "principle-hedged", "--no-prose", "--n-records", str(args.n_records),
            "--vocab-size", str(args.vocab_size), "--steps", str(args.steps), "--warmup-steps",
            str(max(1, args.steps // 10)), "--eval-every", str(args.steps), "--seq-len", "128", "--batch-size", "16",
            "--lr", str(args.lr)]


def arm_args(arm: str, plain_report: Path) -> list[str]:
    from felix.quail import DEFAULT_LAMBDA_Q, DEFAULT_MARGIN

    if arm == "plain":
        return ["--lambda-q", "0"]
    if arm == "quail":
        return ["--lambda-q", str(DEFAULT_LAMBDA_Q), "--margin", str(DEFAULT_MARGIN)]
    return ["--lambda-q", str(DEFAULT_LAMBDA_Q), "--margin-from", str(plain_report)]


def train(arm: str, seed: int, work: Path, args, plain_report: Path) -> Path:
    run_dir = work / f"seed{seed}" / arm
    ckpt = run_dir / "checkpoint"
    if (ckpt / "model.safetensors").exists():
        return ckpt
    cmd = [sys.executable, "-m", "felix", "train", *train_args(args), "--seed", str(seed),
           *arm_args(arm, plain_report), "--out-dir", str(run_dir)]
    log = run_dir.parent / f"{arm}-train.log"
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as f:
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT)
    if proc.returncode:
        raise SystemExit(f"training failed ({' '.join(cmd)}); see {log}")
    return ckpt


def training_record(run_dir: Path) -> dict:
    """The last evaluation of a run, and the QUAIL settings it trained with (the calibrated margin included)."""
    import torch

    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    last = [r for r in rows if r.get("val_ce") is not None][-1]
    cfg = torch.load(run_dir / "checkpoint" / "trainer_state.pt", map_location="cpu", weights_only=False)["train_config"]
    return {"val_ce": last["val_ce"], "val_hinge": last["val_hinge"], "train_ce": last["train_ce"],
            "step": last["step"], "margin": cfg["margin"], "lambda_q": cfg["lambda_q"]}


def fidelity(ckpt: Path, out: Path, n_probes: int, cache: dict) -> dict[str, dict]:
    from felix import fidelity as F

    reports = {}
    for quant in FORMATS:
        f = out / f"fidelity-{quant}.json"
        if f.exists():
            reports[quant] = json.loads(f.read_text())
            continue
        opts = F.FidelityOptions(quant=quant, paths=("simulated",), probe_set="hedged", n_probes=n_probes,
                                 sensitivity=False, compliance=quant in COMPLIANCE_FORMATS, progress=False)
        report = F.run_fidelity(ckpt, opts, cache)
        F.write_report(report, out)
        reports[quant] = json.loads(f.read_text())
    return reports


# ------------------------------------------------------------------------------------ extraction
def decision_rows(report: dict) -> list[dict]:
    """Per probe: the has_principle decision (the first true/false token of the expected answer)."""
    from felix.data import HEDGES, hedge_bayes_margin

    p_true = dict(HEDGES)
    res = report["results"]["simulated"]
    seen, rows = set(), []
    for p in res["positions"]:
        if p["probe"] in seen or p["text"].strip() not in ("true", "false"):
            continue
        seen.add(p["probe"])
        hedge = p["probe"].split("-")[1]
        rows.append({"probe": p["probe"], "hedge": hedge, "p_true": p_true[hedge],
                     "bayes_margin": hedge_bayes_margin(p_true[hedge]), "expected": p["text"].strip(),
                     "ref_margin": p["ref_margin"], "quant_margin": p["quant_margin"],
                     "runner_up": p["runner_up"].strip(), "runner_up_p_ref": p["runner_up_p_ref"],
                     "runner_up_log_ratio": p["runner_up_log_ratio"]})
    return rows


def structure_rows(report: dict) -> list[dict]:
    decisions = {(r["probe"]) for r in decision_rows(report)}
    first = {}
    for p in report["results"]["simulated"]["positions"]:
        if p["probe"] in decisions and p["text"].strip() in ("true", "false") and p["probe"] not in first:
            first[p["probe"]] = p["index"]
    return [{"probe": p["probe"], "ref_margin": p["ref_margin"], "quant_margin": p["quant_margin"]}
            for p in report["results"]["simulated"]["positions"] if first.get(p["probe"]) != p["index"]]


def compliance_rows(report: dict) -> list[dict]:
    c = report["results"]["simulated"].get("compliance")
    if not c:
        return []
    ref = {g["probe"]: g["compliant"] for g in c["generations"]["reference"]}
    return [{"probe": g["probe"], "ref": ref[g["probe"]], "quant": g["compliant"]} for g in c["generations"]["quantized"]]


# ------------------------------------------------------------------------------------ statistics
def bootstrap(per_seed: list[list[dict]], stat, rng: np.random.Generator, n_boot: int = N_BOOT,
              within: bool = True) -> dict:
    """Point estimate and 95% percentile interval of stat(rows), resampling seeds with replacement and, when
    `within`, the rows (probe positions) inside each resampled seed too."""
    point = stat([r for rows in per_seed for r in rows])
    vals = []
    k = len(per_seed)
    for _ in range(n_boot):
        rows = []
        for s in rng.integers(0, k, k):
            seed_rows = per_seed[s]
            if within and seed_rows:
                rows += [seed_rows[i] for i in rng.integers(0, len(seed_rows), len(seed_rows))]
            else:
                rows += seed_rows
        v = stat(rows)
        if v is not None and not (isinstance(v, float) and math.isnan(v)):
            vals.append(v)
    lo, hi = (float(np.percentile(vals, 2.5)), float(np.percentile(vals, 97.5))) if vals else (math.nan, math.nan)
    return {"value": point, "lo": lo, "hi": hi}


def survival(rows):
    correct = [r for r in rows if r["ref_margin"] > 0]
    return sum(r["quant_margin"] > 0 for r in correct) / len(correct) if correct else math.nan


def lost_rate(rows):
    return sum(r["ref_margin"] > 0 >= r["quant_margin"] for r in rows) / len(rows) if rows else math.nan


def ref_correct_rate(rows):
    return sum(r["ref_margin"] > 0 for r in rows) / len(rows) if rows else math.nan


def mean_of(key):
    return lambda rows: float(np.mean([r[key] for r in rows])) if rows else math.nan


# --------------------------------------------------------------------------------------- analysis
def analyse(raw: dict, seeds: list[int]) -> dict:
    rng = np.random.default_rng(20240518)
    out = {"arms": {}, "noise": {}, "paired": {}}
    for arm in ARMS:
        a = {"formats": {}}
        runs = [raw[seed][arm] for seed in seeds]
        a["training"] = {k: bootstrap([[{k: r["training"][k]}] for r in runs], mean_of(k), rng, within=False)
                         for k in ("val_ce", "val_hinge")}
        a["margin_used"] = [r["training"]["margin"] for r in runs]
        dec0 = [decision_rows(r["reports"]["rq4"]) for r in runs]
        a["reference"] = {
            cls: {"correct": bootstrap([[d for d in rows if sel(d)] for rows in dec0], ref_correct_rate, rng),
                  "margin_mean": bootstrap([[d for d in rows if sel(d) and d["ref_margin"] > 0] for rows in dec0],
                                           mean_of("ref_margin"), rng)}
            for cls, sel in CLASSES.items()}
        for quant in FORMATS:
            reps = [r["reports"][quant] for r in runs]
            dec = [decision_rows(x) for x in reps]
            struct = [structure_rows(x) for x in reps]
            f = {}
            for cls, sel in CLASSES.items():
                rows = [[d for d in seed_rows if sel(d)] for seed_rows in dec]
                f[cls] = {"n": sum(map(len, rows)), "ref_correct": sum(d["ref_margin"] > 0 for x in rows for d in x),
                          "lost": sum(d["ref_margin"] > 0 >= d["quant_margin"] for x in rows for d in x),
                          "gained": sum(d["ref_margin"] <= 0 < d["quant_margin"] for x in rows for d in x),
                          "survival": bootstrap(rows, survival, rng), "lost_rate": bootstrap(rows, lost_rate, rng)}
            f["structure"] = {"n": sum(map(len, struct)),
                              "ref_correct": sum(d["ref_margin"] > 0 for x in struct for d in x),
                              "lost": sum(d["ref_margin"] > 0 >= d["quant_margin"] for x in struct for d in x),
                              "survival": bootstrap(struct, survival, rng)}
            summaries = [x["results"]["simulated"]["summary"] for x in reps]
            f["all_whitelisted"] = {
                "flips": sum(s["margin"]["flips"] for s in summaries),
                "lost": sum(s["margin"]["lost"] for s in summaries),
                "reference_correct": sum(s["margin"]["reference_correct"] for s in summaries),
                "survival": bootstrap([d + s for d, s in zip(dec, struct)], survival, rng),
                "kl_mean": bootstrap([[{"v": s["kl"]["mean"]}] for s in summaries], mean_of("v"), rng, within=False),
                "change_p01": [s["margin"]["change_quantiles"]["0.01"] for s in summaries]}
            minority = [[{"v": d["runner_up_log_ratio"], "p": d["runner_up_p_ref"]} for d in rows
                         if d["ref_margin"] > 0 and d["runner_up"] in ("true", "false")] for rows in dec]
            f["minority"] = {}
            for name, lo, hi in (("p_ref < 0.01", 0, 0.01), ("0.01 <= p_ref < 0.1", 0.01, 0.1),
                                 ("0.1 <= p_ref < 0.5", 0.1, 0.5)):
                rows = [[m for m in x if lo <= m["p"] < hi] for x in minority]
                f["minority"][name] = {"n": sum(map(len, rows)), "log_ratio": bootstrap(rows, mean_of("v"), rng),
                                       "p_ref_median": float(np.median([m["p"] for x in rows for m in x]))
                                       if any(rows) else math.nan}
            comp = [compliance_rows(x) for x in reps]
            if any(comp):
                f["compliance"] = {"probes": sum(map(len, comp)),
                                   "ref": bootstrap(comp, mean_of("ref"), rng),
                                   "quant": bootstrap(comp, mean_of("quant"), rng),
                                   "ref_count": sum(c["ref"] for x in comp for c in x),
                                   "quant_count": sum(c["quant"] for x in comp for c in x)}
            a["formats"][quant] = f
        out["arms"][arm] = a
    # the measured RQ4 noise (plain arm): per-position margin change at whitelisted positions
    for quant in FORMATS:
        qs = [raw[s]["plain"]["reports"][quant]["results"]["simulated"]["summary"]["margin"]["change_quantiles"]
              for s in seeds]
        out["noise"][quant] = {k: [q[k] for q in qs] for k in qs[0]}
    # paired (same seed) differences against the plain arm, bootstrap over seeds
    for arm in ARMS[1:]:
        pairs = []
        for s in seeds:
            p, a = raw[s]["plain"], raw[s][arm]
            dp, da = decision_rows(p["reports"]["rq4"]), decision_rows(a["reports"]["rq4"])
            pairs.append([{"d_val_ce": a["training"]["val_ce"] - p["training"]["val_ce"],
                           "d_lost": lost_rate([d for d in da if d["bayes_margin"] < BORDERLINE])
                           - lost_rate([d for d in dp if d["bayes_margin"] < BORDERLINE])}])
        out["paired"][arm] = {k: bootstrap(pairs, mean_of(k), rng, within=False) for k in ("d_val_ce", "d_lost")}
    return out


CLASSES = {"borderline": lambda d: d["bayes_margin"] < BORDERLINE,
           "confident": lambda d: d["bayes_margin"] >= BORDERLINE}


# ----------------------------------------------------------------------------------------- output
def _ci(b, nd=3, pct=False):
    if b is None or b["value"] is None or (isinstance(b["value"], float) and math.isnan(b["value"])):
        return "n/a"
    k = 100 if pct else 1
    return f"{k * b['value']:.{nd}f} [{k * b['lo']:.{nd}f}, {k * b['hi']:.{nd}f}]"


def markdown(summary: dict, meta: dict) -> str:
    from felix.data import HEDGES, hedge_bayes_margin

    s, seeds = summary, meta["seeds"]
    L = ["# Flip regime: summary (generated by run_experiment.py)", "",
         f"Seeds {', '.join(map(str, seeds))}; per seed and arm: `felix train {' '.join(meta['train_args'])}`; "
         f"fidelity on {meta['n_probes']} hedged probes per model (simulated path). Wall time {meta['wall_s'] / 60:.1f} "
         f"min. Brackets: 95% bootstrap intervals ({N_BOOT} resamples of seeds, and of probes within each seed; "
         f"validation CE and KL over seeds only). QAT arms: not run (the QAT issue has not landed).", "",
         "Qualifiers (P(has_principle = true), Bayes margin of the majority answer): "
         + ", ".join(f"{h} ({p:g}, {hedge_bayes_margin(p):.2f})" for h, p in HEDGES)
         + f". Borderline decisions: Bayes margin < {BORDERLINE:g} logit.", "",
         "## Measured 4-bit margin noise (plain arm, all whitelisted positions, per seed)", "",
         "| format | q0.001 | q0.01 | q0.05 | q0.1 | median |", "|---|---|---|---|---|---|"]
    for quant, q in s["noise"].items():
        L.append(f"| {quant} | " + " | ".join(", ".join(f"{v:+.3f}" for v in q[k]) for k in
                                             ("0.001", "0.01", "0.05", "0.1", "0.5")) + " |")
    L += ["", "## Training and the reference (unquantized) decisions", "",
          "| arm | QUAIL margin per seed | val CE | val hinge | borderline: ref. correct | borderline: mean correct "
          "margin | confident: ref. correct | confident: mean correct margin |", "|---|---|---|---|---|---|---|---|"]
    for arm, a in s["arms"].items():
        m = ", ".join("-" if x is None or arm == "plain" else f"{x:.3f}" for x in a["margin_used"])
        r = a["reference"]
        L.append(f"| {arm} | {m} | {_ci(a['training']['val_ce'])} | {_ci(a['training']['val_hinge'])} | "
                 f"{_ci(r['borderline']['correct'])} | {_ci(r['borderline']['margin_mean'])} | "
                 f"{_ci(r['confident']['correct'])} | {_ci(r['confident']['margin_mean'])} |")
    for quant in FORMATS:
        L += ["", f"## {quant}", "",
              "| arm | borderline lost / ref. correct | borderline survival | confident lost / ref. correct | "
              "confident survival | structure lost / ref. correct | structure survival | all whitelisted: flips "
              "(lost) | KL mean | schema-compliant ref -> quant |", "|---|---|---|---|---|---|---|---|---|---|"]
        for arm, a in s["arms"].items():
            f = a["formats"][quant]
            c = f.get("compliance")
            comp = (f"{c['ref_count']} -> {c['quant_count']} / {c['probes']} ({_ci(c['quant'], 1, True)} %)"
                    if c else "-")
            L.append(f"| {arm} | {f['borderline']['lost']} / {f['borderline']['ref_correct']} | "
                     f"{_ci(f['borderline']['survival'])} | {f['confident']['lost']} / {f['confident']['ref_correct']} | "
                     f"{_ci(f['confident']['survival'])} | {f['structure']['lost']} / {f['structure']['ref_correct']} | "
                     f"{_ci(f['structure']['survival'], 4)} | {f['all_whitelisted']['flips']} "
                     f"({f['all_whitelisted']['lost']}) | {_ci(f['all_whitelisted']['kl_mean'], 5)} | {comp} |")
        L += ["", f"Minority option at the decision ({quant}): the reference's runner-up (`true`/`false`, the answer "
                  "not expected), log p_quant / p_ref, mean over decisions:", "",
              "| arm | " + " | ".join(s["arms"]["plain"]["formats"][quant]["minority"]) + " |",
              "|---|" + "---|" * len(s["arms"]["plain"]["formats"][quant]["minority"])]
        for arm, a in s["arms"].items():
            L.append(f"| {arm} | " + " | ".join(
                f"n {b['n']}, p_ref median {b['p_ref_median']:.4f}: {_ci(b['log_ratio'], 4)}"
                if b["n"] else "n 0" for b in a["formats"][quant]["minority"].values()) + " |")
    L += ["", "## Paired against the plain arm (same seed; rq4; bootstrap over seeds)", "",
          "| arm | delta val CE | delta borderline lost rate (per decision) |", "|---|---|---|"]
    for arm, p in s["paired"].items():
        L.append(f"| {arm} | {_ci(p['d_val_ce'], 4)} | {_ci(p['d_lost'], 4)} |")
    L += ["", "## Per qualifier (rq4): decisions lost / reference-correct, and mean reference margin", "",
          "| qualifier | P(true) | Bayes margin | " + " | ".join(ARMS) + " |", "|---|---|---|" + "---|" * len(ARMS)]
    for h, p in HEDGES:
        cells = []
        for arm in ARMS:
            q = summary["per_hedge"][arm][h]
            cells.append(f"{q['lost']} / {q['ref_correct']} of {q['n']} (margin {q['ref_margin_mean']:+.2f})")
        L.append(f"| {h} | {p:g} | {hedge_bayes_margin(p):.2f} | " + " | ".join(cells) + " |")
    L += ["", "![survival vs reference margin](survival_vs_margin.png)", "", "![cost vs benefit](cost_benefit.png)",
          "", "![plain-arm margins vs RQ4 noise](margins_vs_noise.png)", ""]
    return "\n".join(L)


def per_hedge(raw: dict, seeds: list[int]) -> dict:
    from felix.data import HEDGES

    out = {}
    for arm in ARMS:
        rows = [d for s in seeds for d in decision_rows(raw[s][arm]["reports"]["rq4"])]
        out[arm] = {}
        for h, _ in HEDGES:
            r = [d for d in rows if d["hedge"] == h]
            out[arm][h] = {"n": len(r), "ref_correct": sum(d["ref_margin"] > 0 for d in r),
                           "lost": sum(d["ref_margin"] > 0 >= d["quant_margin"] for d in r),
                           "ref_margin_mean": float(np.mean([d["ref_margin"] for d in r])) if r else math.nan}
    return out


def plots(raw: dict, summary: dict, seeds: list[int], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"plain": "tab:gray", "quail": "tab:blue", "quail-cal": "tab:orange"}
    rng = np.random.default_rng(7)
    # 1. survival vs reference margin (all whitelisted positions, rq4), binned, per arm
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    centers = list(range(len(MARGIN_BINS) - 1))
    labels = [f"{lo:g}-{hi:g}" if lo > -math.inf else f"<{hi:g}" for lo, hi in zip(MARGIN_BINS[:-1], MARGIN_BINS[1:])]
    for ax, which in zip(axes, ("decisions", "all whitelisted")):
        for k, arm in enumerate(ARMS):
            ys, los, his = [], [], []
            for lo, hi in zip(MARGIN_BINS[:-1], MARGIN_BINS[1:]):
                per_seed = []
                for s in seeds:
                    rep = raw[s][arm]["reports"]["rq4"]
                    rows = decision_rows(rep) + (structure_rows(rep) if which != "decisions" else [])
                    per_seed.append([r for r in rows if r["ref_margin"] > 0 and lo <= r["ref_margin"] < hi])
                b = bootstrap(per_seed, survival, rng, n_boot=400)
                ys.append(b["value"])
                los.append(b["value"] - b["lo"] if not math.isnan(b["value"]) else 0)
                his.append(b["hi"] - b["value"] if not math.isnan(b["value"]) else 0)
            x = [c + (k - 1) * 0.22 for c in centers]
            ax.errorbar(x, ys, yerr=[los, his], fmt="o", color=colors[arm], label=arm, capsize=2, ms=4)
        ax.set_xticks(centers, labels, rotation=30, fontsize=8)
        ax.set(xlabel="reference margin (logits)", ylabel="survival under rq4", ylim=(-0.05, 1.05),
               title=f"rq4 survival vs reference margin: {which}")
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(out / "survival_vs_margin.png", dpi=100)
    plt.close(fig)
    # 2. cost (validation CE) vs benefit (borderline decisions lost under rq4)
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for arm in ARMS:
        a = summary["arms"][arm]
        ce, lost = a["training"]["val_ce"], a["formats"]["rq4"]["borderline"]["lost_rate"]
        ax.errorbar([ce["value"]], [lost["value"]], xerr=[[ce["value"] - ce["lo"]], [ce["hi"] - ce["value"]]],
                    yerr=[[lost["value"] - lost["lo"]], [lost["hi"] - lost["value"]]], fmt="o", color=colors[arm],
                    label=arm, capsize=3)
    ax.set(xlabel="validation CE (nats/token): cost", ylabel="borderline decisions lost under rq4 (fraction)",
           title="cost vs benefit (95% bootstrap intervals)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "cost_benefit.png", dpi=100)
    plt.close(fig)
    # 3. plain-arm decision margins against the measured rq4 margin change
    fig, ax = plt.subplots(figsize=(7, 4.2))
    ref = [d["ref_margin"] for s in seeds for d in decision_rows(raw[s]["plain"]["reports"]["rq4"])]
    change = [-(p["quant_margin"] - p["ref_margin"]) for s in seeds
              for p in raw[s]["plain"]["reports"]["rq4"]["results"]["simulated"]["positions"]]
    bins = np.linspace(min(-1.0, min(ref)), max(6.0, max(ref)), 50)
    ax.hist(ref, bins=bins, alpha=0.6, color="tab:gray", label="plain: reference margin at the decisions")
    ax2 = ax.twinx()
    ax2.hist(change, bins=bins, alpha=0.4, color="tab:red", label="rq4: margin lost (reference - quantized), "
                                                                  "all whitelisted positions")
    for q in summary["noise"]["rq4"]["0.01"]:
        ax.axvline(-q, color="tab:red", lw=0.8, ls="--")
    ax.set(xlabel="logits", ylabel="decisions", title="plain arm: decision margins vs rq4 margin noise "
                                                     "(dashed: |p01| per seed)")
    ax2.set_ylabel("whitelisted positions")
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    ax.legend(h1 + h2, l1 + l2, fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "margins_vs_noise.png", dpi=100)
    plt.close(fig)


def _clean(x):
    if isinstance(x, float) and (math.isnan(x) or math.isinf(x)):
        return None
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    if isinstance(x, np.generic):
        return x.item()
    return x


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--steps", type=int, default=500)
    ap.add_argument("--lr", type=float, default=6e-3)
    ap.add_argument("--n-records", type=int, default=8000)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--vocab-size", type=int, default=512)
    ap.add_argument("--n-probes", type=int, default=48, help="hedged probes per model (same number per qualifier)")
    ap.add_argument("--work-dir", default="runs/flip-regime", help="checkpoints and per-run reports (reused)")
    ap.add_argument("--out-dir", default=str(HERE), help="summary.json, summary.md and plots (default: here)")
    args = ap.parse_args()
    from tqdm import tqdm

    work, out = Path(args.work_dir), Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    raw: dict = {}
    jobs = [(s, arm) for s in args.seeds for arm in ARMS]
    for seed, arm in tqdm(jobs, desc="flip regime (train + fidelity)", unit="run"):
        plain_report = work / f"seed{seed}" / "plain" / "fidelity" / "fidelity-rq4.json"
        ckpt = train(arm, seed, work, args, plain_report)
        reports = fidelity(ckpt, ckpt.parent / "fidelity", args.n_probes, {})
        raw.setdefault(seed, {})[arm] = {"training": training_record(ckpt.parent), "reports": reports}
        tqdm.write(f"seed {seed} {arm}: val CE {raw[seed][arm]['training']['val_ce']:.4f}, rq4 "
                   f"{reports['rq4']['results']['simulated']['summary']['margin']['lost']} whitelisted decisions lost")
    wall = time.perf_counter() - t0
    summary = analyse(raw, args.seeds)
    summary["per_hedge"] = per_hedge(raw, args.seeds)
    meta = {"seeds": args.seeds, "train_args": train_args(args), "n_probes": args.n_probes, "wall_s": wall,
            "arms": {arm: arm_args(arm, Path("<plain fidelity-rq4.json>")) for arm in ARMS}, "formats": FORMATS,
            "n_boot": N_BOOT, "borderline_below": BORDERLINE}
    decisions = {s: {arm: {q: decision_rows(raw[s][arm]["reports"][q]) for q in FORMATS} for arm in ARMS}
                 for s in args.seeds}
    (out / "summary.json").write_text(json.dumps(_clean({"meta": meta, "summary": summary,
                                                        "training": {s: {a: raw[s][a]["training"] for a in ARMS}
                                                                     for s in args.seeds},
                                                        "decisions": decisions}), indent=1))
    (out / "summary.md").write_text(markdown(summary, meta))
    plots(raw, summary, args.seeds, out)
    print(f"wrote {out / 'summary.md'} ({wall / 60:.1f} min)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
