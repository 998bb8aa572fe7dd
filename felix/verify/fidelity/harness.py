"""The harness: one checkpoint, one quantization, the simulated and/or runtime path; each path runs on its own
and the agreement between them is computed afterwards, from their logits."""

from __future__ import annotations

import copy
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from felix.model import qat as felix_qat
from felix.model.felix_lm import load_checkpoint
from felix.model.qat import read_qat_config
from felix.model.tokenizer import Tokenizer
from felix.ops.activation_rounding import ActivationRounding
from felix.ops.quant_policy import check_type, plan_tensor_types, roundtrip
from felix.ship import llamacpp
from felix.ship.export import base_tensors, export_gguf, splice_factors
from felix.ship.serve import Server, ServeError
from felix.verify.fidelity.common import (
    PATHS,
    SCHEMA_NAME,
    SCHEMA_VERSION,
    SIM_ACTIVATIONS,
    FidelityError,
    arch_of,
    runtime_of,
)
from felix.verify.fidelity.constrained import constrained_run
from felix.verify.fidelity.generation import compliance_run, compliance_summary
from felix.verify.fidelity.metrics import PositionStats, agreement, compare_logits, predicted_effect, summarize
from felix.verify.fidelity.probes import all_targets, build_probe_whitelist, encode_probes, load_probes, probe_set
from felix.verify.fidelity.sources import LlamaCppSource, TorchSource, score_probes


def load_for_fidelity(checkpoint, tokenizer_path=None):
    """(model, tokenizer) from a checkpoint directory; the tokenizer must fit the model's vocabulary."""
    model = load_checkpoint(checkpoint)
    tok = Tokenizer.load(tokenizer_path or checkpoint)
    if tok.vocab_size != model.cfg.vocab_size:
        raise FidelityError(
            f"checkpoint/tokenizer mismatch: the tokenizer "
            f"({tokenizer_path or Path(checkpoint) / 'tokenizer.json'}) has {tok.vocab_size} tokens, "
            f"the model's vocabulary is {model.cfg.vocab_size}"
        )
    return model, tok


def quantized_state(state: dict, quant: str, embedding_type=None, only: str | None = None, qat=None):
    """(state dict after the export policy's roundtrip, the policy's choices). `only`: quantize just that
    tensor (per-tensor sensitivity), keep the rest exact. `qat` (felix.model.qat.QATConfig of a quantization-aware
    checkpoint): its tensors go through the codec its forward used, as the exporter writes them."""
    plan = plan_tensor_types({k: tuple(v.shape) for k, v in state.items()}, quant, embedding_type)
    out = dict(state)
    for c in plan:
        if c.type != "f32" and (only is None or c.name == only):
            if qat is not None and qat.tensor_types.get(c.name) == c.type:
                out[c.name] = felix_qat.fake_quant(state[c.name].float(), c.type, qat.mode)
            else:
                out[c.name] = roundtrip(state[c.name].float(), c.type)
    return out, plan


def deployed_state(model, qat=None) -> dict:
    """The model's state as the exporter deploys it, before quantization: a plain checkpoint's live splices are
    merged into their weights (``--splice merge``: the file quantizes W + gate B A, so must the simulation) and
    their B zeroed; a quantization-aware checkpoint keeps them live, since its file carries them as a LoRA
    adapter beside the base weights its forward quantized (see _export_pair)."""
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if qat is None:
        for name, w in base_tensors(model, "merge").items():
            if name in state and not torch.equal(state[name].float(), w):
                state[name] = w.to(state[name].dtype)
        for name in state:
            if ".splice." in name and name.endswith(".b"):
                state[name] = torch.zeros_like(state[name])
    return state


def _with_state(model, state):
    m = copy.deepcopy(model)
    m.load_state_dict(state, strict=True)
    return m.eval()


def sensitivity(model, encoded, quant, embedding_type, whitelist, ref_logits, progress=False, qat=None) -> list[dict]:
    """One tensor quantized at a time (simulated): margin cost at whitelisted positions, flips, KL; ranked by
    the mean margin lost (reference margin minus quantized margin), largest first."""
    state = deployed_state(model, qat)
    plan = plan_tensor_types({k: tuple(v.shape) for k, v in state.items()}, quant, embedding_type)
    targets = all_targets(encoded)
    rows = []
    work = model.__class__(model.cfg).eval()
    for c in tqdm(
        [c for c in plan if c.type != "f32"],
        desc="per-tensor sensitivity",
        unit="tensor",
        disable=not progress,
        leave=False,
    ):
        qstate, _ = quantized_state(state, quant, embedding_type, only=c.name, qat=qat)
        work.load_state_dict(qstate, strict=True)
        stats = compare_logits(ref_logits, score_probes(TorchSource(work), encoded), targets, whitelist)
        w = stats.whitelisted
        rows.append(
            {
                "tensor": c.name,
                "type": c.type,
                "shape": list(c.shape),
                "margin_cost": float((stats.ref_margin[w] - stats.quant_margin[w]).mean()) if w.any() else 0.0,
                "flips": int(stats.flipped[w].sum()),
                "kl_mean": float(stats.kl.mean()),
            }
        )
    return sorted(rows, key=lambda r: -r["margin_cost"])


@dataclass
class FidelityOptions:
    quant: str = "rq4"
    paths: tuple[str, ...] = ("simulated",)
    embedding_type: str | None = None
    probes_file: str | None = None
    n_probes: int = 24
    probe_set: str = "builtin"  # built-in probes when there is no probes_file: see PROBE_SETS
    whitelist_strings: tuple[str, ...] = ()
    whitelist_tokens: tuple[str, ...] = ()
    sensitivity: bool = True
    compliance: bool = True
    max_new_tokens: int = 160
    tokenizer: str | None = None
    gguf_dir: str | None = None  # runtime path: where the exported GGUF files go (default: a temp dir)
    progress: bool = False
    compliance_paths: tuple[str, ...] | None = None  # paths that generate (None: all of `paths`)
    sim_activations: str = "exact"  # simulated path: "exact" activations, or "runtime" (rounded as llama.cpp does)
    constrained: bool = (
        False  # serve the quantized export (felix.ship.serve) and compare free vs grammar-constrained answers
    )


def _positions_table(encoded, stats: PositionStats, tokenizer) -> list[dict]:
    rows, i = [], 0
    for e in encoded:
        for j, t in enumerate(e.targets):
            if e.whitelisted[j]:
                rows.append(
                    {
                        "probe": e.probe.name,
                        "index": j,
                        "token": t,
                        "text": tokenizer.decode([t]),
                        "ref_margin": round(float(stats.ref_margin[i]), 4),
                        "quant_margin": round(float(stats.quant_margin[i]), 4),
                        "flipped": bool(stats.flipped[i]),
                        "runner_up": tokenizer.decode([int(stats.runner_up[i])]),
                        "runner_up_p_ref": round(float(stats.runner_up_logp_ref[i].exp()), 6),
                        "runner_up_log_ratio": round(
                            float(stats.runner_up_logp_quant[i] - stats.runner_up_logp_ref[i]), 5
                        ),
                    }
                )
            i += 1
    return rows


def _export_pair(checkpoint, quant, embedding_type, directory: Path, model) -> tuple[Path, Path, Path | None]:
    """The f32 reference and the quantized file, both in the arch of the runtime that serves `quant` (so the
    reference and the quantized model run in the same llama.cpp and differ only by quantization), and the quantized
    file's splice adapter when it needs one.

    A quantization-aware checkpoint with SpliceCore tensors computes quantized(W) x + gate B A x with the splice in
    F32, which a merged file cannot hold (the exporter refuses to re-quantize W + gate B A): its quantized file keeps
    the base weights and carries the splices as a LoRA adapter applied at scale 1, which is that computation. The
    f32 reference merges them (exact at f32)."""
    directory.mkdir(parents=True, exist_ok=True)
    arch = arch_of(quant)
    ref, q = directory / f"reference-f32-{arch}.gguf", directory / f"quantized-{quant}.gguf"
    export_gguf(checkpoint, ref, arch=arch, quant="f32", force=True)
    adapter = None
    if read_qat_config(checkpoint) is not None and splice_factors(model):
        adapter = directory / f"quantized-{quant}.splice-lora.gguf"
        export_gguf(
            checkpoint,
            q,
            arch=arch,
            quant=quant,
            force=True,
            embedding_type=embedding_type,
            splice="adapter",
            adapter_out=adapter,
        )
    else:
        export_gguf(checkpoint, q, arch=arch, quant=quant, force=True, embedding_type=embedding_type)
    return ref, q, adapter


def simulated_model(model, qstate: dict, plan, sim_activations: str):
    """The simulated deployment: `model` on the policy's dequantized weights `qstate`, with activations exact or
    rounded as llama.cpp's CPU matmuls and KV cache round them (felix.ops.activation_rounding)."""
    if sim_activations not in SIM_ACTIVATIONS:
        raise FidelityError(f"unknown sim_activations {sim_activations!r}; choose from {', '.join(SIM_ACTIVATIONS)}")
    m = _with_state(model, qstate)
    return m.set_activation_rounding(ActivationRounding.from_plan(plan) if sim_activations == "runtime" else None)


def run_fidelity(checkpoint, opts: FidelityOptions, cache: dict | None = None) -> dict:
    """The full harness on one checkpoint and one quantization: the report as a dict (see write_report).
    The checkpoint is loaded once; each path (PATHS) runs on its own (_run_path) and, when both ran, their
    agreement is computed afterwards from their logits. `cache`: a dict kept across calls on the same checkpoint,
    probes and whitelist (several formats), so the reference model's logits and generations are computed once per
    path."""
    quant = check_type(opts.quant)
    bad_paths = [p for p in opts.paths if p not in PATHS]
    if bad_paths or not opts.paths:
        raise FidelityError(f"unknown path(s) {bad_paths or list(opts.paths)}; choose from {', '.join(PATHS)}")
    if opts.sim_activations not in SIM_ACTIVATIONS:
        raise FidelityError(
            f"unknown sim_activations {opts.sim_activations!r}; choose from {', '.join(SIM_ACTIVATIONS)}"
        )
    runtime = runtime_of(quant)
    if "runtime" in opts.paths or opts.constrained:
        ok, why = llamacpp.available(runtime)
        if not ok:
            what = "the llama.cpp fork (the only runtime with " + quant + ")" if runtime == "fork" else "llama.cpp"
            raise FidelityError(f"the runtime path runs {what}: {why}")
    model, tok = load_for_fidelity(checkpoint, opts.tokenizer)
    probes = load_probes(opts.probes_file) if opts.probes_file else probe_set(opts.probe_set, opts.n_probes)
    wl = build_probe_whitelist(tok, model.cfg.vocab_size, opts.whitelist_strings, opts.whitelist_tokens)
    for msg in wl.problems:
        print(f"felix fidelity: warning: {msg}", file=sys.stderr)
    encoded = encode_probes(probes, tok, wl.mask)
    targets = all_targets(encoded)

    qat = read_qat_config(checkpoint)  # a quantization-aware checkpoint ships the bytes its forward used
    qstate, plan = quantized_state(deployed_state(model, qat), quant, opts.embedding_type, qat=qat)
    report = {
        "schema": SCHEMA_NAME,
        "schema_version": SCHEMA_VERSION,
        "checkpoint": str(checkpoint),
        "quant": quant,
        "embedding_type": opts.embedding_type,
        "paths": list(opts.paths),
        "probes": {
            "source": opts.probes_file or f"built-in {opts.probe_set} ({opts.n_probes})",
            "count": len(probes),
            "names": [p.name for p in probes],
            "context_window": model.cfg.max_seq_len,
        },
        "whitelist": {
            "size": int(wl.mask.sum()),
            "strings": wl.strings,
            "tokens": wl.tokens,
            "problems": wl.problems,
            "unreachable": wl.unreachable,
            "covered": len({t for e in encoded for j, t in enumerate(e.targets) if e.whitelisted[j]}),
        },
        "qat": None if qat is None else qat.mode,
        "tensor_types": [
            {"name": c.name, "shape": list(c.shape), "type": c.type, "reason": c.reason, "fallback": c.fallback}
            for c in plan
        ],
        "results": {},
        "sensitivity": None,
        "agreement": None,
    }
    cache = {} if cache is None else cache
    key = (
        str(checkpoint),
        opts.tokenizer,
        tuple(p.name for p in probes),
        tuple(wl.mask.nonzero()[:, 0].tolist()),
        opts.max_new_tokens,
    )
    report["sim_activations"] = opts.sim_activations
    report["runtime"] = runtime if "runtime" in opts.paths else None
    setup = _Setup(checkpoint, opts, quant, runtime, model, tok, encoded, targets, wl.mask, qstate, plan, cache, key)
    runs = {path: _run_path(setup, path) for path in opts.paths}  # each path on its own
    for path, run in runs.items():
        report["results"][path] = run.result
    if "simulated" in runs and opts.sensitivity:
        report["sensitivity"] = sensitivity(
            model, encoded, quant, opts.embedding_type, wl.mask, runs["simulated"].ref_logits, opts.progress, qat
        )
    if "simulated" in runs and "runtime" in runs:  # computed after both paths, from their logits
        by_sim = _agreement_by_sim_activations(setup, runs["simulated"], runs["runtime"])
        report["agreement"] = by_sim[opts.sim_activations]
        report["agreement_by_sim_activations"] = by_sim
    if opts.constrained:
        report["constrained"] = _constrained(setup)
    return report


def _constrained(s: _Setup) -> dict:
    """The quantized export served (felix.ship.serve, the path clients call), each schema probe answered free and under
    its schema's grammar (felix.verify.fidelity.constrained)."""
    tmp = None if s.opts.gguf_dir else tempfile.TemporaryDirectory(prefix="felix-fidelity-served-")
    try:
        _, q_path, adapter = _export_pair(
            s.checkpoint, s.quant, s.opts.embedding_type, Path(s.opts.gguf_dir or tmp.name), s.model
        )
        try:
            with Server(q_path, lora=adapter, n_ctx=s.model.cfg.max_seq_len) as server:
                out = constrained_run(server, s.encoded, s.tokenizer, s.opts.max_new_tokens, s.opts.progress)
        except ServeError as e:
            raise FidelityError(f"--constrained could not serve the {s.quant} export: {e}") from None
    finally:
        if tmp is not None:
            tmp.cleanup()
    return {"quant": s.quant, "runtime": s.runtime, **out}


@dataclass
class PathRun:
    """What one path computed: the reference's and the quantized model's logits at every expected token, and the
    path's entry of the report's ``results`` (summary, positions, compliance)."""

    path: str
    ref_logits: torch.Tensor
    quant_logits: torch.Tensor
    result: dict


@dataclass
class _Setup:
    """What run_fidelity prepares once (the checkpoint loaded once, probes encoded once) for every path."""

    checkpoint: object
    opts: FidelityOptions
    quant: str
    runtime: str
    model: object
    tokenizer: object
    encoded: list
    targets: torch.Tensor
    whitelist: torch.Tensor
    qstate: dict
    plan: list
    cache: dict
    key: tuple


def _run_path(s: _Setup, path: str) -> PathRun:
    """One path: reference and quantized logits (the reference's cached across formats), their comparison, and the
    compliance of greedy generations."""
    opts, quant = s.opts, s.quant
    cache_path = path if path == "simulated" else f"runtime-{s.runtime}"
    if path == "simulated":
        ref_src = TorchSource(s.model)
        q_src = TorchSource(simulated_model(s.model, s.qstate, s.plan, opts.sim_activations))
        cleanup = []
    else:
        tmp = None if opts.gguf_dir else tempfile.TemporaryDirectory(prefix="felix-fidelity-")
        ref_path, q_path, q_adapter = _export_pair(
            s.checkpoint, quant, opts.embedding_type, Path(opts.gguf_dir or tmp.name), s.model
        )
        ref_src = LlamaCppSource(ref_path, s.model.cfg.max_seq_len)
        q_src = LlamaCppSource(q_path, s.model.cfg.max_seq_len, adapter=q_adapter)
        cleanup = [ref_src.close, q_src.close] + ([tmp.cleanup] if tmp else [])
        if ref_src.n_vocab != s.model.cfg.vocab_size:
            for fn in cleanup:
                fn()
            raise FidelityError(
                f"{ref_path} has a vocabulary of {ref_src.n_vocab}, the checkpoint {s.model.cfg.vocab_size}"
            )
    try:
        if (s.key, cache_path, "logits") not in s.cache:
            s.cache[s.key, cache_path, "logits"] = score_probes(ref_src, s.encoded, opts.progress, f"{path}: reference")
        ref_logits = s.cache[s.key, cache_path, "logits"]
        q_logits = score_probes(q_src, s.encoded, opts.progress, f"{path}: {quant}")
        stats = compare_logits(ref_logits, q_logits, s.targets, s.whitelist)
        result = {"summary": summarize(stats), "positions": _positions_table(s.encoded, stats, s.tokenizer)}
        if opts.compliance and path in (opts.compliance_paths or opts.paths):
            if (s.key, cache_path, "generations") not in s.cache:
                s.cache[s.key, cache_path, "generations"] = compliance_run(
                    ref_src,
                    s.encoded,
                    s.tokenizer,
                    opts.max_new_tokens,
                    opts.progress,
                    f"{path}: generating (reference)",
                )
            ref_rows = s.cache[s.key, cache_path, "generations"]
            q_rows = compliance_run(
                q_src, s.encoded, s.tokenizer, opts.max_new_tokens, opts.progress, f"{path}: generating ({quant})"
            )
            result["compliance"] = {
                "reference": compliance_summary(ref_rows),
                "quantized": compliance_summary(q_rows),
                "generations": {"reference": ref_rows, "quantized": q_rows},
            }
    finally:
        for fn in cleanup:
            fn()
    return PathRun(path, ref_logits, q_logits, result)


def _agreement_by_sim_activations(s: _Setup, sim: PathRun, runtime: PathRun) -> dict:
    """Each way of simulating (SIM_ACTIVATIONS) against what the runtime computed: position by position
    (agreement), and as a predictor of the runtime's own quantization effect (KL, margin change): what the
    activation model buys."""
    rt_stats = compare_logits(runtime.ref_logits, runtime.quant_logits, s.targets, s.whitelist)
    by_sim = {}
    for variant in SIM_ACTIVATIONS:
        v_logits = (
            sim.quant_logits
            if variant == s.opts.sim_activations
            else score_probes(
                TorchSource(simulated_model(s.model, s.qstate, s.plan, variant)),
                s.encoded,
                s.opts.progress,
                f"simulated ({variant} activations): {s.quant}",
            )
        )
        by_sim[variant] = {
            **agreement(v_logits, runtime.quant_logits, s.targets, s.whitelist),
            **predicted_effect(compare_logits(sim.ref_logits, v_logits, s.targets, s.whitelist), rt_stats),
        }
    return by_sim
