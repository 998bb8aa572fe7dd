"""SpliceCore edits: 100 sequential edits into the splice surface of a tiny Felix-LM, their drift, and their life in
llama.cpp. One command reproduces everything in this folder (a few minutes on a 2-core CPU):

    python reports/splice-edits/run_experiment.py
    python reports/splice-edits/run_experiment.py --n-edits 20 --steps 100 --work-dir /tmp/se-smoke   # a smoke run

1. Train the tiny preset (`felix train`, built-in corpus) unless --work-dir already holds the checkpoint.
2. Fold the trained splice of layer 3 into its ffn_down weight (felix.tools.edit.fold_splice; function-preserving), which
   frees the whole rank-8 surface for edits.
3. The built-in edit set (felix.tools.edit.builtin_edit_set): a (subject, failure) pair from felix.data.corpus's records in one
   of their phrasings; the corpus teaches the fix's first word; the edit rewrites it to another fix's first word
   (counterfactual); paraphrases: the same pair in the two other phrasings, with other people.
4. Arms, each from the same folded model, edits applied one after another (default 100):
     alphaedit   closed form, null space of the preserved keys (train-split text), exact fit, rank-8 refit when full
     alphaedit-ridge  as alphaedit with a ridge term (edits hold approximately, ||dW|| stays bounded)
     minnorm     closed form without the null space (plain minimum-norm MEMIT-style solve), rank-8 refit
     finetune    constrained fine-tune of the splice's A/B (L-inf ball), the baseline
     alphaedit-r64  as alphaedit with the splice widened to rank 64 (felix.tools.edit.widen_splice)
   After each edit: efficacy, paraphrase generalisation, retention of earlier edits, locality KL on neutral
   validation text, ||dW||_F, rank used, validation CE.
5. Deployment of the alphaedit arm: the edited model exported as base GGUF + splice LoRA adapter; stock llama.cpp
   (llama-cpp-python) and the fork load it; logits at the last edit vs PyTorch, adapter scale 0 / 1 hot-swap, every
   edit's efficacy in the runtime; the same adapter over an RQ4 base in the fork (does an edit survive rq4 export
   of the base?), next to PyTorch on the RQ4 file's decoded weights.
Outputs: summary.json, summary.md, curves.png next to this script; the checkpoint and GGUFs in --work-dir.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from felix.model.felix_lm import load_checkpoint
from felix.model.tokenizer import Tokenizer
from felix.ship.export import adapter_tensors, export_gguf, model_from_gguf
from felix.ship.llamacpp import LlamaCppModel, available
from felix.tools.edit import (
    EditRequest,
    HarnessData,
    SpliceEditor,
    builtin_edit_set,
    corpus_sequences,
    fact_phrases,
    fold_splice,
    run_sequential,
    site_keys,
    splice_site,
    target_sequence,
    tokenize_request,
    widen_splice,
)

HERE = Path(__file__).resolve().parent
ARMS = ("alphaedit", "alphaedit-ridge", "minnorm", "finetune", "alphaedit-r64")
RIDGE = 0.01  # alphaedit-ridge: lambda = RIDGE * mean |P k|^2 (chosen from 0, 0.01, 0.03, 0.1, 1 on this edit set)
DEPLOYED = ("alphaedit", "alphaedit-ridge")


def train_checkpoint(work: Path, steps: int) -> Path:
    ckpt = work / "tiny" / "checkpoint"
    if (ckpt / "model.safetensors").exists():
        return ckpt
    cmd = [
        sys.executable,
        "-m",
        "felix",
        "train",
        "--out-dir",
        str(work / "tiny"),
        "--steps",
        str(steps),
        "--eval-every",
        str(steps),
    ]
    work.mkdir(parents=True, exist_ok=True)
    with open(work / "train.log", "w") as f:
        if subprocess.run(
            cmd, stdout=f, stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"}
        ).returncode:
            raise SystemExit(f"training failed; see {work / 'train.log'}")
    return ckpt


def make_editor(arm, model, tok, preserved):
    if arm == "alphaedit-r64":
        widen_splice(model, 64)
    if arm == "finetune":
        return SpliceEditor(model, tok, method="finetune")
    return SpliceEditor(
        model,
        tok,
        preserved_keys=preserved if arm != "minnorm" else None,
        null_space=arm != "minnorm",
        when_full="refit",
        ridge=RIDGE if arm == "alphaedit-ridge" else 0.0,
    )


def torch_logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids]))[0].double().numpy()


def deploy(model, tok, cases, work: Path) -> dict:
    """Export the edited model as base + splice adapter and run it in llama.cpp (stock and fork)."""
    work.mkdir(parents=True, exist_ok=True)
    out: dict = {}
    items = [tokenize_request(tok, model, EditRequest(c["prompt"], c["target"])) for c in cases]
    seqs = [target_sequence(p, t) for p, t in items]
    last_ids, last_pos = seqs[-1]
    last_target = items[-1][1][0]
    want = torch_logits(model, last_ids)[last_pos[0]]
    lora = adapter_tensors(model)
    for name, arch, quant in (("f32", "llama", "f32"), ("rq4", "felix", "rq4")):
        base = work / f"edited-{name}.gguf"
        res = export_gguf(work, base, arch=arch, quant=quant, splice="adapter", force=True, model=model, tokenizer=tok)
        # PyTorch on the file's decoded base weights + the adapter (what the runtime should compute)
        decoded = model_from_gguf(base)
        with torch.no_grad():
            for key, a in lora.items():
                if key.endswith(".lora_a"):
                    wname = key[: -len(".lora_a")]
                    b = lora[wname + ".lora_b"]
                    w = dict(decoded.named_parameters())[wname]
                    w.copy_((w.double() + b.double() @ a.double()).float())
        sim = [torch_logits(decoded, s)[p[0]] for s, p in seqs]
        out[f"pytorch_{name}_efficacy"] = float(np.mean([int(np.argmax(l)) == t[0] for l, (_, t) in zip(sim, items)]))
        runtimes = ["stock", "fork"] if name == "f32" else ["fork"]
        for rt in runtimes:
            ok, why = available(rt)
            key = f"{rt}_{name}"
            if not ok:
                out[key] = {"skipped": why}
                continue
            r: dict = {"adapter_file": res.adapter_path.name}
            with LlamaCppModel(base, adapter=res.adapter_path, runtime=rt) as llm:
                got = [llm.logits(s)[p[0]] for s, p in seqs]
                r["efficacy_all_edits"] = float(np.mean([int(np.argmax(g)) == t[0] for g, (_, t) in zip(got, items)]))
                r["agreement_with_pytorch_same_weights"] = float(
                    np.mean([int(np.argmax(g)) == int(np.argmax(s)) for g, s in zip(got, sim)])
                )
                g_last = got[-1]
                r["last_edit_argmax_is_target"] = int(np.argmax(g_last)) == last_target
                r["last_edit_rel_err_vs_pytorch_same_weights"] = float(
                    np.abs(g_last - sim[-1]).max() / np.abs(sim[-1]).max()
                )
                r["last_edit_rel_err_vs_pytorch_f32"] = float(np.abs(g_last - want).max() / np.abs(want).max())
                llm.set_adapter_scale(0.0)
                g0 = llm.logits(last_ids)[last_pos[0]]
                r["scale0_argmax_is_target"] = int(np.argmax(g0)) == last_target
                llm.set_adapter_scale(1.0)
                g1 = llm.logits(last_ids)[last_pos[0]]
                r["hot_swap_back_equal"] = bool(np.array_equal(g1, g_last))
            out[key] = r
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work-dir", default="/tmp/felix-splice-edits")
    ap.add_argument("--n-edits", type=int, default=100)
    ap.add_argument("--steps", type=int, default=400, help="training steps of the tiny model")
    ap.add_argument("--arms", nargs="+", default=list(ARMS), choices=ARMS)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (tiny matrices: 1 is fastest)")
    ap.add_argument("--out-dir", default=str(HERE))
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    work = Path(args.work_dir)
    t_start = time.perf_counter()
    ckpt = train_checkpoint(work, args.steps)
    tok = Tokenizer.load(ckpt)
    base = load_checkpoint(ckpt).eval()
    for p in base.parameters():
        p.requires_grad_(False)
    fold_err = fold_splice(base)
    cases = builtin_edit_set(base, tok, args.n_edits, args.seed)
    # neutral text for locality: validation documents that hold none of the edited facts' failure phrases
    data = HarnessData(
        cases, corpus_sequences(tok, "val", 16, 32, exclude=fact_phrases()), corpus_sequences(tok, "val", 8, 128)
    )
    site = splice_site(base)
    preserved = site_keys(base, site, corpus_sequences(tok, "train", 64, 64))
    summary = {
        "checkpoint": str(ckpt),
        "n_edits": len(cases),
        "fold_max_weight_change": fold_err,
        "site": f"blk.{site.layer}.splice.{site.projection}",
        "splice_rank": site.rank,
        "preserved_keys": list(preserved.shape),
        "learned_fraction": sum(c["learned"] for c in cases) / len(cases),
        "targets": sorted({c["target"] for c in cases}),
        "arms": {},
    }
    curves = {}
    edited_models = {}
    for arm in args.arms:
        model = copy.deepcopy(base)
        editor = make_editor(arm, model, tok, preserved)
        t0 = time.perf_counter()
        rows = run_sequential(editor, data, desc=arm)
        last = rows[-1]
        summary["arms"][arm] = {
            "final_cumulative_efficacy": last["cumulative_efficacy"],
            "final_retention": last["retention"],
            "final_cumulative_paraphrase": last.get("cumulative_paraphrase"),
            "mean_efficacy_at_edit_time": sum(r["efficacy"] for r in rows) / len(rows),
            "mean_paraphrase_at_edit_time": sum(r["paraphrase"] for r in rows) / len(rows),
            "final_locality_kl": last["locality_kl"],
            "max_locality_kl": max(r["locality_kl"] for r in rows),
            "final_val_ce_change": last["val_ce_change"],
            "final_dW_fro": last["dW_fro"],
            "final_rank_used": last["rank_used"],
            "splice_rank": editor.site.rank,
            "null_dim": editor.null_dim if arm != "finetune" else None,
            "seconds": time.perf_counter() - t0,
        }
        curves[arm] = rows
        edited_models[arm] = model
        print(
            f"{arm}: "
            + ", ".join(
                f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in summary["arms"][arm].items()
            ),
            flush=True,
        )
    for arm in DEPLOYED:
        if arm in edited_models:
            summary[f"deploy_{arm}"] = deploy(edited_models[arm], tok, cases, work / arm)
            print(f"deploy {arm}:", json.dumps(summary[f"deploy_{arm}"], indent=1), flush=True)
    summary["seconds_total"] = time.perf_counter() - t_start
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps({"summary": summary, "curves": curves}, indent=1))
    write_md(out / "summary.md", summary)
    plot(out, curves)
    return 0


def write_md(path: Path, s: dict) -> None:
    lines = [
        f"# SpliceCore edits: {s['n_edits']} sequential edits on {s['site']} (rank {s['splice_rank']})",
        "",
        f"checkpoint `{s['checkpoint']}`; trained splice folded into the weight (max change "
        f"{s['fold_max_weight_change']:.1e}); preserved keys {s['preserved_keys']}; the model had learned "
        f"{s['learned_fraction']:.0%} of the edited facts; targets {', '.join(repr(t) for t in s['targets'])}.",
        "",
        "| arm | rank | null dim | efficacy at edit | final efficacy (all edits) | final retention | paraphrase at edit "
        "| final paraphrase (all) | final KL | max KL | val CE change | ||dW||_F | rank used | s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for arm, a in s["arms"].items():
        f = lambda v, fmt=".3f": "-" if v is None else format(v, fmt)  # noqa: E731
        lines.append(
            f"| {arm} | {a['splice_rank']} | {a['null_dim'] if a['null_dim'] is not None else '-'} | "
            f"{f(a['mean_efficacy_at_edit_time'])} | {f(a['final_cumulative_efficacy'])} | "
            f"{f(a['final_retention'])} | {f(a['mean_paraphrase_at_edit_time'])} | "
            f"{f(a['final_cumulative_paraphrase'])} | {f(a['final_locality_kl'], '.2e')} | "
            f"{f(a['max_locality_kl'], '.2e')} | {f(a['final_val_ce_change'], '+.4f')} | "
            f"{f(a['final_dW_fro'], '.3f')} | {a['final_rank_used']} | {a['seconds']:.0f} |"
        )
    for arm in DEPLOYED:
        if f"deploy_{arm}" in s:
            lines += [
                "",
                f"## Deployment ({arm} arm): base GGUF + splice LoRA adapter in llama.cpp",
                "",
                "| runtime / base | efficacy (all edits) | top-1 = PyTorch on the same weights | last edit: target "
                "is argmax | last edit: rel. logit err vs PyTorch same weights | scale 0: target | scale 1 again "
                "bit-equal |",
                "|---|---|---|---|---|---|---|",
            ]
            for key, r in s[f"deploy_{arm}"].items():
                if isinstance(r, dict) and "skipped" in r:
                    lines.append(f"| {key} | skipped: {r['skipped']} | | | | | |")
                elif isinstance(r, dict):
                    lines.append(
                        f"| {key} | {r['efficacy_all_edits']:.2f} | {r['agreement_with_pytorch_same_weights']:.2f} "
                        f"| {r['last_edit_argmax_is_target']} | {r['last_edit_rel_err_vs_pytorch_same_weights']:.1e} "
                        f"| {r['scale0_argmax_is_target']} | {r['hot_swap_back_equal']} |"
                    )
            lines.append(
                "PyTorch efficacy, f32 base + adapter: {:.2f}; RQ4 base (decoded) + adapter: {:.2f}".format(
                    s[f"deploy_{arm}"]["pytorch_f32_efficacy"], s[f"deploy_{arm}"]["pytorch_rq4_efficacy"]
                )
            )
    lines += ["", f"total {s['seconds_total']:.0f} s"]
    path.write_text("\n".join(lines) + "\n")


def plot(out: Path, curves: dict) -> None:
    import matplotlib  # heavy optional dependency (the plot only); the Agg backend is chosen before pyplot loads

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [
        ("cumulative_efficacy", "efficacy over all applied edits"),
        ("retention", "retention of earlier edits"),
        ("paraphrase", "paraphrase generalisation (current edit)"),
        ("locality_kl", "locality KL (neutral text)"),
        ("dW_fro", "||dW||_F"),
        ("rank_used", "rank used"),
        ("val_ce_change", "validation CE change"),
        ("efficacy", "efficacy at edit time"),
    ]
    fig, axes = plt.subplots(2, 4, figsize=(18, 8))
    for ax, (k, title) in zip(axes.flat, keys):
        for arm, rows in curves.items():
            xs = [r["edit"] for r in rows if r.get(k) is not None]
            ys = [r[k] for r in rows if r.get(k) is not None]
            if k == "efficacy":  # running mean of a 0/1 series
                ys = [sum(ys[max(0, i - 9) : i + 1]) / len(ys[max(0, i - 9) : i + 1]) for i in range(len(ys))]
            ax.plot(xs, ys, label=arm)
        ax.set_title(title)
        ax.set_xlabel("edits applied")
        if k == "locality_kl":
            ax.set_yscale("symlog", linthresh=1e-6)
    axes.flat[0].legend()
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
