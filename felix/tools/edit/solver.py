"""The splice editor (SpliceEditor): write a behaviour into a model's splice surface, list it, undo it, snapshot it.

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
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F

from felix.model.splice import read_splice, restore_splices, snapshot_splices, write_splice
from felix.tools.edit.edit_requests import EditRequest, target_sequence, tokenize_request
from felix.tools.edit.errors import ConflictError, EditError, RankBudgetError
from felix.tools.edit.keys import DEFAULT_NULL_TOL, null_space_projector, tap_projection
from felix.tools.edit.sites import RANK_TOL, numerical_rank, splice_product, splice_site

METHODS = ("closed-form", "finetune")
WHEN_FULL = ("refuse", "refit")
DEFAULT_CONFLICT_TOL = 1e-3  # a key whose part outside the protected span is < 0.1% of its norm conflicts
FLOAT32_RANK_TOL = 1e-5  # relative singular value below which a product of float32 factors calls a direction
# zero (felix.tools.edit.sites.RANK_TOL: the same for float64)


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
        return {
            "id": self.id,
            "name": self.request.name,
            "prompt": self.request.prompt,
            "target": self.request.target,
            "method": self.method,
            "n_keys": len(self.target_ids),
            "target_prob_before": self.target_prob_before,
            "value_delta_norm": self.value_delta_norm,
            **self.info,
        }


class SpliceEditor:
    """Edits of one splice site of a FelixLM, with list / undo / snapshot. See the module docstring."""

    def __init__(
        self,
        model,
        tokenizer,
        layer: int | None = None,
        projection: str | None = None,
        method: str = "closed-form",
        preserved_keys: torch.Tensor | None = None,
        null_space: bool = True,
        null_tol: float = DEFAULT_NULL_TOL,
        when_full: str = "refuse",
        conflict_tol: float = DEFAULT_CONFLICT_TOL,
        ridge: float = 0.0,
        value_prob: float = 0.9,
        value_steps: int = 60,
        value_lr: float = 0.25,
        ft_steps: int = 60,
        ft_lr: float = 2e-2,
        ft_eps: float = 0.1,
    ):
        if method not in METHODS:
            raise EditError(f"unknown edit method {method!r}; choose from {', '.join(METHODS)}")
        if when_full not in WHEN_FULL:
            raise EditError(f"unknown when_full {when_full!r}; choose from {', '.join(WHEN_FULL)}")
        if getattr(model, "activation_rounding", None) is not None:
            raise EditError(
                "the model rounds or masks its matmul inputs (an activation seam is installed: fidelity "
                "simulation, QAT bitnet, pruning masks): the closed form needs the projection's input as "
                "its key; edit the plain model"
            )
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
            raise EditError(
                f"{self.site.name('gate')} is 0: the splice is switched off, an edit cannot be written "
                "into B (set the gate first)"
            )
        self.base = {
            k: v
            for k, v in snapshot_splices(model).items()
            if k.startswith(f"blk.{self.site.layer}.splice.{self.site.projection}.")
        }
        self.weight = getattr(self.site.block, self.site.projection).weight.detach().double().clone()
        self.s0 = splice_product(self.site)
        self.base_rank = numerical_rank(self.s0)
        self.in_features = self.weight.shape[1]
        self.projector, self.null_dim = None, self.in_features
        if method == "closed-form" and null_space:
            if preserved_keys is None:
                raise EditError("null_space=True needs preserved_keys (site_keys of the preserved-knowledge text)")
            if preserved_keys.shape[-1] != self.in_features:
                raise EditError(
                    f"preserved keys have width {preserved_keys.shape[-1]}, the site's input is {self.in_features}"
                )
            self.projector, self.null_dim = null_space_projector(preserved_keys, null_tol)
            if self.null_dim == 0:
                raise EditError(
                    f"the preserved keys span the whole {self.in_features}-dim input of "
                    f"{self.site.projection} at null_tol {null_tol}: no direction is free to edit"
                )
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
                    raise ConflictError(
                        f"edit {e.id} already makes {req.prompt!r} continue with "
                        f"{e.request.target!r}, not {req.target!r}: undo edit {e.id} first"
                    )
            if tuple(p) in seen:
                other = seen[tuple(p)]
                raise ConflictError(
                    f"two requests of this batch edit the prompt {req.prompt!r}: targets "
                    f"{other.target!r} and {req.target!r}"
                )
            seen[tuple(p)] = req
            prepared.append((req, p, t))
        return prepared

    # -- values (ROME's v*)
    def _value(self, prompt_ids, target_ids) -> tuple[torch.Tensor, torch.Tensor, float, float]:
        """(keys [m, in], values [m, out], p(target) before, |delta|): the projection outputs at the target
        positions that make the model give the target probability >= value_prob (Adam on a delta)."""
        ids, pos = target_sequence(prompt_ids, target_ids)
        x = torch.tensor([ids])
        tgt = torch.tensor(target_ids)
        positions = torch.tensor([pos])
        out_features = self.weight.shape[0]
        delta = torch.zeros(1, len(pos), out_features, requires_grad=True)
        opt = torch.optim.Adam([delta], lr=self.value_lr)
        p_before = None
        for _ in range(self.value_steps + 1):
            cap: list = []
            with tap_projection(self.site, cap, {"positions": positions, "value": delta}):
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
        k = keys.double().T  # [in, M]
        r = (values.double() - keys.double() @ (self.weight + self.s0).T).T  # [out, M] residuals
        p = self.projector if self.projector is not None else torch.eye(self.in_features, dtype=torch.float64)
        pk = p @ k
        if self.ridge > 0:  # dW = R (K^T P K + lambda I)^-1 K^T P: ridge in key space, lambda relative to mean |P k|^2
            gram = pk.T @ pk
            lam = self.ridge * float(torch.diagonal(gram).mean())
            dw = torch.linalg.solve(gram + lam * torch.eye(gram.shape[0], dtype=gram.dtype), r.T).T @ pk.T
        else:
            dw = r @ torch.linalg.pinv(pk, rtol=RANK_TOL) @ p  # min-norm: dW P K = R, dW = dW P
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
                raise ConflictError(
                    f"{names[i]}: its key lies in the span of the preserved-knowledge keys (only "
                    f"{float(pk.norm()) / norm:.2e} of it is outside): no null-space update can "
                    "write it without changing preserved behaviour"
                )
            if old_k.shape[1]:
                coef = torch.linalg.lstsq(old_k, pk[:, None]).solution
                rest = pk - (old_k @ coef)[:, 0]
                if float(rest.norm()) < self.conflict_tol * norm:
                    j = int(coef.abs().argmax())
                    raise ConflictError(
                        f"{names[i]}: its key is (to {float(rest.norm()) / norm:.1e}) a combination "
                        f"of the keys of applied edits, mostly edit {owners[j].id} "
                        f"({owners[j].request.prompt!r} -> {owners[j].request.target!r}); both cannot "
                        "hold: undo that edit first"
                    )
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
            return torch.zeros(0, self.in_features, dtype=torch.float64), torch.zeros(
                0, self.weight.shape[0], dtype=torch.float64
            )
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
        self._check_conflict(
            new_keys, [f"edit {req.prompt!r} -> {req.target!r}" for e in new for req in [e.request] * e.keys.shape[0]]
        )
        n_keys = sum(e.keys.shape[0] for e in self.edits) + new_keys.shape[0]
        if n_keys > self.rank_budget and self.when_full == "refuse":
            raise RankBudgetError(
                f"the splice {self.site.name('a').rsplit('.', 1)[0]} has rank {self.site.rank}"
                + (f", {self.base_rank} of it held by its trained update" if self.base_rank else "")
                + f": {self.rank_budget} left for edits, and the applied and new edits need {n_keys} (one per target "
                "token). Undo an edit, use when_full='refit' (--when-full refit: a best rank-limited fit of all "
                "edits), "
                + ("fold the trained splice into the weight (fold_splice / --fold-splice), " if self.base_rank else "")
                + "or widen the splice (widen_splice / --splice-rank)"
            )
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
        ids, pos = target_sequence(prompt_ids, target_ids)
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
        return {
            "splices": snapshot_splices(self.model),
            "edits": copy.deepcopy(self.edits),
            "next_id": self._next_id,
            "ft_stack": copy.deepcopy(self._ft_stack),
        }

    def restore(self, snap: dict) -> None:
        restore_splices(self.model, snap["splices"])
        self.edits = copy.deepcopy(snap["edits"])
        self._next_id = snap["next_id"]
        self._ft_stack = copy.deepcopy(snap["ft_stack"])

    # -- persistence (felix edit across invocations)
    def state(self) -> tuple[dict, dict[str, torch.Tensor]]:
        """(manifest JSON, tensors) that let a later session list, undo and extend these edits."""
        if self.method == "finetune":
            raise EditError(
                "finetune edits are not saved with their history (they hold no keys); save the checkpoint itself"
            )
        manifest = {
            "format": "felix-splice-edits",
            "version": 1,
            "layer": self.site.layer,
            "projection": self.site.projection,
            "method": self.method,
            "null_space": self.null_space,
            "null_tol": self.null_tol,
            "when_full": self.when_full,
            "ridge": self.ridge,
            "next_id": self._next_id,
            "edits": [
                {
                    **asdict(e.request),
                    "id": e.id,
                    "prompt_ids": e.prompt_ids,
                    "target_ids": e.target_ids,
                    "target_prob_before": e.target_prob_before,
                    "value_delta_norm": e.value_delta_norm,
                }
                for e in self.edits
            ],
        }
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
        SpliceEditor.__init__(
            ed,
            model,
            tokenizer,
            manifest["layer"],
            manifest["projection"],
            "closed-form",
            preserved_keys=None,
            null_space=False,
            when_full=manifest["when_full"],
            **kwargs,
        )
        ed.null_space, ed.null_tol, ed.ridge = manifest["null_space"], manifest["null_tol"], manifest.get("ridge", 0.0)
        if "projector" in tensors:
            ed.projector = tensors["projector"].double()
            ed.null_dim = int(round(float(torch.trace(ed.projector))))
        ed.base = {k[len("base.") :]: v for k, v in tensors.items() if k.startswith("base.")}
        current = snapshot_splices(model)
        restore_splices(model, ed.base)
        ed.s0 = splice_product(ed.site)
        ed.base_rank = numerical_rank(ed.s0)
        restore_splices(model, current)
        for d in manifest["edits"]:
            req = EditRequest(d["prompt"], d["target"], tuple(d.get("paraphrases", ())), d.get("name", ""))
            ed.edits.append(
                Edit(
                    d["id"],
                    req,
                    d["prompt_ids"],
                    d["target_ids"],
                    "closed-form",
                    tensors[f"edit.{d['id']}.keys"].double(),
                    tensors[f"edit.{d['id']}.values"].double(),
                    d["target_prob_before"],
                    d["value_delta_norm"],
                )
            )
        ed._next_id = manifest["next_id"]
        keys, values = ed._all_keys_values()
        ed.dw = ed.solve(keys, values)
        want = ed.s0 + ed.dw
        have = splice_product(ed.site)
        err = float((want - have).abs().max()) / max(float(want.abs().max()), 1e-30)
        if err > 1e-5:
            raise EditError(
                f"the model's splice does not hold the saved edits (relative difference {err:.2e}); "
                "the checkpoint was changed after editing"
            )
        return ed
