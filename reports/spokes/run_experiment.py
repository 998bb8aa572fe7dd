"""Spokes on schema compliance: a tiny Felix-LM hub, then 4 spokes of rank 8 per layer trained on task records with
the hub frozen (`felix train --train-only spokes`), measured on held-out task probes (felix.verify.fidelity's built-in
probes: a seed away from the trainer's records) by the schema-compliance check of greedy generations (valid JSON,
required fields, types, enums), in PyTorch (fp32) and in the llama.cpp fork at RQ4 (`--arch felix --quant rq4`).

    python3 reports/spokes/run_experiment.py [--quick]

Two hubs: pretrained on prose + task records, and on prose alone (the seed's case: a general hub, the task taught
by the spokes). Writes reports/spokes/results-<scenario>.json, compliance-<scenario>.png, summary.json (runs under
a temp dir). CPU, ~6 minutes.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path


HERE = Path(__file__).resolve().parent


def compliance(model_dir: Path, probes, gguf_dir: Path, label: str) -> dict:
    from felix.verify import fidelity
    from felix.ship.export import export_gguf
    from felix.model.felix_lm import load_checkpoint
    from felix.model.tokenizer import Tokenizer

    model, tok = load_checkpoint(model_dir).eval(), Tokenizer.load(model_dir)
    wl = fidelity.build_probe_whitelist(tok, model.cfg.vocab_size).mask
    encoded = fidelity.encode_probes(probes, tok, wl)
    out = {}
    rows = fidelity.compliance_run(
        fidelity.TorchSource(model), encoded, tok, 160, progress=True, desc=f"{label} pytorch"
    )
    out["pytorch"] = {"summary": fidelity.compliance_summary(rows), "rows": rows}
    gguf = gguf_dir / f"{label}-rq4.gguf"
    export_gguf(model_dir, gguf, arch="felix", quant="rq4", force=True)
    src = fidelity.LlamaCppSource(gguf, model.cfg.max_seq_len)
    try:
        rows = fidelity.compliance_run(src, encoded, tok, 160, progress=True, desc=f"{label} fork rq4")
    finally:
        src.close()
    out["fork_rq4"] = {"summary": fidelity.compliance_summary(rows), "rows": rows}
    return out


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = ("valid_json", "required_fields", "field_types", "enum_values", "compliant")
    arms = [(arm, path_) for arm in ("base", "base+spokes") for path_ in ("pytorch", "fork_rq4")]
    fig, ax = plt.subplots(figsize=(9, 4))
    width = 0.8 / len(arms)
    for i, (arm, p) in enumerate(arms):
        s = results["arms"][arm][p]["summary"]
        ax.bar(
            [k + i * width for k in range(len(keys))],
            [s[k] / s["probes"] for k in keys],
            width,
            label=f"{arm} ({'PyTorch fp32' if p == 'pytorch' else 'fork RQ4'})",
        )
    ax.set_xticks([k + 0.4 - width / 2 for k in range(len(keys))], keys)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel(f"fraction of {results['probes']} held-out probes")
    ax.set_title(f"Schema compliance ({results['scenario']}): hub vs hub + 4 spokes (rank 8, hub frozen)")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="smoke sizes")
    ap.add_argument("--hub-steps", type=int, default=400)
    ap.add_argument("--spoke-steps", type=int, default=300)
    ap.add_argument("--probes", type=int, default=24)
    ap.add_argument("--work", help="run directory (default: a temp dir)")
    args = ap.parse_args(argv)
    if args.quick:
        args.hub_steps, args.spoke_steps, args.probes = 20, 10, 4
    from felix.verify import fidelity
    from felix.train.loop import TrainConfig, train

    work = Path(args.work or tempfile.mkdtemp(prefix="felix-spokes-"))
    out = HERE if not args.quick else work
    common = dict(preset="tiny", seq_len=128, batch_size=16, eval_every=100, eval_batches=4, seed=0, device="cpu")
    probes = fidelity.builtin_probes(args.probes)
    # two hubs: one pretrained on prose + 2000 task records (the tasks are in its distribution already), one on
    # prose alone (the seed's situation: a general hub, the task taught by the spokes alone)
    scenarios = {"hub-with-records": 2000, "prose-hub": 0}
    summary = {}
    for name, hub_records in scenarios.items():
        t0 = time.time()
        d = work / name
        train(
            TrainConfig(
                out_dir=str(d / "hub"),
                steps=args.hub_steps,
                n_records=hub_records,
                warmup_steps=min(50, args.hub_steps // 4),
                **common,
            )
        )
        spoke_run = train(
            TrainConfig(
                out_dir=str(d / "spokes"),
                init_from=str(d / "hub" / "checkpoint"),
                train_only="spokes",
                spokes=4,
                spoke_rank=8,
                steps=args.spoke_steps,
                n_records=2000,
                prose=False,
                lr=3e-3,
                warmup_steps=min(20, args.spoke_steps // 4),
                **common,
            )
        )
        results = {
            "schema": "felix-spokes-report",
            "scenario": name,
            "hub": {"preset": "tiny", "steps": args.hub_steps, "task_records_in_hub_corpus": hub_records},
            "spokes": {
                "n_spokes": 4,
                "rank": 8,
                "steps": args.spoke_steps,
                "train_only": "spokes",
                "data": "2000 task records (no prose)",
                "trainable_parameters": spoke_run.parameter_counts["spokes"],
                "final_val_ce": spoke_run.metrics[-1]["val_ce"],
            },
            "probes": len(probes),
            "probe_source": "felix.verify.fidelity.builtin_probes (held out: seed 1000003)",
            "arms": {},
        }
        (d / "gguf").mkdir(exist_ok=True)
        results["arms"]["base"] = compliance(d / "hub" / "checkpoint", probes, d / "gguf", "base")
        results["arms"]["base+spokes"] = compliance(d / "spokes" / "checkpoint", probes, d / "gguf", "spokes")
        results["seconds"] = time.time() - t0
        (out / f"results-{name}.json").write_text(json.dumps(results, indent=2))
        plot(results, out / f"compliance-{name}.png")
        summary[name] = {arm: {p: v["summary"] for p, v in r.items()} for arm, r in results["arms"].items()}
        for arm, r in summary[name].items():
            for p, v in r.items():
                print(name, arm, p, v)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"wrote {out}/results-*.json, compliance-*.png, summary.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
