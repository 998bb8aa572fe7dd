"""The `felix` command line (also `python -m felix`).

felix quantize      codec demo on a built-in weight-like matrix: error and speed per format and backend
felix backends      which backends run here, and why not where they do not
felix aot-report    compile every Triton kernel for gfx1101 and sm_90 and print registers / LDS / spills
felix selftest      run every op against its torch reference on this machine's best device; exit 1 on failure
felix train         train Felix-LM (default: the tiny preset on the built-in corpus, CPU, a few minutes)
felix fidelity      which logit margins / decisions of a checkpoint survive a quantization (exit 1: gate failed)
felix export        a checkpoint to GGUF: stock llama.cpp (`llama`) or the fork (`felix` arch, RQ4)
felix inspect       metadata and tensor table of any GGUF file
felix prune         structured pruning of a checkpoint to a smaller Felix config (recover: train --init-from)
felix edit          write (prompt -> target) edits into a checkpoint's splice surface; list and undo them
felix teacher-data  multi-teacher JSONL from the built-in task records (+ checkpoints); teacher agreement report
felix eval-tasks    task-suite report: student checkpoints vs teachers vs the teacher ensemble, per task
felix tokenizer     train a byte-level BPE tokenizer on a bounded sample of pretraining sources
felix data          prepare pretraining sources once into memory-mappable token shards
felix serve         a checkpoint or GGUF on llama.cpp's OpenAI-compatible chat API (127.0.0.1 by default)
"""

from __future__ import annotations

import argparse
import sys

from felix.cli import data, ops, ship, tools, train, verify
from felix.cli.edit import add_edit_parser

# Every subcommand, in the order `felix --help` lists them: each stage's module of felix/cli holds its subcommands'
# parsers and the functions they run (set_defaults(func=...)).
SUBCOMMANDS = (
    ops.add_quantize_parser,
    ops.add_backends_parser,
    ops.add_aot_report_parser,
    ops.add_selftest_parser,
    train.add_train_parser,
    verify.add_fidelity_parser,
    ship.add_export_parser,
    ship.add_inspect_parser,
    tools.add_prune_parser,
    add_edit_parser,
    data.add_teacher_data_parser,
    verify.add_eval_tasks_parser,
    data.add_tokenizer_parser,
    data.add_data_parser,
    ship.add_serve_parser,
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="felix", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    for add_parser in SUBCOMMANDS:
        add_parser(sub)
    return p


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    problem = args.args_problem(args) if "args_problem" in vars(args) else None  # beyond what argparse checks
    if problem:
        parser.error(problem)
    try:
        return args.func(args)
    except ValueError as e:  # the last net: a bad input file or option that a command did not map itself (the
        # project's rule: bad input raises a ValueError subclass naming the file; the command line exits 2)
        print(f"felix {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
