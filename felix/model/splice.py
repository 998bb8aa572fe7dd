"""SpliceCore: Felix-LM v2's dedicated, trainable low-rank surface for runtime edits, and its name API.

A :class:`SpliceCore` is one low-rank term ``gate * (x Aᵀ) Bᵀ`` (A ``[r, in]``, B ``[out, r]`` zero at
init, so a fresh surface is exactly the identity on the layer it rides on). A :class:`SplicedLinear`
is a projection (weight, optional bias) carrying one or more named terms — the model's ``splice`` and,
for example, a task adapter — all applied in one fused ``lowrank_linear`` call.

Splice tensors are addressed by the names the GGUF exporter writes (one table, :data:`SPLICE_TENSOR_NAMES`,
in the style of the fork's ``blk.N.spoke.w_down_fused.weight``):

    blk.{layer}.{term}.{projection}.a      [r, in]
    blk.{layer}.{term}.{projection}.b      [out, r]
    blk.{layer}.{term}.{projection}.gate   [1] or [out]

e.g. ``blk.3.splice.ffn_down.a``. :func:`list_splices`, :func:`read_splice`, :func:`write_splice`,
:func:`snapshot_splices` and :func:`restore_splices` work on any module tree containing SplicedLinear
layers; a write with the wrong shape or dtype (or a non-finite value) is refused with a clear error and
changes nothing.
"""

from __future__ import annotations

import math
import re

import torch
from torch import nn

from felix.ops.lowrank import MAX_RANK
from felix.ops.lowrank import lowrank_linear

SPLICE_TENSOR_NAMES = {
    "a": "blk.{layer}.{term}.{projection}.a",
    "b": "blk.{layer}.{term}.{projection}.b",
    "gate": "blk.{layer}.{term}.{projection}.gate",
}


class SpliceCore(nn.Module):
    """One low-rank term: A ``[rank, in]`` (Kaiming-uniform like LoRA's A), B ``[out, rank]`` (zeros), gate.

    `per_output_gate`: a gate per output feature instead of one scalar; `gate_init`: its initial value
    (1.0: the term is fully on once B has learned something; B = 0 keeps the start exactly the identity)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int = 8,
        per_output_gate: bool = False,
        gate_init: float = 1.0,
        dtype: torch.dtype | None = None,
        device=None,
    ):
        super().__init__()
        if not 1 <= rank <= MAX_RANK:
            raise ValueError(f"SpliceCore rank must be in [1, {MAX_RANK}], got {rank}")
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.a = nn.Parameter(torch.empty(rank, in_features, dtype=dtype, device=device))
        self.b = nn.Parameter(torch.zeros(out_features, rank, dtype=dtype, device=device))
        self.gate = nn.Parameter(
            torch.full((out_features if per_output_gate else 1,), float(gate_init), dtype=torch.float32, device=device)
        )
        nn.init.kaiming_uniform_(self.a, a=math.sqrt(5))

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, rank={self.rank}, gate={tuple(self.gate.shape)}"


class SplicedLinear(nn.Module):
    """A linear projection plus named low-rank terms, computed by one fused `felix.lowrank_linear`.

    `layer` and `projection` (e.g. 3, "ffn_down") name its splice tensors; `terms` maps term names
    ("splice", "adapter", ...) to SpliceCores. With no terms it is a plain linear layer."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = False,
        layer: int = 0,
        projection: str = "proj",
        terms: dict[str, SpliceCore] | None = None,
        backend: str | None = None,
        dtype: torch.dtype | None = None,
        device=None,
    ):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=dtype, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device)) if bias else None
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        self.layer, self.projection, self.backend = layer, projection, backend
        self.terms = nn.ModuleDict(terms or {})

    def add_term(self, name: str, rank: int, **kwargs) -> SpliceCore:
        if name in self.terms:
            raise ValueError(f"layer {self.layer} {self.projection} already has a term named {name!r}")
        core = SpliceCore(
            self.weight.shape[1],
            self.weight.shape[0],
            rank,
            dtype=self.weight.dtype,
            device=self.weight.device,
            **kwargs,
        )
        self.terms[name] = core
        return core

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.terms:
            return nn.functional.linear(x, self.weight, self.bias)
        cores = list(self.terms.values())
        return lowrank_linear(
            x,
            self.weight,
            [c.a for c in cores],
            [c.b for c in cores],
            [c.gate for c in cores],
            bias=self.bias,
            backend=self.backend,
        )

    def splice_tensors(self) -> dict[str, nn.Parameter]:
        """{GGUF name: parameter} for every term of this projection."""
        out = {}
        for term, core in self.terms.items():
            for part, pattern in SPLICE_TENSOR_NAMES.items():
                out[pattern.format(layer=self.layer, term=term, projection=self.projection)] = getattr(core, part)
        return out


# ------------------------------------------------------------------------------------- name API
_CORE_PATH = re.compile(r"(?:^|\.)blk\.(\d+)\.(\w+)\.(\w+)$")


def _table(model: nn.Module) -> dict[str, nn.Parameter]:
    """{GGUF name: parameter}: SplicedLinear layers name their terms; a bare SpliceCore is named by its
    module path when that path is ``...blk.{layer}.{term}.{projection}`` (as in felix.model.felix_lm.FelixLM)."""
    table: dict[str, nn.Parameter] = {}
    owned = set()
    for module in model.modules():
        if not isinstance(module, SplicedLinear):
            continue
        owned.update(id(c) for c in module.terms.values())
        for name, p in module.splice_tensors().items():
            if name in table:
                raise ValueError(
                    f"two splice tensors are named {name!r}: give each SplicedLinear a distinct (layer, projection)"
                )
            table[name] = p
    for path, module in model.named_modules():
        if isinstance(module, SpliceCore) and id(module) not in owned:
            m = _CORE_PATH.search(path)
            if m is None:
                continue
            layer, term, projection = m.groups()
            for part, pattern in SPLICE_TENSOR_NAMES.items():
                name = pattern.format(layer=int(layer), term=term, projection=projection)
                if name in table:
                    raise ValueError(f"two splice tensors are named {name!r}")
                table[name] = getattr(module, part)
    return table


def list_splices(model: nn.Module) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """{name: (shape, dtype)} of every splice tensor in `model`, in module order."""
    return {name: (tuple(p.shape), p.dtype) for name, p in _table(model).items()}


def _lookup(table, name):
    if name not in table:
        near = [n for n in table if n.split(".")[:2] == name.split(".")[:2]]
        raise KeyError(
            f"no splice tensor named {name!r}"
            + (f"; this layer has: {', '.join(near)}" if near else f" ({len(table)} splice tensors exist)")
        )
    return table[name]


def read_splice(model: nn.Module, name: str) -> torch.Tensor:
    """A detached copy of splice tensor `name`."""
    return _lookup(_table(model), name).detach().clone()


def _check_value(name, p, value):
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"{name}: expected a tensor, got {type(value).__name__}")
    if tuple(value.shape) != tuple(p.shape):
        raise ValueError(f"{name}: shape {tuple(value.shape)} does not match the splice tensor's {tuple(p.shape)}")
    if value.dtype != p.dtype:
        raise ValueError(f"{name}: dtype {value.dtype} does not match the splice tensor's {p.dtype}")
    if not bool(torch.isfinite(value).all()):
        raise ValueError(f"{name}: the new value holds NaN or Inf")


def write_splice(model: nn.Module, name: str, value: torch.Tensor) -> None:
    """Overwrite splice tensor `name` in place (same shape and dtype required; refused otherwise)."""
    p = _lookup(_table(model), name)
    _check_value(name, p, value)
    with torch.no_grad():
        p.copy_(value)


def snapshot_splices(model: nn.Module) -> dict[str, torch.Tensor]:
    """Copies of every splice tensor, by name (restorable with restore_splices)."""
    return {name: p.detach().clone() for name, p in _table(model).items()}


def restore_splices(model: nn.Module, snapshot: dict[str, torch.Tensor]) -> None:
    """Write every tensor of `snapshot` back; all names, shapes and dtypes are checked before any write."""
    table = _table(model)
    for name, value in snapshot.items():
        _check_value(name, _lookup(table, name), value)
    with torch.no_grad():
        for name, value in snapshot.items():
            table[name].copy_(value)
