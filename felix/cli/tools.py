"""`felix prune`: the tools stage (felix/tools) -- structured pruning of a checkpoint to a smaller Felix config.
(`felix edit` is added by felix.tools.edit.add_edit_parser.)"""

from __future__ import annotations

import sys

from felix.model.felix_lm import PRESETS, CheckpointError
from felix.tools.prune import METHODS, prune_checkpoint


def cmd_prune(args) -> int:
    try:
        result = prune_checkpoint(
            args.checkpoint,
            args.out,
            preset=args.to_preset,
            method=args.method,
            calib_batches=args.calib_batches,
            batch_size=args.batch_size,
            seq_len=args.seq_len,
            data=args.data or None,
            hc_steps=args.hc_steps,
            hc_lr=args.hc_lr,
            seed=args.seed,
            progress=sys.stderr.isatty(),
            n_layer=args.layers,
            n_head=args.heads,
            n_kv_head=args.kv_heads,
            ffn_hidden=args.ffn_hidden,
            d_model=args.d_model,
        )
    except (ValueError, CheckpointError, FileNotFoundError) as e:
        print(f"felix prune: error: {e}", file=sys.stderr)
        return 2
    c = result.model.cfg
    print(
        f"pruned {args.checkpoint} ({result.source_params / 1e6:.3f}M parameters) -> {args.out} "
        f"({result.pruned_params / 1e6:.3f}M): {c.n_layer} layers x {c.d_model}, {c.n_head}:{c.n_kv_head} heads of "
        f"{c.head_dim}, FFN {c.ffn_hidden}; method {args.method}; kept layers "
        f"{[lp.source_layer for lp in result.plan.layers]}. Recover: felix train --init-from {args.out}"
    )
    return 0


def add_prune_parser(sub) -> None:
    p = sub.add_parser(
        "prune",
        help="structured pruning to a smaller Felix config (then felix train --init-from)",
        description="Prune a Felix checkpoint to a smaller shape: importance-scored coupled groups "
        "(layers, kv heads, query heads, value dims, FFN channels, residual channels), "
        "spliced into a normal Felix checkpoint (felix/tools/prune.py). Target: --to-preset's "
        "shape, each field overridable; unspecified fields keep the source's.",
    )
    p.add_argument("checkpoint", help="source checkpoint directory")
    p.add_argument("out", help="output checkpoint directory (written atomically; holds prune_plan.json too)")
    p.add_argument("--to-preset", choices=list(PRESETS), help="target shape of this preset (vocabulary kept)")
    p.add_argument("--layers", type=int, help="target n_layer")
    p.add_argument("--heads", type=int, help="target n_head")
    p.add_argument("--kv-heads", type=int, help="target n_kv_head")
    p.add_argument("--ffn-hidden", type=int, help="target SwiGLU width")
    p.add_argument("--d-model", type=int, help="target residual width")
    p.add_argument(
        "--method",
        choices=METHODS,
        default="taylor",
        help="taylor: first-order |dL/dmask|; activation: activation norms; hard-concrete: learned "
        "Sheared-LLaMA masks with a target-shape constraint (small models)",
    )
    p.add_argument("--calib-batches", type=int, default=8, help="calibration batches (train split)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, help="calibration window (default: the model's max_seq_len)")
    p.add_argument("--data", action="append", default=[], help="calibration files (default: built-in corpus)")
    p.add_argument("--hc-steps", type=int, default=200, help="hard-concrete: mask training steps")
    p.add_argument("--hc-lr", type=float, default=0.1, help="hard-concrete: mask learning rate")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_prune)
