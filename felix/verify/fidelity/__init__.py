"""RQ4 fidelity harness: which decisions of a Felix-LM checkpoint survive a given quantization, token by token.

`felix fidelity CHECKPOINT --quant rq4` feeds probes (prompt + expected continuation) through the reference
model and the quantized one and compares their logits at every expected token:

* **Whitelisted positions** (the expected token is a QUAIL-whitelisted token: JSON structure, the literals
  ``true``/``false``/``null`` -- ``has_principle: false`` is the refusal path -- and any strings/tokens the user
  adds): the *margin* (target logit minus the best other logit) before and after, the margin change, and
  whether the decision *flipped* (margin > 0 on one side and <= 0 on the other). *Margin survival* is the
  fraction of positions the reference decides correctly (margin > 0) that stay correct when quantized.
* **All positions**: KL divergence reference -> quantized (mean, median, p99, max), top-1 agreement and the
  change of the expected token's probability (delta-p), the statistics of ``llama-perplexity --kl-divergence``.
* **Per-tensor sensitivity**: one tensor quantized at a time, the rest exact; tensors ranked by the mean
  margin they cost at whitelisted positions, so a user sees which ones need more bits.
* **Schema compliance** of greedy generations (valid JSON, required fields, field types, enum values),
  reference vs quantized.

Two paths. *simulated*: the PyTorch model on weights that went through the exporter's per-tensor policy
(felix.ops.quant_policy: roundtrip of every tensor through its GGUF type) -- any format. With
``sim_activations="runtime"`` (CLI ``--sim-activations runtime``) it also rounds activations as llama.cpp's CPU
matmuls do (Q8_0 blocks for 4-bit and 8-bit weights, f16 q/k/v: felix.ops.activation_rounding), so it predicts
what the deployment computes, not only what its weights are. *runtime*: the exported GGUF files (f32
reference, quantized) in the runtime that serves them: stock llama.cpp (``llama`` arch) for the stock formats,
the Felix llama.cpp fork (``felix`` arch) for RQ4 (felix.ship.llamacpp). When both paths run, the report says how
closely each simulation (exact and runtime activations) reproduces the runtime's logits (``agreement``,
``agreement_by_sim_activations``); tests/verify/test_fidelity_llamacpp.py and tests/ship/test_fork_llamacpp.py bound it.

Probes are scored in windows of the model's context (max_seq_len): a probe longer than that is scored in
overlapping windows, each expected token seeing at least half a window of context, identically on both paths.

Outputs: a JSON report (``schema: felix-fidelity-report``, ``schema_version``), a Markdown report and PNG
plots (margin scatter with the flip region marked, margin-change histogram, sensitivity bars). Gate
thresholds make `felix fidelity` exit non-zero when crossed.

The package, one job per module (everything below is re-exported here, so ``from felix.verify.fidelity import X`` and
``felix.verify.fidelity.X`` keep working):

* ``common``     the report schema, PATHS, SIM_ACTIVATIONS, the runtime a format runs in, FidelityError
* ``metrics``    margins, KL, PositionStats, compare_logits, summarize, agreement, predicted_effect
* ``probes``     Probe, the built-in probe sets, load_probes, the whitelist, encode_probes
* ``sources``    TorchSource, LlamaCppSource, windows, score_probes
* ``generation`` greedy_generate (llama.cpp's KV cache where possible), check_compliance, compliance_run
* ``harness``    FidelityOptions, load_for_fidelity, quantized_state, sensitivity, run_fidelity (paths run on their
  own, PathRun; agreement computed afterwards)
* ``report``     Gate, markdown_report, the plots, write_report
* ``constrained`` json_schema (a probe schema as JSON Schema), response_format, constrained_run (``--constrained``:
  the quantized export served by felix.ship.serve, each schema probe answered free and under its schema's grammar)
"""

from __future__ import annotations

from felix.verify.fidelity.common import (
    SCHEMA_NAME,
    SCHEMA_VERSION,
    PATHS,
    SIM_ACTIVATIONS,
    runtime_of,
    arch_of,
    FidelityError,
)
from felix.verify.fidelity.metrics import (
    margins,
    kl_divergence,
    PositionStats,
    compare_logits,
    MINORITY_BUCKETS,
    minority_summary,
    summarize,
    agreement,
    predicted_effect,
)
from felix.verify.fidelity.probes import (
    Probe,
    builtin_schemas,
    builtin_probes,
    PROBE_SETS,
    hedged_probes,
    weighed_probes,
    probe_set,
    schema_from_example,
    load_probes,
    Whitelist,
    build_probe_whitelist,
    EncodedProbe,
    encode_probes,
    all_targets,
)
from felix.verify.fidelity.sources import TorchSource, LlamaCppSource, windows, score_probes
from felix.verify.fidelity.generation import greedy_generate, check_compliance, compliance_run, compliance_summary
from felix.verify.fidelity.harness import (
    load_for_fidelity,
    quantized_state,
    sensitivity,
    FidelityOptions,
    simulated_model,
    run_fidelity,
    PathRun,
)
from felix.verify.fidelity.report import (
    Gate,
    plot_margins,
    plot_margin_change,
    plot_sensitivity,
    markdown_report,
    write_report,
)
from felix.verify.fidelity.constrained import json_schema, response_format, constrained_run

__all__ = [
    "SCHEMA_NAME",
    "SCHEMA_VERSION",
    "PATHS",
    "SIM_ACTIVATIONS",
    "runtime_of",
    "arch_of",
    "FidelityError",
    "margins",
    "kl_divergence",
    "PositionStats",
    "compare_logits",
    "MINORITY_BUCKETS",
    "minority_summary",
    "summarize",
    "agreement",
    "predicted_effect",
    "Probe",
    "builtin_schemas",
    "builtin_probes",
    "PROBE_SETS",
    "hedged_probes",
    "weighed_probes",
    "probe_set",
    "schema_from_example",
    "load_probes",
    "Whitelist",
    "build_probe_whitelist",
    "EncodedProbe",
    "encode_probes",
    "all_targets",
    "TorchSource",
    "LlamaCppSource",
    "windows",
    "score_probes",
    "greedy_generate",
    "check_compliance",
    "compliance_run",
    "compliance_summary",
    "load_for_fidelity",
    "quantized_state",
    "sensitivity",
    "FidelityOptions",
    "simulated_model",
    "run_fidelity",
    "PathRun",
    "Gate",
    "plot_margins",
    "plot_margin_change",
    "plot_sensitivity",
    "markdown_report",
    "write_report",
    "json_schema",
    "response_format",
    "constrained_run",
]
