"""Edited checkpoints: open a checkpoint for editing (resuming the edits a `felix edit` checkpoint saved), and write
the edited model with its edit history (edits.json + edits.safetensors) by swap-into-place."""

from __future__ import annotations

import json
from pathlib import Path

from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from felix.core.files import read_json
from felix.model.felix_lm import load_checkpoint, save_checkpoint
from felix.model.qat import QAT_FILE, read_qat_config
from felix.model.tokenizer import Tokenizer
from felix.tools.edit.errors import EditError
from felix.tools.edit.harness import corpus_sequences
from felix.tools.edit.keys import site_keys
from felix.tools.edit.sites import fold_splice, splice_site, widen_splice
from felix.tools.edit.solver import SpliceEditor

EDITS_MANIFEST, EDITS_TENSORS = "edits.json", "edits.safetensors"


def open_editor(
    checkpoint,
    method: str = "closed-form",
    null_space: bool = True,
    when_full: str = "refuse",
    fold: bool = False,
    splice_rank: int | None = None,
    layer=None,
    projection=None,
    preserved_windows: int = 64,
    ridge: float = 0.0,
    log=print,
):
    """(model, tokenizer, editor) for a checkpoint directory; a checkpoint written by `felix edit` resumes its
    edits (list, undo, more edits) from its edits.json / edits.safetensors."""

    checkpoint = Path(checkpoint)
    qat = read_qat_config(checkpoint)
    if qat is not None:
        raise EditError(
            f"{checkpoint} was trained quantization-aware ({qat.mode}, {QAT_FILE}): felix edit solves "
            "against the float weights and writes a checkpoint without the QAT record, so its export would "
            "no longer ship the bytes the model trained with; edit the checkpoint before the QAT phase"
        )
    model = load_checkpoint(checkpoint).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    tok = Tokenizer.load(checkpoint)
    manifest_path = checkpoint / EDITS_MANIFEST
    if manifest_path.is_file():
        if fold or splice_rank:
            raise EditError(
                f"{checkpoint} already holds edits: --fold-splice / --splice-rank apply to an unedited model"
            )
        return model, tok, resume_editor(model, tok, checkpoint)
    if method == "finetune":
        raise EditError(
            "felix edit saves closed-form edits with their history; the finetune baseline is "
            "for the Python API and the report (felix.tools.edit.SpliceEditor(method='finetune'))"
        )
    if splice_rank:
        widen_splice(model, splice_rank)
    if fold:
        err = fold_splice(model, layer, projection)
        log(f"folded the trained splice into its weight (max change of the effective weight {err:.1e})")
    preserved = None
    if null_space:
        site = splice_site(model, layer, projection)
        preserved = site_keys(model, site, corpus_sequences(tok, "train", preserved_windows, 64))
    return (
        model,
        tok,
        SpliceEditor(
            model, tok, layer, projection, method, preserved, null_space=null_space, when_full=when_full, ridge=ridge
        ),
    )


def resume_editor(model, tok, checkpoint) -> SpliceEditor:
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
        raise EditError(
            f"{manifest_path} is corrupt or does not match {EDITS_TENSORS} ({type(e).__name__}: {e})"
        ) from e


def save_edited(model, tok, editor: SpliceEditor, out, force: bool = False):
    """The edited checkpoint (model, tokenizer, edits.json, edits.safetensors), written by swap-into-place."""
    out = Path(out)
    if out.exists() and not force:
        raise EditError(f"{out} exists; pass --force to overwrite it")
    manifest, tensors = editor.state()
    return save_checkpoint(
        out,
        model,
        tok,
        extra_files={
            EDITS_MANIFEST: lambda p: p.write_text(json.dumps(manifest, indent=1)),
            EDITS_TENSORS: lambda p: save_file(tensors, str(p)),
        },
    )
