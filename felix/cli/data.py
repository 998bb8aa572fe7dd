"""`felix tokenizer train`, `felix data prepare`, `felix teacher-data`: the data stage (felix/data) -- a tokenizer
and token shards from pretraining sources, and multi-teacher distillation data."""

from __future__ import annotations

import sys
import time
from pathlib import Path

from felix.core.files import file_sha256, named_path
from felix.data.corpus import DataError
from felix.data.shards import DEFAULT_SHARD_TOKENS, DEFAULT_VAL_FRACTION, prepare_corpus
from felix.data.sources import SUPPORTED_SUFFIXES
from felix.data.teachers import (
    SCORERS,
    TeacherGroup,
    builtin_teacher_groups,
    checkpoint_teacher,
    select_responses,
    teacher_agreement,
    write_agreement_report,
    write_teacher_groups,
)
from felix.data.tokenizer_training import DEFAULT_DOC_CAP, DEFAULT_MAX_CHARS, train_tokenizer_from_sources
from felix.model.tokenizer import save_tokenizer_file
from felix.tasks import MAKERS, SUITE_SEED, TASKS, builtin_task_suite
from felix.tasks.perturbations import BUILTIN_TEACHERS, builtin_teacher_responses

SOURCES_HELP = (
    f"files ({', '.join(SUPPORTED_SUFFIXES)}), folders (searched recursively) or glob patterns; "
    'JSONL lines are {"text": ...} or {"prompt", "response"}, a .txt file is one document'
)


def cmd_tokenizer_train(args) -> int:
    t0 = time.perf_counter()
    try:
        if args.out.exists() and not args.force:
            raise FileExistsError(f"{args.out} exists; use --force to overwrite it")
        tok, sample = train_tokenizer_from_sources(
            args.sources,
            args.vocab_size,
            max_chars=int(args.max_chars),
            doc_cap=args.doc_cap,
            text_field=args.text_field,
        )
        save_tokenizer_file(tok, args.out, force=args.force)
    except (ValueError, DataError, FileExistsError, FileNotFoundError) as e:
        print(f"felix tokenizer train: error: {e}", file=sys.stderr)
        return 2
    print(f"trained on {sample.describe()}")
    print(
        f"wrote {args.out}: vocabulary {tok.vocab_size:,}, sha256 {file_sha256(args.out)[:16]}..., "
        f"{time.perf_counter() - t0:.1f} s"
    )
    return 0


def cmd_data_prepare(args) -> int:
    t0 = time.perf_counter()
    try:
        corpus = prepare_corpus(
            args.sources,
            args.tokenizer,
            args.out,
            workers=args.workers,
            val_fraction=args.val_fraction,
            shard_tokens=int(args.shard_tokens),
            text_field=args.text_field,
            force=args.force,
            progress=sys.stderr.isatty(),
        )
    except (ValueError, DataError, FileNotFoundError) as e:
        print(f"felix data prepare: error: {e}", file=sys.stderr)
        return 2
    m, run = corpus.manifest, corpus.manifest["last_run"]
    print(f"{args.out}: {len(m['sources'])} source file(s), dtype {m['dtype']} ({m['bytes_per_token']} bytes/token)")
    for split in ("train", "val"):
        info = m["splits"][split]
        print(
            f"  {split}: {info['documents']:,} documents, {info['tokens']:,} tokens in {len(info['shards'])} shard(s)"
        )
    print(
        f"  {time.perf_counter() - t0:.1f} s; the run that finished it encoded {run['tokens_encoded']:,} tokens in "
        f"{run['seconds']:.1f} s ({run['tokens_encoded'] / max(run['seconds'], 1e-9):,.0f} tokens/s, "
        f"{run['workers']} worker(s)); fingerprint {corpus.fingerprint[:16]}"
    )
    if m["splits"]["val"]["documents"] == 0:
        print(
            "felix data prepare: warning: the validation split is empty (few documents for --val-fraction "
            f"{args.val_fraction}); raise it for a validation loss",
            file=sys.stderr,
        )
    return 0


def add_tokenizer_parser(sub) -> None:
    """`felix tokenizer train` (felix/data/tokenizer_training.py, felix/model/tokenizer.py)."""
    tk = sub.add_parser("tokenizer", help="train a byte-level BPE tokenizer on a bounded sample of sources")
    tk_sub = tk.add_subparsers(dest="tokenizer_command", required=True)
    tt = tk_sub.add_parser(
        "train",
        help="byte-level BPE (HF tokenizers) from a streamed, bounded sample",
        description="Train Felix's byte-level BPE tokenizer (special tokens at ids 0-6) on the "
        "first --max-chars characters of SOURCES, each document cut to --doc-cap "
        "characters, streamed: memory does not grow with the corpus size.",
    )
    tt.add_argument("sources", nargs="+", help=SOURCES_HELP)
    tt.add_argument("--vocab-size", type=int, required=True, help="vocabulary size, the 7 special tokens included")
    tt.add_argument("--out", type=Path, required=True, help="the tokenizer JSON file to write (atomically)")
    tt.add_argument(
        "--max-chars",
        type=float,
        default=DEFAULT_MAX_CHARS,
        help=f"characters sampled in all (default {DEFAULT_MAX_CHARS:.0e})",
    )
    tt.add_argument(
        "--doc-cap",
        type=int,
        default=DEFAULT_DOC_CAP,
        help=f"characters kept per document (default {DEFAULT_DOC_CAP:,})",
    )
    tt.add_argument("--text-field", default="text", help="JSONL key / parquet column holding the text")
    tt.add_argument("--force", action="store_true", help="overwrite an existing --out")
    tt.set_defaults(func=cmd_tokenizer_train)


def add_data_parser(sub) -> None:
    """`felix data prepare` (felix/data/shards.py, docs/data-format.md)."""
    da = sub.add_parser("data", help="prepare pretraining sources into token shards")
    da_sub = da.add_subparsers(dest="data_command", required=True)
    dp = da_sub.add_parser(
        "prepare",
        help="tokenize sources once, in parallel, into memory-mappable token shards",
        description="Tokenize SOURCES once into token shards in --out (docs/data-format.md): "
        "uint16/uint32 shards of bos+document+eos, a train/val split by document "
        "content, manifest.json written last. An interrupted prepare continues when "
        "rerun with the same arguments.",
    )
    dp.add_argument("sources", nargs="+", help=SOURCES_HELP)
    dp.add_argument("--tokenizer", type=Path, required=True, help="tokenizer JSON file (felix tokenizer train)")
    dp.add_argument("--out", type=Path, required=True, help="output directory (one per source is the usual use)")
    dp.add_argument("--workers", type=int, default=None, help="tokenizer processes (default: every core)")
    dp.add_argument(
        "--val-fraction",
        type=float,
        default=DEFAULT_VAL_FRACTION,
        help=f"share of documents in the validation split (default {DEFAULT_VAL_FRACTION})",
    )
    dp.add_argument(
        "--shard-tokens",
        type=float,
        default=DEFAULT_SHARD_TOKENS,
        help=f"tokens per shard file (default {DEFAULT_SHARD_TOKENS:.0e})",
    )
    dp.add_argument("--text-field", default="text", help="JSONL key / parquet column holding the text")
    dp.add_argument("--force", action="store_true", help="replace a different prepared corpus in --out")
    dp.set_defaults(func=cmd_data_prepare)


def cmd_teacher_data(args) -> int:
    args.builtin_teacher = args.builtin_teacher or list(BUILTIN_TEACHERS)
    if args.seed is None:
        args.seed = SUITE_SEED if args.suite else 0
    try:
        if args.suite:  # the prompts of the task-suite evaluation (felix eval-tasks), so teachers can be compared
            items = builtin_task_suite(args.per_task, args.seed)
            records = [{"task": i.task, "prompt": i.prompt, "response": i.reference} for i in items]
            groups = [
                TeacherGroup(
                    r["prompt"],
                    r["task"],
                    {t: builtin_teacher_responses([r], t, args.seed)[0] for t in args.builtin_teacher},
                    {},
                )
                for r in records
            ]
        else:
            groups = builtin_teacher_groups(args.n_records, args.seed, tuple(args.task or TASKS), args.builtin_teacher)
        for name, ckpt in args.teacher_checkpoint:
            checkpoint_teacher(name, ckpt, groups, args.max_new_tokens, progress=sys.stderr.isatty())
        selections = select_responses(groups, args.teacher_scorer)
        path = write_teacher_groups(groups, args.out)
        files = write_agreement_report(teacher_agreement(groups, selections), args.report_dir or Path(args.out).parent)
    except (ValueError, FileNotFoundError) as e:
        print(f"felix teacher-data: error: {e}", file=sys.stderr)
        return 2
    print(
        f"{path}: {len(groups)} prompts x {len({t for g in groups for t in g.responses})} teachers; agreement "
        f"report {files['markdown']} (+ json, png)"
    )
    return 0


def add_teacher_data_parser(sub) -> None:
    p = sub.add_parser(
        "teacher-data",
        help="multi-teacher JSONL from the built-in task records (+ checkpoints); teacher agreement report",
        description="Write teacher data (one line per prompt: {prompt, task, responses: {teacher: "
        "response}}) made from felix.tasks.records' task records by the built-in teachers (exact, "
        "noisy, sloppy) and/or trained Felix checkpoints, plus the teacher-agreement report.",
    )
    p.add_argument("out", help="output JSONL (written atomically)")
    p.add_argument("--n-records", type=int, default=256, help="task records (prompts) to answer")
    p.add_argument("--task", action="append", choices=list(MAKERS), help="task kinds (default: all four)")
    p.add_argument(
        "--seed", type=int, help="record seed (default 0; with --suite: the suite's seed, as felix eval-tasks uses)"
    )
    p.add_argument(
        "--builtin-teacher",
        action="append",
        choices=list(BUILTIN_TEACHERS),
        help="built-in teachers to include (repeatable; default: all)",
    )
    p.add_argument(
        "--teacher-checkpoint",
        action="append",
        type=named_path,
        default=[],
        metavar="NAME=DIR",
        help="a trained Felix checkpoint as teacher NAME (its greedy responses)",
    )
    p.add_argument("--max-new-tokens", type=int, default=192, help="checkpoint teachers: response budget")
    p.add_argument("--teacher-scorer", choices=list(SCORERS), default="consensus")
    p.add_argument(
        "--suite",
        action="store_true",
        help="answer the task-suite prompts of felix eval-tasks instead (--per-task of each task, suite --seed)",
    )
    p.add_argument("--per-task", type=int, default=8, help="with --suite: items per task")
    p.add_argument("--report-dir", help="where the agreement report goes (default: beside OUT)")
    p.set_defaults(func=cmd_teacher_data)
