"""Structured pruning: turn a trained Felix checkpoint into a smaller Felix config (`felix prune`).

Sheared-LLaMA / LLM-Pruner style. Three steps:

1. **Score** coupled groups on a calibration set. A group is everything that must go together:

   * a **layer** (the whole block: its attention and FFN contributions to the residual stream);
   * a **kv head** (its k/v rows and every query head that reads it: the q rows and attn_output columns);
   * a **query head** inside a kv group (its q rows and attn_output columns);
   * a **value dimension** of a kv head (a v row and the attn_output column of every query head in the group);
   * an **FFN channel** (a row of ffn_gate and ffn_up, a column of ffn_down);
   * a **residual channel** (a column of the embedding, of every q/k/v/gate/up and of an untied head, a row of
     every attn_output / ffn_down, an element of every RMSNorm weight).

   Each group gets a scalar mask ``z`` (1 = kept) inserted into the forward pass (:class:`MaskedForward`):
   residual channels multiply every RMSNorm input (the residual stream is only ever read through a norm),
   layer / head / value-dimension masks multiply the input of attn_output, layer / FFN masks the input of
   ffn_down. Splices ride on the same projections, so they are masked with them. Scores:

   * ``taylor`` (default): first-order Taylor, ``|dL/dz|`` at z = 1 per calibration batch, averaged: the
     predicted loss change of removing the group (LLM-Pruner's group Taylor importance).
   * ``activation``: activation norms: the L2 norm over calibration tokens of the group's contribution
     (head / channel output times its weight column norm; residual channels by their RMS at every norm
     input; layers by 1 - cos(x_in, x_out), ShortGPT's block influence).
   * ``hard-concrete``: Sheared-LLaMA's learned masks: a hard-concrete gate per group (Louizos et al. 2018)
     trained on the calibration set with a Lagrangian target-shape constraint (weights frozen); the score is
     the learned log-alpha. For small models (the masks are trained by backprop through the whole model).

2. **Select** the top groups to the target shape: layers, then kv groups per layer, then r' query heads per
   kept kv group (the GQA ratio n_head/n_kv_head is kept exactly: each kept kv head keeps the same number of
   query heads, no more than it had), value dimensions per kept kv head, FFN channels per layer, residual
   channels globally.

3. **Splice** the kept rows/columns into a new model of the target config (:func:`apply_plan`). Splices follow
   their projections (A columns = the projection's kept inputs, B rows = its kept outputs) and their layers
   (renumbered; splices on dropped layers go with them). The output is a normal Felix checkpoint.

Two reparametrizations keep the pruned model EXACTLY equal to the source with the dropped groups zeroed:

* **d_model**: a dropped residual channel is zero everywhere, but RMSNorm divides by the width. With
  d -> d', every norm weight is multiplied by sqrt(d/d') and norm_eps by d/d':
  rsqrt(sum x^2/d' + eps d/d') = sqrt(d'/d) rsqrt(sum x^2/d + eps).
* **head_dim** (d_model' / n_head' < d_model / n_head): RoPE rotates pair i at theta^(-2i/head_dim). Keeping
  every f-th pair (f = head_dim / head_dim') gives theta^(-2fj/head_dim) = theta^(-2j/head_dim'): the same
  rotation. So q/k keep a fixed stride of pairs (RoPE fixes them; no importance choice), and q rows are
  scaled by sqrt(head_dim'/head_dim) to keep the attention scale 1/sqrt(head_dim). Value dimensions carry no
  rotation and are chosen by importance.

Recovery is ordinary continued training: ``felix train --init-from PRUNED``.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from felix.data import corpus as felix_data
from felix.model import felix_lm as felix_model
from felix.model.felix_lm import FelixConfig, FelixLM
from felix.ops.attention import SUPPORTED_HEAD_DIMS
from felix.ops.attention import attention
from felix.model.tokenizer import Tokenizer
from felix.train.config import TrainConfig

METHODS = ("taylor", "activation", "hard-concrete")
PLAN_FILE = "prune_plan.json"
SHAPE_FIELDS = ("n_layer", "n_head", "n_kv_head", "ffn_hidden", "d_model")

# Hard-concrete gate constants (Louizos et al. 2018; Sheared-LLaMA uses the same): temperature and stretch.
HC_BETA, HC_LOW, HC_HIGH = 2.0 / 3.0, -0.1, 1.1


class PruneError(ValueError):
    """A pruning target cannot be reached from the source (larger, not dividing, GQA ratio not keepable)."""


# ---------------------------------------------------------------------------------------- target
@dataclass(frozen=True)
class Target:
    n_layer: int
    n_head: int
    n_kv_head: int
    ffn_hidden: int
    d_model: int

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head


def target_from(source: FelixConfig, preset: str | None = None, **explicit) -> Target:
    """The target shape: the source's, overridden by `preset`'s shape fields, overridden by explicit ones
    (None = not given). The vocabulary, context length and RoPE base always stay the source's."""
    shape = {f: getattr(source, f) for f in SHAPE_FIELDS}
    if preset is not None:
        if preset not in felix_model.PRESETS:
            raise PruneError(f"unknown preset {preset!r}; available presets: {', '.join(felix_model.PRESETS)}")
        shape.update({f: felix_model.PRESETS[preset][f] for f in SHAPE_FIELDS})
    shape.update({k: v for k, v in explicit.items() if v is not None})
    unknown = sorted(set(shape) - set(SHAPE_FIELDS))
    if unknown:
        raise PruneError(f"unknown target field(s) {unknown}; known: {', '.join(SHAPE_FIELDS)}")
    target = Target(**shape)
    check_target(source, target, preset)
    return target


def check_target(source: FelixConfig, t: Target, preset: str | None = None) -> None:
    """Every reason `t` cannot be pruned out of `source`, in one PruneError."""
    if source.n_spokes:  # the masks do not reach the spokes' fused RMSNorm, and apply_plan does not cut spokes
        raise PruneError(
            f"cannot prune: the source has spokes ({source.n_spokes} of rank {source.spoke_rank} per "
            "layer, felix.model.spokes); prune the hub without them, then train spokes on the pruned hub "
            "(felix train --init-from PRUNED --train-only spokes)"
        )
    problems = []
    for f in SHAPE_FIELDS:
        if getattr(t, f) < 1:
            problems.append(f"target {f} must be >= 1, got {getattr(t, f)}")
        elif getattr(t, f) > getattr(source, f):
            hint = (
                f" (preset {preset!r} has {f} {getattr(t, f)}; keep the source's with --{f.replace('_', '-')} "
                f"{getattr(source, f)} or less)"
                if preset
                else ""
            )
            problems.append(
                f"target {f} {getattr(t, f)} is larger than the source's {getattr(source, f)}: pruning "
                f"only removes{hint}"
            )
    if problems:
        raise PruneError("cannot prune: " + "; ".join(problems))
    if t.d_model % t.n_head:
        problems.append(f"target n_head {t.n_head} does not divide target d_model {t.d_model}")
    elif t.head_dim % 2:
        problems.append(f"target head_dim {t.head_dim} (d_model {t.d_model} / n_head {t.n_head}) must be even for RoPE")
    elif t.head_dim > source.head_dim:
        problems.append(
            f"target head_dim {t.head_dim} (d_model {t.d_model} / n_head {t.n_head}) is larger than the "
            f"source's {source.head_dim}: Felix ties head_dim to d_model / n_head, so fewer heads need "
            "a proportionally smaller d_model"
        )
    elif t.head_dim not in SUPPORTED_HEAD_DIMS:
        problems.append(
            f"target head_dim {t.head_dim} (d_model {t.d_model} / n_head {t.n_head}) is not one "
            f"felix.attention supports {SUPPORTED_HEAD_DIMS}"
        )
    elif source.head_dim % t.head_dim:
        problems.append(
            f"target head_dim {t.head_dim} does not divide the source head_dim {source.head_dim}: RoPE "
            "pairs can only be kept at a whole stride (the rotation frequencies must survive)"
        )
    if t.n_head % t.n_kv_head:
        problems.append(f"target n_kv_head {t.n_kv_head} does not divide target n_head {t.n_head}")
    else:
        ratio, src_ratio = t.n_head // t.n_kv_head, source.n_head // source.n_kv_head
        if ratio > src_ratio:
            problems.append(
                f"GQA ratio cannot be kept: the target wants {ratio} query heads per kv head "
                f"({t.n_head}:{t.n_kv_head}) but each source kv head serves only {src_ratio} "
                f"({source.n_head}:{source.n_kv_head}); keep n_head/n_kv_head <= {src_ratio}"
            )
    if problems:
        raise PruneError("cannot prune: " + "; ".join(problems))


def target_config(source: FelixConfig, t: Target, kept_layers: list[int]) -> FelixConfig:
    """The pruned model's config: the target shape, norm_eps rescaled for the narrower residual (module doc),
    splice layers renumbered to the kept layers."""
    new_index = {old: new for new, old in enumerate(kept_layers)}
    d = asdict(source)
    d.update({f: getattr(t, f) for f in SHAPE_FIELDS})
    d["norm_eps"] = source.norm_eps * source.d_model / t.d_model
    d["splice_layers"] = [new_index[i] for i in source.resolved_splice_layers() if i in new_index]
    return FelixConfig(**d)


# ------------------------------------------------------------------------------------------ masks
def mask_shapes(cfg: FelixConfig) -> dict[str, tuple[int, ...]]:
    """One mask per coupled group kind (module doc)."""
    return {
        "layer": (cfg.n_layer,),
        "kv_head": (cfg.n_layer, cfg.n_kv_head),
        "head": (cfg.n_layer, cfg.n_head),
        "v_dim": (cfg.n_layer, cfg.n_kv_head, cfg.head_dim),
        "ffn": (cfg.n_layer, cfg.ffn_hidden),
        "hidden": (cfg.d_model,),
    }


def ones_masks(cfg: FelixConfig, requires_grad: bool = False) -> dict[str, torch.Tensor]:
    return {k: torch.ones(s, requires_grad=requires_grad) for k, s in mask_shapes(cfg).items()}


class _MaskTap:
    """Sits in the model's matmul-input seam (FelixLM.set_activation_rounding: called as ``tap(site, x)`` on the
    input of every projection, and ``tap.attention(q, k, v)`` instead of attention) and multiplies the
    inputs of attn_output and ffn_down by their group masks; optionally records activation statistics."""

    def __init__(self, cfg: FelixConfig, masks: dict[str, torch.Tensor], record: dict | None):
        self.cfg, self.masks, self.record = cfg, masks, record
        self.sites = {}
        for i in range(cfg.n_layer):
            self.sites[f"blk.{i}.attn_output.weight"] = ("attn", i)
            self.sites[f"blk.{i}.ffn_down.weight"] = ("ffn", i)

    def attention(self, q, k, v):
        return attention(q, k, v, causal=True)

    def __call__(self, site: str, x: torch.Tensor) -> torch.Tensor:
        kind, i = self.sites.get(site, (None, None))
        if kind is None:
            return x
        if self.record is not None:
            sq = x.detach().float().pow(2).reshape(-1, x.shape[-1]).sum(0)
            key = f"{kind}_sq.{i}"
            self.record[key] = self.record.get(key, 0) + sq
        cfg, m = self.cfg, self.masks
        if kind == "attn":
            group = torch.arange(cfg.n_head) // (cfg.n_head // cfg.n_kv_head)
            per_head = m["layer"][i] * m["head"][i] * m["kv_head"][i][group]  # [n_head]
            mask = per_head[:, None] * m["v_dim"][i][group]  # [n_head, head_dim]
            return x * mask.reshape(-1).to(x.dtype)
        return x * (m["layer"][i] * m["ffn"][i]).to(x.dtype)


class MaskedForward:
    """Context manager: while active, `model`'s forward applies `masks` (see mask_shapes; 1 = kept) to every
    coupled group. With binary masks it computes exactly the source with the dropped groups removed (up to the
    RMSNorm width, which apply_plan reparametrizes). `record` (a dict) collects activation statistics."""

    def __init__(self, model: FelixLM, masks: dict[str, torch.Tensor], record: dict | None = None):
        if model.activation_rounding is not None:
            raise PruneError(
                "the model already has an activation seam installed (fidelity simulation); prune a plain model"
            )
        self.model, self.masks, self.record = model, masks, record
        self.handles = []

    def _norm_hook(self, name):
        def hook(module, args):
            x = args[0]
            if self.record is not None:
                key = f"norm_sq.{name}"
                self.record[key] = self.record.get(key, 0) + x.detach().float().pow(2).reshape(-1, x.shape[-1]).sum(0)
            return (x * self.masks["hidden"].to(x.dtype),)

        return hook

    def __enter__(self):
        self.model.set_activation_rounding(_MaskTap(self.model.cfg, self.masks, self.record))
        for name, module in self.model.named_modules():
            if isinstance(module, felix_model.RMSNorm):
                self.handles.append(module.register_forward_pre_hook(self._norm_hook(name)))
        if self.record is not None:
            for i, block in enumerate(self.model.blk):
                self.handles.append(block.register_forward_hook(self._block_hook(i)))
        return self

    def _block_hook(self, i):
        def hook(module, args, out):
            x_in = args[0].detach().float()
            x_out = out.detach().float()
            cos = F.cosine_similarity(x_in, x_out, dim=-1)
            key = f"block_influence.{i}"
            self.record[key] = self.record.get(key, 0) + float((1 - cos).sum())
            self.record["tokens"] = self.record.get("tokens", 0) + (x_in.numel() // x_in.shape[-1]) / len(
                self.model.blk
            )

        return hook

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()
        self.handles = []
        self.model.set_activation_rounding(None)
        return False


# ---------------------------------------------------------------------------------------- scores
def calibration_batches(
    tokenizer, seq_len: int, batch_size: int, n_batches: int, seed: int = 0, data: list[str] | None = None
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Calibration windows from the TRAINING split (`felix train`'s split of the built-in corpus, or `data`
    files), so that a later validation CE never scores text the pruner has seen."""
    defaults = TrainConfig()
    if data:
        docs = felix_data.load_user_data(data).documents
    else:
        docs = felix_data.builtin_corpus(defaults.n_records, defaults.seed)
    train_docs, _ = felix_data.split_documents(docs, defaults.val_fraction, defaults.seed)
    stream = felix_data.TokenStream.from_documents(train_docs, tokenizer, seq_len, seed)
    return [stream.next_batch(batch_size) for _ in range(n_batches)]


def taylor_scores(model: FelixLM, batches, progress: bool = False) -> dict[str, torch.Tensor]:
    """First-order Taylor importance per group: mean over calibration batches of |dL/dz| at z = 1."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    scores = {k: torch.zeros(s) for k, s in mask_shapes(model.cfg).items()}
    try:
        for x, y in tqdm(batches, desc="taylor scores", unit="batch", disable=not progress):
            masks = ones_masks(model.cfg, requires_grad=True)
            with MaskedForward(model, masks):
                loss = model.loss(x, y).loss  # lambda_q = 0: the CE (.ce is detached, for logging)
            grads = torch.autograd.grad(loss, list(masks.values()))
            for k, g in zip(masks, grads):
                scores[k] += g.abs() / len(batches)
    finally:
        for p in model.parameters():
            p.requires_grad_(True)
    return scores


@torch.no_grad()
def activation_scores(model: FelixLM, batches, progress: bool = False) -> dict[str, torch.Tensor]:
    """Activation-norm importance: each group's contribution norm over the calibration tokens (module doc)."""
    cfg = model.cfg
    model.eval()
    record: dict = {}
    masks = ones_masks(cfg)
    for x, _ in tqdm(batches, desc="activation scores", unit="batch", disable=not progress):
        with MaskedForward(model, masks, record):
            model(x)
    hd, ratio = cfg.head_dim, cfg.n_head // cfg.n_kv_head
    scores = {k: torch.zeros(s) for k, s in mask_shapes(cfg).items()}
    for i, block in enumerate(model.blk):
        # per input column of attn_output / ffn_down: ||activation column|| * ||weight column||
        attn = record[f"attn_sq.{i}"].sqrt() * block.attn_output.weight.float().norm(dim=0)
        attn = attn.view(cfg.n_head, hd)
        scores["head"][i] = attn.pow(2).sum(-1).sqrt()
        scores["kv_head"][i] = attn.pow(2).view(cfg.n_kv_head, ratio, hd).sum((1, 2)).sqrt()
        scores["v_dim"][i] = attn.pow(2).view(cfg.n_kv_head, ratio, hd).sum(1).sqrt()
        scores["ffn"][i] = record[f"ffn_sq.{i}"].sqrt() * block.ffn_down.weight.float().norm(dim=0)
        scores["layer"][i] = record[f"block_influence.{i}"] / record["tokens"]
    scores["hidden"] = sum(v for k, v in record.items() if k.startswith("norm_sq.")).sqrt()
    return scores


def hard_concrete_sample(log_alpha: torch.Tensor) -> torch.Tensor:
    u = torch.rand_like(log_alpha).clamp(1e-6, 1 - 1e-6)
    s = torch.sigmoid((u.log() - (1 - u).log() + log_alpha) / HC_BETA)
    return (s * (HC_HIGH - HC_LOW) + HC_LOW).clamp(0.0, 1.0)


def hard_concrete_keep_probability(log_alpha: torch.Tensor) -> torch.Tensor:
    """P(z != 0): the expected L0 norm of one gate."""
    return torch.sigmoid(log_alpha - HC_BETA * math.log(-HC_LOW / HC_HIGH))


def expected_shape(cfg: FelixConfig, log_alpha: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Expected kept count per structure (the quantities the target shape constrains)."""
    p = {k: hard_concrete_keep_probability(v) for k, v in log_alpha.items()}
    ratio = cfg.n_head // cfg.n_kv_head
    return {
        "layer": p["layer"].sum(),
        "kv_head": p["kv_head"].sum(-1).mean(),
        "head": p["head"].view(cfg.n_layer, cfg.n_kv_head, ratio).sum(-1).mean(),
        "v_dim": p["v_dim"].sum(-1).mean(),
        "ffn": p["ffn"].sum(-1).mean(),
        "hidden": p["hidden"].sum(),
    }


def target_counts(cfg: FelixConfig, t: Target) -> dict[str, int]:
    return {
        "layer": t.n_layer,
        "kv_head": t.n_kv_head,
        "head": t.n_head // t.n_kv_head,
        "v_dim": t.head_dim,
        "ffn": t.ffn_hidden,
        "hidden": t.d_model,
    }


def source_counts(cfg: FelixConfig) -> dict[str, int]:
    return {
        "layer": cfg.n_layer,
        "kv_head": cfg.n_kv_head,
        "head": cfg.n_head // cfg.n_kv_head,
        "v_dim": cfg.head_dim,
        "ffn": cfg.ffn_hidden,
        "hidden": cfg.d_model,
    }


def hard_concrete_scores(
    model: FelixLM,
    batches,
    target: Target,
    steps: int = 200,
    lr: float = 0.1,
    seed: int = 0,
    progress: bool = False,
    history: list | None = None,
) -> dict[str, torch.Tensor]:
    """Sheared-LLaMA's targeted structured pruning with frozen weights: hard-concrete gates per group,
    loss = CE(masked model) + sum over structures of lambda1 (s_hat - s) + lambda2 (s_hat - s)^2 (s_hat the
    expected kept fraction, s the target's), minimized in the gates and MAXIMIZED in the lambdas, so the
    expected shape is driven to the target. Returns the learned log-alphas (higher = keep)."""
    cfg = model.cfg
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    gen_state = torch.get_rng_state()
    torch.manual_seed(seed)
    log_alpha = {k: torch.full(s, 3.0, requires_grad=True) for k, s in mask_shapes(cfg).items()}
    lambdas = {k: torch.zeros(2, requires_grad=True) for k in log_alpha}
    want, have = target_counts(cfg, target), source_counts(cfg)
    opt = torch.optim.Adam(list(log_alpha.values()), lr=lr)
    opt_lambda = torch.optim.Adam(list(lambdas.values()), lr=lr, maximize=True)
    try:
        for step in tqdm(range(steps), desc="hard-concrete masks", unit="step", disable=not progress):
            x, y = batches[step % len(batches)]
            masks = {k: hard_concrete_sample(v) for k, v in log_alpha.items()}
            with MaskedForward(model, masks):
                ce = model.loss(x, y).loss  # lambda_q = 0: the CE
            exp = expected_shape(cfg, log_alpha)
            constraint = sum(
                lambdas[k][0] * gap + lambdas[k][1] * gap**2 for k in exp for gap in [(exp[k] - want[k]) / have[k]]
            )
            loss = ce + constraint
            opt.zero_grad()
            opt_lambda.zero_grad()
            loss.backward()
            opt.step()
            opt_lambda.step()
            if history is not None:
                history.append(
                    {
                        "step": step,
                        "ce": float(ce.detach()),
                        **{f"expected_{k}": float(v.detach()) for k, v in exp.items()},
                    }
                )
    finally:
        torch.set_rng_state(gen_state)
        for p in model.parameters():
            p.requires_grad_(True)
    return {k: v.detach() for k, v in log_alpha.items()}


# ------------------------------------------------------------------------------------------- plan
@dataclass
class LayerPlan:
    source_layer: int
    kv_heads: list[int]  # kept source kv heads, in order
    heads: list[list[int]]  # per kept kv head: kept source query heads (global indices), in order
    v_dims: list[list[int]]  # per kept kv head: kept value dimensions (within the head), in order
    ffn: list[int]  # kept FFN channels


@dataclass
class PrunePlan:
    target: dict
    hidden: list[int]  # kept residual channels
    qk_pairs: list[int]  # kept RoPE pairs of every q/k head (a fixed stride, module doc)
    layers: list[LayerPlan] = field(default_factory=list)
    method: str = "manual"

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    @classmethod
    def from_dict(cls, d: dict) -> PrunePlan:
        d = dict(d)
        d["layers"] = [LayerPlan(**lp) for lp in d["layers"]]
        return cls(**d)


def _top(scores: torch.Tensor, k: int) -> list[int]:
    """Indices of the k largest scores, in ascending index order (ties: the lower index)."""
    order = sorted(range(scores.numel()), key=lambda i: (-float(scores[i]), i))
    return sorted(order[:k])


def select(cfg: FelixConfig, target: Target, scores: dict[str, torch.Tensor], method: str = "manual") -> PrunePlan:
    """The kept groups: top scores per structure, to the target shape exactly (module doc, step 2)."""
    check_target(cfg, target)
    ratio, new_ratio = cfg.n_head // cfg.n_kv_head, target.n_head // target.n_kv_head
    stride = cfg.head_dim // target.head_dim
    layers = []
    for i in _top(scores["layer"], target.n_layer):
        kv = _top(scores["kv_head"][i], target.n_kv_head)
        heads = [[g * ratio + h for h in _top(scores["head"][i][g * ratio : (g + 1) * ratio], new_ratio)] for g in kv]
        v_dims = [_top(scores["v_dim"][i][g], target.head_dim) for g in kv]
        layers.append(LayerPlan(i, kv, heads, v_dims, _top(scores["ffn"][i], target.ffn_hidden)))
    return PrunePlan(
        asdict(target),
        _top(scores["hidden"], target.d_model),
        list(range(0, cfg.head_dim // 2, stride)),
        layers,
        method,
    )


def identity_plan(cfg: FelixConfig) -> PrunePlan:
    """Keep everything: apply_plan of this returns the source model."""
    t = target_from(cfg)
    return select(cfg, t, ones_masks(cfg), "identity")


# ---------------------------------------------------------------------------------------- splice
def _take(w: torch.Tensor, rows=None, cols=None) -> torch.Tensor:
    if rows is not None:
        w = w[torch.as_tensor(rows, dtype=torch.long)]
    if cols is not None:
        w = w[:, torch.as_tensor(cols, dtype=torch.long)]
    return w


@torch.no_grad()
def apply_plan(model: FelixLM, plan: PrunePlan) -> FelixLM:
    """A new FelixLM of the plan's shape holding the kept rows and columns of `model` (module doc, step 3)."""
    src = model.cfg
    t = Target(**plan.target)
    check_target(src, t)
    if len(plan.layers) != t.n_layer or len(plan.hidden) != t.d_model or len(plan.qk_pairs) != t.head_dim // 2:
        raise PruneError("the plan does not match its target shape")
    cfg = target_config(src, t, [lp.source_layer for lp in plan.layers])
    hd = src.head_dim
    hidden = plan.hidden
    norm_scale = math.sqrt(src.d_model / t.d_model)
    q_scale = math.sqrt(t.head_dim / hd)
    qk_dims = [2 * p + j for p in plan.qk_pairs for j in (0, 1)]
    ratio = src.n_head // src.n_kv_head
    state = model.state_dict()
    out: dict[str, torch.Tensor] = {
        "token_embd.weight": _take(state["token_embd.weight"], cols=hidden),
        "output_norm.weight": state["output_norm.weight"][hidden] * norm_scale,
    }
    if not src.tie_embeddings:
        out["output.weight"] = _take(state["output.weight"], cols=hidden)
    for new, lp in enumerate(plan.layers):
        old = lp.source_layer
        if (
            len(lp.kv_heads) != t.n_kv_head
            or any(len(h) != t.n_head // t.n_kv_head for h in lp.heads)
            or any(len(v) != t.head_dim for v in lp.v_dims)
            or len(lp.ffn) != t.ffn_hidden
        ):
            raise PruneError(f"the plan's layer {old} does not match its target shape")
        if any(h // ratio != g for g, hs in zip(lp.kv_heads, lp.heads) for h in hs):
            raise PruneError(f"the plan's layer {old} moves a query head to another kv head")
        q_rows = [h * hd + d for hs in lp.heads for h in hs for d in qk_dims]
        k_rows = [g * hd + d for g in lp.kv_heads for d in qk_dims]
        v_rows = [g * hd + d for g, vd in zip(lp.kv_heads, lp.v_dims) for d in vd]
        o_cols = [h * hd + d for hs, vd in zip(lp.heads, lp.v_dims) for h in hs for d in vd]
        # (rows, cols, row scale) of every projection
        spec = {
            "attn_q": (q_rows, hidden, q_scale),
            "attn_k": (k_rows, hidden, 1.0),
            "attn_v": (v_rows, hidden, 1.0),
            "attn_output": (hidden, o_cols, 1.0),
            "ffn_gate": (lp.ffn, hidden, 1.0),
            "ffn_up": (lp.ffn, hidden, 1.0),
            "ffn_down": (hidden, lp.ffn, 1.0),
        }
        for proj, (rows, cols, scale) in spec.items():
            out[f"blk.{new}.{proj}.weight"] = _take(state[f"blk.{old}.{proj}.weight"], rows, cols) * scale
            prefix = f"blk.{old}.splice.{proj}."
            if prefix + "a" in state:  # the splice follows its projection: A reads its inputs, B writes its outputs
                gate = state[prefix + "gate"]
                out[f"blk.{new}.splice.{proj}.a"] = _take(state[prefix + "a"], cols=cols)
                out[f"blk.{new}.splice.{proj}.b"] = _take(state[prefix + "b"], rows=rows) * scale
                out[f"blk.{new}.splice.{proj}.gate"] = gate if gate.numel() == 1 else gate[rows]
        for norm in ("attn_norm", "ffn_norm"):
            out[f"blk.{new}.{norm}.weight"] = state[f"blk.{old}.{norm}.weight"][hidden] * norm_scale
    pruned = FelixLM(cfg)
    felix_model.load_state_into(pruned, {k: v.contiguous() for k, v in out.items()}, source="the pruned tensors")
    return pruned.to(next(model.parameters()).device)


# ------------------------------------------------------------------------------------------ driver
@dataclass
class PruneResult:
    model: FelixLM
    plan: PrunePlan
    scores: dict
    source_params: int
    pruned_params: int
    history: list


def prune(
    model: FelixLM,
    target: Target,
    method: str = "taylor",
    batches=None,
    hc_steps: int = 200,
    hc_lr: float = 0.1,
    seed: int = 0,
    progress: bool = False,
) -> PruneResult:
    """Score, select and splice (module doc). `batches`: calibration (inputs, targets) pairs."""
    if method not in METHODS:
        raise PruneError(f"unknown pruning method {method!r}; choose from {', '.join(METHODS)}")
    check_target(model.cfg, target)
    if not batches:
        raise PruneError("no calibration batches")
    history: list = []
    if method == "taylor":
        scores = taylor_scores(model, batches, progress)
    elif method == "activation":
        scores = activation_scores(model, batches, progress)
    else:
        scores = hard_concrete_scores(model, batches, target, hc_steps, hc_lr, seed, progress, history)
    plan = select(model.cfg, target, scores, method)
    pruned = apply_plan(model, plan)
    return PruneResult(
        pruned,
        plan,
        scores,
        felix_model.parameter_counts(model.cfg)["total"],
        felix_model.parameter_counts(pruned.cfg)["total"],
        history,
    )


def prune_checkpoint(
    checkpoint,
    out,
    target: Target | None = None,
    preset: str | None = None,
    method: str = "taylor",
    calib_batches: int = 8,
    batch_size: int = 8,
    seq_len: int | None = None,
    data: list[str] | None = None,
    hc_steps: int = 200,
    hc_lr: float = 0.1,
    seed: int = 0,
    progress: bool = False,
    **explicit,
) -> PruneResult:
    """`felix prune`: load `checkpoint`, prune to `target` (or `preset` / explicit fields), write a normal Felix
    checkpoint to `out` (atomically) with the plan and scores beside the weights."""
    model = felix_model.load_checkpoint(checkpoint)
    tokenizer = Tokenizer.load(checkpoint)
    if target is None:
        target = target_from(model.cfg, preset, **explicit)
    else:
        check_target(model.cfg, target)
    seq_len = min(seq_len or model.cfg.max_seq_len, model.cfg.max_seq_len)
    batches = calibration_batches(tokenizer, seq_len, batch_size, calib_batches, seed, data)
    torch.manual_seed(seed)
    result = prune(model, target, method, batches, hc_steps, hc_lr, seed, progress)

    def write_plan(path):
        path.write_text(
            json.dumps(
                {
                    "source": str(checkpoint),
                    "plan": asdict(result.plan),
                    "source_params": result.source_params,
                    "pruned_params": result.pruned_params,
                    "calibration": {
                        "batches": calib_batches,
                        "batch_size": batch_size,
                        "seq_len": seq_len,
                        "data": data or "built-in (train split)",
                    },
                    "scores": {k: v.tolist() for k, v in result.scores.items()},
                    "history": result.history,
                },
                indent=1,
            )
        )

    felix_model.save_checkpoint(Path(out), result.model, tokenizer, {PLAN_FILE: write_plan})
    return result
