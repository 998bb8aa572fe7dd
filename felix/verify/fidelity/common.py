"""What every part of the fidelity harness shares: the report schema, the two paths, the runtime a format runs
in, and the error type."""

from __future__ import annotations

from felix.core.fork import arch_of, runtime_of  # noqa: F401  (re-exported; their home is felix.core.fork, the fork facts)

SCHEMA_NAME = "felix-fidelity-report"
SCHEMA_VERSION = 2  # 2: summary.margin.change_quantiles, summary.minority, probe sets
PATHS = ("simulated", "runtime")
SIM_ACTIVATIONS = ("exact", "runtime")  # simulated path: exact activations, or rounded as llama.cpp does


class FidelityError(ValueError):
    """Input the harness cannot use: malformed probes, a tokenizer that does not fit the checkpoint, bad logits."""
