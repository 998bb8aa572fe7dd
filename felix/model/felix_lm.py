"""Felix-LM v2: a llama-style decoder that stock llama.cpp can run, with SpliceCore low-rank splices.

Read top to bottom: config + presets, parameter counts, the two op seams, the layers (RMSNorm, RoPE,
attention, SwiGLU, block), the model, checkpoints.

Layout decisions (so a GGUF export is a rename, not a transformation):

* Parameter names ARE llama.cpp's GGUF tensor names: ``token_embd.weight``, ``blk.N.attn_norm.weight``,
  ``blk.N.attn_q.weight`` ... ``blk.N.ffn_down.weight``, ``output_norm.weight``, ``output.weight`` (absent
  when tied to the embedding), and the splices ``blk.N.splice.<projection>.a|b|gate``.
* RoPE rotates ADJACENT pairs (2i, 2i+1) -- the "NORM" rope that llama.cpp's ``llama`` arch applies -- not
  HF's ``rotate_half`` (i, i + d/2, the NEOX style). A model trained this way exports q/k weights with NO row
  permutation (docs/platform-notes.md: checked identical to 4e-15; HF-layout models need convert_hf_to_gguf's permute).
* Attention goes through ``attention`` (causal, grouped-query when n_kv_head < n_head).
"""

from __future__ import annotations

import ctypes
import errno
import json
import math
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.checkpoint import checkpoint

from felix.core.files import fsync_path, read_text
from felix.ops.dispatch import autocast_dtype
from felix.core.quail import DEFAULT_MARGIN
from felix.ops.reference.loss import LossParts
from felix.model.splice import SpliceCore
from felix.model.spokes import DEFAULT_GATE_INIT, MAX_WIDTH as MAX_SPOKE_WIDTH, SpokeResidual, gate_init_schedule
from felix.ops.attention import attention
from felix.ops.loss import linear_ce_quail
from felix.ops.lowrank import lowrank_linear

PROJECTIONS = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")


# ------------------------------------------------------------------------------------- config
@dataclass
class FelixConfig:
    vocab_size: int = 2048
    n_layer: int = 4
    d_model: int = 128
    n_head: int = 4
    n_kv_head: int = 2
    ffn_hidden: int = 352
    max_seq_len: int = 128
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    # SpliceCore: low-rank trainable corrections on chosen projections of chosen layers.
    # splice_layers None = every 4th layer starting at 3 (3, 7, 11, ...).
    splice_layers: list[int] | None = None
    splice_projections: list[str] = field(default_factory=lambda: ["ffn_down"])
    splice_rank: int = 8
    splice_gate_init: float = 1.0
    # Spokes (felix.model.spokes; the fork's felix arch): n_spokes of rank spoke_rank after each layer's FFN residual,
    # fused into one [n_spokes * spoke_rank] bottleneck. 0 = none (a plain hub). spoke_layers None = every layer.
    # gate_bias starts at spoke_gate_init[0] + (spoke_gate_init[1] - spoke_gate_init[0]) * i / (L - 1).
    n_spokes: int = 0
    spoke_rank: int = 8
    spoke_layers: list[int] | None = None
    spoke_gate_init: list[float] = field(default_factory=lambda: list(DEFAULT_GATE_INIT))
    checkpoint_activations: bool = False
    init_std: float = 0.02

    def __post_init__(self):
        _check_field_types(self)
        problems = [
            f"{name} {getattr(self, name)} exceeds {limit:,} (CONFIG_LIMITS: larger is no model Felix "
            f"builds, and an allocation this size would not fit in memory)"
            for name, limit in CONFIG_LIMITS.items()
            if getattr(self, name) > limit
        ]
        if problems:
            raise ValueError("invalid FelixConfig: " + "; ".join(problems))
        if min(self.n_head, self.n_kv_head) < 1:
            raise ValueError(
                f"invalid FelixConfig: n_head {self.n_head} and n_kv_head {self.n_kv_head} must be positive"
            )
        if self.d_model % self.n_head:
            problems.append(f"d_model {self.d_model} is not a multiple of n_head {self.n_head}")
        elif self.head_dim % 2:
            problems.append(f"head_dim {self.head_dim} must be even for RoPE")
        if self.n_kv_head <= 0 or self.n_head % self.n_kv_head:
            problems.append(f"n_head {self.n_head} is not a multiple of n_kv_head {self.n_kv_head}")
        bad_proj = [p for p in self.splice_projections if p not in PROJECTIONS]
        if bad_proj:
            problems.append(f"unknown splice projection(s) {bad_proj}; choose from {list(PROJECTIONS)}")
        bad_layers = [i for i in self.resolved_splice_layers() if not 0 <= i < self.n_layer]
        if bad_layers:
            problems.append(f"splice layer(s) {bad_layers} outside 0..{self.n_layer - 1}")
        if self.splice_rank < 1 and self.resolved_splice_layers() and self.splice_projections:
            problems.append(f"splice_rank must be >= 1, got {self.splice_rank}")
        if self.n_spokes < 0:
            problems.append(f"n_spokes must be >= 0, got {self.n_spokes}")
        elif self.n_spokes:
            if self.spoke_rank < 1:
                problems.append(f"spoke_rank must be >= 1, got {self.spoke_rank}")
            elif self.n_spokes * self.spoke_rank > MAX_SPOKE_WIDTH:
                problems.append(
                    f"n_spokes x spoke_rank = {self.n_spokes * self.spoke_rank} > {MAX_SPOKE_WIDTH}: the "
                    f"fused spoke kernel holds the bottleneck in one register tile"
                )
            bad = [i for i in self.resolved_spoke_layers() if not 0 <= i < self.n_layer]
            if bad:
                problems.append(f"spoke layer(s) {bad} outside 0..{self.n_layer - 1}")
            if len(self.spoke_gate_init) != 2 or not all(math.isfinite(float(g)) for g in self.spoke_gate_init):
                problems.append(
                    f"spoke_gate_init must be two finite numbers [first layer, last layer], got {self.spoke_gate_init}"
                )
        if min(self.vocab_size, self.n_layer, self.d_model, self.ffn_hidden, self.max_seq_len) < 1:
            problems.append("vocab_size, n_layer, d_model, ffn_hidden, max_seq_len must be positive")
        if not self.rope_theta > 0 or not math.isfinite(self.rope_theta):
            problems.append(f"rope_theta must be a positive finite number, got {self.rope_theta}")
        if not self.norm_eps > 0 or not math.isfinite(self.norm_eps):
            problems.append(f"norm_eps must be a positive finite number, got {self.norm_eps}")
        if problems:
            raise ValueError("invalid FelixConfig: " + "; ".join(problems))

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head

    def resolved_splice_layers(self) -> list[int]:
        if self.splice_layers is None:
            return list(range(3, self.n_layer, 4))
        return sorted(set(self.splice_layers))

    def resolved_spoke_layers(self) -> list[int]:
        if not self.n_spokes:
            return []
        return list(range(self.n_layer)) if self.spoke_layers is None else sorted(set(self.spoke_layers))

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_dict(cls, d: dict) -> FelixConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown FelixConfig field(s) {unknown}")
        return cls(**d)


# Upper bounds a config must respect (checked before anything is allocated: a config.json or GGUF header that says
# n_layer 1000000 or vocab_size 2**40 is refused, not built). Generous: 4x the largest open models' values.
CONFIG_LIMITS = {
    "vocab_size": 1 << 22,
    "n_layer": 1024,
    "d_model": 1 << 16,
    "n_head": 1024,
    "n_kv_head": 1024,
    "ffn_hidden": 1 << 18,
    "max_seq_len": 1 << 21,
    "splice_rank": 1 << 14,
    "n_spokes": 1 << 12,
    "spoke_rank": 1 << 12,
}
_INT_FIELDS = (
    "vocab_size",
    "n_layer",
    "d_model",
    "n_head",
    "n_kv_head",
    "ffn_hidden",
    "max_seq_len",
    "splice_rank",
    "n_spokes",
    "spoke_rank",
)
_FLOAT_FIELDS = ("rope_theta", "norm_eps", "splice_gate_init", "init_std")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _check_field_types(cfg: FelixConfig) -> None:
    """Every field of the right JSON type (a config.json is user input), before any arithmetic on them."""
    problems = [f"{n} must be an integer, got {getattr(cfg, n)!r}" for n in _INT_FIELDS if not _is_int(getattr(cfg, n))]
    problems += [
        f"{n} must be a number, got {getattr(cfg, n)!r}" for n in _FLOAT_FIELDS if not _is_number(getattr(cfg, n))
    ]
    problems += [
        f"{n} must be true or false, got {getattr(cfg, n)!r}"
        for n in ("tie_embeddings", "checkpoint_activations")
        if not isinstance(getattr(cfg, n), bool)
    ]
    for n in ("splice_layers", "spoke_layers"):
        v = getattr(cfg, n)
        if v is not None and not (isinstance(v, (list, tuple)) and all(_is_int(i) for i in v)):
            problems.append(f"{n} must be null or a list of layer numbers, got {v!r}")
    if not (
        isinstance(cfg.splice_projections, (list, tuple)) and all(isinstance(p, str) for p in cfg.splice_projections)
    ):
        problems.append(f"splice_projections must be a list of projection names, got {cfg.splice_projections!r}")
    if not (isinstance(cfg.spoke_gate_init, (list, tuple)) and all(_is_number(g) for g in cfg.spoke_gate_init)):
        problems.append(f"spoke_gate_init must be a list of two numbers, got {cfg.spoke_gate_init!r}")
    if problems:
        raise ValueError("invalid FelixConfig: " + "; ".join(problems))


def expected_shapes(cfg: FelixConfig) -> dict[str, tuple[int, ...]]:
    """{tensor name: shape} of the model `cfg` describes, built on the meta device (nothing allocated): what a
    weights file must hold before a model is built for it."""
    with torch.device("meta"):
        model = FelixLM(cfg)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


# Every preset names its spoke rank (the seed's per-task adapters: 4 spokes of rank 64 at ~100M; felix.model.spokes);
# spokes are off (n_spokes 0) until asked for: `felix train --spokes N` or `--train-only spokes`.
PRESETS: dict[str, dict] = {
    # CPU, seconds: 4 layers x 128 (head_dim 32, GQA 4:2), one splice on layer 3.
    "tiny": dict(
        vocab_size=2048, n_layer=4, d_model=128, n_head=4, n_kv_head=2, ffn_hidden=352, max_seq_len=128, spoke_rank=8
    ),
    # CPU, minutes: 2 layers x 256 (head_dim 64, GQA 4:2), SwiGLU 512. Rows of 256 and 512 fit every block
    # format, TQ2_0's 256 included, so a fidelity run quantizes the same tensors in every format (QUAIL experiment).
    "tiny-256": dict(
        vocab_size=2048, n_layer=2, d_model=256, n_head=4, n_kv_head=2, ffn_hidden=512, max_seq_len=128, spoke_rank=8
    ),
    # The seed's scale-down pilot: ~50M.
    "pilot-50m": dict(
        vocab_size=32768,
        n_layer=12,
        d_model=512,
        n_head=8,
        n_kv_head=4,
        ffn_hidden=1408,
        max_seq_len=2048,
        spoke_rank=32,
    ),
    # 24 x 1024 x 16 heads (head_dim 64), GQA 16:4, SwiGLU 3072, tied 32K vocab: ~323M.
    "felix-300m": dict(
        vocab_size=32768,
        n_layer=24,
        d_model=1024,
        n_head=16,
        n_kv_head=4,
        ffn_hidden=3072,
        max_seq_len=2048,
        spoke_rank=64,
    ),
    # 24 x 1280 x 20 heads (head_dim 64), GQA 20:4, SwiGLU 4096, tied 32K vocab: ~514M.
    "felix-500m": dict(
        vocab_size=32768,
        n_layer=24,
        d_model=1280,
        n_head=20,
        n_kv_head=4,
        ffn_hidden=4096,
        max_seq_len=2048,
        spoke_rank=64,
    ),
}


def preset(name: str, **overrides) -> FelixConfig:
    """A preset config by name, with field overrides."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; available presets: {', '.join(PRESETS)}")
    return FelixConfig(**{**PRESETS[name], **overrides})


def _projection_shape(cfg: FelixConfig, proj: str) -> tuple[int, int]:
    """(out_features, in_features) of a projection."""
    d, kv = cfg.d_model, cfg.n_kv_head * cfg.head_dim
    return {
        "attn_q": (d, d),
        "attn_k": (kv, d),
        "attn_v": (kv, d),
        "attn_output": (d, d),
        "ffn_gate": (cfg.ffn_hidden, d),
        "ffn_up": (cfg.ffn_hidden, d),
        "ffn_down": (d, cfg.ffn_hidden),
    }[proj]


def parameter_counts(cfg: FelixConfig) -> dict[str, int]:
    """Parameters per part, by arithmetic (no allocation), for any preset size."""
    attn = sum(math.prod(_projection_shape(cfg, p)) for p in PROJECTIONS[:4])
    ffn = sum(math.prod(_projection_shape(cfg, p)) for p in PROJECTIONS[4:])
    splice = sum(
        cfg.splice_rank * sum(_projection_shape(cfg, p)) + 1
        for _ in cfg.resolved_splice_layers()
        for p in cfg.splice_projections
    )
    spokes = len(cfg.resolved_spoke_layers()) * (2 * cfg.n_spokes * cfg.spoke_rank * cfg.d_model + cfg.d_model + 1)
    counts = {
        "embedding": cfg.vocab_size * cfg.d_model,
        "attention": cfg.n_layer * attn,
        "ffn": cfg.n_layer * ffn,
        "norms": (2 * cfg.n_layer + 1) * cfg.d_model,
        "splice": splice,
        "spokes": spokes,
        "output_head": 0 if cfg.tie_embeddings else cfg.vocab_size * cfg.d_model,
    }
    counts["total"] = sum(counts.values())
    return counts


def format_parameter_counts(cfg: FelixConfig) -> str:
    c = parameter_counts(cfg)
    return ", ".join(f"{k} {v / 1e6:.2f}M" if v >= 1e5 else f"{k} {v:,}" for k, v in c.items())


# ------------------------------------------------------------------------------------- the ops
# The model's three heavy products go through Felix's op layer (reference / Triton backends):
# felix.attention, felix.lowrank_linear (spliced projections) and felix.linear_ce_quail (the loss).
_autocast_dtype = autocast_dtype  # felix.ops.dispatch: the ops apply the same rule themselves


def _splice_linear(
    x: torch.Tensor, weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor, gate: torch.Tensor
) -> torch.Tensor:
    """y = x W^T + gate * (x A^T) B^T  (W [out, in], A [r, in], B [out, r], gate a 1-element tensor), fused.
    Under autocast the operands take the autocast dtype, as F.linear's would."""
    dt = _autocast_dtype(x.device) or x.dtype
    return lowrank_linear(x.to(dt), weight.to(dt), a.to(dt), b.to(dt), gate)


def _lm_loss(
    h: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    whitelist: torch.Tensor | None,
    margin: float,
    lambda_q: float,
    ignore_index: int = -100,
) -> LossParts:
    """Cross-entropy of logits = h W^T plus lambda_q times the QUAIL margin hinge over whitelisted targets
    (token ids or a vocabulary mask): linear_ce_quail, which never materializes the logits."""
    dt = _autocast_dtype(h.device) or h.dtype
    wl = whitelist if whitelist is not None and whitelist.numel() else None
    return linear_ce_quail(
        h.reshape(-1, h.shape[-1]).to(dt),
        weight.to(dt),
        targets.reshape(-1),
        wl,
        margin=margin,
        lambda_q=lambda_q,
        ignore_index=ignore_index,
    )


# -------------------------------------------------------------------------------------- layers
class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype) * self.weight


def rope_cos_sin(seq_len: int, head_dim: int, theta: float, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin [seq_len, head_dim/2] for frequencies theta^(-2i/head_dim), i = 0..head_dim/2-1."""
    inv_freq = theta ** (-torch.arange(0, head_dim, 2, device=device, dtype=torch.float64) / head_dim)
    angles = torch.arange(seq_len, device=device, dtype=torch.float64)[:, None] * inv_freq[None, :]
    return angles.cos().float(), angles.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ADJACENT pairs (x[2i], x[2i+1]) by angle pos * freq_i: llama.cpp's NORM rope (see module doc).
    x [B, H, T, D]; cos/sin [T, D/2]."""
    xf = x.float().unflatten(-1, (-1, 2))
    x0, x1 = xf[..., 0], xf[..., 1]
    out = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1)
    return out.flatten(-2).to(x.dtype)


class Block(nn.Module):
    """Pre-norm llama block: x += attn(attn_norm(x)); x += ffn(ffn_norm(x)), with optional splices."""

    def __init__(self, cfg: FelixConfig, layer: int):
        super().__init__()
        self.cfg = cfg
        self.layer = layer
        # None, or felix.ops.activation_rounding.ActivationRounding: round matmul inputs and compute attention as
        # llama.cpp does (the fidelity harness's runtime-faithful simulation; FelixLM.set_activation_rounding)
        self.activation_rounding = None
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.ffn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        for proj in PROJECTIONS:
            out_f, in_f = _projection_shape(cfg, proj)
            setattr(self, proj, nn.Linear(in_f, out_f, bias=False))
        spliced = cfg.splice_projections if layer in cfg.resolved_splice_layers() else []
        # felix.model.splice.SpliceCore (B = 0: the model starts exactly as the base); module paths
        # blk.N.splice.<proj> make the tensor names blk.N.splice.<proj>.a|b|gate (felix.model.splice's name API)
        self.splice = nn.ModuleDict(
            {
                p: SpliceCore(
                    _projection_shape(cfg, p)[1],
                    _projection_shape(cfg, p)[0],
                    cfg.splice_rank,
                    gate_init=cfg.splice_gate_init,
                )
                for p in spliced
            }
        )
        for core in self.splice.values():
            nn.init.normal_(core.a, 0.0, cfg.init_std)
        self.spoke = None
        self.attach_spokes()

    def attach_spokes(self) -> None:
        """Create this layer's SpokeResidual when the config gives it spokes (felix.model.spokes; W_up = 0: a no-op)."""
        cfg = self.cfg
        if self.spoke is None and self.layer in cfg.resolved_spoke_layers():
            gate = gate_init_schedule(cfg.n_layer, *cfg.spoke_gate_init)[self.layer]
            self.spoke = SpokeResidual(cfg.d_model, cfg.n_spokes, cfg.spoke_rank, gate, cfg.norm_eps)

    def proj(self, name: str, x: torch.Tensor) -> torch.Tensor:
        w = getattr(self, name).weight
        if self.activation_rounding is not None:
            xr = self.activation_rounding(f"blk.{self.layer}.{name}.weight", x)
            if name in self.splice and getattr(self.activation_rounding, "splice_takes_raw_input", False):
                # llama.cpp runs a live splice as a LoRA adapter: its F32 matmuls take the unrounded input, only the
                # quantized base weight's matmul takes the rounded one (a merged splice is inside w, with B = 0 here)
                s = self.splice[name]
                return F.linear(xr, w) + F.linear(F.linear(x, s.a), s.b) * s.gate
            x = xr  # any other transform of the input (felix.tools.prune's masks) feeds the splice too
        if name in self.splice:
            s = self.splice[name]
            return _splice_linear(x, w, s.a, s.b, s.gate)
        return F.linear(x, w)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attention_backend: str | None = None
    ) -> torch.Tensor:
        cfg = self.cfg
        B, T, _ = x.shape
        h = self.attn_norm(x)
        q = self.proj("attn_q", h).view(B, T, cfg.n_head, cfg.head_dim).transpose(1, 2)
        k = self.proj("attn_k", h).view(B, T, cfg.n_kv_head, cfg.head_dim).transpose(1, 2)
        v = self.proj("attn_v", h).view(B, T, cfg.n_kv_head, cfg.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if self.activation_rounding is not None:  # the runtime's own attention numerics (simulation only)
            att = self.activation_rounding.attention(q, k, v)
        else:
            att = attention(q, k, v, causal=True, backend=attention_backend)
        x = x + self.proj("attn_output", att.transpose(1, 2).reshape(B, T, cfg.d_model))
        h = self.ffn_norm(x)
        x = x + self.proj("ffn_down", F.silu(self.proj("ffn_gate", h)) * self.proj("ffn_up", h))
        return x if self.spoke is None else self.spoke(x)


# --------------------------------------------------------------------------------------- model
class FelixLM(nn.Module):
    def __init__(self, cfg: FelixConfig):
        super().__init__()
        self.cfg = cfg
        self.activation_rounding = None  # see set_activation_rounding
        self.token_embd = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blk = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer))
        self.output_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        if not cfg.tie_embeddings:
            self.output = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self):
        std = self.cfg.init_std
        for name, p in self.named_parameters():
            if ".spoke." in name:
                continue  # SpokeResidual's own init (W_up = 0: a fresh spoke is a no-op)
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif ".splice." in name:
                continue  # SpliceCore's own init (B = 0: the splice starts as a no-op)
            elif name.endswith(("attn_output.weight", "ffn_down.weight")):
                p.normal_(0, std / math.sqrt(2 * self.cfg.n_layer))  # GPT-2 residual scaling
            else:
                p.normal_(0, std)

    @property
    def head_weight(self) -> torch.Tensor:
        return self.token_embd.weight if self.cfg.tie_embeddings else self.output.weight

    @property
    def head_weight_name(self) -> str:
        return "token_embd.weight" if self.cfg.tie_embeddings else "output.weight"

    def set_activation_rounding(self, rounding) -> FelixLM:
        """Round every matmul input as `rounding(site, x)` says and attend with `rounding.attention(q, k, v)`: an
        ActivationRounding models what llama.cpp computes; None restores exact activations. Inference only."""
        self.activation_rounding = rounding
        for block in self.blk:
            block.activation_rounding = rounding
        return self

    def hidden_states(self, tokens: torch.Tensor, attention_backend: str | None = None) -> torch.Tensor:
        """Final-normed hidden states [B, T, d_model] (the loss op multiplies by the head itself).
        `attention_backend` picks attention's backend (None = automatic)."""
        B, T = tokens.shape
        if T > self.cfg.max_seq_len:
            raise ValueError(f"sequence length {T} exceeds max_seq_len {self.cfg.max_seq_len}")
        cos, sin = rope_cos_sin(T, self.cfg.head_dim, self.cfg.rope_theta, tokens.device)
        x = self.token_embd(tokens)
        for block in self.blk:
            if self.cfg.checkpoint_activations and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, cos, sin, attention_backend, use_reentrant=False)
            else:
                x = block(x, cos, sin, attention_backend)
        return self.output_norm(x)

    def forward(self, tokens: torch.Tensor, attention_backend: str | None = None) -> torch.Tensor:
        """Logits [B, T, vocab]."""
        h = self.hidden_states(tokens, attention_backend)
        if self.activation_rounding is not None:
            h = self.activation_rounding(self.head_weight_name, h)
        return F.linear(h, self.head_weight)

    def loss(
        self,
        tokens,
        targets,
        whitelist=None,
        margin: float = DEFAULT_MARGIN,
        lambda_q: float = 0.0,
        ignore_index: int = -100,
        attention_backend: str | None = None,
    ) -> LossParts:
        return _lm_loss(
            self.hidden_states(tokens, attention_backend),
            self.head_weight,
            targets,
            whitelist,
            margin,
            lambda_q,
            ignore_index,
        )


# ---------------------------------------------------------------------------------- checkpoints
WEIGHTS_FILE, CONFIG_FILE = "model.safetensors", "config.json"


class CheckpointError(ValueError):
    """A checkpoint directory cannot be loaded (missing files, corrupt data, tensors that do not fit)."""


def _exchange_directories(a: Path, b: Path) -> bool:
    """Atomically swap the names `a` and `b` (Linux renameat2 RENAME_EXCHANGE). False where the system or the
    filesystem cannot (the caller falls back to two renames)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
        return False
    raise OSError(err, f"cannot swap {a} and {b}: {os.strerror(err)}")


def write_checkpoint_files(directory, model: FelixLM, tokenizer=None, extra_files: dict | None = None) -> None:
    """``model.safetensors`` + ``config.json`` (+ ``tokenizer.json``, + `extra_files` {name: callable(path)}) into
    the existing directory `directory` (felix.train.runs writes a training run's step directories with this)."""
    directory = Path(directory)
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(tensors, str(directory / WEIGHTS_FILE), metadata={"format": "felix-lm"})
    (directory / CONFIG_FILE).write_text(model.cfg.to_json())
    if tokenizer is not None:
        tokenizer.save(directory)
    for name, writer in (extra_files or {}).items():
        writer(directory / name)


def save_checkpoint(directory, model: FelixLM, tokenizer=None, extra_files: dict | None = None) -> Path:
    """Write a checkpoint (:func:`write_checkpoint_files`) into a fresh temporary directory beside `directory`,
    fsync it, then put it in place: renamed to a new name, or atomically exchanged with an existing directory
    (renameat2) whose old copy is removed only afterwards. A crash at any point leaves the old checkpoint or the
    new one under the final name, never neither. (Without renameat2 -- not Linux -- the old copy is first renamed
    to ``.NAME.old-PID``: a crash in between leaves it there.) A training run's checkpoints use versioned step
    directories instead (felix.train.runs)."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.tmp-{os.getpid()}-", dir=directory.parent))
    try:
        write_checkpoint_files(tmp, model, tokenizer, extra_files)
        for p in tmp.iterdir():
            fsync_path(p)
        fsync_path(tmp, directory=True)
        if directory.is_dir() and not directory.is_symlink() and _exchange_directories(tmp, directory):
            fsync_path(directory.parent, directory=True)
            shutil.rmtree(tmp)  # now the old checkpoint
            return directory
        old = None
        if directory.exists() or directory.is_symlink():
            old = directory.with_name(f".{directory.name}.old-{os.getpid()}")
            os.replace(directory, old)
        try:
            os.replace(tmp, directory)
        except BaseException:
            if old is not None:
                os.replace(old, directory)  # the old copy back under its name
            raise
        fsync_path(directory.parent, directory=True)
        if old is not None:
            if old.is_dir() and not old.is_symlink():
                shutil.rmtree(old)
            else:
                os.unlink(old)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def load_config(directory) -> FelixConfig:
    """The checked FelixConfig in ``config.json``; a missing, non-UTF-8, non-JSON or invalid one (a field of the
    wrong type, out of CONFIG_LIMITS, not divisible) raises CheckpointError naming the file and the field."""
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise CheckpointError(f"{directory} is not a Felix checkpoint: {CONFIG_FILE} is missing")
    text = read_text(path, CheckpointError, "config")
    try:
        d = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as e:
        raise CheckpointError(f"{path} is corrupt or not a Felix config: {e}") from e
    if not isinstance(d, dict):
        raise CheckpointError(
            f"{path} is corrupt or not a Felix config: it holds a JSON {type(d).__name__}, not an object"
        )
    try:
        return FelixConfig.from_dict(d)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path} is corrupt or not a Felix config: {e}") from e


def check_stored_shapes(cfg: FelixConfig, stored: dict[str, tuple[int, ...]], source: str) -> None:
    """Refuse, before a model is built, a weights file whose tensor table (`stored`: name -> shape, read from its
    header) is not the model `cfg` describes: the file says what the model is, so a config that asks for more
    layers, a larger vocabulary or other widths than its tensors hold is corrupt or forged."""
    # first what costs nothing: the layer count and the embedding (a meta model's construction time grows with
    # n_layer, so the config's layer count must be the file's before one is built)
    layers = sorted({int(k.split(".")[1]) for k in stored if k.startswith("blk.") and k.split(".")[1].isdigit()})
    if layers != list(range(cfg.n_layer)):
        held = f"blk.{layers[0]}..blk.{layers[-1]} ({len(layers)} layers)" if layers else "no blk.N tensors"
        raise CheckpointError(
            f"{source} does not fit the model: its config says n_layer {cfg.n_layer}, the file holds {held}"
        )
    embd = tuple(stored.get("token_embd.weight", ()))
    if embd != (cfg.vocab_size, cfg.d_model):
        raise CheckpointError(
            f"{source} does not fit the model: token_embd.weight is {embd}, its config says "
            f"vocab_size {cfg.vocab_size} x d_model {cfg.d_model}"
        )
    load_state_into(None, stored, source=source, expected=expected_shapes(cfg))


def load_state_into(
    model: FelixLM | None, tensors: dict, source: str = "checkpoint", expected: dict[str, tuple[int, ...]] | None = None
) -> None:
    """Copy `tensors` into `model`, first listing every missing, unexpected and mis-shaped tensor. With `model`
    None, only compare `tensors` (tensors or shapes) with the `expected` shapes."""

    def shape(t):
        return tuple(t.shape) if hasattr(t, "shape") else tuple(t)

    if expected is None:
        expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    misshaped = sorted(
        f"{k}: {shape(tensors[k])} in {source}, model wants {expected[k]}"
        for k in set(expected) & set(tensors)
        if shape(tensors[k]) != expected[k]
    )
    if missing or extra or misshaped:
        lines = [f"{source} does not fit the model:"]
        if missing:
            lines.append(f"  missing tensors ({len(missing)}): {', '.join(missing)}")
        if extra:
            lines.append(f"  unexpected tensors ({len(extra)}): {', '.join(extra)}")
        if misshaped:
            lines.append(f"  mis-shaped tensors ({len(misshaped)}): " + "; ".join(misshaped))
        raise CheckpointError("\n".join(lines))
    if model is not None:
        model.load_state_dict(tensors, strict=True)


def load_checkpoint(directory, device="cpu") -> FelixLM:
    """Rebuild the model from ``config.json`` and load ``model.safetensors`` into it."""
    cfg = load_config(directory)
    path = Path(directory) / WEIGHTS_FILE
    if not path.is_file():
        raise CheckpointError(f"{directory} is not a Felix checkpoint: {WEIGHTS_FILE} is missing")
    try:
        with safe_open(str(path), "pt") as f:
            stored = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{path} is corrupt or truncated ({e})") from e
    check_stored_shapes(cfg, stored, str(path))  # before anything the size of the config is allocated
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{path} is corrupt or truncated ({e})") from e
    model = FelixLM(cfg)
    load_state_into(model, tensors, source=str(path))
    return model.to(device)
