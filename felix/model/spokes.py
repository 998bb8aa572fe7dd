"""Spokes: the fork's per-layer gated low-rank residual in Felix-LM, and the seed's per-task adapter workflow.

After each layer's FFN residual the fork's ``felix`` arch computes (felix.core.fork, docs/fork.md)::

    h += sigmoid(gate_bias) * W_up · silu(W_down · rmsnorm(h, spoke_norm)) / n_spokes

:class:`SpokeResidual` holds one layer's spokes under the fork's own tensor names, so a model's state dict *is* the
file's spoke tensors: ``blk.N.spoke.norm.weight`` [d], ``blk.N.spoke.gate_bias`` [1],
``blk.N.spoke.w_down_fused.weight`` [S*r, d], ``blk.N.spoke.w_up_fused.weight`` [d, S*r]. Its forward is one
``spoke_residual`` call (the fused op), never a loop over spokes.

Initialisation (the seed system's recipe): W_up = 0, so a fresh spoke adds exactly 0.0 and the model computes
what its hub computes; W_down ~ N(0, 1/d) (unit-variance bottleneck on the RMS-normed input); norm 1; gate_bias
per layer ``start + (end - start) * i / (L - 1)``, by default -2 + 4i/(L-1): early layers' spokes open at
sigmoid(-2) = 0.12, the last layer's at sigmoid(2) = 0.88.

The seed's workflow: a trained hub, frozen (:func:`freeze_hub`), and spokes trained on task records
(``felix train --train-only spokes --init-from CKPT``). A spoke file (:func:`save_spokes`, ``spokes.safetensors``
beside a checkpoint) holds only the spokes plus the fingerprint of the hub they were trained on
(:func:`hub_fingerprint`); :func:`load_spokes` refuses spokes whose hub does not match.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from felix.core.files import remove_stale_temps, temp_path
from felix.ops.spoke import MAX_WIDTH
from felix.ops.spoke import spoke_residual

SPOKE_MARKER = ".spoke."
DEFAULT_GATE_INIT = (-2.0, 2.0)  # gate_bias of the first and last layer; linear in between
SEED_RECIPE = {"n_spokes": 4}  # the seed system's count (its rank was 64 at 100M; presets carry their own)
SPOKES_FILE = "spokes.safetensors"


class SpokeError(ValueError):
    """Spokes that cannot be attached, loaded or trained as asked (shapes, a different hub, bad counts)."""


def gate_init_schedule(
    n_layer: int, start: float = DEFAULT_GATE_INIT[0], end: float = DEFAULT_GATE_INIT[1]
) -> list[float]:
    """gate_bias per layer: start + (end - start) * i / (L - 1) (one layer: start)."""
    if n_layer == 1:
        return [float(start)]
    return [float(start + (end - start) * i / (n_layer - 1)) for i in range(n_layer)]


class _Weight(nn.Module):
    """A bare ``.weight`` holder, so the parameter's name ends in ``.weight`` as the fork's tensor names do."""

    def __init__(self, *shape: int):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(*shape))


class SpokeResidual(nn.Module):
    """One layer's spokes: ``h + sigmoid(gate_bias) W_up silu(W_down rmsnorm(h)) / n_spokes``, fused."""

    def __init__(self, d_model: int, n_spokes: int, rank: int, gate_init: float, eps: float):
        super().__init__()
        if n_spokes < 1 or rank < 1:
            raise SpokeError(f"n_spokes and spoke_rank must be >= 1, got {n_spokes} and {rank}")
        self.n_spokes, self.rank, self.eps = n_spokes, rank, eps
        self.norm = _Weight(d_model)
        self.gate_bias = nn.Parameter(torch.full((1,), float(gate_init)))
        self.w_down_fused = _Weight(n_spokes * rank, d_model)
        self.w_up_fused = _Weight(d_model, n_spokes * rank)
        self.reset_parameters(gate_init)

    @torch.no_grad()
    def reset_parameters(self, gate_init: float) -> None:
        self.norm.weight.fill_(1.0)
        self.gate_bias.fill_(float(gate_init))
        self.w_down_fused.weight.normal_(0.0, self.w_down_fused.weight.shape[1] ** -0.5)
        self.w_up_fused.weight.zero_()  # a fresh spoke is an exact no-op

    def forward(self, h: torch.Tensor, backend: str | None = None) -> torch.Tensor:
        dt = h.dtype
        return spoke_residual(
            h,
            self.norm.weight,
            self.w_down_fused.weight.to(dt),
            self.w_up_fused.weight.to(dt),
            self.gate_bias,
            self.n_spokes,
            self.eps,
            backend=backend,
        )

    def extra_repr(self) -> str:
        return f"n_spokes={self.n_spokes}, rank={self.rank}, d={self.norm.weight.shape[0]}"


def is_spoke_name(name: str) -> bool:
    return SPOKE_MARKER in name


def spoke_state(model) -> dict[str, torch.Tensor]:
    """The model's spoke tensors by name (detached)."""
    return {k: v.detach() for k, v in model.state_dict().items() if is_spoke_name(k)}


def hub_state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach() for k, v in model.state_dict().items() if not is_spoke_name(k)}


def hub_fingerprint(model) -> str:
    """sha256 over the hub's tensor names, shapes, dtypes and bytes: which hub a set of spokes was trained on."""
    h = hashlib.sha256()
    for name, t in sorted(hub_state(model).items()):
        t = t.contiguous().cpu()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def add_spokes(model, n_spokes: int, rank: int, layers=None, gate_init=DEFAULT_GATE_INIT) -> None:
    """Give a FelixLM without spokes fresh spokes (W_up = 0: the model's outputs do not change). `layers`: None =
    every layer (the fork's file needs spoke tensors in every layer; layers without spokes are written as no-ops)."""
    cfg = model.cfg
    if cfg.n_spokes:
        raise SpokeError(f"the model already has {cfg.n_spokes} spokes of rank {cfg.spoke_rank}")
    fields = ("n_spokes", "spoke_rank", "spoke_layers", "spoke_gate_init")
    before = {f: getattr(cfg, f) for f in fields}
    cfg.n_spokes, cfg.spoke_rank = int(n_spokes), int(rank)
    cfg.spoke_layers = None if layers is None else sorted(set(layers))
    cfg.spoke_gate_init = [float(g) for g in gate_init]
    try:
        cfg.__post_init__()  # the config's own checks (counts, width, layers)
    except ValueError:
        for f, v in before.items():
            setattr(cfg, f, v)
        raise
    device = next(model.parameters()).device
    for block in model.blk:
        block.attach_spokes()
        if block.spoke is not None:
            block.spoke.to(device)


def freeze_hub(model) -> list[str]:
    """requires_grad False on every non-spoke parameter; returns the names of what still trains."""
    trainable = []
    for name, p in model.named_parameters():
        p.requires_grad_(is_spoke_name(name))
        if p.requires_grad:
            trainable.append(name)
    if not trainable:
        raise SpokeError("the model has no spokes to train: give it spokes first (--spokes N)")
    return trainable


def save_spokes(path, model) -> Path:
    """Write only the spokes, with the hub's fingerprint and the spoke config, to `path` (safetensors; temp+rename)."""
    path = Path(path)
    cfg = model.cfg
    meta = {
        "format": "felix-spokes",
        "hub_fingerprint": hub_fingerprint(model),
        "spoke_config": json.dumps(
            {
                "n_spokes": cfg.n_spokes,
                "spoke_rank": cfg.spoke_rank,
                "spoke_layers": cfg.spoke_layers,
                "spoke_gate_init": cfg.spoke_gate_init,
                "n_layer": cfg.n_layer,
                "d_model": cfg.d_model,
            }
        ),
    }
    remove_stale_temps(path)
    tmp = temp_path(path)
    try:
        save_file({k: v.contiguous().cpu() for k, v in spoke_state(model).items()}, str(tmp), metadata=meta)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def _spoke_config(text: str, path) -> dict:
    """The spoke file's ``spoke_config`` metadata, checked field by field (types, bounds) before anything is built
    from it; a corrupt one raises SpokeError naming the file and the field."""
    try:
        sc = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as e:
        raise SpokeError(f"{path}: its spoke_config metadata is not valid JSON ({e})") from e
    if not isinstance(sc, dict):
        raise SpokeError(f"{path}: its spoke_config metadata is a JSON {type(sc).__name__}, not an object")

    def is_int(v):
        return isinstance(v, int) and not isinstance(v, bool)

    problems = [
        f"{k} must be a positive integer, got {sc.get(k)!r}"
        for k in ("n_layer", "d_model", "n_spokes", "spoke_rank")
        if not is_int(sc.get(k)) or sc[k] < 1
    ]
    if not problems and sc["n_spokes"] * sc["spoke_rank"] > MAX_WIDTH:
        problems.append(f"n_spokes x spoke_rank = {sc['n_spokes'] * sc['spoke_rank']} exceeds {MAX_WIDTH}")
    layers = sc.get("spoke_layers")
    if layers is not None and not (isinstance(layers, list) and all(is_int(i) for i in layers)):
        problems.append(f"spoke_layers must be null or a list of layer numbers, got {layers!r}")
    gates = sc.get("spoke_gate_init", list(DEFAULT_GATE_INIT))
    if not (
        isinstance(gates, list)
        and len(gates) == 2
        and all(isinstance(g, (int, float)) and not isinstance(g, bool) for g in gates)
    ):
        problems.append(f"spoke_gate_init must be two numbers, got {gates!r}")
    if problems:
        raise SpokeError(f"{path}: corrupt spoke_config metadata: " + "; ".join(problems))
    return {**sc, "spoke_layers": layers, "spoke_gate_init": gates}


def load_spokes(model, path, check_hub: bool = True) -> None:
    """Attach the spokes in `path` (save_spokes) to `model`. Refused, with the reason, when the file's hub
    fingerprint is not this model's hub, when its spokes do not fit the model's shape, or when the model already
    has different spokes."""
    path = Path(path)
    if not path.is_file():
        raise SpokeError(f"spoke file {path} does not exist")
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise SpokeError(f"{path} is not a readable spoke file ({e})") from e
    if meta.get("format") != "felix-spokes" or "spoke_config" not in meta:
        raise SpokeError(f"{path} is not a Felix spoke file (format {meta.get('format')!r})")
    sc = _spoke_config(meta["spoke_config"], path)
    cfg = model.cfg
    if (sc["n_layer"], sc["d_model"]) != (cfg.n_layer, cfg.d_model):
        raise SpokeError(
            f"{path}: spokes for a hub of {sc['n_layer']} layers x d {sc['d_model']}, but this model "
            f"has {cfg.n_layer} x {cfg.d_model}: the spokes' hub does not match"
        )
    if check_hub and meta.get("hub_fingerprint") != hub_fingerprint(model):
        raise SpokeError(
            f"{path}: these spokes were trained on a different hub (fingerprint "
            f"{meta.get('hub_fingerprint', '?')[:12]}…, this model's {hub_fingerprint(model)[:12]}…); "
            "spokes only mean something on the hub they were trained with"
        )
    if cfg.n_spokes and (cfg.n_spokes, cfg.spoke_rank) != (sc["n_spokes"], sc["spoke_rank"]):
        raise SpokeError(
            f"the model has {cfg.n_spokes} spokes of rank {cfg.spoke_rank}, the file "
            f"{sc['n_spokes']} of rank {sc['spoke_rank']}"
        )
    if not cfg.n_spokes:
        try:
            add_spokes(model, sc["n_spokes"], sc["spoke_rank"], sc["spoke_layers"], sc["spoke_gate_init"])
        except ValueError as e:
            raise SpokeError(f"{path}: its spoke_config does not fit the model ({e})") from e
    want = spoke_state(model)
    missing, extra = sorted(set(want) - set(tensors)), sorted(set(tensors) - set(want))
    bad = [k for k in set(want) & set(tensors) if tuple(want[k].shape) != tuple(tensors[k].shape)]
    if missing or extra or bad:
        raise SpokeError(
            f"{path} does not fit the model's spokes: missing {missing[:4]}, unexpected {extra[:4]}, "
            f"mis-shaped {bad[:4]}"
        )
    nonfinite = [k for k, v in tensors.items() if not torch.isfinite(v).all()]
    if nonfinite:
        raise SpokeError(f"{path}: non-finite values in {nonfinite[:4]}")
    params = dict(model.named_parameters())
    with torch.no_grad():
        for k, v in tensors.items():
            params[k].copy_(v)
