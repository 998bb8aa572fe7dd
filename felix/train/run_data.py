"""The pretraining data of one `felix train` run: its sources as prepared token shards, the run's tokenizer, the
weighted mix stream and the evaluation windows (felix/train/loop.py's build_run calls :func:`open_run_data`).

Each source (TrainConfig.data, named by data_names, weighted by data_weights) is

* a directory written by `felix data prepare` (felix.data.shards): opened as is, in milliseconds, whatever its size; or
* a data file (``.jsonl``/``.jsonl.gz``/``.jsonl.zst``/``.parquet``/``.txt``, a folder or a glob: what
  felix.data.sources reads), prepared on the fly into ``OUT/data/NAME/`` with felix.data.shards.prepare_corpus (a
  complete preparation of the same inputs is reused, so a resume does not tokenize again);
* with no sources, the built-in corpus (felix.data.corpus.builtin_corpus), written to ``OUT/data/builtin.jsonl`` and
  prepared the same way.

The run's tokenizer: the checkpoint's on resume, else --init-from's, else --tokenizer, else the one every prepared
source was made with (its manifest's path, when that file still has the recorded sha256), else one trained on a
bounded sample of the data files (felix.data.tokenizer_training.train_tokenizer_from_sources) and saved as
``OUT/data/tokenizer.json`` before anything is prepared with it. A prepared source made with another tokenizer is
refused, naming both.

Validation: each source's own validation split (the content-hash split of felix.data.shards), evaluated separately
(per-source validation loss) -- or, with --val-data, those files alone (then every source trains on all of its
tokens). A data file prepared on the fly sends at least one document to validation, as felix.data.corpus.split_documents
did: when no document's content hash falls under --val-fraction, the threshold is raised to just above the
smallest hash (one document, chosen by content).

Resume identity: every source's fingerprint (changes iff its tokens change), tokenizer sha256 and vocabulary go
into the stream's state; a resume on different data is refused naming the source and what changed, and a source
missing at resume is a clear error.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from felix.data import corpus as felix_data
from felix.data.corpus import DataError
from felix.core.files import atomic_write, file_sha256
from felix.data.mix import MixStream, fixed_batches, normalize_weights, window_count
from felix.train.config import default_source_names
from felix.data.shards import MANIFEST, PreparedCorpus, ShardError, document_is_val, prepare_corpus
from felix.data.sources import SourceReader, expand_sources
from felix.model.felix_lm import PRESETS
from felix.model.tokenizer import Tokenizer, save_tokenizer_file
from felix.data.tokenizer_training import train_tokenizer_from_sources

DATA_DIR = "data"  # OUT/data: on-the-fly prepared sources and the run's tokenizer
TOKENIZER_FILE = "tokenizer.json"
BUILTIN = "builtin"
VAL_DATA = "val-data"  # the name of the --val-data set (a directory under OUT/data)
ON_THE_FLY_BYTES_PER_WORKER = 32 << 20  # prepare small inputs in this process, large ones in worker processes


class RunDataError(DataError):
    """The run's data cannot be used: a source missing or changed, a tokenizer or vocabulary mismatch."""


@dataclass
class Source:
    name: str
    path: str  # as configured: a prepared directory or data file(s)
    corpus: PreparedCorpus
    on_the_fly: bool  # prepared by this run into OUT/data/NAME

    def identity(self) -> dict:
        """What a resume must find again (the path may move; the tokens may not change)."""
        return {
            "fingerprint": self.corpus.fingerprint,
            "tokenizer_sha256": self.corpus.tokenizer_sha256,
            "vocab_size": self.corpus.vocab_size,
        }


@dataclass
class RunData:
    tokenizer: Tokenizer
    sources: list[Source]
    weights: list[float]  # normalized, one per source
    train_stream: MixStream
    val_sets: dict  # name -> token array evaluated as validation
    train_sets: dict  # name -> training token array (fixed train windows for the memorization monitor)
    val_weights: dict  # name -> weight of its CE in the overall val_ce
    train_weights: dict  # name -> weight of its CE in the overall train_eval_ce (the source weights)

    def describe(self) -> str:
        parts = []
        for s, w in zip(self.sources, self.weights):
            train = self.train_sets[s.name]
            parts.append(
                f"{s.name} {w:.3f} ({train.n_tokens:,} train tokens, {window_count(train.n_tokens, self.train_stream.seq_len):,} windows"
                f"{', prepared here' if s.on_the_fly else ''})"
            )
        val = ", ".join(f"{n} {a.n_tokens:,}" for n, a in self.val_sets.items())
        return "sources " + "; ".join(parts) + f"; validation tokens {val}"


class ConcatTokens:
    """Token arrays read as one (a source's train and val splits together, when --val-data holds validation)."""

    def __init__(self, arrays):
        self.arrays = [a for a in arrays if a.n_tokens]
        self.starts = np.concatenate([[0], np.cumsum([a.n_tokens for a in self.arrays])]).astype(np.int64)
        self.n_tokens = int(self.starts[-1])

    def read(self, start: int, length: int) -> np.ndarray:
        if start < 0 or length < 0 or start + length > self.n_tokens:
            raise IndexError(f"tokens [{start}, {start + length}) are outside {self.n_tokens} tokens")
        parts, pos, end = [], start, start + length
        i = int(np.searchsorted(self.starts, start, side="right")) - 1
        while pos < end:
            take = min(end, int(self.starts[i + 1])) - pos
            parts.append(self.arrays[i].read(pos - int(self.starts[i]), take))
            pos += take
            i += 1
        return np.concatenate(parts) if len(parts) != 1 else parts[0]


def is_prepared(path) -> bool:
    return Path(path).is_dir() and (Path(path) / MANIFEST).is_file()


def tokenizer_sha256(tokenizer: Tokenizer) -> str:
    """The sha256 of the tokenizer as tokenizers serializes it: the file bytes of any tokenizer.json written by
    felix (felix.model.tokenizer.save_tokenizer_file, checkpoints), which is what a prepared corpus records."""
    return hashlib.sha256(tokenizer.hf.to_str(pretty=True).encode("utf-8")).hexdigest()


def _write_if_changed(path: Path, text: str) -> None:
    """Write `text` to `path` atomically, unless the file already holds exactly it (an unchanged file keeps its
    modification time, so a preparation of it is reused)."""
    if path.is_file() and path.stat().st_size == len(text.encode("utf-8")) and path.read_text("utf-8") == text:
        return
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def _min_hash_fraction(paths) -> tuple[float, int]:
    """(the val_fraction that sends exactly the smallest-hash document(s) to validation, documents read)."""
    smallest, n = None, 0
    for path in expand_sources(paths):
        for text in SourceReader(path):
            h = int.from_bytes(hashlib.sha256(text.encode("utf-8", "surrogatepass")).digest()[:8], "big")
            smallest = h if smallest is None else min(smallest, h)
            n += 1
    fraction = smallest / 2**64
    while not fraction * 2**64 > smallest:  # the split rule is hash < val_fraction * 2**64
        fraction = math.nextafter(fraction, 1.0)
    return fraction, n


def _effective_val_fraction(paths, val_fraction: float, log) -> float:
    """--val-fraction, raised (for a small input) so that at least one document is held out."""
    for path in expand_sources(paths):
        if any(document_is_val(text, val_fraction) for text in SourceReader(path)):
            return val_fraction
    fraction, n = _min_hash_fraction(paths)
    if n < 2:
        raise RunDataError(
            f"{', '.join(map(str, paths))}: {n} document(s): a held-out validation split needs at "
            f"least 2 (or give --val-data)"
        )
    log(
        f"{', '.join(map(str, paths))}: no document's content hash falls under val_fraction {val_fraction:g}; "
        f"holding out the one with the smallest hash"
    )
    return fraction


def _workers_for(paths) -> int:
    size = sum(p.stat().st_size for p in expand_sources(paths))
    return max(1, min(os.cpu_count() or 1, size // ON_THE_FLY_BYTES_PER_WORKER))


def _resolve_tokenizer(
    cfg, out: Path, ckpt_dir: Path, resume: bool, raw: list[list], prepared: list[Path], par, device, log
):
    """(tokenizer, its file for preparing data files, sha256 values a prepared source may carry, where it came
    from). A tokenizer trained here is trained by rank 0 and read from its file by the other ranks."""
    data_dir = out / DATA_DIR
    if resume:
        tok, origin = Tokenizer.load(ckpt_dir), f"the checkpoint {ckpt_dir}"
    elif cfg.init_from:
        tok, origin = Tokenizer.load(cfg.init_from), f"--init-from {cfg.init_from}"
    elif cfg.tokenizer:
        tok, origin = Tokenizer.load(cfg.tokenizer), f"--tokenizer {cfg.tokenizer}"
    elif prepared:  # the data files of a mixed run are prepared with it too
        tok, origin = _tokenizer_of_prepared(prepared), None
    else:

        def train():
            vocab = cfg.vocab_size or _preset_vocab(cfg.preset)
            trained, sample = train_tokenizer_from_sources([p for paths in raw for p in paths], vocab)
            log(f"trained a byte-level BPE tokenizer of {trained.vocab_size} tokens on {sample.describe()}")
            _save_run_tokenizer(trained, out)
            return trained

        tok = on_main_rank(par, device, train) or Tokenizer.load(data_dir / TOKENIZER_FILE)
        origin = "the tokenizer trained for this run"
    accepted = {tokenizer_sha256(tok)}
    given = cfg.tokenizer if not (resume or cfg.init_from) else None
    if given:  # a user's file may be formatted differently from tokenizers' own serialization
        path = Path(given) / TOKENIZER_FILE if Path(given).is_dir() else Path(given)
        accepted.add(file_sha256(path))
    tok_file = None
    if raw:
        tok_file = on_main_rank(par, device, lambda: _save_run_tokenizer(tok, out)) or data_dir / TOKENIZER_FILE
    return tok, tok_file, accepted, origin


def _preset_vocab(preset: str) -> int:
    return PRESETS[preset]["vocab_size"]


def _tokenizer_of_prepared(prepared: list[Path]) -> Tokenizer:
    """The tokenizer every prepared source names in its manifest (when that file still has the recorded hash)."""
    corpora = [PreparedCorpus.open(p) for p in prepared]
    shas = {c.tokenizer_sha256 for c in corpora}
    if len(shas) > 1:
        raise RunDataError(
            "the prepared sources were made with different tokenizers ("
            + ", ".join(f"{c.path}: {c.tokenizer_sha256[:12]}" for c in corpora)
            + "); prepare them with one tokenizer"
        )
    recorded = Path(corpora[0].manifest["tokenizer"]["path"])
    if not recorded.is_file() or file_sha256(recorded) != corpora[0].tokenizer_sha256:
        raise RunDataError(
            f"{corpora[0].path} was prepared with the tokenizer {recorded}, which is "
            f"{'missing' if not recorded.is_file() else 'changed since'}; give --tokenizer (the "
            f"tokenizer.json it was prepared with, sha256 {corpora[0].tokenizer_sha256[:12]}...)"
        )
    return Tokenizer.load(recorded)


def _open_source(name: str, path: str, resume: bool) -> PreparedCorpus:
    try:
        return PreparedCorpus.open(path)
    except ShardError as e:
        raise RunDataError(f"{'cannot resume: ' if resume else ''}data source {name!r}: {e}") from e


def _prepared_from_same_content(name: str, paths: list, target: Path) -> PreparedCorpus | None:
    """On resume: the complete corpus in `target` when the source files still hold the bytes it was prepared from
    (compared by size and sha256, not by path or time, so a run directory that was moved or copied resumes); None
    when `target` is incomplete (the prepare then continues). A source file whose content changed is refused."""
    try:
        corpus = PreparedCorpus.open(target)
    except ShardError:
        return None
    recorded = [(s.get("bytes"), s.get("sha256")) for s in corpus.manifest.get("sources", [])]
    files = expand_sources(paths)
    current = [(f.stat().st_size, file_sha256(f)) for f in files]
    if current != recorded:
        changed = [str(f) for f, c, r in zip(files, current, recorded) if c != r] or [str(f) for f in files]
        raise RunDataError(
            f"cannot resume: data source {name!r}: {', '.join(changed)} changed since the run prepared "
            f"{target} from it ({len(recorded)} file(s) recorded, {len(current)} now); restore it or "
            f"start a new run"
        )
    return corpus


def _prepare_here(
    name: str, paths: list, out: Path, tok_file: Path, val_fraction: float, resume: bool, progress: bool, log
) -> PreparedCorpus:
    """Data file(s) of one source tokenized into OUT/data/NAME (reused when already prepared from the same inputs)."""
    target = out / DATA_DIR / name
    if resume:
        reused = _prepared_from_same_content(name, paths, target)
        if reused is not None:
            return reused
    try:
        return prepare_corpus(
            paths,
            tok_file,
            target,
            workers=_workers_for(paths),
            val_fraction=val_fraction,
            force=not resume,
            progress=progress,
            log=log,
        )
    except ShardError as e:
        if resume:
            raise RunDataError(
                f"cannot resume: data source {name!r} ({', '.join(map(str, paths))}) is not what the "
                f"run was prepared from: {e}"
            ) from e
        raise
    except FileNotFoundError as e:
        raise RunDataError(f"{'cannot resume: ' if resume else ''}data source {name!r}: {e}") from e


def open_run_data(cfg, out: Path, ckpt_dir: Path, resume: bool, par, device, log) -> RunData:
    """The run's tokenizer, sources, mix stream and evaluation sets (module docstring). Rank 0 prepares data files;
    the other ranks wait for it, then open the same directories."""
    out = Path(out)
    if cfg.data:
        names = cfg.data_names or default_source_names(cfg.data)
        specs = list(zip(names, cfg.data))
    else:
        builtin = out / DATA_DIR / f"{BUILTIN}.jsonl"

        def write_builtin():
            builtin.parent.mkdir(parents=True, exist_ok=True)
            docs = felix_data.builtin_corpus(cfg.n_records, cfg.seed, tuple(cfg.tasks), cfg.prose)
            _write_if_changed(builtin, "".join(json.dumps({"text": d}) + "\n" for d in docs))

        on_main_rank(par, device, write_builtin)
        names, specs = [BUILTIN], [(BUILTIN, str(builtin))]
    clash = [n for n, _ in specs if n in (VAL_DATA, TOKENIZER_FILE)]
    if clash:
        raise RunDataError(
            f"data source name(s) {clash} are reserved (OUT/{DATA_DIR}/{VAL_DATA} holds --val-data, "
            f"OUT/{DATA_DIR}/{TOKENIZER_FILE} the run's tokenizer); rename the source"
        )
    for name, path in specs:
        if not (is_prepared(path) or Path(path).exists() or any(c in str(path) for c in "*?[")):
            raise RunDataError(f"{'cannot resume: ' if resume else ''}data source {name!r}: {path} does not exist")
    raw = [(name, [path]) for name, path in specs if not is_prepared(path)]
    prepared = [Path(path) for name, path in specs if is_prepared(path)]
    tokenizer, tok_file, accepted, origin = _resolve_tokenizer(
        cfg, out, ckpt_dir, resume, [p for _, p in raw], prepared, par, device, log
    )
    val_files = list(cfg.val_data)
    progress = par.is_main and _stderr_is_tty()

    def prepare_files():
        prepared_here = {}
        for name, paths in raw:
            fraction = 0.0 if val_files else _effective_val_fraction(paths, cfg.val_fraction, log)
            prepared_here[name] = _prepare_here(name, paths, out, tok_file, fraction, resume, progress, log)
        return prepared_here

    corpora: dict[str, PreparedCorpus] = on_main_rank(par, device, prepare_files) or {}
    sources = []
    for name, path in specs:
        if name in corpora:
            corpus = corpora[name]
        elif is_prepared(path):
            corpus = _open_source(name, path, resume)
        else:  # another rank prepared it
            corpus = _open_source(name, str(out / DATA_DIR / name), resume)
        sources.append(Source(name, path, corpus, not is_prepared(path)))
    if not resume:
        for s in sources:
            if s.corpus.tokenizer_sha256 not in accepted:
                raise RunDataError(
                    f"data source {s.name!r} ({s.path}) was prepared with the tokenizer of sha256 "
                    f"{s.corpus.tokenizer_sha256[:12]}..., not with {origin or 'the run tokenizer'} "
                    f"(sha256 {sorted(accepted)[0][:12]}...): prepare it with the run's tokenizer or "
                    f"give --tokenizer"
                )
    for s in sources:
        if s.corpus.vocab_size != tokenizer.vocab_size:
            raise RunDataError(
                f"data source {s.name!r} ({s.path}) has a vocabulary of {s.corpus.vocab_size} tokens; "
                f"the run's tokenizer has {tokenizer.vocab_size}"
            )

    val_sets, train_sets = {}, {}
    if val_files:
        vpath = val_files[0] if len(val_files) == 1 and is_prepared(val_files[0]) else None
        if vpath is not None:
            vcorpus = _open_source(VAL_DATA, vpath, resume)
        else:
            vcorpus = on_main_rank(
                par,
                device,
                lambda: _prepare_here(
                    VAL_DATA,
                    val_files,
                    out,
                    tok_file or _save_run_tokenizer(tokenizer, out),
                    0.0,
                    resume,
                    progress,
                    log,
                ),
            ) or _open_source(VAL_DATA, str(out / DATA_DIR / VAL_DATA), resume)
        if vcorpus.vocab_size != tokenizer.vocab_size:
            raise RunDataError(
                f"--val-data {vpath or ', '.join(val_files)} has a vocabulary of {vcorpus.vocab_size} "
                f"tokens; the run's tokenizer has {tokenizer.vocab_size}"
            )
        val_sets["val"] = ConcatTokens([vcorpus.split("train"), vcorpus.split("val")])
        for s in sources:
            train_sets[s.name] = ConcatTokens([s.corpus.split("train"), s.corpus.split("val")])
    else:
        for s in sources:
            train_sets[s.name] = s.corpus.split("train")
            val_sets[s.name] = s.corpus.split("val")
    for name, array in list(val_sets.items()) + list(train_sets.items()):
        if window_count(array.n_tokens, cfg.seq_len) < 1:
            which = "validation" if array in val_sets.values() else "training"
            raise DataError(
                f"{name}: the {which} split has {array.n_tokens} tokens, fewer than one window of "
                f"seq_len+1 = {cfg.seq_len + 1}; add data, raise --val-fraction or lower --seq-len"
            )

    names = [s.name for s in sources]
    if cfg.data_weights:
        weights = normalize_weights(cfg.data_weights, names)
    else:  # no weights: each source weighs its tokens (what concatenating the sources would do)
        weights = normalize_weights([train_sets[n].n_tokens for n in names], names)
    stream = MixStream(
        [train_sets[n] for n in names],
        weights,
        cfg.seq_len,
        cfg.seed,
        names,
        identity={s.name: s.identity() for s in sources},
    )
    source_weights = dict(zip(names, weights))
    return RunData(
        tokenizer,
        sources,
        weights,
        stream,
        val_sets,
        train_sets,
        {"val": 1.0} if val_files else source_weights,
        source_weights,
    )


def on_main_rank(par, device, fn):
    """`fn()` on rank 0 (its result there; None on the other ranks), the other ranks waiting for it. When it fails
    on rank 0 every rank raises, rather than waiting at a barrier for a rank that will never come."""
    result, error = None, None
    if par.is_main:
        try:
            result = fn()
        except Exception as e:  # re-raised below, after the other ranks have heard of it
            error = e
    if par.world_size > 1:
        failed = par.any_rank(error is not None, device)
        if error is None and failed:
            raise RunDataError("rank 0 could not prepare the training data (its error is in its log)")
    if error is not None:
        raise error
    return result


def _save_run_tokenizer(tokenizer: Tokenizer, out: Path) -> Path:
    path = out / DATA_DIR / TOKENIZER_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    if not (path.is_file() and file_sha256(path) == tokenizer_sha256(tokenizer)):
        save_tokenizer_file(tokenizer, path, force=True)
    return path


def _stderr_is_tty() -> bool:
    return sys.stderr.isatty()


def eval_batches(run_data: RunData, seq_len: int, batch_size: int, n_batches: int) -> tuple[dict, dict]:
    """(validation batches per eval set, fixed training batches per source): windows spread evenly."""
    val = {n: fixed_batches(a, seq_len, batch_size, n_batches) for n, a in run_data.val_sets.items()}
    train = {n: fixed_batches(a, seq_len, batch_size, n_batches) for n, a in run_data.train_sets.items()}
    return val, train
