"""`felix edit`: write (prompt -> target) edits into a checkpoint's splice surface, list them, undo them
(felix.tools.edit does the work; this module is its command line)."""

from __future__ import annotations

import sys

from felix.model.felix_lm import CheckpointError
from felix.tools.edit import WHEN_FULL, EditError, EditRequest, load_requests, open_editor, save_edited


def cmd_edit(args) -> int:
    try:
        model, tok, ed = open_editor(
            args.checkpoint,
            null_space=not args.no_null_space,
            when_full=args.when_full,
            fold=args.fold_splice,
            splice_rank=args.splice_rank,
            layer=args.layer,
            projection=args.projection,
            ridge=args.ridge,
        )
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
                print(
                    f"edit {e.id}: {e.request.prompt!r} -> {e.request.target!r} (p(target) before "
                    f"{e.target_prob_before:.3g})"
                )
        changed = bool(requests or args.undo or args.fold_splice or args.splice_rank)
        if args.list or not changed:
            site = ed.site
            print(
                f"blk.{site.layer}.splice.{site.projection}: rank {site.rank}, {ed.base_rank} held by the trained "
                f"update, {ed.rank_used()} used by {len(ed.edits)} edit(s); null space {ed.null_dim} of "
                f"{ed.in_features} input dims" + (" (refit when full)" if ed.when_full == "refit" else "")
            )
            for d in ed.list():
                print(f"  {d['id']:4d}  {d['prompt']!r} -> {d['target']!r}")
        if changed:
            if not args.out:
                raise EditError("edits, undos and folds need --out (the edited checkpoint directory)")
            save_edited(model, tok, ed, args.out, args.force)
            print(
                f"wrote {args.out} ({len(ed.edits)} edit(s), rank used {ed.rank_used()}); export it with "
                f"`felix export {args.out} OUT.gguf --splice adapter` for a hot-swappable LoRA adapter"
            )
    except (EditError, CheckpointError, FileNotFoundError) as e:
        print(f"felix edit: error: {e}", file=sys.stderr)
        return 2
    return 0


def add_edit_parser(sub) -> None:
    e = sub.add_parser(
        "edit",
        help="write (prompt -> target) edits into a checkpoint's splice surface; list, undo",
        description="Closed-form splice edits (MEMIT-style solve with AlphaEdit's null-space "
        "projection of preserved-knowledge keys from the built-in corpus). The output is a "
        "checkpoint whose splice holds the edits, plus edits.json / edits.safetensors so "
        "later runs can list, undo and add edits.",
    )
    e.add_argument("checkpoint", help="checkpoint directory (felix train's, or one felix edit wrote)")
    e.add_argument("--prompt", action="append", default=[], help="edit prompt (repeatable, paired with --target)")
    e.add_argument("--target", action="append", default=[], help="what the prompt should continue with")
    e.add_argument("--requests", help="JSONL of {prompt, target} edit requests")
    e.add_argument("--undo", type=int, action="append", default=[], help="remove the edit with this id (repeatable)")
    e.add_argument("--list", action="store_true", help="list the applied edits")
    e.add_argument("--out", help="edited checkpoint directory (written atomically)")
    e.add_argument("--force", action="store_true", help="overwrite --out")
    e.add_argument(
        "--when-full",
        choices=WHEN_FULL,
        default="refuse",
        help="when the edits need more rank than the splice has: refuse, or refit (best rank-limited fit)",
    )
    e.add_argument(
        "--ridge",
        type=float,
        default=0.0,
        help="ridge term (relative to mean |P k|^2): bounded update, edits hold approximately (default 0: exact)",
    )
    e.add_argument("--no-null-space", action="store_true", help="plain minimum-norm update (no preserved keys)")
    e.add_argument(
        "--fold-splice",
        action="store_true",
        help="first fold the trained splice into its weight (frees the whole rank for edits)",
    )
    e.add_argument("--splice-rank", type=int, help="first widen every splice to this rank (exact)")
    e.add_argument("--layer", type=int, help="spliced layer to edit (default: the highest)")
    e.add_argument("--projection", help="spliced projection to edit (default: ffn_down)")
    e.set_defaults(func=cmd_edit)
