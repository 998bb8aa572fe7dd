"""Ternary QAT vs ternary PTQ, same data and steps: train tiny-256 twice per seed (identical seed, data order,
initialization and steps; only `--qat bitnet` differs), ship both as TQ2_0 and measure the shipped files in stock
llama.cpp against the full-precision run's f32 export (the common reference):

* ``ptq``          the full-precision run, TQ2_0 by ggml's codec (absmax ternary rounding: what `felix export
                   --quant tq2_0` does to an ordinary checkpoint);
* ``ptq-absmean``  the full-precision run, TQ2_0 by BitNet's absmean codec (no training): separates the codec's
                   share of the effect from training's;
* ``qat``          the `--qat bitnet` run (BitNet b1.58 from step 0), exported as trained: the bytes its forward used.

Per shipped file: margin survival at whitelisted probe positions (fraction of the positions the f32 reference
decides correctly that stay correct), the shipped model's own whitelisted accuracy, KL reference -> shipped, top-1
agreement, validation CE (llama.cpp logits on held-out windows) and schema compliance of greedy generations (these
in PyTorch on the file's decoded weights with llama.cpp's activation numerics modelled: llama.cpp would recompute
each 128-token sliding window per token, hours on a loaded CPU).
Also: the QAT model's PyTorch forward against llama.cpp on the same probes (max relative logit error).

    PYTHONPATH=. python reports/qat-ternary/run_experiment.py              # ~45 min on a loaded 2-core CPU
    PYTHONPATH=. python reports/qat-ternary/run_experiment.py --seeds 0 1

Checkpoints stay in --work-dir (reused when present); summary.json, summary.md and comparison.png go next to this
script.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
from pathlib import Path

import torch

from felix.data.corpus import TokenStream, builtin_corpus, split_documents
from felix.model import qat
from felix.model.felix_lm import load_checkpoint
from felix.model.qat import load_qat_checkpoint
from felix.model.tokenizer import Tokenizer
from felix.ops.activation_rounding import ActivationRounding
from felix.ops.quant_policy import plan_tensor_types
from felix.ship.export import export_gguf, model_from_gguf
from felix.train import loop as felix_train
from felix.train.runs import read_metrics
from felix.verify import fidelity

HERE = Path(__file__).resolve().parent
TRAIN_ARGS = [
    "--preset",
    "tiny-256",
    "--steps",
    "200",
    "--batch-size",
    "8",
    "--warmup-steps",
    "20",
    "--eval-every",
    "50",
]
ARMS = {"fp": [], "qat": ["--qat", "bitnet"]}
SHIPPED = ("ptq", "ptq-absmean", "qat")
N_PROBES, VAL_WINDOWS, MAX_NEW = 24, 32, 160


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
    r = rows[-1]
    return {
        "step": r["step"],
        "val_ce_trained_forward": r["val_ce"],
        "train_ce": r["train_ce"],
        "peak_memory_mb": r["peak_memory_mb"],
        "tokens_per_s": r["tokens_per_s"],
    }


def export_all(fp_ckpt: Path, qat_ckpt: Path, out: Path) -> dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    files = {
        "reference": out / "reference-f32.gguf",
        "ptq": out / "ptq-tq2_0.gguf",
        "ptq-absmean": out / "ptq-absmean-tq2_0.gguf",
        "qat": out / "qat-bitnet-tq2_0.gguf",
    }
    export_gguf(fp_ckpt, files["reference"], quant="f32", force=True)
    export_gguf(fp_ckpt, files["ptq"], quant="tq2_0", force=True)
    absmean = qat.apply_qat(load_checkpoint(fp_ckpt), "bitnet", activations=None)  # the codec only, no training
    export_gguf(fp_ckpt, files["ptq-absmean"], quant="tq2_0", force=True, model=absmean)
    export_gguf(qat_ckpt, files["qat"], quant="tq2_0", force=True)
    return files


def val_ce(source, windows: list[list[int]]) -> float:
    total, n = 0.0, 0
    for ids, z in zip(windows, source.logits(windows)):
        z = z.double()
        t = torch.tensor(ids[1:])
        total += float(torch.nn.functional.cross_entropy(z[:-1], t, reduction="sum"))
        n += len(ids) - 1
    return total / n


def measure(seed: int, fp_ckpt: Path, qat_ckpt: Path, work: Path) -> dict:
    tok = Tokenizer.load(fp_ckpt)
    if (fp_ckpt / "tokenizer.json").read_text() != (qat_ckpt / "tokenizer.json").read_text():
        raise SystemExit("the two arms trained different tokenizers: not the same data")
    files = export_all(fp_ckpt, qat_ckpt, work / f"seed{seed}" / "gguf")
    cfg = felix_train.TrainConfig(preset="tiny-256", seed=seed)
    # the held-out documents of the built-in corpus, split as the experiment's runs were (by document, seeded)
    _, val_docs = split_documents(
        builtin_corpus(cfg.n_records, cfg.seed, tuple(cfg.tasks), cfg.prose), cfg.val_fraction, cfg.seed
    )
    val = TokenStream.from_documents(val_docs, tok, 128, seed + 1).fixed_batches(1, VAL_WINDOWS)
    windows = [x[0].tolist() + [int(y[0, -1])] for x, y in val]

    probes = fidelity.probe_set("builtin", N_PROBES)
    n_vocab = json.loads((fp_ckpt / "config.json").read_text())["vocab_size"]
    wl = fidelity.build_probe_whitelist(tok, n_vocab)
    encoded = fidelity.encode_probes(probes, tok, wl.mask)
    targets = fidelity.all_targets(encoded)
    n_ctx = 128

    def torch_twin(path):  # the file's weights in PyTorch with llama.cpp's CPU numerics (batched generation)
        m = model_from_gguf(path)
        if path != files["reference"]:
            plan = plan_tensor_types({k: tuple(v.shape) for k, v in m.state_dict().items()}, "tq2_0")
            m.set_activation_rounding(ActivationRounding.from_plan(plan))
        return fidelity.TorchSource(m)

    ref = fidelity.LlamaCppSource(files["reference"], n_ctx)
    ref_logits = fidelity.score_probes(ref, encoded, True, "reference f32")
    ref_comp = fidelity.compliance_summary(
        fidelity.compliance_run(torch_twin(files["reference"]), encoded, tok, MAX_NEW, True, "reference gen")
    )
    ref_stats = fidelity.compare_logits(ref_logits, ref_logits, targets, wl.mask)
    result = {
        "reference": {
            "val_ce": val_ce(ref, windows),
            "compliance": ref_comp,
            "whitelisted_accuracy": float((ref_stats.ref_margin[ref_stats.whitelisted] > 0).double().mean()),
        }
    }
    ref.close()
    for name in SHIPPED:
        src = fidelity.LlamaCppSource(files[name], n_ctx)
        q_logits = fidelity.score_probes(src, encoded, True, name)
        stats = fidelity.compare_logits(ref_logits, q_logits, targets, wl.mask)
        s = fidelity.summarize(stats)
        comp = fidelity.compliance_summary(
            fidelity.compliance_run(torch_twin(files[name]), encoded, tok, MAX_NEW, True, f"{name} gen")
        )
        w = stats.whitelisted
        result[name] = {
            "margin_survival": s["margin"]["survival"],
            "survived": s["margin"]["survived"],
            "reference_correct": s["margin"]["reference_correct"],
            "whitelisted_accuracy": float((stats.quant_margin[w] > 0).double().mean()),
            "margin_mean": s["margin"]["quantized_mean"],
            "flips": s["margin"]["flips"],
            "lost": s["margin"]["lost"],
            "gained": s["margin"]["gained"],
            "kl_mean": s["kl"]["mean"],
            "kl_p99": s["kl"]["p99"],
            "top1_agreement": s["top1_agreement"],
            "val_ce": val_ce(src, windows),
            "compliance": comp,
            "file_bytes": files[name].stat().st_size,
        }
        if name == "qat":  # the QAT model's own forward (runtime activation model) against llama.cpp on this file
            model = load_qat_checkpoint(qat_ckpt)
            plan = plan_tensor_types({k: tuple(v.shape) for k, v in model.state_dict().items()}, "tq2_0")
            model.set_activation_rounding(ActivationRounding.from_plan(plan))
            sim = fidelity.score_probes(fidelity.TorchSource(model), encoded)
            result[name]["forward_vs_llamacpp"] = fidelity.agreement(sim, q_logits, targets, wl.mask)
        src.close()
    result["whitelisted_positions"] = int(wl.mask[targets].sum())
    return result


def markdown(summary: dict) -> str:
    lines = [
        "# Ternary QAT vs ternary PTQ (generated by run_experiment.py)",
        "",
        f"Training: `felix train {' '.join(TRAIN_ARGS)}`, per seed twice: plain (fp) and `--qat bitnet`; same seed, "
        f"data order, initialization and steps. Measured in stock llama.cpp (CPU) on {N_PROBES} built-in probes "
        f"and {VAL_WINDOWS} held-out windows of 128 tokens; reference = the fp run's f32 export.",
        "",
        "| seed | shipped | margin survival | whitelisted accuracy | flips (lost/gained) | KL mean | KL p99 | "
        "top-1 agr. | val CE | schema-compliant / valid JSON | file bytes |",
        "|---" * 11 + "|",
    ]
    for seed, res in summary["results"].items():
        r = res["reference"]
        lines.append(
            f"| {seed} | reference f32 | - | {r['whitelisted_accuracy']:.4f} | - | - | - | - | {r['val_ce']:.4f} "
            f"| {r['compliance']['compliant']} / {r['compliance']['valid_json']} of {r['compliance']['probes']} | - |"
        )
        for name in SHIPPED:
            q = res[name]
            lines.append(
                f"| {seed} | {name} TQ2_0 | {q['margin_survival']:.4f} ({q['survived']}/{q['reference_correct']}) | "
                f"{q['whitelisted_accuracy']:.4f} | {q['flips']} ({q['lost']}/{q['gained']}) | {q['kl_mean']:.4f} "
                f"| {q['kl_p99']:.4f} | {q['top1_agreement']:.4f} | {q['val_ce']:.4f} | "
                f"{q['compliance']['compliant']} / {q['compliance']['valid_json']} of {q['compliance']['probes']} "
                f"| {q['file_bytes']:,} |"
            )
    lines += [
        "",
        "Training runs (the forward each arm trained with; QAT's val CE is its ternary forward):",
        "",
        "| seed | arm | val CE (trained forward) | train CE | tokens/s | peak memory MB |",
        "|---|---|---|---|---|---|",
    ]
    for t in summary["training"]:
        lines.append(
            f"| {t['seed']} | {t['arm']} | {t['val_ce_trained_forward']:.4f} | {t['train_ce']:.4f} | "
            f"{t['tokens_per_s']:.0f} | {t['peak_memory_mb']:.0f} |"
        )
    lines += [
        "",
        "QAT forward (PyTorch, llama.cpp's activation rounding modelled) vs llama.cpp on the exported file:",
        "",
        "| seed | max rel. logit err | top-1 agreement | decision disagreements |",
        "|---|---|---|---|",
    ]
    for seed, res in summary["results"].items():
        a = res["qat"]["forward_vs_llamacpp"]
        lines.append(f"| {seed} | {a['max_rel_err']:.2e} | {a['top1_agreement']:.4f} | {a['decision_disagreements']} |")
    lines += ["", "![comparison](comparison.png)", ""]
    return "\n".join(lines)


def plot(summary: dict, path: Path) -> None:
    import matplotlib  # heavy optional dependency (the plot only); the Agg backend is chosen before pyplot loads

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = [
        ("margin_survival", "margin survival (vs f32 ref.)"),
        ("kl_mean", "KL mean ref -> shipped (nats)"),
        ("val_ce", "validation CE (llama.cpp)"),
        ("compliant", "schema-compliant generations"),
    ]
    seeds = list(summary["results"])
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics), 3.6))
    colors = {"ptq": "tab:gray", "ptq-absmean": "tab:olive", "qat": "tab:blue"}
    for ax, (key, label) in zip(axes, metrics):
        for k, name in enumerate(SHIPPED):
            vals = [
                summary["results"][s][name]["compliance"]["compliant"]
                if key == "compliant"
                else summary["results"][s][name][key]
                for s in seeds
            ]
            ax.bar([i + (k - 1) * 0.27 for i in range(len(seeds))], vals, 0.27, label=name, color=colors[name])
        if key in ("val_ce", "compliant"):
            ref = [
                summary["results"][s]["reference"]["compliance"]["compliant"]
                if key == "compliant"
                else summary["results"][s]["reference"]["val_ce"]
                for s in seeds
            ]
            for i, v in enumerate(ref):
                ax.hlines(
                    v,
                    i - 0.45,
                    i + 0.45,
                    colors="black",
                    linestyles="dashed",
                    label="f32 reference" if i == 0 else None,
                )
        ax.set_xticks(range(len(seeds)), [f"seed {s}" for s in seeds])
        ax.set_title(label, fontsize=10)
    axes[0].legend(fontsize=8)
    fig.suptitle("Ternary (TQ2_0) shipped in llama.cpp: PTQ vs BitNet QAT, same data and steps")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--work-dir", default="/tmp/felix-qat-ternary")
    ap.add_argument("--out-dir", default=str(HERE))
    ap.add_argument("--train-only", action="store_true")
    args = ap.parse_args()
    work, out = Path(args.work_dir), Path(args.out_dir)
    summary = {"train_args": TRAIN_ARGS, "arms": ARMS, "seeds": args.seeds, "training": [], "results": {}}
    for seed in args.seeds:
        ckpts = {arm: train(arm, seed, work) for arm in ARMS}
        if args.train_only:
            continue
        summary["training"] += [{"seed": seed, "arm": arm, **last_eval(c.parent)} for arm, c in ckpts.items()]
        summary["results"][str(seed)] = measure(seed, ckpts["fp"], ckpts["qat"], work)
    if args.train_only:
        return 0
    (out / "summary.json").write_text(
        json.dumps(summary, indent=1, default=lambda x: None if isinstance(x, float) and math.isnan(x) else x)
    )
    plot(summary, out / "comparison.png")
    (out / "summary.md").write_text(markdown(summary))
    print(f"wrote {out / 'summary.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
