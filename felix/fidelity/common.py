"""What every part of the fidelity harness shares: the report schema, the two paths, the runtime a format runs
in, and the error type."""
from __future__ import annotations

SCHEMA_NAME = "felix-fidelity-report"
SCHEMA_VERSION = 2  # 2: summary.margin.change_quantiles, summary.minority, probe sets
PATHS = ("simulated", "runtime")
SIM_ACTIVATIONS = ("exact", "runtime")   # simulated path: exact activations, or rounded as llama.cpp does


def runtime_of(quant: str) -> str:
    """The llama.cpp runtime an export to `quant` runs in: "fork" for the fork-only formats (RQ4), else "stock"."""
    from felix.formats import FORMATS

    return FORMATS[quant].runtime if quant in FORMATS else "stock"


def arch_of(quant: str) -> str:
    """The GGUF architecture the runtime path exports to: the fork's ``felix`` arch for fork-only formats."""
    from felix import fork

    return fork.ARCH if runtime_of(quant) == "fork" else "llama"


class FidelityError(ValueError):
    """Input the harness cannot use: malformed probes, a tokenizer that does not fit the checkpoint, bad logits."""
