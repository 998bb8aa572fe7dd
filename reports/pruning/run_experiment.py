"""Is pruning worth it? Prune a trained tiny-256 to the tiny width, recover, and compare with the same config trained
from scratch at equal compute, on validation CE. Writes summary.json, summary.md and val_ce_vs_flops.png here.

    python reports/pruning/run_experiment.py            # a few minutes on 2 idle cores (CPU, fp32)
    python reports/pruning/run_experiment.py --seeds 0 1 --recovery-steps 200

Arms (all on the built-in corpus, one tokenizer: the source's; validation CE on one fixed set of held-out windows):

* source: tiny-256 (2 x 256, 4:2 heads of 64, SwiGLU 512) trained --source-steps steps.
* pruned-<method> + recovery: `felix prune` to the tiny width (d_model 128, 4:2 heads of 32, SwiGLU 352) at the
  source's 2 layers -- the tiny preset itself has 4 layers, more than the source, which pruning cannot add -- then
  `felix train --init-from` for --recovery-steps steps.
* scratch (post-source compute): the same config from a fresh init, trained with the FLOPs the pruned arm spent
  AFTER the source existed (calibration / mask learning + recovery): the comparison when the source is a given.
* scratch (total compute): the same, also granted the source's own training FLOPs: the comparison when the
  source has to be trained for this purpose.

FLOPs: felix.train.loop.flops_per_token (6 x matmul parameters + attention) per token trained; a calibration batch is
counted as one forward+backward of the source (Taylor, hard-concrete) or one forward (activation norms).
Checkpoints go to --work-dir (not committed).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))

from felix.data import corpus as felix_data  # noqa: E402
from felix.model import felix_lm as felix_model  # noqa: E402
from felix.tools import prune as felix_prune  # noqa: E402
from felix.train.loop import TrainConfig, flops_per_token, train  # noqa: E402

TARGET = dict(n_layer=2, n_head=4, n_kv_head=2, ffn_hidden=352, d_model=128)  # tiny's width, the source's depth


def run_train(out: Path, log, **kw):
    cfg = TrainConfig(out_dir=str(out), **kw)
    t0 = time.perf_counter()
    res = train(cfg, log=log)
    return res, time.perf_counter() - t0


def val_batches(tokenizer, args, seed):
    """felix train's validation split and windows (the same for every arm: same corpus, seed, tokenizer)."""
    d = TrainConfig()
    docs = felix_data.builtin_corpus(d.n_records, seed)
    _, val = felix_data.split_documents(docs, d.val_fraction, seed)
    stream = felix_data.TokenStream.from_documents(val, tokenizer, args.seq_len, seed + 1)
    return stream.fixed_batches(args.batch_size, args.eval_batches)


@torch.no_grad()
def val_ce(model, batches) -> float:
    model.eval()
    return sum(float(model.loss(x, y).ce) for x, y in batches) / len(batches)


def curve(metrics, flops_per_step, offset):
    return [(offset + m["step"] * flops_per_step, m["val_ce"]) for m in metrics]


def llamacpp_check(ckpt: Path, work: Path) -> dict:
    """Export f16 to stock llama.cpp and compare its logits with PyTorch's on one validation window."""
    from felix.ship.export import export_gguf
    from felix.ship.llamacpp import LlamaCppModel, available
    from felix.model.tokenizer import Tokenizer

    ok, why = available()
    if not ok:
        return {"skipped": why}
    out = work / "pruned-recovered-f16.gguf"
    export_gguf(ckpt, out, quant="f16", force=True)
    tok = Tokenizer.load(ckpt)
    ids = tok.encode(felix_data.builtin_corpus(4, 0)[-1])[:96]
    model = felix_model.load_checkpoint(ckpt).eval()
    with LlamaCppModel(out) as llm:
        got = torch.from_numpy(llm.logits(ids)).double()
    with torch.no_grad():
        want = model(torch.tensor([ids]))[0].double()
    return {
        "gguf": out.name,
        "tokens": len(ids),
        "max_rel_err": float((got - want).abs().max() / want.abs().max()),
        "top1_agreement": float((got.argmax(-1) == want.argmax(-1)).double().mean()),
    }


def run_seed(seed: int, args, log) -> dict:
    work = Path(args.work_dir) / f"seed{seed}"
    common = dict(
        seq_len=args.seq_len,
        batch_size=args.batch_size,
        eval_batches=args.eval_batches,
        seed=seed,
        lambda_q=0.0,
        lr=args.lr,
    )
    tokens_per_step = args.seq_len * args.batch_size
    rows = {}
    # 1. source
    src_res, src_s = run_train(
        work / "source",
        log,
        preset="tiny-256",
        steps=args.source_steps,
        warmup_steps=args.source_steps // 10,
        eval_every=max(1, args.source_steps // 4),
        **common,
    )
    src_ckpt = work / "source" / "checkpoint"
    source = felix_model.load_checkpoint(src_ckpt)
    from felix.model.tokenizer import Tokenizer

    tok = Tokenizer.load(src_ckpt)
    vb = val_batches(tok, args, seed)
    src_fpt = flops_per_token(source.cfg, args.seq_len)
    source_flops = src_fpt * tokens_per_step * args.source_steps
    rows["source"] = {
        "config": "tiny-256",
        "params": felix_model.parameter_counts(source.cfg)["total"],
        "steps": args.source_steps,
        "train_flops": source_flops,
        "val_ce": val_ce(source, vb),
        "seconds": src_s,
    }
    curves = {"source": curve(src_res.metrics, src_fpt * tokens_per_step, 0.0)}
    log(f"[seed {seed}] source val CE {rows['source']['val_ce']:.4f}")

    # 2. prune + recover, per method
    target = felix_prune.Target(**TARGET)
    post_source_budget = 0.0
    for method in args.methods:
        t0 = time.perf_counter()
        pruned_dir = work / f"pruned-{method}"
        result = felix_prune.prune_checkpoint(
            src_ckpt,
            pruned_dir,
            target,
            method=method,
            calib_batches=args.calib_batches,
            batch_size=args.batch_size,
            seq_len=args.seq_len,
            hc_steps=args.hc_steps,
            seed=seed,
        )
        prune_s = time.perf_counter() - t0
        calib_passes = args.hc_steps if method == "hard-concrete" else args.calib_batches
        per_pass = 1 / 3 if method == "activation" else 1.0  # a forward is ~1/3 of forward+backward
        prune_flops = src_fpt * tokens_per_step * calib_passes * per_pass
        pcfg = result.model.cfg
        tgt_fpt = flops_per_token(pcfg, args.seq_len)
        rec_res, rec_s = run_train(
            work / f"recovered-{method}",
            log,
            init_from=str(pruned_dir),
            steps=args.recovery_steps,
            warmup_steps=args.recovery_steps // 10,
            eval_every=max(1, args.recovery_steps // 4),
            **common,
        )
        recovered = felix_model.load_checkpoint(work / f"recovered-{method}" / "checkpoint")
        rec_flops = tgt_fpt * tokens_per_step * args.recovery_steps
        rows[f"pruned-{method}"] = {
            "params": result.pruned_params,
            "kept_layers": [lp.source_layer for lp in result.plan.layers],
            "val_ce_before_recovery": val_ce(result.model, vb),
            "val_ce": val_ce(recovered, vb),
            "recovery_steps": args.recovery_steps,
            "prune_flops": prune_flops,
            "recovery_flops": rec_flops,
            "post_source_flops": prune_flops + rec_flops,
            "seconds": prune_s + rec_s,
        }
        post_source_budget = max(post_source_budget, prune_flops + rec_flops)
        curves[f"pruned-{method} + recovery"] = [
            (prune_flops, rows[f"pruned-{method}"]["val_ce_before_recovery"])
        ] + curve(rec_res.metrics, tgt_fpt * tokens_per_step, prune_flops)
        log(
            f"[seed {seed}] {method}: pruned val CE {rows[f'pruned-{method}']['val_ce_before_recovery']:.4f} -> "
            f"recovered {rows[f'pruned-{method}']['val_ce']:.4f}"
        )

    # 3. from scratch, same config as the pruned model (standard init and norm epsilon), equal compute
    scratch_cfg = felix_model.FelixConfig(**{**json.loads(pcfg.to_json()), "norm_eps": source.cfg.norm_eps})
    torch.manual_seed(seed)
    init_dir = work / "scratch-init"
    felix_model.save_checkpoint(init_dir, felix_model.FelixLM(scratch_cfg), tok)
    step_flops = flops_per_token(scratch_cfg, args.seq_len) * tokens_per_step
    for name, budget in (
        ("scratch (post-source compute)", post_source_budget),
        ("scratch (total compute)", post_source_budget + source_flops),
    ):
        steps = max(1, round(budget / step_flops))
        slug = "scratch-post" if "post" in name else "scratch-total"
        res, s = run_train(
            work / slug,
            log,
            init_from=str(init_dir),
            steps=steps,
            warmup_steps=steps // 10,
            eval_every=max(1, steps // 6),
            **common,
        )
        rows[name] = {
            "params": felix_model.parameter_counts(scratch_cfg)["total"],
            "steps": steps,
            "train_flops": steps * step_flops,
            "budget_flops": budget,
            "val_ce": val_ce(felix_model.load_checkpoint(work / slug / "checkpoint"), vb),
            "seconds": s,
        }
        curves[name] = curve(res.metrics, step_flops, 0.0)
        log(f"[seed {seed}] {name}: {steps} steps, val CE {rows[name]['val_ce']:.4f}")
    best = min((k for k in rows if k.startswith("pruned-")), key=lambda k: rows[k]["val_ce"])
    rows[best]["llamacpp"] = llamacpp_check(work / f"recovered-{best.removeprefix('pruned-')}" / "checkpoint", work)
    return {"seed": seed, "rows": rows, "curves": curves, "source_flops": source_flops}


def write_report(results, args):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = {"settings": vars(args), "target": TARGET, "seeds": results}
    (HERE / "summary.json").write_text(json.dumps(summary, indent=1))
    names = list(results[0]["rows"])
    lines = [
        "# Structured pruning vs training from scratch (equal compute)",
        "",
        f"Source tiny-256 trained {args.source_steps} steps; target: tiny's width at 2 layers "
        f"({TARGET}); batch {args.batch_size} x {args.seq_len} tokens; recovery {args.recovery_steps} steps; "
        f"calibration {args.calib_batches} batches (hard-concrete: {args.hc_steps} mask steps); validation CE on "
        f"{args.eval_batches} fixed held-out batches. Seeds: {[r['seed'] for r in results]}.",
        "",
        "| arm | params | val CE before recovery | val CE (mean over seeds) | per seed | post-source GFLOPs |",
        "|---|---|---|---|---|---|",
    ]
    for n in names:
        ces = [r["rows"][n]["val_ce"] for r in results]
        row = results[0]["rows"][n]
        before = [r["rows"][n].get("val_ce_before_recovery") for r in results]
        flops = row.get("post_source_flops", row.get("train_flops") if n.startswith("scratch") else None)
        lines.append(
            f"| {n} | {row['params']:,} | "
            f"{', '.join(f'{b:.4f}' for b in before) if before[0] is not None else '-'} | "
            f"{sum(ces) / len(ces):.4f} | {', '.join(f'{c:.4f}' for c in ces)} | "
            f"{flops / 1e9:.1f} |"
            if flops is not None
            else f"| {n} | {row['params']:,} | - | {sum(ces) / len(ces):.4f} | {', '.join(f'{c:.4f}' for c in ces)} "
            f"| (source: {row['train_flops'] / 1e9:.1f}) |"
        )
    for r in results:
        for n, row in r["rows"].items():
            if "llamacpp" in row:
                lines += [
                    "",
                    f"seed {r['seed']}, {n} after recovery, exported f16 and run in stock llama.cpp: "
                    f"{json.dumps(row['llamacpp'])}",
                ]
    (HERE / "summary.md").write_text("\n".join(lines) + "\n")
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for r in results:
        for n, pts in r["curves"].items():
            if n == "source":
                continue
            ax.plot(
                [p[0] / 1e9 for p in pts],
                [p[1] for p in pts],
                "o-" if "pruned" in n else "s--",
                ms=3,
                label=f"{n} (seed {r['seed']})",
                alpha=0.85,
            )
        ax.axvline(r["source_flops"] / 1e9, color="grey", lw=0.8, ls=":")
    ax.set_xlabel("training GFLOPs after the source (dotted line: the source's own training)")
    ax.set_ylabel("validation CE (nats/token)")
    ax.set_title("pruned tiny-256 + recovery vs from scratch, same config")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(HERE / "val_ce_vs_flops.png", dpi=110)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--source-steps", type=int, default=200)
    p.add_argument("--recovery-steps", type=int, default=60)
    p.add_argument("--calib-batches", type=int, default=4)
    p.add_argument("--hc-steps", type=int, default=40)
    p.add_argument("--methods", nargs="+", default=list(felix_prune.METHODS), choices=felix_prune.METHODS)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--eval-batches", type=int, default=8)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--work-dir", default=str(HERE / "work"))
    args = p.parse_args(argv)
    log = lambda msg: print(msg, flush=True)  # noqa: E731
    results = [run_seed(s, args, log) for s in args.seeds]
    write_report(results, args)
    print((HERE / "summary.md").read_text())


if __name__ == "__main__":
    main()
