"""The report's outputs: the gate thresholds, the Markdown report, the plots and the JSON file."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from felix.core.files import atomic_write_text, jsonable, save_figure


@dataclass
class Gate:
    """Thresholds; None = not checked. Margin survival and top-1 agreement are fractions in [0, 1]."""

    min_margin_survival: float | None = None
    max_flips: int | None = None
    max_kl_mean: float | None = None
    max_kl_p99: float | None = None
    min_top1_agreement: float | None = None

    def check(self, report: dict) -> list[str]:
        failures = []
        for path, res in report["results"].items():
            s = res["summary"]
            checks = [
                (self.min_margin_survival, s["margin"]["survival"], "margin survival", "<"),
                (self.max_flips, s["margin"]["flips"], "flips", ">"),
                (self.max_kl_mean, s["kl"]["mean"], "KL mean", ">"),
                (self.max_kl_p99, s["kl"]["p99"], "KL p99", ">"),
                (self.min_top1_agreement, s["top1_agreement"], "top-1 agreement", "<"),
            ]
            for limit, value, what, bad_if in checks:
                if limit is None:
                    continue
                crossed = (value < limit) if bad_if == "<" else (value > limit)
                if isinstance(value, float) and math.isnan(value):
                    failures.append(
                        f"{path}: {what} is undefined (no whitelisted position the reference decides "
                        f"correctly, or no positions): cannot show it meets {limit:.4g}"
                    )
                elif crossed:
                    failures.append(
                        f"{path}: {what} {value:.4g} {'below' if bad_if == '<' else 'above'} the threshold {limit:.4g}"
                    )
        return failures


def _plt():
    import matplotlib  # local: heavy (half a second), loaded only when a plot is drawn; Agg before pyplot

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_margins(positions: list[dict], path: Path, title: str) -> None:
    """Reference vs quantized margin at whitelisted positions; the flip regions shaded."""
    plt = _plt()
    x = [p["ref_margin"] for p in positions]
    y = [p["quant_margin"] for p in positions]
    fig, ax = plt.subplots(figsize=(5, 5))
    lim = max([1.0] + [abs(v) for v in x + y]) * 1.05
    ax.fill_between([0, lim], -lim, 0, color="red", alpha=0.12, label="lost (flip)")
    ax.fill_between([-lim, 0], 0, lim, color="orange", alpha=0.12, label="gained (flip)")
    ax.plot([-lim, lim], [-lim, lim], color="gray", lw=0.8)
    colors = ["red" if p["flipped"] else "tab:blue" for p in positions]
    ax.scatter(x, y, s=6, c=colors, alpha=0.6)
    ax.set(
        xlim=(-lim, lim), ylim=(-lim, lim), xlabel="reference margin (logits)", ylabel="quantized margin", title=title
    )
    ax.axhline(0, color="k", lw=0.5)
    ax.axvline(0, color="k", lw=0.5)
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    save_figure(fig, path, dpi=80)
    plt.close(fig)


def plot_margin_change(positions: list[dict], path: Path, title: str) -> None:
    plt = _plt()
    d = [p["quant_margin"] - p["ref_margin"] for p in positions]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.hist(d, bins=40, color="tab:blue", alpha=0.8)
    ax.axvline(0, color="k", lw=0.8)
    ax.set(xlabel="margin change (quantized - reference)", ylabel="whitelisted positions", title=title)
    fig.tight_layout()
    save_figure(fig, path, dpi=80)
    plt.close(fig)


def plot_sensitivity(rows: list[dict], path: Path, title: str, top: int = 15) -> None:
    plt = _plt()
    rows = rows[:top][::-1]
    fig, ax = plt.subplots(figsize=(6, 0.3 * len(rows) + 1.2))
    ax.barh([f"{r['tensor']} ({r['type']})" for r in rows], [r["margin_cost"] for r in rows], color="tab:red")
    ax.set(xlabel="mean margin lost at whitelisted positions (logits)", title=title)
    ax.tick_params(axis="y", labelsize=7)
    fig.tight_layout()
    save_figure(fig, path, dpi=80)
    plt.close(fig)


def _f(x, nd=4) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{nd}f}"


def markdown_report(report: dict, plots: dict[str, str]) -> str:
    q = report["quant"]
    low = next((r["summary"]["margin"]["low_threshold"] for r in report["results"].values()), float("nan"))
    lines = [
        f"# Fidelity report: {report['checkpoint']} at {q}",
        "",
        f"Probes: {report['probes']['count']} ({report['probes']['source']}), context window "
        f"{report['probes']['context_window']}. Whitelist: {report['whitelist']['size']} tokens, "
        f"{report['whitelist']['covered']} of them expected somewhere in the probes. Low-margin: reference-correct "
        f"whitelisted positions with a reference margin below {low:g} logits (the QUAIL margin).",
        "",
    ]
    for msg in report["whitelist"]["problems"]:
        lines.append(f"- whitelist problem: {msg}")
    if report["whitelist"]["unreachable"]:
        lines.append(
            f"- {len(report['whitelist']['unreachable'])} whitelisted tokens are never produced by the "
            f"tokenizer (no probe can expect them): {', '.join(report['whitelist']['unreachable'][:8])}"
        )
    types = {}
    for t in report["tensor_types"]:
        types.setdefault(t["type"], []).append(t["name"])
    lines += [
        "",
        "Tensor types: " + "; ".join(f"{k}: {len(v)}" for k, v in types.items()),
        "",
        "| path | whitelisted positions | ref. correct | survived | margin survival | low-margin survived | "
        "flips (lost/gained) | mean margin ref -> quant | KL mean | KL p99 | KL max | top-1 agreement | delta-p mean | delta-p rms |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for path, res in report["results"].items():
        s, m = res["summary"], res["summary"]["margin"]
        lines.append(
            f"| {path} | {s['whitelisted_positions']} | {m['reference_correct']} | {m['survived']} | "
            f"{_f(m['survival'])} | {m['low_survived']}/{m['low_reference_correct']} | {m['flips']} ({m['lost']}/{m['gained']}) | {_f(m['reference_mean'], 2)}"
            f" -> {_f(m['quantized_mean'], 2)} | {_f(s['kl']['mean'], 5)} | {_f(s['kl']['p99'], 5)} | "
            f"{_f(s['kl']['max'], 5)} | {_f(s['top1_agreement'])} | {_f(s['delta_p']['mean'], 5)} | "
            f"{_f(s['delta_p']['rms'], 5)} |"
        )
    if any("compliance" in r for r in report["results"].values()):
        lines += [
            "",
            "Schema compliance of greedy generations (probes with a schema):",
            "",
            "| path | model | probes | valid JSON | required fields | field types | enum values | compliant |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for path, res in report["results"].items():
            for side in ("reference", "quantized"):
                c = res.get("compliance", {}).get(side)
                if c:
                    lines.append(
                        f"| {path} | {side} | {c['probes']} | {c['valid_json']} | {c['required_fields']} | "
                        f"{c['field_types']} | {c['enum_values']} | {c['compliant']} |"
                    )
    if report.get("agreement_by_sim_activations"):
        lines += [
            "",
            f"Simulated vs runtime ({q} in {report.get('runtime') or 'llama.cpp'} llama.cpp; the report's "
            f"simulated path uses {report.get('sim_activations', 'exact')} activations):",
            "",
            "| simulated activations | top-1 agreement | max rel. logit error | mean rel. logit error | KL sim -> "
            "runtime | mean / max |margin diff| | decisions that differ | predicted / runtime KL(ref -> quant) | "
            "predicted / runtime margin-change RMS |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for name, a in report["agreement_by_sim_activations"].items():
            lines.append(
                f"| {name} | {_f(a['top1_agreement'])} | {_f(a['max_rel_err'])} | {_f(a['mean_rel_err'])} | "
                f"{_f(a['kl_mean'], 6)} | {_f(a['margin_abs_diff_mean'])} / {_f(a['margin_abs_diff_max'])} | "
                f"{a['decision_disagreements']} | {_f(a['sim_kl_mean'], 6)} / {_f(a['runtime_kl_mean'], 6)} "
                f"({_f(a['kl_mean_ratio'], 2)}x) | {_f(a['sim_margin_change_rms'])} / "
                f"{_f(a['runtime_margin_change_rms'])} ({_f(a['margin_change_rms_ratio'], 2)}x) |"
            )
    elif report.get("agreement"):
        a = report["agreement"]
        lines += [
            "",
            f"Simulated vs runtime ({q}): top-1 agreement {_f(a['top1_agreement'])}, max relative logit "
            f"error {_f(a['max_rel_err'])}, max |margin difference| {_f(a['margin_abs_diff_max'])}, "
            f"{a['decision_disagreements']} whitelisted decisions differ.",
        ]
    if report.get("constrained"):
        c = report["constrained"]
        lines += [
            "",
            f"Served ({c['quant']} through felix serve's /v1/chat/completions, greedy): free vs constrained by "
            f"the schema's grammar (response_format json_schema); the grammar changed "
            f"{c['changed_by_grammar']} of {c['free']['probes']} answers"
            + (f"; {len(c['skipped'])} probes skipped" if c["skipped"] else "")
            + ":",
            "",
            "| decoding | probes | valid JSON | required fields | field types | enum values | compliant | "
            "task score (1-5) |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for side in ("free", "constrained"):
            x = c[side]
            lines.append(
                f"| {side} | {x['probes']} | {x['valid_json']} | {x['required_fields']} | {x['field_types']} "
                f"| {x['enum_values']} | {x['compliant']} | {_f(x['task_score_mean'], 2)} |"
            )
    for path, res in report["results"].items():
        flips = [p for p in res["positions"] if p["flipped"]]
        if flips:
            lines += [
                "",
                f"Flipped decisions ({path}, first 20):",
                "",
                "| probe | index | token | ref | quant |",
                "|---|---|---|---|---|",
            ]
            lines += [
                f"| {p['probe']} | {p['index']} | `{p['text']!r}` | {p['ref_margin']:.3f} | {p['quant_margin']:.3f} |"
                for p in flips[:20]
            ]
    if report.get("sensitivity"):
        lines += [
            "",
            "Per-tensor sensitivity (one tensor quantized at a time, simulated; top 10):",
            "",
            "| tensor | type | mean margin lost | flips | KL mean |",
            "|---|---|---|---|---|",
        ]
        lines += [
            f"| {r['tensor']} | {r['type']} | {r['margin_cost']:.4f} | {r['flips']} | {r['kl_mean']:.5f} |"
            for r in report["sensitivity"][:10]
        ]
    if report.get("gate"):
        g = report["gate"]
        lines += ["", f"Gate: {'PASSED' if g['passed'] else 'FAILED'}"] + [f"- {f}" for f in g["failures"]]
    lines += [""] + [f"![{name}]({file})" for name, file in plots.items()]
    return "\n".join(lines) + "\n"


def write_report(report: dict, out_dir, stem: str | None = None) -> dict[str, Path]:
    """report JSON (NaN -> null), Markdown and PNG plots into `out_dir`; returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = stem or f"fidelity-{report['quant']}"
    files, plots = {}, {}
    for path, res in report["results"].items():
        title = f"{report['quant']} ({path})"
        if res["positions"]:
            f = out / f"{stem}-{path}-margins.png"
            plot_margins(res["positions"], f, title)
            plots[f"margins {path}"] = f.name
            f = out / f"{stem}-{path}-margin-change.png"
            plot_margin_change(res["positions"], f, title)
            plots[f"margin change {path}"] = f.name
    if report.get("sensitivity"):
        f = out / f"{stem}-sensitivity.png"
        plot_sensitivity(report["sensitivity"], f, f"per-tensor sensitivity, {report['quant']}")
        plots["sensitivity"] = f.name
    files["json"] = out / f"{stem}.json"
    atomic_write_text(files["json"], json.dumps(jsonable(report), indent=1))
    files["markdown"] = out / f"{stem}.md"
    atomic_write_text(files["markdown"], markdown_report(report, plots))
    files.update({k: out / v for k, v in plots.items()})
    return files
