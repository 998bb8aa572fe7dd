"""The flip regime: decisions whose margins are small because the data makes them hard, 4-bit deployment, and
whether QUAIL (and QAT) keep them. One command reproduces each task's folder:

    python reports/flip-regime/run_experiment.py                  # weighed task: 5 seeds x 5 arms (~1.5-2 h, 2 cores)
    python reports/flip-regime/run_experiment.py --task hedged --arms plain quail quail-cal   # the first regime
    python reports/flip-regime/run_experiment.py --seeds 0 1 --steps 60 --n-probes 64 --work-dir /tmp/fr-smoke \
        --out-dir /tmp/fr-smoke/out                                # a smoke run

Tasks (felix.data.corpus; structured records only, `--no-prose`):
  weighed  `--task principle-weighed`: three reviewers each leave a qualifier; has_principle is drawn with
           P(true) = sigmoid(sum of the qualifiers' log-odds weights, felix.data.corpus.REVIEW_WEIGHTS). 8^3 = 512 distinct
           prompts whose Bayes margins form a continuum down to near zero; the probes (`--probe-set weighed`) are all
           512 of them, each expecting its majority answer. Decision classes by |evidence| (the Bayes margin).
  hedged   `--task principle-hedged`: one reviewer's qualifier (felix.data.corpus.HEDGES); 8 distinct prompts.

Arms (per seed: the same data, tokenizer seed, steps and initialisation; only the loss / forward differs):
  plain      --lambda-q 0
  quail      the QUAIL default (felix.core.quail.DEFAULT_MARGIN, DEFAULT_LAMBDA_Q)
  quail-cal  --margin-from <the plain arm's fidelity-rq4.json>: the margin measured from RQ4's margin noise
  qat        --lambda-q 0 --qat rq4: fake-quant STE on the export policy's formats (felix.model.qat), from step 0
  quail-qat  the QUAIL default and --qat rq4

Each checkpoint is measured by `felix fidelity` (simulated path: PyTorch on the export policy's dequantized weights;
for the weighed task with llama.cpp's CPU activation numerics, `--sim-activations runtime`) on the task's probes for
rq4, q4_0 and iq4_nl, plus greedy generations + schema compliance on the first `--compliance-probes` probes in rq4.
A QAT checkpoint holds latent weights; its fidelity reference is that latent model and its quantized model is what
the QAT forward computed (the exported bytes). Flips are decisions whose sign differs between reference and
quantized; "deployed correct" (the quantized model gives the majority answer) compares every arm on one scale.
Statistics: bootstrap over seeds, and over probes within each resampled seed, with fixed generator seeds.
Outputs: summary.json, summary.md and the plots in the task's folder; checkpoints and per-run reports stay in
--work-dir.
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
from tqdm import tqdm

from felix.core.files import atomic_write_text, jsonable, save_figure
from felix.core.quail import DEFAULT_LAMBDA_Q, DEFAULT_MARGIN
from felix.tasks.records import HEDGES, hedge_bayes_margin, weighed_evidence
from felix.train.runs import read_metrics
from felix.verify import fidelity as F

HERE = Path(__file__).resolve().parent
ARMS = ("plain", "quail", "quail-cal", "qat", "quail-qat")
QAT_MODE = "rq4"  # the QAT arms train against the deployment format
FORMATS = ("rq4", "q4_0", "iq4_nl")
N_BOOT = 2000
# Per task: training task, probe set, defaults, decision classes (edges on the Bayes margin, logits), bins for the
# per-cue table and the survival plot, and the simulated path's activation numerics.
TASKS = {
    "weighed": {
        "train_task": "principle-weighed",
        "probe_set": "weighed",
        "n_probes": 512,
        "steps": 800,
        "class_edges": (0.5, 1.5),
        "class_names": ("near-tie", "borderline", "confident"),
        "sim_activations": "runtime",
    },
    "hedged": {
        "train_task": "principle-hedged",
        "probe_set": "hedged",
        "n_probes": 48,
        "steps": 500,
        "class_edges": (1.0,),
        "class_names": ("borderline", "confident"),
        "sim_activations": "exact",
    },
}
EVIDENCE_BINS = (0.0, 0.25, 0.5, 1.0, 1.5, 2.5, 4.0, math.inf)
MARGIN_BINS = (0.0, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, math.inf)


def train_args(args) -> list[str]:
    return [
        "--preset",
        args.preset,
        "--task",
        TASKS[args.task]["train_task"],
        "--no-prose",
        "--n-records",
        str(args.n_records),
        "--vocab-size",
        str(args.vocab_size),
        "--steps",
        str(args.steps),
        "--warmup-steps",
        str(max(1, args.steps // 10)),
        "--eval-every",
        str(args.steps),
        "--seq-len",
        "128",
        "--batch-size",
        "16",
        "--lr",
        str(args.lr),
    ]


def arm_args(arm: str, plain_report: Path) -> list[str]:
    default = ["--lambda-q", str(DEFAULT_LAMBDA_Q), "--margin", str(DEFAULT_MARGIN)]
    return {
        "plain": ["--lambda-q", "0"],
        "quail": default,
        "quail-cal": ["--lambda-q", str(DEFAULT_LAMBDA_Q), "--margin-from", str(plain_report)],
        "qat": ["--lambda-q", "0", "--qat", QAT_MODE],
        "quail-qat": default + ["--qat", QAT_MODE],
    }[arm]


def train(arm: str, seed: int, work: Path, args, plain_report: Path) -> Path:
    run_dir = work / f"seed{seed}" / arm
    ckpt = run_dir / "checkpoint"
    if (ckpt / "model.safetensors").exists():
        return ckpt
    cmd = [
        sys.executable,
        "-m",
        "felix",
        "train",
        *train_args(args),
        "--seed",
        str(seed),
        *arm_args(arm, plain_report),
        "--out-dir",
        str(run_dir),
    ]
    log = run_dir.parent / f"{arm}-train.log"
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as f:
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT)
    if proc.returncode:
        raise SystemExit(f"training failed ({' '.join(cmd)}); see {log}")
    return ckpt


def training_record(run_dir: Path) -> dict:
    """The last evaluation of a run, and the QUAIL settings it trained with (the calibrated margin included)."""
    rows = read_metrics(run_dir)
    last = [r for r in rows if r.get("val_ce") is not None][-1]
    cfg = json.loads((run_dir / "checkpoint" / "trainer_state.json").read_text())["train_config"]
    return {
        "val_ce": last["val_ce"],
        "val_hinge": last["val_hinge"],
        "train_ce": last["train_ce"],
        "step": last["step"],
        "margin": cfg["margin"],
        "lambda_q": cfg["lambda_q"],
    }


def fidelity(ckpt: Path, out: Path, args, cache: dict) -> dict[str, dict]:
    """The per-format fidelity reports of one checkpoint (reused when present), and the rq4 compliance report."""
    task = TASKS[args.task]
    reports = {}
    jobs = [(q, out, args.n_probes, False) for q in FORMATS] + [
        ("rq4", out / "compliance", args.compliance_probes, True)
    ]
    for quant, where, n, compliance in jobs:
        f = where / f"fidelity-{quant}.json"
        if not f.exists():
            opts = F.FidelityOptions(
                quant=quant,
                paths=("simulated",),
                probe_set=task["probe_set"],
                n_probes=n,
                sensitivity=False,
                compliance=compliance,
                progress=False,
                sim_activations=task["sim_activations"],
            )
            F.write_report(F.run_fidelity(ckpt, opts, cache), where)
        reports["compliance" if compliance else quant] = json.loads(f.read_text())
    return reports


# ------------------------------------------------------------------------------------ extraction
def probe_cue(task: str, probe: str) -> tuple[str, float, float]:
    """(cue, P(true), Bayes margin) of a probe from its name: the hedged probe's qualifier, or the weighed probe's
    three qualifiers and their summed log-odds (felix.data.corpus)."""
    cue = probe.split("-")[1]
    if task == "hedged":
        p_true = dict(HEDGES)[cue]
        return cue, p_true, hedge_bayes_margin(p_true)
    evidence = weighed_evidence(cue.split("."))
    return cue, 1.0 / (1.0 + math.exp(-evidence)), abs(evidence)


def decision_rows(report: dict, task: str) -> list[dict]:
    """Per probe: the has_principle decision (the first true/false token of the expected answer)."""
    res = report["results"]["simulated"]
    seen, rows = set(), []
    for p in res["positions"]:
        if p["probe"] in seen or p["text"].strip() not in ("true", "false"):
            continue
        seen.add(p["probe"])
        cue, p_true, bayes = probe_cue(task, p["probe"])
        rows.append(
            {
                "probe": p["probe"],
                "cue": cue,
                "p_true": p_true,
                "bayes_margin": bayes,
                "expected": p["text"].strip(),
                "ref_margin": p["ref_margin"],
                "quant_margin": p["quant_margin"],
                "runner_up": p["runner_up"].strip(),
                "runner_up_p_ref": p["runner_up_p_ref"],
                "runner_up_log_ratio": p["runner_up_log_ratio"],
            }
        )
    return rows


def structure_rows(report: dict) -> list[dict]:
    """Every other whitelisted position (JSON structure, field names, enum values)."""
    first = {}
    for p in report["results"]["simulated"]["positions"]:
        if p["text"].strip() in ("true", "false") and p["probe"] not in first:
            first[p["probe"]] = p["index"]
    return [
        {"probe": p["probe"], "ref_margin": p["ref_margin"], "quant_margin": p["quant_margin"]}
        for p in report["results"]["simulated"]["positions"]
        if first.get(p["probe"]) != p["index"]
    ]


def compliance_rows(report: dict) -> list[dict]:
    c = report["results"]["simulated"].get("compliance")
    if not c:
        return []
    ref = {g["probe"]: g["compliant"] for g in c["generations"]["reference"]}
    return [
        {"probe": g["probe"], "ref": ref[g["probe"]], "quant": g["compliant"]} for g in c["generations"]["quantized"]
    ]


def decision_class(task: str, bayes_margin: float) -> str:
    t = TASKS[task]
    return t["class_names"][sum(bayes_margin >= e for e in t["class_edges"])]


# ------------------------------------------------------------------------------------ statistics
class RatioStat:
    """A statistic of a list of rows that is a ratio of sums, sum(num(row)) / sum(den(row)) (a mean, a rate, a
    conditional rate): the form that lets the bootstrap below resample by multinomial weights in numpy."""

    def __init__(self, num, den=lambda r: 1.0):
        self.num, self.den = num, den

    def parts(self, rows) -> tuple[np.ndarray, np.ndarray]:
        return (
            np.array([float(self.num(r)) for r in rows], dtype=np.float64),
            np.array([float(self.den(r)) for r in rows], dtype=np.float64),
        )

    def __call__(self, rows):
        num, den = self.parts(rows)
        return float(num.sum() / den.sum()) if den.sum() > 0 else math.nan


def bootstrap(
    per_seed: list[list[dict]], stat: RatioStat, rng: np.random.Generator, n_boot: int = N_BOOT, within: bool = True
) -> dict:
    """Point estimate and 95% percentile interval of stat(rows), resampling seeds with replacement and, when
    `within`, the rows (probes) inside each resampled seed too.

    A seed drawn c times contributes c independent within-seed resamples of its n rows, i.e. c*n row indices
    drawn uniformly; all resamples are drawn at once and summed with bincount (no Python loop over rows). Resamples whose denominator is 0 (e.g. no reference-correct rows) are left out of the interval."""
    parts = [stat.parts(rows) for rows in per_seed]
    point = stat([r for rows in per_seed for r in rows])
    k = len(per_seed)
    picks = np.stack([np.bincount(rng.integers(0, k, k), minlength=k) for _ in range(n_boot)])  # [n_boot, k]
    num = np.zeros(n_boot)
    den = np.zeros(n_boot)
    for s, (nu, de) in enumerate(parts):
        n = len(nu)
        if n == 0:
            continue
        if within:  # picks[b, s] * n row indices drawn for resample b, summed per resample
            owner = np.repeat(np.arange(n_boot), picks[:, s] * n)
            rows = rng.integers(0, n, owner.size)
            num += np.bincount(owner, weights=nu[rows], minlength=n_boot)
            den += np.bincount(owner, weights=de[rows], minlength=n_boot)
        else:
            num += picks[:, s] * nu.sum()
            den += picks[:, s] * de.sum()
    ok = den > 0
    vals = num[ok] / den[ok]
    lo, hi = (float(np.percentile(vals, 2.5)), float(np.percentile(vals, 97.5))) if ok.any() else (math.nan, math.nan)
    return {"value": point, "lo": lo, "hi": hi}


def flipped(r) -> bool:
    return (r["ref_margin"] > 0) != (r["quant_margin"] > 0)


survival = RatioStat(lambda r: r["ref_margin"] > 0 and r["quant_margin"] > 0, lambda r: r["ref_margin"] > 0)
flip_rate = RatioStat(flipped)
ref_correct_rate = RatioStat(lambda r: r["ref_margin"] > 0)
deployed_correct_rate = RatioStat(lambda r: r["quant_margin"] > 0)


def mean_of(key) -> RatioStat:
    return RatioStat(lambda r: r[key])


def counts(rows_per_seed: list[list[dict]]) -> dict:
    rows = [r for x in rows_per_seed for r in x]
    return {
        "n": len(rows),
        "ref_correct": sum(r["ref_margin"] > 0 for r in rows),
        "deployed_correct": sum(r["quant_margin"] > 0 for r in rows),
        "flips": sum(map(flipped, rows)),
        "lost": sum(r["ref_margin"] > 0 >= r["quant_margin"] for r in rows),
        "gained": sum(r["ref_margin"] <= 0 < r["quant_margin"] for r in rows),
    }


# --------------------------------------------------------------------------------------- analysis
def analyse(raw: dict, seeds: list[int], arms: list[str], task: str) -> dict:
    rng = np.random.default_rng(20240518)
    names = TASKS[task]["class_names"]
    out = {"arms": {}, "noise": {}, "decision_noise": {}, "paired": {}}
    for arm in arms:
        a = {"formats": {}}
        runs = [raw[seed][arm] for seed in seeds]
        a["training"] = {
            k: bootstrap([[{k: r["training"][k]}] for r in runs], mean_of(k), rng, within=False)
            for k in ("val_ce", "val_hinge")
        }
        a["margin_used"] = [r["training"]["margin"] if r["training"]["lambda_q"] else None for r in runs]
        dec0 = [decision_rows(r["reports"]["rq4"], task) for r in runs]
        a["reference"] = {
            cls: {
                "correct": bootstrap(
                    [[d for d in rows if decision_class(task, d["bayes_margin"]) == cls] for rows in dec0],
                    ref_correct_rate,
                    rng,
                ),
                "margin_mean": bootstrap(
                    [
                        [d for d in rows if decision_class(task, d["bayes_margin"]) == cls and d["ref_margin"] > 0]
                        for rows in dec0
                    ],
                    mean_of("ref_margin"),
                    rng,
                ),
            }
            for cls in names
        }
        for quant in FORMATS:
            reps = [r["reports"][quant] for r in runs]
            dec = [decision_rows(x, task) for x in reps]
            struct = [structure_rows(x) for x in reps]
            f = {}
            for cls in names + ("all decisions",):
                rows = [
                    [d for d in seed_rows if cls == "all decisions" or decision_class(task, d["bayes_margin"]) == cls]
                    for seed_rows in dec
                ]
                f[cls] = {
                    **counts(rows),
                    "survival": bootstrap(rows, survival, rng),
                    "flip_rate": bootstrap(rows, flip_rate, rng),
                    "deployed_correct_rate": bootstrap(rows, deployed_correct_rate, rng),
                }
            f["structure"] = {**counts(struct), "survival": bootstrap(struct, survival, rng)}
            summaries = [x["results"]["simulated"]["summary"] for x in reps]
            f["kl_mean"] = bootstrap([[{"v": s["kl"]["mean"]}] for s in summaries], mean_of("v"), rng, within=False)
            minority = [
                [
                    {"v": d["runner_up_log_ratio"], "p": d["runner_up_p_ref"]}
                    for d in rows
                    if d["ref_margin"] > 0 and d["runner_up"] in ("true", "false")
                ]
                for rows in dec
            ]
            f["minority"] = {}
            for name, lo, hi in (
                ("p_ref < 0.01", 0, 0.01),
                ("0.01 <= p_ref < 0.1", 0.01, 0.1),
                ("0.1 <= p_ref < 0.5", 0.1, 0.5),
            ):
                rows = [[m for m in x if lo <= m["p"] < hi] for x in minority]
                f["minority"][name] = {
                    "n": sum(map(len, rows)),
                    "log_ratio": bootstrap(rows, mean_of("v"), rng),
                    "p_ref_median": float(np.median([m["p"] for x in rows for m in x])) if any(rows) else math.nan,
                }
            a["formats"][quant] = f
        comp = [compliance_rows(r["reports"]["compliance"]) for r in runs]
        a["compliance_rq4"] = {
            "probes": sum(map(len, comp)),
            "ref": bootstrap(comp, mean_of("ref"), rng),
            "quant": bootstrap(comp, mean_of("quant"), rng),
            "ref_count": sum(c["ref"] for x in comp for c in x),
            "quant_count": sum(c["quant"] for x in comp for c in x),
        }
        out["arms"][arm] = a
    # the measured 4-bit noise of the plain arm: per-position margin change at all whitelisted positions (what
    # --margin-from reads), and at the decisions themselves
    base = arms[0]
    for quant in FORMATS:
        qs = [
            raw[s][base]["reports"][quant]["results"]["simulated"]["summary"]["margin"]["change_quantiles"]
            for s in seeds
        ]
        out["noise"][quant] = {k: [q[k] for q in qs] for k in qs[0]}
        ch = [
            [d["quant_margin"] - d["ref_margin"] for d in decision_rows(raw[s][base]["reports"][quant], task)]
            for s in seeds
        ]
        out["decision_noise"][quant] = {
            "std": [float(np.std(c)) for c in ch],
            "p01": [float(np.percentile(c, 1)) for c in ch],
            "p99": [float(np.percentile(c, 99)) for c in ch],
            "mean": [float(np.mean(c)) for c in ch],
        }
    # paired (same seed) differences against the first arm (plain), rq4, bootstrap over seeds
    for arm in arms[1:]:
        pairs = []
        for s in seeds:
            p, a = raw[s][base], raw[s][arm]
            dp, da = decision_rows(p["reports"]["rq4"], task), decision_rows(a["reports"]["rq4"], task)
            pairs.append(
                [
                    {
                        "d_val_ce": a["training"]["val_ce"] - p["training"]["val_ce"],
                        "d_flip_rate": flip_rate(da) - flip_rate(dp),
                        "d_deployed_correct": deployed_correct_rate(da) - deployed_correct_rate(dp),
                    }
                ]
            )
        out["paired"][arm] = {
            k: bootstrap(pairs, mean_of(k), rng, within=False)
            for k in ("d_val_ce", "d_flip_rate", "d_deployed_correct")
        }
    out["per_cue"] = per_cue(raw, seeds, arms, task)
    return out


def per_cue(raw: dict, seeds: list[int], arms: list[str], task: str) -> dict:
    """rq4 decisions per qualifier (hedged) or per |evidence| bin (weighed): flips, reference/deployed correct."""
    if task == "hedged":
        groups = [(h, lambda d, h=h: d["cue"] == h) for h, _ in HEDGES]
    else:
        groups = [
            (f"|evidence| {lo:g}-{hi:g}", lambda d, lo=lo, hi=hi: lo <= d["bayes_margin"] < hi)
            for lo, hi in zip(EVIDENCE_BINS[:-1], EVIDENCE_BINS[1:])
        ]
    out = {}
    for arm in arms:
        rows = [d for s in seeds for d in decision_rows(raw[s][arm]["reports"]["rq4"], task)]
        out[arm] = {}
        for name, sel in groups:
            r = [d for d in rows if sel(d)]
            out[arm][name] = {
                **counts([r]),
                "ref_margin_mean": float(np.mean([d["ref_margin"] for d in r])) if r else math.nan,
            }
    return out


# ----------------------------------------------------------------------------------------- output
def _ci(b, nd=3, pct=False):
    if b is None or b["value"] is None or (isinstance(b["value"], float) and math.isnan(b["value"])):
        return "n/a"
    k = 100 if pct else 1
    return f"{k * b['value']:.{nd}f} [{k * b['lo']:.{nd}f}, {k * b['hi']:.{nd}f}]"


def markdown(summary: dict, meta: dict) -> str:
    s, seeds, task = summary, meta["seeds"], meta["task"]
    names = TASKS[task]["class_names"]
    edges = TASKS[task]["class_edges"]
    L = [
        f"# Flip regime ({task} task): summary (generated by run_experiment.py)",
        "",
        f"Seeds {', '.join(map(str, seeds))}; per seed and arm: `felix train {' '.join(meta['train_args'])}` plus "
        f"the arm's flags ({'; '.join(f'{a}: `{chr(32).join(f)}`' for a, f in meta['arms'].items())}). "
        f"Fidelity: {meta['n_probes']} {TASKS[task]['probe_set']} probes per model, simulated path, activations "
        f"`{meta['sim_activations']}`; schema compliance on {meta['compliance_probes']} probes (rq4). Wall time "
        f"of train + fidelity in this invocation {meta['wall_s'] / 60:.1f} min ({meta['runs_reused']} of "
        f"{meta['runs']} runs reused from an earlier invocation's --work-dir). Brackets: 95% bootstrap intervals ({N_BOOT} resamples of seeds, and of "
        f"probes within each seed; validation CE and KL over seeds only).",
        "",
        "Decision classes by the Bayes margin of the majority answer (logits): "
        + ", ".join(
            f"{n} ({'< ' + format(edges[0], 'g') if i == 0 else ('>= ' + format(edges[-1], 'g') if i == len(names) - 1 else format(edges[i - 1], 'g') + '-' + format(edges[i], 'g'))})"
            for i, n in enumerate(names)
        )
        + ". A flip: the sign of the decision margin differs between "
        "the reference and the quantized model (lost: the reference gave the majority answer; gained: it did not).",
        "",
        f"## Measured 4-bit margin noise ({meta['arms_run'][0]} arm, per seed)",
        "",
        "All whitelisted positions (per-position margin change; what `--margin-from` reads):",
        "",
        "| format | q0.001 | q0.01 | q0.05 | q0.1 | median |",
        "|---|---|---|---|---|---|",
    ]
    for quant, q in s["noise"].items():
        L.append(
            f"| {quant} | "
            + " | ".join(", ".join(f"{v:+.3f}" for v in q[k]) for k in ("0.001", "0.01", "0.05", "0.1", "0.5"))
            + " |"
        )
    L += [
        "",
        "At the decisions (quantized - reference margin):",
        "",
        "| format | mean | std | p01 | p99 |",
        "|---|---|---|---|---|",
    ]
    for quant, q in s["decision_noise"].items():
        L.append(
            f"| {quant} | "
            + " | ".join(", ".join(f"{v:+.3f}" for v in q[k]) for k in ("mean", "std", "p01", "p99"))
            + " |"
        )
    L += [
        "",
        "## Training and the reference (unquantized) decisions",
        "",
        "| arm | QUAIL margin per seed | val CE | val hinge | "
        + " | ".join(f"{n}: ref. correct | {n}: mean correct margin" for n in names)
        + " |",
        "|---|---|---|---|" + "---|---|" * len(names),
    ]
    for arm, a in s["arms"].items():
        m = ", ".join("-" if x is None else f"{x:.3f}" for x in a["margin_used"])
        r = a["reference"]
        L.append(
            f"| {arm} | {m} | {_ci(a['training']['val_ce'])} | {_ci(a['training']['val_hinge'])} | "
            + " | ".join(f"{_ci(r[n]['correct'])} | {_ci(r[n]['margin_mean'])}" for n in names)
            + " |"
        )
    for quant in FORMATS:
        L += [
            "",
            f"## {quant}",
            "",
            "| arm | "
            + " | ".join(f"{n}: flips (lost/gained) of n | {n}: flip rate" for n in names + ("all decisions",))
            + " | all decisions: deployed correct | structure lost / ref. correct | KL mean |",
            "|---|" + "---|---|" * (len(names) + 1) + "---|---|---|",
        ]
        for arm, a in s["arms"].items():
            f = a["formats"][quant]
            L.append(
                f"| {arm} | "
                + " | ".join(
                    f"{f[n]['flips']} ({f[n]['lost']}/{f[n]['gained']}) of {f[n]['n']} | {_ci(f[n]['flip_rate'], 4)}"
                    for n in names + ("all decisions",)
                )
                + f" | {_ci(f['all decisions']['deployed_correct_rate'])} | {f['structure']['lost']} / "
                f"{f['structure']['ref_correct']} | {_ci(f['kl_mean'], 5)} |"
            )
        L += [
            "",
            f"Minority option at the decision ({quant}): the reference's runner-up (`true`/`false`, the answer "
            "not expected), log p_quant / p_ref, mean over decisions:",
            "",
            "| arm | " + " | ".join(s["arms"][meta["arms_run"][0]]["formats"][quant]["minority"]) + " |",
            "|---|" + "---|" * 3,
        ]
        for arm, a in s["arms"].items():
            L.append(
                f"| {arm} | "
                + " | ".join(
                    f"n {b['n']}, p_ref median {b['p_ref_median']:.4f}: {_ci(b['log_ratio'], 4)}" if b["n"] else "n 0"
                    for b in a["formats"][quant]["minority"].values()
                )
                + " |"
            )
    L += [
        "",
        "## Schema compliance of greedy generations (rq4)",
        "",
        "| arm | compliant ref -> quant | quant rate (%) |",
        "|---|---|---|",
    ]
    for arm, a in s["arms"].items():
        c = a["compliance_rq4"]
        L.append(f"| {arm} | {c['ref_count']} -> {c['quant_count']} / {c['probes']} | {_ci(c['quant'], 1, True)} |")
    L += [
        "",
        f"## Paired against the {meta['arms_run'][0]} arm (same seed; rq4; bootstrap over seeds)",
        "",
        "| arm | delta val CE | delta flip rate (all decisions) | delta deployed correct |",
        "|---|---|---|---|",
    ]
    for arm, p in s["paired"].items():
        L.append(
            f"| {arm} | {_ci(p['d_val_ce'], 4)} | {_ci(p['d_flip_rate'], 4)} | {_ci(p['d_deployed_correct'], 4)} |"
        )
    groups = list(s["per_cue"][meta["arms_run"][0]])
    L += [
        "",
        "## Per cue (rq4, all seeds): flips (lost/gained), reference / deployed correct of n, mean reference margin",
        "",
        "| cue | " + " | ".join(meta["arms_run"]) + " |",
        "|---|" + "---|" * len(meta["arms_run"]),
    ]
    for g in groups:
        cells = []
        for arm in meta["arms_run"]:
            q = s["per_cue"][arm][g]
            cells.append(
                f"{q['flips']} ({q['lost']}/{q['gained']}); {q['ref_correct']} / {q['deployed_correct']} of "
                f"{q['n']} ({q['ref_margin_mean']:+.2f})"
            )
        L.append(f"| {g} | " + " | ".join(cells) + " |")
    L += [
        "",
        "![flip rate vs reference margin](flips_vs_margin.png)",
        "",
        "![cost vs benefit](cost_benefit.png)",
        "",
        "![plain-arm margins vs 4-bit noise](margins_vs_noise.png)",
        "",
    ]
    return "\n".join(L)


COLORS = {
    "plain": "tab:gray",
    "quail": "tab:blue",
    "quail-cal": "tab:orange",
    "qat": "tab:green",
    "quail-qat": "tab:purple",
}


def plots(raw: dict, summary: dict, seeds: list[int], arms: list[str], task: str, out: Path) -> None:
    import matplotlib  # heavy optional dependency (the plots only); the Agg backend is chosen before pyplot loads

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rng = np.random.default_rng(7)
    # 1. flip rate vs |reference margin| at the decisions, per arm and format, binned
    fig, axes = plt.subplots(1, len(FORMATS), figsize=(5 * len(FORMATS), 4.2), sharey=True)
    centers = list(range(len(MARGIN_BINS) - 1))
    labels = [f"{lo:g}-{hi:g}" for lo, hi in zip(MARGIN_BINS[:-1], MARGIN_BINS[1:])]
    for ax, quant in zip(axes, FORMATS):
        for k, arm in enumerate(arms):
            ys, los, his = [], [], []
            for lo, hi in zip(MARGIN_BINS[:-1], MARGIN_BINS[1:]):
                per_seed = [
                    [r for r in decision_rows(raw[s][arm]["reports"][quant], task) if lo <= abs(r["ref_margin"]) < hi]
                    for s in seeds
                ]
                b = bootstrap(per_seed, flip_rate, rng, n_boot=300)
                ys.append(b["value"])
                los.append(b["value"] - b["lo"] if not math.isnan(b["value"]) else 0)
                his.append(b["hi"] - b["value"] if not math.isnan(b["value"]) else 0)
            x = [c + (k - (len(arms) - 1) / 2) * 0.14 for c in centers]
            ax.errorbar(x, ys, yerr=[los, his], fmt="o", color=COLORS[arm], label=arm, capsize=2, ms=4)
        ax.set_xticks(centers, labels, rotation=30, fontsize=8)
        ax.set(xlabel="|reference margin| at the decision (logits)", title=f"{quant}: decisions flipped")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("flip rate (95% bootstrap)")
    axes[0].legend()
    fig.tight_layout()
    save_figure(fig, out / "flips_vs_margin.png", dpi=100)
    plt.close(fig)
    # 2. cost (validation CE) vs benefit (rq4 flip rate; deployed correct)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    for ax, key, label in (
        (axes[0], "flip_rate", "rq4: decisions flipped (fraction)"),
        (axes[1], "deployed_correct_rate", "rq4: deployed decisions correct (fraction)"),
    ):
        for arm in arms:
            a = summary["arms"][arm]
            ce, v = a["training"]["val_ce"], a["formats"]["rq4"]["all decisions"][key]
            ax.errorbar(
                [ce["value"]],
                [v["value"]],
                xerr=[[ce["value"] - ce["lo"]], [ce["hi"] - ce["value"]]],
                yerr=[[v["value"] - v["lo"]], [v["hi"] - v["value"]]],
                fmt="o",
                color=COLORS[arm],
                label=arm,
                capsize=3,
            )
        ax.set(xlabel="validation CE (nats/token): cost", ylabel=label)
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle("cost vs benefit (95% bootstrap intervals)")
    fig.tight_layout()
    save_figure(fig, out / "cost_benefit.png", dpi=100)
    plt.close(fig)
    # 3. plain-arm decision margins against the measured decision-margin change
    fig, ax = plt.subplots(figsize=(7, 4.2))
    rows = [d for s in seeds for d in decision_rows(raw[s][arms[0]]["reports"]["rq4"], task)]
    ref = [d["ref_margin"] for d in rows]
    change = [d["quant_margin"] - d["ref_margin"] for d in rows]
    ax.scatter(ref, change, s=5, alpha=0.5, c=["tab:red" if flipped(d) else "tab:gray" for d in rows])
    lim = max(abs(min(change)), abs(max(change))) * 1.2
    xs = np.linspace(-lim, lim, 10)
    ax.plot(xs, -xs, color="k", lw=0.8, ls="--", label="change = -reference margin (flip boundary)")
    ax.set(
        xlabel="reference decision margin (logits)",
        ylabel="rq4 margin change (quantized - reference)",
        title=f"{arms[0]} arm, all seeds: decisions (red: flipped)",
    )
    ax.set_xlim(-max(1.0, 4 * lim), max(1.0, 4 * lim))
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    save_figure(fig, out / "margins_vs_noise.png", dpi=100)
    plt.close(fig)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", choices=tuple(TASKS), default="weighed")
    ap.add_argument(
        "--arms",
        nargs="+",
        choices=ARMS,
        default=list(ARMS),
        help="arms to run; the first is the baseline of the paired comparisons and the noise tables",
    )
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--steps", type=int, default=None, help="training steps (default: the task's)")
    ap.add_argument("--lr", type=float, default=6e-3)
    ap.add_argument("--n-records", type=int, default=8000)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--vocab-size", type=int, default=512)
    ap.add_argument("--n-probes", type=int, default=None, help="probes per model (default: the task's)")
    ap.add_argument("--compliance-probes", type=int, default=48, help="probes generated for schema compliance (rq4)")
    ap.add_argument(
        "--work-dir", default=None, help="checkpoints and per-run reports (reused; default runs/flip-regime/<task>)"
    )
    ap.add_argument("--out-dir", default=None, help="summary.json, summary.md and plots (default: <here>/<task>)")
    args = ap.parse_args()
    task = TASKS[args.task]
    args.steps = args.steps or task["steps"]
    args.n_probes = args.n_probes or task["n_probes"]
    if "quail-cal" in args.arms and "plain" not in args.arms:
        ap.error("the quail-cal arm reads the plain arm's fidelity report: run plain too")
    arms = [a for a in ARMS if a in args.arms]  # in ARMS order: the first (plain, when run) is the baseline
    work = Path(args.work_dir or f"runs/flip-regime/{args.task}")
    out = Path(args.out_dir or HERE / args.task)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    raw: dict = {}
    jobs = [(s, arm) for s in args.seeds for arm in arms]
    reused = 0
    for seed, arm in tqdm(jobs, desc=f"flip regime, {args.task} (train + fidelity)", unit="run"):
        run_dir = work / f"seed{seed}" / arm
        reused += (run_dir / "fidelity" / "compliance" / "fidelity-rq4.json").exists()
        plain_report = work / f"seed{seed}" / "plain" / "fidelity" / "fidelity-rq4.json"
        ckpt = train(arm, seed, work, args, plain_report)
        reports = fidelity(ckpt, ckpt.parent / "fidelity", args, {})
        raw.setdefault(seed, {})[arm] = {"training": training_record(ckpt.parent), "reports": reports}
        d = decision_rows(reports["rq4"], args.task)
        tqdm.write(
            f"seed {seed} {arm}: val CE {raw[seed][arm]['training']['val_ce']:.4f}, rq4 decisions flipped "
            f"{sum(map(flipped, d))} of {len(d)}"
        )
    wall = time.perf_counter() - t0
    summary = analyse(raw, args.seeds, arms, args.task)
    meta = {
        "task": args.task,
        "seeds": args.seeds,
        "train_args": train_args(args),
        "n_probes": args.n_probes,
        "compliance_probes": args.compliance_probes,
        "sim_activations": task["sim_activations"],
        "wall_s": wall,
        "runs_reused": reused,
        "runs": len(jobs),
        "arms_run": arms,
        "arms": {arm: arm_args(arm, Path("<plain fidelity-rq4.json>")) for arm in arms},
        "formats": FORMATS,
        "n_boot": N_BOOT,
        "classes": dict(zip(task["class_names"], task["class_edges"])),
    }
    # every decision of every run, as a table (columns once, then one row per decision) to keep the file small
    columns = list(decision_rows(raw[args.seeds[0]][arms[0]]["reports"]["rq4"], args.task)[0])
    decisions = {
        "columns": columns,
        "rows": {
            s: {
                arm: {
                    q: [[d[c] for c in columns] for d in decision_rows(raw[s][arm]["reports"][q], args.task)]
                    for q in FORMATS
                }
                for arm in arms
            }
            for s in args.seeds
        },
    }
    atomic_write_text(
        out / "summary.json",
        json.dumps(
            jsonable(
                {
                    "meta": meta,
                    "summary": summary,
                    "training": {s: {a: raw[s][a]["training"] for a in arms} for s in args.seeds},
                    "decisions": decisions,
                }
            ),
            separators=(",", ":"),
        ),
    )
    atomic_write_text(out / "summary.md", markdown(summary, meta))
    plots(raw, summary, args.seeds, arms, args.task, out)
    print(f"wrote {out / 'summary.md'} ({wall / 60:.1f} min)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
