"""SpliceCore edits: write a behaviour into a model's splice surface, list it, undo it, export it.

An edit request is ``(prompt, target)``: after `prompt` the model should continue with `target`. Only the splice
tensors of one spliced projection (by default the highest spliced layer's ``ffn_down``) change; everything else is
frozen. The method (closed form with AlphaEdit's null space, or the constrained fine-tuning baseline) is described
in felix.tools.edit.solver. One module per concern:

    errors         EditError and its kinds (UntokenisableError, ConflictError, RankBudgetError)
    edit_requests  EditRequest, load_requests (JSONL), tokenize_request, the teacher-forced target_sequence
    sites          the spliced projection edits write to (splice_site), gate * B A, fold_splice, widen_splice
    keys           key capture at the projection's input (tap_projection, site_keys), null_space_projector
    solver         SpliceEditor: values, the closed-form solve, apply / undo / snapshot / state
    metrics        target_stats, mean_kl, logprobs, validation_ce
    harness        the built-in edit set, corpus windows, run_sequential
    checkpoint_io  open_editor / resume_editor / save_edited: edited checkpoints with their history

The `felix edit` command is felix.cli.edit. This package re-exports the public names of its modules.
"""

from __future__ import annotations

from felix.tools.edit.checkpoint_io import EDITS_MANIFEST, EDITS_TENSORS, open_editor, resume_editor, save_edited
from felix.tools.edit.edit_requests import EditRequest, load_requests, pad_batch, target_sequence, tokenize_request
from felix.tools.edit.errors import ConflictError, EditError, RankBudgetError, UntokenisableError
from felix.tools.edit.harness import (
    FACT_TEMPLATES,
    HarnessData,
    builtin_edit_set,
    corpus_sequences,
    fact_phrases,
    run_sequential,
)
from felix.tools.edit.keys import DEFAULT_NULL_TOL, null_space_projector, site_keys, tap_projection
from felix.tools.edit.metrics import logprobs, mean_kl, target_stats, validation_ce
from felix.tools.edit.sites import (
    RANK_TOL,
    SpliceSite,
    fold_splice,
    numerical_rank,
    splice_product,
    splice_site,
    widen_splice,
)
from felix.tools.edit.solver import DEFAULT_CONFLICT_TOL, FLOAT32_RANK_TOL, METHODS, WHEN_FULL, Edit, SpliceEditor

__all__ = [
    # errors
    "EditError",
    "UntokenisableError",
    "ConflictError",
    "RankBudgetError",
    # edit_requests
    "EditRequest",
    "load_requests",
    "tokenize_request",
    "target_sequence",
    "pad_batch",
    # sites
    "RANK_TOL",
    "SpliceSite",
    "splice_site",
    "splice_product",
    "numerical_rank",
    "fold_splice",
    "widen_splice",
    # keys
    "DEFAULT_NULL_TOL",
    "tap_projection",
    "site_keys",
    "null_space_projector",
    # solver
    "METHODS",
    "WHEN_FULL",
    "DEFAULT_CONFLICT_TOL",
    "FLOAT32_RANK_TOL",
    "Edit",
    "SpliceEditor",
    # metrics
    "target_stats",
    "mean_kl",
    "logprobs",
    "validation_ce",
    # harness
    "FACT_TEMPLATES",
    "fact_phrases",
    "builtin_edit_set",
    "corpus_sequences",
    "HarnessData",
    "run_sequential",
    # checkpoint_io
    "EDITS_MANIFEST",
    "EDITS_TENSORS",
    "open_editor",
    "resume_editor",
    "save_edited",
]
