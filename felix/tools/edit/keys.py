"""Key capture: the inputs (and outputs) of a site's spliced projection, recorded while the model runs, optionally
with a delta added to its output (the value optimisation); the keys of text at chosen positions; and the null space
of the preserved-knowledge keys (AlphaEdit's projector)."""

from __future__ import annotations

from contextlib import contextmanager

import torch

from felix.tools.edit.edit_requests import pad_batch
from felix.tools.edit.sites import SpliceSite

DEFAULT_NULL_TOL = 1e-2  # AlphaEdit-style: eigen-directions below 1% of the largest count as "null"


@contextmanager
def tap_projection(site: SpliceSite, captured: list, delta: dict | None = None):
    """While active, the site's projection records its (input, output) per call into `captured`, and adds
    delta["value"] [B, m, out] at positions delta["positions"] [B, m] of its output when `delta` is given."""
    block, name = site.block, site.projection
    shadowed = block.__dict__.get("proj")  # an enclosing tap's, if any
    original = block.proj

    def proj(pname, x):
        y = original(pname, x)
        if pname == name:
            if delta is not None:
                idx = delta["positions"]
                rows = torch.arange(y.shape[0], device=y.device)[:, None].expand_as(idx)
                y = y.index_put((rows, idx), delta["value"].to(y.dtype), accumulate=True)
            captured.append((x.detach(), y.detach()))
        return y

    block.proj = proj
    try:
        yield
    finally:
        if shadowed is None:
            del block.proj  # the class method again
        else:
            block.proj = shadowed


@torch.no_grad()
def site_keys(
    model, site: SpliceSite, seqs: list[list[int]], positions: list[list[int]] | None = None, batch_size: int = 32
) -> torch.Tensor:
    """Inputs of the spliced projection (float64 [N, in]) at `positions` of each sequence (all positions when None).
    Right-padding is harmless: attention is causal, so padding never reaches a real position."""
    out = []
    for i in range(0, len(seqs), batch_size):
        chunk = seqs[i : i + batch_size]
        cap: list = []
        with tap_projection(site, cap):
            model(pad_batch(chunk))
        x = cap[-1][0]
        for j, s in enumerate(chunk):
            pos = positions[i + j] if positions is not None else range(len(s))
            out.append(x[j, list(pos)].double())
    return torch.cat(out)


def null_space_projector(keys: torch.Tensor, tol: float = DEFAULT_NULL_TOL) -> tuple[torch.Tensor, int]:
    """(P [in, in], null dimension): the projector onto the eigenvectors of K^T K (float64) whose eigenvalue is at
    most `tol` times the largest: AlphaEdit's null space of the preserved keys."""
    k = keys.double()
    cov = k.T @ k
    evals, evecs = torch.linalg.eigh(cov)
    keep = evals <= tol * float(evals[-1].clamp_min(1e-300))
    u = evecs[:, keep]
    return u @ u.T, int(keep.sum())
