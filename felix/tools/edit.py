"""SpliceCore edits: write a behaviour into a model's splice surface, list it, undo it, export it.

An edit request is ``(prompt, target)``: after `prompt` the model should continue with `target`. Only the splice
tensors of one spliced projection (by default the highest spliced layer's ``ffn_down``) change; everything else is
frozen. Two methods:

``closed-form`` (the ROME / MEMIT family, with AlphaEdit's null-space constraint)
    *Keys* are the inputs of the spliced projection at the positions that predict the target's tokens (the last
    prompt token, then each target token but the last). *Values* come from a small optimisation, as in ROME: a
    vector delta added to the projection's output at those positions is tuned (Adam, everything else frozen) until
    the model gives the target probability ``value_prob``; the value is the projection's output plus that delta.
    The update dW (``[out, in]``) then solves, in float64,

        dW k_i = v_i - (W + S0) k_i   for every key of every applied edit (jointly: MEMIT's batch solve),
        dW = dW P                     P: projector onto the null space of the preserved-knowledge keys,

    where S0 = gate * B0 A0 is the splice before the session. dW = R (P K)^+ P is the minimum-Frobenius-norm
    solution: edited keys map exactly to their values, preserved keys exactly to what the unedited projection gave
    (``null_space=False`` drops P: plain minimum-norm, the ablation). ``ridge`` > 0 trades exactness on the edited
    keys for a bounded update: dW = R (K^T P K + lambda I)^-1 K^T P, i.e. min |dW P K - R|^2 + lambda |dW|_F^2 with
    lambda = ridge * mean |P k|^2 (AlphaEdit's identity term); preserved keys stay exact. The preserved set is keys
    from corpus text; its null space is the span of the eigenvectors of K_p^T K_p whose eigenvalue is at most
    ``null_tol`` times the largest (AlphaEdit keeps the small-eigenvalue directions; exact when K_p is rank-deficient
    and the tolerance sits in the gap). The new splice S0 + dW is factored by SVD into A [r, in] and B [out, r] (B divided by the
    gate) and written through felix.model.splice.write_splice.

    Rank: dW has one rank per key, the splice holds rank r in all, S0 takes rank(S0) of it. When the keys of all
    edits need more than the budget r - rank(S0): ``when_full="refuse"`` raises RankBudgetError;
    ``"refit"`` solves the reduced-rank problem instead (the best rank-q dW in the least-squares sense, closed form
    by reduced-rank regression: dW = U_q U_q^T dW_ls, U_q the top left singular vectors of the fitted residuals):
    edits then hold approximately, which the sequential harness measures. A trained splice (S0 of full rank)
    leaves no budget; :func:`fold_splice` moves it into the projection's weight first (function-preserving, in
    float64), which frees the whole surface for edits.

``finetune`` (baseline: constrained fine-tuning of the splice, Zhu et al. 2020)
    A and B of the site are tuned by Adam on the target's cross-entropy for ``ft_steps`` steps, every step clamped
    back into an L-infinity ball of radius ``ft_eps`` around their values at the start of the session. Undo is
    last-in-first-out (each edit keeps the splice tensors it started from).

Bad input is refused before anything is written: a target that is empty, holds special-token text, does not round
trip through the tokenizer or has ids outside the model's vocabulary (UntokenisableError); a prompt already edited
to another target, two requests of one batch that disagree, or an edit whose key lies in the span of the protected
keys so that no update can satisfy it without changing what is protected (ConflictError); more keys than the rank
budget with ``when_full="refuse"`` (RankBudgetError).
"""
from __future__ import annotations

import copy
import json
import random
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from felix.data import corpus as felix_data
from felix.core.files import jsonl_lines, read_json, read_text
from felix.model.felix_lm import CheckpointError, load_checkpoint, save_checkpoint
from felix.ops.lowrank import MAX_RANK
from felix.model.qat import QAT_FILE, qat_config_of, read_qat_config
from felix.model.splice import SPLICE_TENSOR_NAMES, read_splice, restore_splices, snapshot_splices, write_splice
from felix.tasks.records import ACTORS, EVENTS, SUBJECTS
from felix.model.tokenizer import SPECIAL_TOKENS, Tokenizer

METHODS = ("closed-form", "finetune")
WHEN_FULL = ("refuse", "refit")
DEFAULT_NULL_TOL = 1e-2      # AlphaEdit-style: eigen-directions below 1% of the largest count as "null"
DEFAULT_CONFLICT_TOL = 1e-3  # a key whose part outside the protected span is < 0.1% of its norm conflicts
RANK_TOL = 1e-9              # relative singular value below which float64 calls a direction zero
FLOAT32_RANK_TOL = 1e-5      # ... and below which a product of float32 factors does


class EditError(ValueError):
    """An edit cannot be made as asked."""


class UntokenisableError(EditError):
    """A prompt or target the tokenizer / model cannot represent."""


class ConflictError(EditError):
    """An edit that contradicts an applied edit, another request of its batch, or the preserved-knowledge set."""


class RankBudgetError(EditError):
    """The edits need more rank than the splice surface has left."""


@dataclass
class EditRequest:
    prompt: str
    target: str
    paraphrases: tuple[str, ...] = ()
    name: str = ""


@dataclass
class Edit:
    """An applied edit: its request, token ids, and (closed-form) keys [m, in] and values [m, out] in float64."""
    id: int
    request: EditRequest
    prompt_ids: list[int]
    target_ids: list[int]
    method: str
    keys: torch.Tensor | None = None
    values: torch.Tensor | None = None
    target_prob_before: float = 0.0
    value_delta_norm: float = 0.0
    info: dict = field(default_factory=dict)

    def summary(self) -> dict:
        return {"id": self.id, "name": self.request.name, "prompt": self.request.prompt,
                "target": self.request.target, "method": self.method, "n_keys": len(self.target_ids),
                "target_prob_before": self.target_prob_before, "value_delta_norm": self.value_delta_norm,
                **self.info}


# ------------------------------------------------------------------------------------- the site
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
        raise EditError(f"the model is patched for quantization-aware training ({qat_config_of(model).mode}): folding "
                        "the splice would re-quantize W + gate B A (as felix export refuses --splice merge)")
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


@contextmanager
def _tap(site: SpliceSite, captured: list, delta: dict | None = None):
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


# ------------------------------------------------------------------------------------- tokens
def tokenize_request(tokenizer, model, req: EditRequest) -> tuple[list[int], list[int]]:
    """(prompt ids, target ids), each text tokenized on its own and concatenated; refused when a text is empty,
    holds special-token text, does not round-trip, or has ids outside the model's vocabulary."""
    out = []
    for role, text in (("prompt", req.prompt), ("target", req.target)):
        if not isinstance(text, str):
            raise UntokenisableError(f"{role} must be a string, got {type(text).__name__}")
        if not text:
            verb = "condition on" if role == "prompt" else "write"
            raise UntokenisableError(f"the {role} is empty: there is no token to {verb}")
        specials = [s for s in SPECIAL_TOKENS if s in text] if role == "target" else []
        if specials:
            raise UntokenisableError(f"target {text!r} holds special-token text {specials}: a target must be plain "
                                     "text (special tokens are control ids, not something an edit writes)")
        ids = tokenizer.encode(text)
        if not ids:
            raise UntokenisableError(f"the tokenizer gives no tokens for the {role} {text!r}")
        back = tokenizer.decode(ids)
        if back != text:
            raise UntokenisableError(f"the {role} {text!r} is not tokenisable: it decodes back as {back!r}")
        bad = [i for i in ids if not 0 <= i < model.cfg.vocab_size]
        if bad:
            raise UntokenisableError(f"the {role} {text!r} has token ids {bad} outside the model's vocabulary of "
                                     f"{model.cfg.vocab_size}")
        out.append(ids)
    if len(out[0]) + len(out[1]) > model.cfg.max_seq_len:
        raise UntokenisableError(f"prompt + target are {len(out[0]) + len(out[1])} tokens, over max_seq_len "
                                 f"{model.cfg.max_seq_len}")
    return out[0], out[1]


def _sequence(prompt_ids, target_ids):
    """Input ids, and the positions whose next-token prediction is a target token."""
    ids = list(prompt_ids) + list(target_ids[:-1])
    return ids, list(range(len(prompt_ids) - 1, len(ids)))


def _batch(seqs: list[list[int]], pad: int = 0) -> torch.Tensor:
    n = max(len(s) for s in seqs)
    return torch.tensor([s + [pad] * (n - len(s)) for s in seqs], dtype=torch.long)


@torch.no_grad()
def site_keys(model, site: SpliceSite, seqs: list[list[int]], positions: list[list[int]] | None = None,
              batch_size: int = 32) -> torch.Tensor:
    """Inputs of the spliced projection (float64 [N, in]) at `positions` of each sequence (all positions when None).
    Right-padding is harmless: attention is causal, so padding never reaches a real position."""
    out = []
    for i in range(0, len(seqs), batch_size):
        chunk = seqs[i:i + batch_size]
        cap: list = []
        with _tap(site, cap):
            model(_batch(chunk))
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


# ------------------------------------------------------------------------------------- the editor
class SpliceEditor:
    """Edits of one splice site of a FelixLM, with list / undo / snapshot. See the module docstring."""

    def __init__(self, model, tokenizer, layer: int | None = None, projection: str | None = None,
                 method: str = "closed-form", preserved_keys: torch.Tensor | None = None,
                 null_space: bool = True, null_tol: float = DEFAULT_NULL_TOL, when_full: str = "refuse",
                 conflict_tol: float = DEFAULT_CONFLICT_TOL, ridge: float = 0.0, value_prob: float = 0.9,
                 value_steps: int = 60,
                 value_lr: float = 0.25, ft_steps: int = 60, ft_lr: float = 2e-2, ft_eps: float = 0.1):
        if method not in METHODS:
            raise EditError(f"unknown edit method {method!r}; choose from {', '.join(METHODS)}")
        if when_full not in WHEN_FULL:
            raise EditError(f"unknown when_full {when_full!r}; choose from {', '.join(WHEN_FULL)}")
        if getattr(model, "activation_rounding", None) is not None:
            raise EditError("the model rounds or masks its matmul inputs (an activation seam is installed: fidelity "
                            "simulation, QAT bitnet, pruning masks): the closed form needs the projection's input as "
                            "its key; edit the plain model")
        self.model, self.tokenizer = model, tokenizer
        self.site = splice_site(model, layer, projection)
        self.method, self.when_full = method, when_full
        self.null_space, self.null_tol, self.conflict_tol = null_space, null_tol, conflict_tol
        if ridge < 0:
            raise EditError(f"ridge must be >= 0, got {ridge}")
        self.ridge = ridge
        self.value_prob, self.value_steps, self.value_lr = value_prob, value_steps, value_lr
        self.ft_steps, self.ft_lr, self.ft_eps = ft_steps, ft_lr, ft_eps
        gate = self.site.core.gate.detach()
        if bool((gate == 0).any()):
            raise EditError(f"{self.site.name('gate')} is 0: the splice is switched off, an edit cannot be written "
                            "into B (set the gate first)")
        self.base = {k: v for k, v in snapshot_splices(model).items() if k.startswith(f"blk.{self.site.layer}.splice."
                                                                                      f"{self.site.projection}.")}
        self.weight = getattr(self.site.block, self.site.projection).weight.detach().double().clone()
        self.s0 = splice_product(self.site)
        self.base_rank = numerical_rank(self.s0)
        self.in_features = self.weight.shape[1]
        self.projector, self.null_dim = None, self.in_features
        if method == "closed-form" and null_space:
            if preserved_keys is None:
                raise EditError("null_space=True needs preserved_keys (site_keys of the preserved-knowledge text)")
            if preserved_keys.shape[-1] != self.in_features:
                raise EditError(f"preserved keys have width {preserved_keys.shape[-1]}, the site's input is "
                                f"{self.in_features}")
            self.projector, self.null_dim = null_space_projector(preserved_keys, null_tol)
            if self.null_dim == 0:
                raise EditError(f"the preserved keys span the whole {self.in_features}-dim input of "
                                f"{self.site.projection} at null_tol {null_tol}: no direction is free to edit")
        self.edits: list[Edit] = []
        self._next_id = 0
        self._ft_stack: list[dict] = []  # finetune: splice tensors before each edit
        self.last_fit: dict = {}
        self.dw = torch.zeros_like(self.weight)  # the closed form's current update, float64

    # -- budget
    @property
    def rank_budget(self) -> int:
        return self.site.rank - self.base_rank

    def rank_used(self) -> int:
        """Rank of the edits' update: of the float64 solve (closed form), or of the written change at float32's
        resolution (finetune)."""
        if self.method == "closed-form":
            return numerical_rank(self.dw)
        return numerical_rank(self.delta(), tol=FLOAT32_RANK_TOL)

    def delta(self) -> torch.Tensor:
        """The change of the site's effective weight as written (float32 factors), in float64 [out, in]."""
        return splice_product(self.site) - self.s0

    # -- requests
    def _prepare(self, requests: list[EditRequest]) -> list[tuple[EditRequest, list[int], list[int]]]:
        prepared, seen = [], {}
        for req in requests:
            if not isinstance(req, EditRequest):
                req = EditRequest(**req) if isinstance(req, dict) else EditRequest(*req)
            p, t = tokenize_request(self.tokenizer, self.model, req)
            for e in self.edits:
                if e.prompt_ids == p:
                    if e.target_ids == t:
                        raise ConflictError(f"edit {e.id} already makes {req.prompt!r} continue with {req.target!r}")
                    raise ConflictError(f"edit {e.id} already makes {req.prompt!r} continue with "
                                        f"{e.request.target!r}, not {req.target!r}: undo edit {e.id} first")
            if tuple(p) in seen:
                other = seen[tuple(p)]
                raise ConflictError(f"two requests of this batch edit the prompt {req.prompt!r}: targets "
                                    f"{other.target!r} and {req.target!r}")
            seen[tuple(p)] = req
            prepared.append((req, p, t))
        return prepared

    # -- values (ROME's v*)
    def _value(self, prompt_ids, target_ids) -> tuple[torch.Tensor, torch.Tensor, float, float]:
        """(keys [m, in], values [m, out], p(target) before, |delta|): the projection outputs at the target
        positions that make the model give the target probability >= value_prob (Adam on a delta)."""
        ids, pos = _sequence(prompt_ids, target_ids)
        x = torch.tensor([ids])
        tgt = torch.tensor(target_ids)
        positions = torch.tensor([pos])
        out_features = self.weight.shape[0]
        delta = torch.zeros(1, len(pos), out_features, requires_grad=True)
        opt = torch.optim.Adam([delta], lr=self.value_lr)
        p_before = None
        for _ in range(self.value_steps + 1):
            cap: list = []
            with _tap(self.site, cap, {"positions": positions, "value": delta}):
                logits = self.model(x)[0, pos]
            logp = F.log_softmax(logits.float(), -1)[torch.arange(len(pos)), tgt]
            if p_before is None:
                p_before = float(logp.detach().sum().exp())
                keys, outs = cap[-1][0][0, pos].double(), cap[-1][1][0, pos].double()
            if float(logp.detach().min().exp()) >= self.value_prob:
                break
            opt.zero_grad()
            (-logp.sum()).backward()
            opt.step()
        d = delta.detach()[0].double()
        return keys, outs + d, p_before, float(d.norm())

    # -- the closed form
    def solve(self, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """dW (float64 [out, in]) for keys [M, in] and values [M, out]: see the module docstring."""
        if keys.shape[0] == 0:
            return torch.zeros_like(self.weight)
        k = keys.double().T                                  # [in, M]
        r = (values.double() - keys.double() @ (self.weight + self.s0).T).T   # [out, M] residuals
        p = self.projector if self.projector is not None else torch.eye(self.in_features, dtype=torch.float64)
        pk = p @ k
        if self.ridge > 0:  # dW = R (K^T P K + lambda I)^-1 K^T P: ridge in key space, lambda relative to mean |P k|^2
            gram = pk.T @ pk
            lam = self.ridge * float(torch.diagonal(gram).mean())
            dw = torch.linalg.solve(gram + lam * torch.eye(gram.shape[0], dtype=gram.dtype), r.T).T @ pk.T
        else:
            dw = r @ torch.linalg.pinv(pk, rtol=RANK_TOL) @ p    # min-norm: dW P K = R, dW = dW P
        q = self.rank_budget
        self.last_fit = {"n_keys": keys.shape[0], "refit": False}
        if keys.shape[0] > q:
            fitted = dw @ k
            u = torch.linalg.svd(fitted, full_matrices=False).U[:, :q]
            dw = u @ (u.T @ dw)
            self.last_fit = {"n_keys": keys.shape[0], "refit": True, "rank": q}
        return dw

    def _check_conflict(self, new_keys: torch.Tensor, names: list[str]) -> None:
        p = self.projector if self.projector is not None else torch.eye(self.in_features, dtype=torch.float64)
        old = [e.keys for e in self.edits if e.keys is not None]
        old_k = (p @ torch.cat(old).T) if old else torch.zeros(self.in_features, 0, dtype=torch.float64)
        owners = [e for e in self.edits if e.keys is not None for _ in range(e.keys.shape[0])]
        for i, key in enumerate(new_keys):
            pk = p @ key
            norm = float(key.norm())
            if float(pk.norm()) < self.conflict_tol * norm:
                raise ConflictError(f"{names[i]}: its key lies in the span of the preserved-knowledge keys (only "
                                    f"{float(pk.norm()) / norm:.2e} of it is outside): no null-space update can "
                                    "write it without changing preserved behaviour")
            if old_k.shape[1]:
                coef = torch.linalg.lstsq(old_k, pk[:, None]).solution
                rest = pk - (old_k @ coef)[:, 0]
                if float(rest.norm()) < self.conflict_tol * norm:
                    j = int(coef.abs().argmax())
                    raise ConflictError(f"{names[i]}: its key is (to {float(rest.norm()) / norm:.1e}) a combination "
                                        f"of the keys of applied edits, mostly edit {owners[j].id} "
                                        f"({owners[j].request.prompt!r} -> {owners[j].request.target!r}); both cannot "
                                        "hold: undo that edit first")
            old_k = torch.cat([old_k, pk[:, None]], 1)
            owners.append(None)

    def _write(self, dw: torch.Tensor) -> None:
        """Write S0 + dW into A/B (rank <= r, exact in float64 up to the float32 cast); S0 itself bit-exactly."""
        self.dw = dw
        if not bool(dw.any()):
            restore_splices(self.model, self.base)
            return
        s = self.s0 + dw
        u, sv, vh = torch.linalg.svd(s, full_matrices=False)
        r = self.site.rank
        root = sv[:r].sqrt()
        a = root[:, None] * vh[:r]
        b = u[:, :r] * root[None, :]
        g = self.site.core.gate.detach().double()
        b = b / (g if g.numel() == 1 else g[:, None])
        core = self.site.core
        write_splice(self.model, self.site.name("a"), a.to(core.a.dtype).contiguous())
        write_splice(self.model, self.site.name("b"), b.to(core.b.dtype).contiguous())

    def _all_keys_values(self, extra=()):
        items = [(e.keys, e.values) for e in self.edits] + list(extra)
        if not items:
            return torch.zeros(0, self.in_features, dtype=torch.float64), torch.zeros(0, self.weight.shape[0],
                                                                                    dtype=torch.float64)
        return torch.cat([k for k, _ in items]), torch.cat([v for _, v in items])

    # -- apply / undo
    def apply(self, requests) -> list[Edit]:
        """Apply one request or a batch (one joint solve). Returns the new Edits; nothing changes on error."""
        if isinstance(requests, (EditRequest, dict)):
            requests = [requests]
        prepared = self._prepare(list(requests))
        if self.method == "finetune":
            return [self._finetune(req, p, t) for req, p, t in prepared]
        new = []
        for req, p, t in prepared:
            keys, values, p0, dn = self._value(p, t)
            new.append(Edit(self._next_id + len(new), req, p, t, self.method, keys, values, p0, dn))
        new_keys = torch.cat([e.keys for e in new])
        self._check_conflict(new_keys, [f"edit {req.prompt!r} -> {req.target!r}" for e in new for req in
                                        [e.request] * e.keys.shape[0]])
        n_keys = sum(e.keys.shape[0] for e in self.edits) + new_keys.shape[0]
        if n_keys > self.rank_budget and self.when_full == "refuse":
            raise RankBudgetError(
                f"the splice {self.site.name('a').rsplit('.', 1)[0]} has rank {self.site.rank}"
                + (f", {self.base_rank} of it held by its trained update" if self.base_rank else "")
                + f": {self.rank_budget} left for edits, and the applied and new edits need {n_keys} (one per target "
                "token). Undo an edit, use when_full='refit' (--when-full refit: a best rank-limited fit of all "
                "edits), "
                + ("fold the trained splice into the weight (fold_splice / --fold-splice), " if self.base_rank else "")
                + "or widen the splice (widen_splice / --splice-rank)")
        keys, values = self._all_keys_values([(e.keys, e.values) for e in new])
        dw = self.solve(keys, values)
        self._write(dw)
        self.edits.extend(new)
        self._next_id += len(new)
        return new

    def _finetune(self, req, prompt_ids, target_ids) -> Edit:
        core = self.site.core
        before = {self.site.name(k): read_splice(self.model, self.site.name(k)) for k in ("a", "b")}
        anchor_a, anchor_b = self.base[self.site.name("a")], self.base[self.site.name("b")]
        ids, pos = _sequence(prompt_ids, target_ids)
        x, tgt = torch.tensor([ids]), torch.tensor(target_ids)
        flags = [(p, p.requires_grad) for p in self.model.parameters()]
        for p, _ in flags:
            p.requires_grad_(False)
        core.a.requires_grad_(True)
        core.b.requires_grad_(True)
        opt = torch.optim.Adam([core.a, core.b], lr=self.ft_lr)
        p0 = None
        try:
            for _ in range(self.ft_steps + 1):
                logp = F.log_softmax(self.model(x)[0, pos].float(), -1)[torch.arange(len(pos)), tgt]
                if p0 is None:
                    p0 = float(logp.detach().sum().exp())
                if float(logp.detach().min().exp()) >= self.value_prob:
                    break
                opt.zero_grad()
                (-logp.sum()).backward()
                opt.step()
                with torch.no_grad():
                    core.a.copy_(torch.maximum(torch.minimum(core.a, anchor_a + self.ft_eps), anchor_a - self.ft_eps))
                    core.b.copy_(torch.maximum(torch.minimum(core.b, anchor_b + self.ft_eps), anchor_b - self.ft_eps))
        finally:
            for p, flag in flags:
                p.requires_grad_(flag)
        self._ft_stack.append(before)
        edit = Edit(self._next_id, req, prompt_ids, target_ids, "finetune", target_prob_before=p0)
        self._next_id += 1
        self.edits.append(edit)
        return edit

    def undo(self, edit_id: int) -> Edit:
        """Remove edit `edit_id`: closed-form re-solves the remaining edits; finetune restores the tensors the
        edit started from (last edit only)."""
        idx = [i for i, e in enumerate(self.edits) if e.id == edit_id]
        if not idx:
            raise EditError(f"no applied edit with id {edit_id}; applied: {[e.id for e in self.edits]}")
        i = idx[0]
        if self.method == "finetune":
            if i != len(self.edits) - 1:
                raise EditError(f"finetune edits undo last-first: edit {self.edits[-1].id} is the last, not {edit_id}")
            restore_splices(self.model, self._ft_stack.pop())
            return self.edits.pop()
        removed = self.edits.pop(i)
        keys, values = self._all_keys_values()
        self._write(self.solve(keys, values))
        return removed

    def list(self) -> list[dict]:
        return [e.summary() for e in self.edits]

    # -- snapshots
    def snapshot(self) -> dict:
        """The site's splice tensors (felix.model.splice.snapshot_splices) plus the applied edits."""
        return {"splices": snapshot_splices(self.model), "edits": copy.deepcopy(self.edits),
                "next_id": self._next_id, "ft_stack": copy.deepcopy(self._ft_stack)}

    def restore(self, snap: dict) -> None:
        restore_splices(self.model, snap["splices"])
        self.edits = copy.deepcopy(snap["edits"])
        self._next_id = snap["next_id"]
        self._ft_stack = copy.deepcopy(snap["ft_stack"])

    # -- persistence (felix edit across invocations)
    def state(self) -> tuple[dict, dict[str, torch.Tensor]]:
        """(manifest JSON, tensors) that let a later session list, undo and extend these edits."""
        if self.method == "finetune":
            raise EditError("finetune edits are not saved with their history (they hold no keys); save the "
                            "checkpoint itself")
        manifest = {"format": "felix-splice-edits", "version": 1, "layer": self.site.layer,
                    "projection": self.site.projection, "method": self.method, "null_space": self.null_space,
                    "null_tol": self.null_tol, "when_full": self.when_full, "ridge": self.ridge,
                    "next_id": self._next_id,
                    "edits": [{**asdict(e.request), "id": e.id, "prompt_ids": e.prompt_ids,
                               "target_ids": e.target_ids, "target_prob_before": e.target_prob_before,
                               "value_delta_norm": e.value_delta_norm} for e in self.edits]}
        tensors = {f"base.{k}": v.contiguous() for k, v in self.base.items()}
        if self.projector is not None:
            tensors["projector"] = self.projector.contiguous()
        for e in self.edits:
            tensors[f"edit.{e.id}.keys"] = e.keys.contiguous()
            tensors[f"edit.{e.id}.values"] = e.values.contiguous()
        return manifest, tensors

    @classmethod
    def from_state(cls, model, tokenizer, manifest: dict, tensors: dict, **kwargs) -> SpliceEditor:
        """An editor over `model` whose splice already holds the saved edits (checked: re-solving them gives the
        splice the model holds)."""
        if manifest.get("format") != "felix-splice-edits":
            raise EditError("not a felix splice-edits manifest")
        ed = cls.__new__(cls)
        SpliceEditor.__init__(ed, model, tokenizer, manifest["layer"], manifest["projection"], "closed-form",
                              preserved_keys=None, null_space=False, when_full=manifest["when_full"], **kwargs)
        ed.null_space, ed.null_tol, ed.ridge = manifest["null_space"], manifest["null_tol"], manifest.get("ridge", 0.0)
        if "projector" in tensors:
            ed.projector = tensors["projector"].double()
            ed.null_dim = int(round(float(torch.trace(ed.projector))))
        ed.base = {k[len("base."):]: v for k, v in tensors.items() if k.startswith("base.")}
        current = snapshot_splices(model)
        restore_splices(model, ed.base)
        ed.s0 = splice_product(ed.site)
        ed.base_rank = numerical_rank(ed.s0)
        restore_splices(model, current)
        for d in manifest["edits"]:
            req = EditRequest(d["prompt"], d["target"], tuple(d.get("paraphrases", ())), d.get("name", ""))
            ed.edits.append(Edit(d["id"], req, d["prompt_ids"], d["target_ids"], "closed-form",
                                 tensors[f"edit.{d['id']}.keys"].double(), tensors[f"edit.{d['id']}.values"].double(),
                                 d["target_prob_before"], d["value_delta_norm"]))
        ed._next_id = manifest["next_id"]
        keys, values = ed._all_keys_values()
        ed.dw = ed.solve(keys, values)
        want = ed.s0 + ed.dw
        have = splice_product(ed.site)
        err = float((want - have).abs().max()) / max(float(want.abs().max()), 1e-30)
        if err > 1e-5:
            raise EditError(f"the model's splice does not hold the saved edits (relative difference {err:.2e}); "
                            "the checkpoint was changed after editing")
        return ed


# ------------------------------------------------------------------------------------- evaluation
@torch.no_grad()
def target_stats(model, items: list[tuple[list[int], list[int]]], batch_size: int = 64) -> list[dict]:
    """Per (prompt ids, target ids): whether every target token is the argmax (teacher-forced), and the target's
    log-probability."""
    out = []
    for i in range(0, len(items), batch_size):
        chunk = items[i:i + batch_size]
        seqs = [_sequence(p, t) for p, t in chunk]
        logits = model(_batch([s for s, _ in seqs])).float()
        for j, ((_, t), (_, pos)) in enumerate(zip(chunk, seqs)):
            lg = logits[j, pos]
            tgt = torch.tensor(t)
            out.append({"top1": bool((lg.argmax(-1) == tgt).all()),
                        "logprob": float(F.log_softmax(lg, -1)[torch.arange(len(t)), tgt].sum())})
    return out


@torch.no_grad()
def mean_kl(model, seqs: list[list[int]], reference_logprobs: list[torch.Tensor]) -> float:
    """Mean over tokens of KL(reference || model) on `seqs`."""
    total, n = 0.0, 0
    logits = model(_batch(seqs)).float()
    for j, s in enumerate(seqs):
        lp = F.log_softmax(logits[j, :len(s)], -1)
        ref = reference_logprobs[j]
        total += float((ref.exp() * (ref - lp)).sum())
        n += len(s)
    return total / n


@torch.no_grad()
def logprobs(model, seqs: list[list[int]]) -> list[torch.Tensor]:
    logits = model(_batch(seqs)).float()
    return [F.log_softmax(logits[j, :len(s)], -1) for j, s in enumerate(seqs)]


# ------------------------------------------------------------------------------------- built-in edit set
# Facts the built-in corpus teaches (felix.tasks.records.EVENTS): after "<subject> <failure>", records go on with the
# fix. The templates are the phrasings felix.data.corpus's records use.
FACT_TEMPLATES = (
    "- {actor} reported that {subject} {failure}; they",
    "{actor} found that {subject} {failure}; the team",
    "{actor}: {subject} {failure}; the fix:",
)


def fact_phrases() -> list[str]:
    """The failure phrases the built-in edit set keys on: neutral text for locality must not contain them."""
    return [e[0] for e in EVENTS]


def builtin_edit_set(model, tokenizer, n: int = 100, seed: int = 0) -> list[dict]:
    """`n` edit cases from felix.data.corpus's records: a (subject, failure) pair in one record phrasing, its fix's first
    word as the fact the corpus teaches, a counterfactual rewrite to another fix's first word, and paraphrases (the
    same pair in the other phrasings, with other people). Each case: prompt, target, true (the corpus answer),
    learned (whether the model's greedy next token is the true one), paraphrases. Targets are single tokens."""
    rng = random.Random(seed)
    events = EVENTS
    first_words = sorted({" " + e[1].split()[0] for e in events})
    single = [w for w in first_words if len(tokenizer.encode(w)) == 1]
    if len(single) < 2:
        raise EditError("the tokenizer splits the fixes' first words into several tokens; the built-in edit set "
                        "needs single-token targets")
    pairs = [(s, e) for s in SUBJECTS for e in events if " " + e[1].split()[0] in single]
    rng.shuffle(pairs)
    if n > len(pairs):
        raise EditError(f"the built-in edit set has {len(pairs)} distinct (subject, failure) cases, fewer than {n}")
    cases = []
    for i, (subject, event) in enumerate(pairs[:n]):
        true = " " + event[1].split()[0]
        target = rng.choice([w for w in single if w != true])
        t = i % len(FACT_TEMPLATES)
        actors = rng.sample(ACTORS, len(FACT_TEMPLATES))
        fill = lambda k: FACT_TEMPLATES[k].format(actor=actors[k], subject=subject, failure=event[0])  # noqa: E731
        cases.append({"name": f"{subject.removeprefix('the ')} / {event[0]}", "prompt": fill(t), "target": target,
                      "true": true, "paraphrases": [fill(k) for k in range(len(FACT_TEMPLATES)) if k != t]})
    stats = target_stats(model, [(tokenizer.encode(c["prompt"]), tokenizer.encode(c["true"])) for c in cases])
    for c, s in zip(cases, stats):
        c["learned"] = s["top1"]
    return cases


def corpus_sequences(tokenizer, split: str, n: int, length: int, seed: int = 0, exclude=()) -> list[list[int]]:
    """`n` windows of `length` tokens from the built-in corpus's train or validation split (felix train's split
    with its defaults), evenly spread; documents containing any of the strings `exclude` are left out."""
    train, val = felix_data.split_documents(felix_data.builtin_corpus(2000, seed), 0.05, seed)
    docs = [d for d in (train if split == "train" else val) if not any(x in d for x in exclude)]
    ids = [i for d in docs for i in tokenizer.encode(d)]
    step = max(length, (len(ids) - length) // max(n, 1))
    out = [ids[s:s + length] for s in range(0, len(ids) - length, step)][:n]
    if len(out) < n:
        raise EditError(f"the {split} split holds only {len(out)} windows of {length} tokens")
    return out


# ------------------------------------------------------------------------------------- sequential harness
@dataclass
class HarnessData:
    """What the sequential harness measures on: edit cases (builtin_edit_set), neutral sequences for locality KL,
    validation windows for CE."""
    cases: list[dict]
    neutral: list[list[int]]
    validation: list[list[int]]


@torch.no_grad()
def validation_ce(model, windows: list[list[int]]) -> float:
    x = torch.tensor(windows)
    return float(model.loss(x[:, :-1], x[:, 1:]).ce)


def run_sequential(editor: SpliceEditor, data: HarnessData, full_every: int = 10, progress: bool = True,
                   desc: str = "edits") -> list[dict]:
    """Apply data.cases one after another; after each edit measure: efficacy (the edit's target is the argmax),
    paraphrase generalisation (the edit's paraphrases), retention (earlier edits still hold), locality (mean
    token KL from the unedited model on the neutral sequences), ||dW||_F and rank used, validation CE. Every
    `full_every` edits (and at the end) also the paraphrases of all applied edits. Returns one row per edit."""
    model, tok = editor.model, editor.tokenizer
    ref = logprobs(model, data.neutral)
    ce0 = validation_ce(model, data.validation)
    tokd = [(tokenize_request(tok, model, EditRequest(c["prompt"], c["target"]))) for c in data.cases]
    para = [[(tok.encode(p), t) for p in c["paraphrases"]] for c, (_, t) in zip(data.cases, tokd)]
    rows = []
    for i, case in enumerate(tqdm(data.cases, desc=desc, unit="edit", disable=not progress, leave=False)):
        t0 = time.perf_counter()
        editor.apply(EditRequest(case["prompt"], case["target"], tuple(case["paraphrases"]), case["name"]))
        seconds = time.perf_counter() - t0
        held = target_stats(model, tokd[: i + 1])
        now_para = target_stats(model, para[i])
        row = {"edit": i + 1, "efficacy": float(held[-1]["top1"]), "target_logprob": held[-1]["logprob"],
               "paraphrase": sum(s["top1"] for s in now_para) / len(now_para),
               "retention": (sum(s["top1"] for s in held[:-1]) / i) if i else None,
               "cumulative_efficacy": sum(s["top1"] for s in held) / (i + 1),
               "locality_kl": mean_kl(model, data.neutral, ref), "val_ce": validation_ce(model, data.validation),
               "val_ce_change": None, "dW_fro": float(editor.delta().norm()), "rank_used": editor.rank_used(),
               "seconds": seconds}
        row["val_ce_change"] = row["val_ce"] - ce0
        if (i + 1) % full_every == 0 or i + 1 == len(data.cases):
            allp = target_stats(model, [x for p in para[: i + 1] for x in p])
            row["cumulative_paraphrase"] = sum(s["top1"] for s in allp) / len(allp)
        rows.append(row)
    return rows


# ------------------------------------------------------------------------------------- felix edit (CLI)
EDITS_MANIFEST, EDITS_TENSORS = "edits.json", "edits.safetensors"


def load_requests(path) -> list[EditRequest]:
    """JSONL of {"prompt", "target"} (+ "paraphrases", "name"), read by felix.core.files' one JSONL reader; every
    malformed line is reported as path:line, a missing or binary file by name."""
    out, problems = [], []
    for where, d, problem in jsonl_lines(read_text(path, EditError, "edit request file"), path):
        if problem is None and (not isinstance(d, dict) or not {"prompt", "target"} <= set(d)):
            problem = "needs keys prompt and target"
        elif problem is None:
            bad = [k for k in ("prompt", "target", "name") if k in d and not isinstance(d[k], str)]
            paraphrases = d.get("paraphrases", [])
            if bad:
                problem = f"{', '.join(bad)} must be text"
            elif not isinstance(paraphrases, list) or not all(isinstance(p, str) for p in paraphrases):
                problem = "paraphrases must be a list of texts"
        if problem is not None:
            problems.append(f"{where}: {problem}")
            continue
        out.append(EditRequest(d["prompt"], d["target"], tuple(d.get("paraphrases", ())), d.get("name", "")))
    if problems:
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        raise EditError("bad edit requests: " + "; ".join(problems[:5]) + more)
    if not out:
        raise EditError(f"{path} holds no edit requests")
    return out


def open_editor(checkpoint, method: str = "closed-form", null_space: bool = True, when_full: str = "refuse",
                fold: bool = False, splice_rank: int | None = None, layer=None, projection=None,
                preserved_windows: int = 64, ridge: float = 0.0, log=print):
    """(model, tokenizer, editor) for a checkpoint directory; a checkpoint written by `felix edit` resumes its
    edits (list, undo, more edits) from its edits.json / edits.safetensors."""

    checkpoint = Path(checkpoint)
    qat = read_qat_config(checkpoint)
    if qat is not None:
        raise EditError(f"{checkpoint} was trained quantization-aware ({qat.mode}, {QAT_FILE}): felix edit solves "
                        "against the float weights and writes a checkpoint without the QAT record, so its export would "
                        "no longer ship the bytes the model trained with; edit the checkpoint before the QAT phase")
    model = load_checkpoint(checkpoint).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    tok = Tokenizer.load(checkpoint)
    manifest_path = checkpoint / EDITS_MANIFEST
    if manifest_path.is_file():
        if fold or splice_rank:
            raise EditError(f"{checkpoint} already holds edits: --fold-splice / --splice-rank apply to an unedited "
                            "model")
        return model, tok, _resume_editor(model, tok, checkpoint)
    if method == "finetune":
        raise EditError("felix edit saves closed-form edits with their history; the finetune baseline is "
                        "for the Python API and the report (felix.tools.edit.SpliceEditor(method='finetune'))")
    if splice_rank:
        widen_splice(model, splice_rank)
    if fold:
        err = fold_splice(model, layer, projection)
        log(f"folded the trained splice into its weight (max change of the effective weight {err:.1e})")
    preserved = None
    if null_space:
        site = splice_site(model, layer, projection)
        preserved = site_keys(model, site, corpus_sequences(tok, "train", preserved_windows, 64))
    return model, tok, SpliceEditor(model, tok, layer, projection, method, preserved, null_space=null_space,
                                    when_full=when_full, ridge=ridge)


def _resume_editor(model, tok, checkpoint) -> SpliceEditor:
    """The editor a `felix edit` checkpoint saved (edits.json + edits.safetensors); a missing, corrupt or
    inconsistent pair raises EditError naming the file."""
    manifest_path, tensors_path = checkpoint / EDITS_MANIFEST, checkpoint / EDITS_TENSORS
    manifest = read_json(manifest_path, EditError, "edit manifest")
    if not tensors_path.is_file():
        raise EditError(f"{checkpoint} has {EDITS_MANIFEST} but no {EDITS_TENSORS}")
    try:
        tensors = load_file(str(tensors_path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise EditError(f"{tensors_path} is corrupt or truncated ({e})") from e
    try:
        return SpliceEditor.from_state(model, tok, manifest, tensors)
    except EditError as e:
        raise EditError(f"{manifest_path}: {e}") from e
    except (KeyError, TypeError, ValueError, IndexError, AttributeError, RuntimeError) as e:
        raise EditError(f"{manifest_path} is corrupt or does not match {EDITS_TENSORS} "
                        f"({type(e).__name__}: {e})") from e


def save_edited(model, tok, editor: SpliceEditor, out, force: bool = False):
    """The edited checkpoint (model, tokenizer, edits.json, edits.safetensors), written by swap-into-place."""
    out = Path(out)
    if out.exists() and not force:
        raise EditError(f"{out} exists; pass --force to overwrite it")
    manifest, tensors = editor.state()
    return save_checkpoint(out, model, tok, extra_files={
        EDITS_MANIFEST: lambda p: p.write_text(json.dumps(manifest, indent=1)),
        EDITS_TENSORS: lambda p: save_file(tensors, str(p))})


def cmd_edit(args) -> int:
    try:
        model, tok, ed = open_editor(args.checkpoint, null_space=not args.no_null_space, when_full=args.when_full,
                                     fold=args.fold_splice, splice_rank=args.splice_rank, layer=args.layer,
                                     projection=args.projection, ridge=args.ridge)
        if len(args.prompt) != len(args.target):
            raise EditError(f"{len(args.prompt)} --prompt but {len(args.target)} --target: give them in pairs")
        requests = [EditRequest(p, t) for p, t in zip(args.prompt, args.target)]
        if args.requests:
            requests += load_requests(args.requests)
        for edit_id in args.undo:
            e = ed.undo(edit_id)
            print(f"undid edit {e.id}: {e.request.prompt!r} -> {e.request.target!r}")
        if requests:
            for e in ed.apply(requests):
                print(f"edit {e.id}: {e.request.prompt!r} -> {e.request.target!r} (p(target) before "
                      f"{e.target_prob_before:.3g})")
        changed = bool(requests or args.undo or args.fold_splice or args.splice_rank)
        if args.list or not changed:
            site = ed.site
            print(f"blk.{site.layer}.splice.{site.projection}: rank {site.rank}, {ed.base_rank} held by the trained "
                  f"update, {ed.rank_used()} used by {len(ed.edits)} edit(s); null space {ed.null_dim} of "
                  f"{ed.in_features} input dims" + (" (refit when full)" if ed.when_full == "refit" else ""))
            for d in ed.list():
                print(f"  {d['id']:4d}  {d['prompt']!r} -> {d['target']!r}")
        if changed:
            if not args.out:
                raise EditError("edits, undos and folds need --out (the edited checkpoint directory)")
            save_edited(model, tok, ed, args.out, args.force)
            print(f"wrote {args.out} ({len(ed.edits)} edit(s), rank used {ed.rank_used()}); export it with "
                  f"`felix export {args.out} OUT.gguf --splice adapter` for a hot-swappable LoRA adapter")
    except (EditError, CheckpointError, FileNotFoundError) as e:
        print(f"felix edit: error: {e}", file=sys.stderr)
        return 2
    return 0


def add_edit_parser(sub) -> None:
    e = sub.add_parser("edit", help="write (prompt -> target) edits into a checkpoint's splice surface; list, undo",
                       description="Closed-form splice edits (MEMIT-style solve with AlphaEdit's null-space "
                                   "projection of preserved-knowledge keys from the built-in corpus). The output is a "
                                   "checkpoint whose splice holds the edits, plus edits.json / edits.safetensors so "
                                   "later runs can list, undo and add edits.")
    e.add_argument("checkpoint", help="checkpoint directory (felix train's, or one felix edit wrote)")
    e.add_argument("--prompt", action="append", default=[], help="edit prompt (repeatable, paired with --target)")
    e.add_argument("--target", action="append", default=[], help="what the prompt should continue with")
    e.add_argument("--requests", help="JSONL of {prompt, target} edit requests")
    e.add_argument("--undo", type=int, action="append", default=[], help="remove the edit with this id (repeatable)")
    e.add_argument("--list", action="store_true", help="list the applied edits")
    e.add_argument("--out", help="edited checkpoint directory (written atomically)")
    e.add_argument("--force", action="store_true", help="overwrite --out")
    e.add_argument("--when-full", choices=WHEN_FULL, default="refuse",
                   help="when the edits need more rank than the splice has: refuse, or refit (best rank-limited fit)")
    e.add_argument("--ridge", type=float, default=0.0, help="ridge term (relative to mean |P k|^2): bounded "
                   "update, edits hold approximately (default 0: exact)")
    e.add_argument("--no-null-space", action="store_true", help="plain minimum-norm update (no preserved keys)")
    e.add_argument("--fold-splice", action="store_true",
                   help="first fold the trained splice into its weight (frees the whole rank for edits)")
    e.add_argument("--splice-rank", type=int, help="first widen every splice to this rank (exact)")
    e.add_argument("--layer", type=int, help="spliced layer to edit (default: the highest)")
    e.add_argument("--projection", help="spliced projection to edit (default: ffn_down)")
    e.set_defaults(func=cmd_edit)
