"""Site geometry: which spliced projection an edit writes to (SpliceSite), its effective update gate * B A, the
numerical rank of an update, and the two function-preserving reshapes of a splice that make room for edits
(fold_splice, widen_splice)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from felix.model.qat import qat_config_of
from felix.model.splice import SPLICE_TENSOR_NAMES
from felix.ops.lowrank import MAX_RANK
from felix.tools.edit.errors import EditError

RANK_TOL = 1e-9  # relative singular value below which float64 calls a direction zero


@dataclass
class SpliceSite:
    layer: int
    projection: str
    block: torch.nn.Module
    core: torch.nn.Module

    def name(self, part: str) -> str:
        return SPLICE_TENSOR_NAMES[part].format(layer=self.layer, term="splice", projection=self.projection)

    @property
    def rank(self) -> int:
        return self.core.rank


def splice_site(model, layer: int | None = None, projection: str | None = None) -> SpliceSite:
    """The spliced projection edits write to: `layer`/`projection`, by default the highest spliced layer (its
    ffn_down if spliced, else its first spliced projection)."""
    spliced = [(i, p) for i, blk in enumerate(model.blk) for p in blk.splice]
    if not spliced:
        raise EditError("the model has no SpliceCore splices to edit (FelixConfig.splice_layers is empty)")
    if layer is None:
        layer = max(i for i, _ in spliced)
    on_layer = [p for i, p in spliced if i == layer]
    if not on_layer:
        raise EditError(f"layer {layer} has no splice; spliced (layer, projection): {spliced}")
    if projection is None:
        projection = "ffn_down" if "ffn_down" in on_layer else on_layer[0]
    if projection not in on_layer:
        raise EditError(f"layer {layer} has no splice on {projection!r}; it has {on_layer}")
    block = model.blk[layer]
    return SpliceSite(layer, projection, block, block.splice[projection])


def splice_product(site: SpliceSite) -> torch.Tensor:
    """gate * B A of the site, float64 [out, in] (a per-output gate scales B's rows)."""
    c = site.core
    g = c.gate.detach().double()
    b = c.b.detach().double() * (g if g.numel() == 1 else g[:, None])
    return b @ c.a.detach().double()


def numerical_rank(m: torch.Tensor, tol: float = RANK_TOL) -> int:
    if m.numel() == 0:
        return 0
    s = torch.linalg.svdvals(m.double())
    return int((s > tol * max(float(s[0]), 1e-300)).sum()) if float(s[0]) > 0 else 0


@torch.no_grad()
def fold_splice(model, layer: int | None = None, projection: str | None = None) -> float:
    """Move the site's trained splice into the projection's weight (W <- W + gate B A in float64, B <- 0), so the
    whole rank of the surface is free for edits. Returns max |change of the effective weight| (float32 rounding)."""
    if qat_config_of(model) is not None:  # its .weight is computed from the latent weight: a write would be lost
        raise EditError(
            f"the model is patched for quantization-aware training ({qat_config_of(model).mode}): folding "
            "the splice would re-quantize W + gate B A (as felix export refuses --splice merge)"
        )
    site = splice_site(model, layer, projection)
    lin = getattr(site.block, site.projection)
    before = lin.weight.double() + splice_product(site)
    lin.weight.copy_(before.to(lin.weight.dtype))
    site.core.b.zero_()
    return float((lin.weight.double() + splice_product(site) - before).abs().max())


@torch.no_grad()
def widen_splice(model, rank: int, seed: int = 0) -> None:
    """Give every splice of `model` rank `rank` (>= its current rank): new rows of A are drawn like the model's
    init, new columns of B are zero, so the model computes exactly what it did. Updates model.cfg.splice_rank."""
    if not model.cfg.splice_rank <= rank <= MAX_RANK:
        raise EditError(f"splice rank must grow within [{model.cfg.splice_rank}, {MAX_RANK}], got {rank}")
    g = torch.Generator().manual_seed(seed)
    for blk in model.blk:
        for core in blk.splice.values():
            extra = rank - core.rank
            if extra == 0:
                continue
            a_new = torch.randn(extra, core.in_features, generator=g, dtype=torch.float32) * model.cfg.init_std
            core.a = torch.nn.Parameter(torch.cat([core.a.detach(), a_new.to(core.a.dtype)]))
            core.b = torch.nn.Parameter(torch.cat([core.b.detach(), core.b.new_zeros(core.out_features, extra)], 1))
            core.rank = rank
    model.cfg.splice_rank = rank
