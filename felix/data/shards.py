"""Pretraining token shards: a corpus tokenized once (`felix data prepare`), read by memory map.

A prepared corpus is a directory (the format is specified in docs/data-format.md):

* ``train_000000.bin``, ``train_000001.bin``, ..., ``val_000000.bin``, ...: a header of 256 little-endian
  int32 (magic, format version, bytes per token, tokens, documents, vocabulary size, split, shard index; the
  rest zero), then the tokens, uint16 when the vocabulary has at most 65,536 entries and uint32 otherwise. Every
  document is ``bos ids... eos`` (felix.model.tokenizer ids) and lies whole in one shard; shards hold about
  `shard_tokens` tokens each.
* ``manifest.json``: format version, tokenizer sha256 and vocabulary size, dtype, the source files (size,
  sha256, documents, characters, malformed lines skipped), documents and tokens per shard and split, and each
  shard's sha256. It is written last and atomically: a directory without it is not a prepared corpus.
* while `prepare_corpus` runs: ``.train_000003.bin.partial`` files and ``prepare-state.json`` (the inputs and the
  shards finished so far), so a rerun after a kill continues where the last checkpoint left off.

The validation split is chosen by each document's content (sha256 of its text): a document repeated anywhere in
the inputs lands on the same side every time.

Reader API (what the trainer uses): :class:`PreparedCorpus` (``open``, ``split``, ``fingerprint``) and
:class:`TokenArray` (``read(start, length)``: tokens across shard boundaries, from np.memmap, no per-token Python
objects)."""

from __future__ import annotations

import bisect
import contextlib
import hashlib
import json
import multiprocessing
import os
import re
import signal
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows: no flock; prepares of one directory must not overlap
    fcntl = None

import numpy as np
from tqdm import tqdm

from felix.data.sources import SourceReader, expand_sources
from felix.core.files import atomic_write_text, file_sha256
from felix.model.tokenizer import Tokenizer

FORMAT_NAME = "felix-token-shards"
FORMAT_VERSION = 1
MAGIC = 0x58494C46  # b"FLIX" read as a little-endian int32
HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4
MANIFEST = "manifest.json"
STATE = "prepare-state.json"
SPLITS = ("train", "val")
DEFAULT_VAL_FRACTION = 0.005
DEFAULT_SHARD_TOKENS = 100_000_000
MAX_SHARD_TOKENS = 2**31 - 1  # the header's token count is an int32
BATCH_CHARS = 1 << 20  # characters per batch sent to a worker
CHECKPOINT_SECONDS = 10.0  # how often a running prepare records where it is (what a rerun continues from)
_SHARD_NAME = re.compile(r"^(train|val)_(\d{6})\.bin$")
_PARTIAL_NAME = re.compile(r"^\.(train|val)_(\d{6})\.bin\.partial$")


class ShardError(ValueError):
    """A prepared corpus is missing, incomplete, corrupt or does not match what it is used with."""


def dtype_for_vocab(vocab_size: int) -> np.dtype:
    """uint16 when every token id fits (vocab_size <= 65,536), else uint32."""
    if vocab_size < 1 or vocab_size > 2**32:
        raise ShardError(f"vocabulary size {vocab_size} does not fit a token shard (1 .. 2**32)")
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


def shard_name(split: str, index: int) -> str:
    return f"{split}_{index:06d}.bin"


def make_header(n_tokens: int, n_documents: int, vocab_size: int, itemsize: int, split: str, index: int) -> bytes:
    if n_tokens > MAX_SHARD_TOKENS or n_documents > MAX_SHARD_TOKENS:
        raise ShardError(f"a shard of {n_tokens} tokens does not fit the header's int32 count")
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[:8] = (
        MAGIC,
        FORMAT_VERSION,
        itemsize,
        n_tokens,
        n_documents,
        vocab_size if vocab_size < 2**31 else -1,
        SPLITS.index(split),
        index,
    )
    return header.tobytes()


def read_header(path) -> dict:
    """The header fields of a shard file; ShardError naming the file when it is not one."""
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            raw = fh.read(HEADER_BYTES)
    except OSError as e:
        raise ShardError(f"cannot read shard {path}: {e}") from e
    if len(raw) < HEADER_BYTES:
        raise ShardError(f"shard {path} is truncated: {len(raw)} bytes, shorter than its {HEADER_BYTES}-byte header")
    h = np.frombuffer(raw, dtype="<i4")
    if h[0] != MAGIC:
        raise ShardError(f"{path} is not a Felix token shard (bad magic number)")
    if h[1] != FORMAT_VERSION:
        raise ShardError(f"shard {path} has format version {h[1]}; this Felix reads version {FORMAT_VERSION}")
    if h[2] not in (2, 4) or h[3] < 0 or h[4] < 0:
        raise ShardError(f"shard {path} has a corrupt header (bytes per token {h[2]}, tokens {h[3]})")
    return {
        "bytes_per_token": int(h[2]),
        "tokens": int(h[3]),
        "documents": int(h[4]),
        "vocab_size": int(h[5]),
        "split": SPLITS[h[6]] if 0 <= h[6] < len(SPLITS) else None,
        "index": int(h[7]),
    }


# ------------------------------------------------------------------------------------------- reading
class TokenArray:
    """The tokens of one split: its shards, memory-mapped, addressed as one array of ``n_tokens`` tokens."""

    def __init__(self, paths: list[Path], counts: list[int], n_documents: int, dtype: np.dtype):
        self.paths = paths
        self.dtype = np.dtype(dtype)
        self.n_documents = n_documents
        self._counts = np.asarray(counts, dtype=np.int64)
        self._starts = np.concatenate([[0], np.cumsum(self._counts)]).astype(np.int64)
        self.n_tokens = int(self._starts[-1])
        self._start_list = self._starts.tolist()
        self._maps: list[np.ndarray | None] = [None] * len(paths)

    def __len__(self) -> int:
        return self.n_tokens

    def _map(self, i: int) -> np.ndarray:
        if self._maps[i] is None:  # a plain ndarray view of the memmap: slicing it skips np.memmap's bookkeeping
            self._maps[i] = (
                np.memmap(
                    self.paths[i], dtype=self.dtype, mode="r", offset=HEADER_BYTES, shape=(int(self._counts[i]),)
                ).view(np.ndarray)
                if self._counts[i]
                else np.empty(0, dtype=self.dtype)
            )
        return self._maps[i]

    def read(self, start: int, length: int) -> np.ndarray:
        """Tokens [start, start + length) in the stored dtype (a copy), across shard boundaries."""
        start, length = int(start), int(length)
        if start < 0 or length < 0 or start + length > self.n_tokens:
            raise IndexError(f"tokens [{start}, {start + length}) are outside this split's {self.n_tokens} tokens")
        i = bisect.bisect_right(self._start_list, start) - 1
        offset = start - self._start_list[i] if i < len(self.paths) else 0
        if i < len(self.paths) and offset + length <= self._start_list[i + 1] - self._start_list[i]:
            return self._map(i)[offset : offset + length].copy()  # the common case: inside one shard
        out = np.empty(length, dtype=self.dtype)
        done = 0
        while done < length:
            offset = start + done - int(self._starts[i])
            take = min(length - done, int(self._counts[i]) - offset)
            if take > 0:
                out[done : done + take] = self._map(i)[offset : offset + take]
                done += take
            i += 1
        return out


@dataclass
class PreparedCorpus:
    """A complete prepared corpus directory (see the module docstring), validated on open."""

    path: Path
    manifest: dict
    _arrays: dict = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def open(cls, directory) -> PreparedCorpus:
        """Open `directory`, checking the manifest and every shard's header and size (not the token bytes'
        hashes: :meth:`verify` does that); ShardError naming the file otherwise."""
        directory = Path(directory)
        manifest_path = directory / MANIFEST
        if not directory.is_dir():
            raise ShardError(f"prepared corpus {directory} does not exist (run `felix data prepare`)")
        if not manifest_path.is_file():
            hint = (
                " (an interrupted `felix data prepare`: rerun it to finish)"
                if (directory / STATE).exists() or any(_PARTIAL_NAME.match(p.name) for p in directory.iterdir())
                else ""
            )
            raise ShardError(f"{directory} is not a complete prepared corpus: it has no {MANIFEST}{hint}")
        try:
            manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ShardError(f"cannot read {manifest_path}: {e}") from e
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
            raise ShardError(f"{manifest_path} is not a Felix token-shard manifest")
        if manifest.get("format_version") != FORMAT_VERSION:
            raise ShardError(
                f"{manifest_path} has format version {manifest.get('format_version')}; this Felix reads "
                f"version {FORMAT_VERSION} (prepare the corpus again)"
            )
        corpus = cls(directory, manifest)
        try:
            dtype = corpus.dtype
            splits = {s: manifest["splits"][s] for s in SPLITS}
            for split, info in splits.items():
                for entry in info["shards"]:
                    corpus._check_shard(directory / entry["file"], entry, split, dtype)
        except (KeyError, TypeError) as e:
            raise ShardError(f"{manifest_path} is malformed (missing or bad field {e})") from e
        return corpus

    def _check_shard(self, path: Path, entry: dict, split: str, dtype: np.dtype) -> None:
        if not path.is_file():
            raise ShardError(f"shard {path} listed in {self.path / MANIFEST} is missing")
        header = read_header(path)
        size = path.stat().st_size
        expected = HEADER_BYTES + header["tokens"] * header["bytes_per_token"]
        if size != expected:
            raise ShardError(
                f"shard {path} is {'truncated' if size < expected else 'too long'}: {size} bytes, its "
                f"header says {header['tokens']} tokens = {expected} bytes"
            )
        if (
            header["bytes_per_token"] != dtype.itemsize
            or header["tokens"] != entry["tokens"]
            or header["documents"] != entry["documents"]
            or header["split"] != split
            or size != entry["bytes"]
        ):
            raise ShardError(
                f"shard {path} does not match {self.path / MANIFEST} (header: {header}; manifest: "
                f"{entry}, dtype {dtype})"
            )

    @property
    def tokenizer_sha256(self) -> str:
        return self.manifest["tokenizer"]["sha256"]

    @property
    def vocab_size(self) -> int:
        return int(self.manifest["tokenizer"]["vocab_size"])

    @property
    def dtype(self) -> np.dtype:
        dtype = np.dtype(self.manifest["dtype"])
        if dtype not in (np.dtype(np.uint16), np.dtype(np.uint32)):
            raise ShardError(f"{self.path / MANIFEST}: unsupported dtype {dtype}")
        return dtype

    @property
    def fingerprint(self) -> str:
        """sha256 over the dtype and every shard's split, name, size, token count and sha256: it changes iff the
        token data changes."""
        rows = [self.manifest["dtype"]] + [
            [s, e["file"], e["bytes"], e["tokens"], e["sha256"]]
            for s in SPLITS
            for e in self.manifest["splits"][s]["shards"]
        ]
        return hashlib.sha256(json.dumps(rows).encode()).hexdigest()

    def split(self, name: str) -> TokenArray:
        if name not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {name!r}")
        if name not in self._arrays:
            info = self.manifest["splits"][name]
            self._arrays[name] = TokenArray(
                [self.path / e["file"] for e in info["shards"]],
                [e["tokens"] for e in info["shards"]],
                info["documents"],
                self.dtype,
            )
        return self._arrays[name]

    def verify(self) -> None:
        """Hash every shard and compare with the manifest (reads the whole corpus)."""
        for split in SPLITS:
            for entry in self.manifest["splits"][split]["shards"]:
                if file_sha256(self.path / entry["file"]) != entry["sha256"]:
                    raise ShardError(f"shard {self.path / entry['file']} does not match its sha256 in the manifest")


# ------------------------------------------------------------------------------------------- writing
def document_is_val(text: str, val_fraction: float) -> bool:
    """The split rule: a document is in the validation split iff the first 8 bytes of sha256(UTF-8 text), as a
    big-endian fraction of 2**64, are below `val_fraction`."""
    digest = hashlib.sha256(text.encode("utf-8", "surrogatepass")).digest()
    return int.from_bytes(digest[:8], "big") < val_fraction * 2**64


_WORKER: dict = {}


def _init_worker(tokenizer_path: str, dtype: str, val_fraction: float) -> None:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one core per worker process: the processes are the parallelism
    tok = Tokenizer.load(tokenizer_path)
    _WORKER.update(tok=tok, dtype=np.dtype(dtype), val_fraction=val_fraction)


def _init_pool_worker(tokenizer_path: str, dtype: str, val_fraction: float) -> None:
    """A pool worker's start: the default SIGTERM (Pool.terminate must end it, whatever handler the parent had when
    it forked, e.g. a training loop's or a server's) and SIGINT ignored (Ctrl-C is the parent's to handle)."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _init_worker(tokenizer_path, dtype, val_fraction)


def _encode_batch(texts: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(tokens of every document as bos ids eos, concatenated; each document's token count; its split flag)."""
    tok, dtype = _WORKER["tok"], _WORKER["dtype"]
    ids = [e.ids for e in tok.hf.encode_batch(texts)]
    lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids)) + 2
    out = np.empty(int(lengths.sum()), dtype=np.int64 if dtype.itemsize > 2 else np.int32)
    pos = 0
    for doc, n in zip(ids, lengths.tolist()):
        out[pos] = tok.bos_id
        out[pos + 1 : pos + n - 1] = doc
        out[pos + n - 1] = tok.eos_id
        pos += n
    if len(out) and (out.max() >= tok.vocab_size or out.min() < 0):
        raise ShardError(
            f"token id {int(out.max())} >= the vocabulary size {tok.vocab_size}: the tokenizer file is inconsistent"
        )
    out = out.astype(dtype)
    is_val = np.fromiter((document_is_val(t, _WORKER["val_fraction"]) for t in texts), dtype=bool, count=len(texts))
    return out, lengths, is_val


class _SplitWriter:
    """Appends documents to the shards of one split: ``.name.partial`` while open, renamed when full."""

    def __init__(
        self,
        directory: Path,
        split: str,
        dtype: np.dtype,
        vocab_size: int,
        shard_tokens: int,
        closed: list[dict] | None = None,
        open_tokens: int = 0,
        open_documents: int = 0,
    ):
        self.directory, self.split, self.dtype = directory, split, dtype
        self.vocab_size, self.shard_tokens = vocab_size, shard_tokens
        self.closed = list(closed or [])
        self.tokens, self.documents = open_tokens, open_documents
        self._fh = None
        if open_tokens or open_documents:  # continuing a checkpointed partial shard: cut what came after it
            self._open(resume=True)

    @property
    def index(self) -> int:
        return len(self.closed)

    @property
    def partial_path(self) -> Path:
        return self.directory / f".{shard_name(self.split, self.index)}.partial"

    def _open(self, resume: bool = False) -> None:
        if resume:
            self._fh = open(self.partial_path, "r+b")
            self._fh.truncate(HEADER_BYTES + self.tokens * self.dtype.itemsize)
            self._fh.seek(0, os.SEEK_END)
        else:
            self._fh = open(self.partial_path, "wb")
            self._fh.write(bytes(HEADER_BYTES))  # the real header is written when the shard is closed

    def add(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
        """Append whole documents (`tokens` concatenated, `lengths` tokens each), closing shards as they fill."""
        ends = np.cumsum(lengths)
        done_docs, done_tokens = 0, 0
        while done_docs < len(lengths):
            room = self.shard_tokens - self.tokens
            # documents that fit in the room left; at least one, so a document longer than a shard gets one alone
            fit = int(np.searchsorted(ends, done_tokens + room, side="right")) - done_docs
            take = max(fit, 1) if self.tokens == 0 else fit
            if take > 0:
                end_tokens = int(ends[done_docs + take - 1])
                if self._fh is None:
                    self._open()
                tokens[done_tokens:end_tokens].tofile(self._fh)
                self.tokens += end_tokens - done_tokens
                self.documents += take
                done_docs, done_tokens = done_docs + take, end_tokens
            if self.tokens >= self.shard_tokens or (take == 0 and self.tokens):
                self.close_shard()

    def flush(self) -> None:
        if self._fh is not None:
            self._fh.flush()

    def close_shard(self) -> None:
        if self._fh is None:
            return
        if self.tokens > MAX_SHARD_TOKENS:
            raise ShardError(f"a document of more than {MAX_SHARD_TOKENS} tokens does not fit a shard")
        self._fh.seek(0)
        self._fh.write(
            make_header(self.tokens, self.documents, self.vocab_size, self.dtype.itemsize, self.split, self.index)
        )
        self._fh.flush()
        os.fsync(self._fh.fileno())
        self._fh.close()
        self._fh = None
        final = self.directory / shard_name(self.split, self.index)
        os.replace(self.partial_path, final)
        self.closed.append(
            {
                "file": final.name,
                "tokens": self.tokens,
                "documents": self.documents,
                "bytes": final.stat().st_size,
                "sha256": file_sha256(final),
            }
        )
        self.tokens = self.documents = 0

    def abandon(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None

    def state(self) -> dict:
        return {"closed": self.closed, "open_tokens": self.tokens, "open_documents": self.documents}


def _source_identity(path: Path) -> dict:
    st = path.stat()
    return {"path": str(path), "bytes": st.st_size, "mtime_ns": st.st_mtime_ns}


def _our_files(directory: Path) -> tuple[list[Path], list[Path]]:
    """(files a prepare writes, other files) in `directory`."""
    ours, other = [], []
    for p in directory.iterdir():
        name = p.name
        if (
            name in (MANIFEST, STATE)
            or _SHARD_NAME.match(name)
            or _PARTIAL_NAME.match(name)
            or name.startswith(f".{MANIFEST}.tmp-")
            or name.startswith(f".{STATE}.tmp-")
        ):
            ours.append(p)
        else:
            other.append(p)
    return ours, other


def _clear(directory: Path) -> None:
    """Remove a previous prepare's files, the manifest first (so an interruption never leaves a manifest
    beside shards it does not describe)."""
    ours, _ = _our_files(directory)
    for p in sorted(ours, key=lambda p: p.name != MANIFEST):
        p.unlink()


def _read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None


def prepare_corpus(
    sources,
    tokenizer_path,
    out_dir,
    workers: int | None = None,
    val_fraction: float = DEFAULT_VAL_FRACTION,
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
    text_field: str = "text",
    force: bool = False,
    progress: bool = True,
    log=None,
) -> PreparedCorpus:
    """Tokenize `sources` (files, folders, globs: felix.data.sources) once with the tokenizer at
    `tokenizer_path`, in `workers` processes (default: every core), into token shards in `out_dir`.

    A rerun on a directory whose prepare was interrupted continues from its last checkpoint when the inputs are
    the same, else starts over; a directory holding a complete corpus of the same inputs is returned as is; one
    holding a different corpus is refused unless `force`. `log` (default: print to stderr) receives warnings."""
    log = log or (lambda msg: print(msg, file=sys.stderr))
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if not 1 <= shard_tokens <= MAX_SHARD_TOKENS:
        raise ValueError(f"shard_tokens must be in [1, {MAX_SHARD_TOKENS}], got {shard_tokens}")
    workers = (os.cpu_count() or 1) if workers is None else int(workers)
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    files = expand_sources(sources)
    tokenizer_path = Path(tokenizer_path)
    if tokenizer_path.is_dir():
        tokenizer_path = tokenizer_path / "tokenizer.json"
    tok = Tokenizer.load(tokenizer_path)
    vocab_size = tok.vocab_size
    dtype = dtype_for_vocab(vocab_size)
    inputs = {
        "format_version": FORMAT_VERSION,
        "tokenizer_sha256": file_sha256(tokenizer_path),
        "vocab_size": vocab_size,
        "dtype": dtype.name,
        "val_fraction": val_fraction,
        "shard_tokens": shard_tokens,
        "text_field": text_field,
        "sources": [_source_identity(p) for p in files],
    }

    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ShardError(f"--out {out} exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    with _exclusive(out):
        return _prepare_locked(
            out,
            files,
            inputs,
            tok,
            tokenizer_path,
            dtype,
            workers,
            val_fraction,
            shard_tokens,
            text_field,
            force,
            progress,
            log,
        )


@contextlib.contextmanager
def _exclusive(directory: Path):
    """Hold an exclusive lock on `directory` (flock; POSIX) so two prepares never write the same directory."""
    if fcntl is None:
        yield
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            raise ShardError(f"another `felix data prepare` is writing {directory}") from e
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def _prepare_locked(
    out: Path,
    files,
    inputs: dict,
    tok,
    tokenizer_path: Path,
    dtype: np.dtype,
    workers: int,
    val_fraction: float,
    shard_tokens: int,
    text_field: str,
    force: bool,
    progress: bool,
    log,
) -> PreparedCorpus:
    vocab_size = tok.vocab_size
    ours, other = _our_files(out)
    if other:
        names = ", ".join(sorted(p.name for p in other)[:5])
        raise ShardError(
            f"{out} holds files that are not part of a prepared corpus ({names}); choose an empty or new directory"
        )
    manifest = _read_json(out / MANIFEST) if (out / MANIFEST).exists() else None
    if (out / MANIFEST).exists():
        if manifest is not None and manifest.get("inputs") == inputs:
            try:
                corpus = PreparedCorpus.open(out)
                log(f"{out} already holds this corpus, prepared from the same inputs: nothing to do")
                return corpus
            except ShardError as e:
                if not force:
                    raise ShardError(
                        f"{out} holds a damaged corpus of the same inputs ({e}); rerun with --force to prepare it again"
                    ) from e
        elif not force:
            what = _difference(manifest.get("inputs") if isinstance(manifest, dict) else None, inputs)
            raise ShardError(
                f"{out} already holds a different prepared corpus ({what}); use --force to replace it, "
                f"or choose another --out"
            )
        _clear(out)
    state = _read_json(out / STATE)
    resume = state if isinstance(state, dict) and state.get("inputs") == inputs else None
    if resume is not None:
        try:
            for split in SPLITS:
                s = resume["splits"][split]
                partial = out / f".{shard_name(split, len(s['closed']))}.partial"
                renamed = out / shard_name(split, len(s["closed"]))
                if not partial.exists() and renamed.is_file() and (s["open_tokens"] or s["open_documents"]):
                    os.replace(renamed, partial)  # closed after the checkpoint: reopen it (its header is rewritten)
                for e in s["closed"]:
                    if not (out / e["file"]).is_file() or (out / e["file"]).stat().st_size != e["bytes"]:
                        raise KeyError(e["file"])
                partial = out / f".{shard_name(split, len(s['closed']))}.partial"
                committed = HEADER_BYTES + s["open_tokens"] * dtype.itemsize
                if (s["open_tokens"] or s["open_documents"]) and (
                    not partial.is_file() or partial.stat().st_size < committed
                ):
                    raise KeyError(partial.name)
        except (KeyError, TypeError):
            resume = None
    if resume is None:
        if ours:
            log(
                f"{out}: an earlier prepare with other inputs (or an unusable checkpoint) was interrupted: "
                "starting over"
            )
        _clear(out)
        resume = {
            "documents_done": 0,
            "splits": {s: {"closed": [], "open_tokens": 0, "open_documents": 0} for s in SPLITS},
        }
    else:
        log(f"{out}: continuing an interrupted prepare after {resume['documents_done']} documents")
        for p in out.iterdir():  # shards past the checkpoint: written after it, redone now
            m = _SHARD_NAME.match(p.name) or _PARTIAL_NAME.match(p.name)
            if not m:
                continue
            n_closed = len(resume["splits"][m.group(1)]["closed"])
            index, partial = int(m.group(2)), p.name.endswith(".partial")
            if index > n_closed or (index == n_closed and not partial) or (partial and index < n_closed):
                p.unlink()
    writers = {
        s: _SplitWriter(
            out,
            s,
            dtype,
            vocab_size,
            shard_tokens,
            resume["splits"][s]["closed"],
            resume["splits"][s]["open_tokens"],
            resume["splits"][s]["open_documents"],
        )
        for s in SPLITS
    }
    skip = int(resume["documents_done"])

    def checkpoint(documents_done: int) -> None:
        for w in writers.values():
            w.flush()
        atomic_write_text(
            out / STATE,
            json.dumps(
                {
                    "inputs": inputs,
                    "documents_done": documents_done,
                    "splits": {s: w.state() for s, w in writers.items()},
                }
            ),
        )

    total_bytes = sum(p.stat().st_size for p in files)
    bar = tqdm(
        total=total_bytes, unit="B", unit_scale=True, desc="tokenizing", disable=not progress, dynamic_ncols=True
    )
    readers: list[SourceReader] = []
    source_info: list[dict] = []
    done_bytes = [0]

    def batches():
        """Batches of about BATCH_CHARS characters of documents, after the `skip` already in the shards."""
        seen, batch, chars = 0, [], 0
        for path in files:
            sha = file_sha256(path)
            reader = SourceReader(path, text_field)
            readers.append(reader)
            for text in reader:
                seen += 1
                if seen <= skip:
                    continue
                batch.append(text)
                chars += len(text)
                if chars >= BATCH_CHARS:
                    yield batch, seen
                    batch, chars = [], 0
            st = reader.stats
            source_info.append(
                {
                    **_source_identity(path),
                    "sha256": sha,
                    "documents": st.documents,
                    "chars": st.chars,
                    "skipped": st.bad,
                    "skipped_examples": st.problems,
                }
            )
            done_bytes[0] += reader.size
            if st.bad:
                log(f"{path}: skipped {st.bad} malformed line(s)/row(s), e.g. {st.problems[0]}")
        if batch:
            yield batch, seen

    n_tokens, started, last_checkpoint = 0, time.perf_counter(), time.perf_counter()
    pool = None
    saved_parallelism = os.environ.get("TOKENIZERS_PARALLELISM")
    closed_at_checkpoint = sum(len(w.closed) for w in writers.values())
    try:
        if workers > 1:
            # set before forking: the workers then encode on one thread each, and HF tokenizers does not warn about
            # a fork after this process used its thread pool (e.g. to train the tokenizer); restored below
            os.environ["TOKENIZERS_PARALLELISM"] = "false"
            ctx = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn")
            pool = ctx.Pool(
                workers, initializer=_init_pool_worker, initargs=(str(tokenizer_path), dtype.name, val_fraction)
            )
            pending: deque = deque()

            def results():
                for batch, seen in batches():
                    pending.append((pool.apply_async(_encode_batch, (batch,)), seen))
                    if len(pending) >= 2 * workers:  # bounded work in flight: memory does not grow with the corpus
                        res, s = pending.popleft()
                        yield res.get(), s
                while pending:
                    res, s = pending.popleft()
                    yield res.get(), s
        else:
            _init_worker(str(tokenizer_path), dtype.name, val_fraction)  # this process encodes, on one core

            def results():
                for batch, seen in batches():
                    yield _encode_batch(batch), seen

        for (tokens, lengths, is_val), seen in results():
            for split, mask in (("train", ~is_val), ("val", is_val)):
                if mask.all():
                    writers[split].add(tokens, lengths)
                elif mask.any():
                    keep = np.repeat(mask, lengths)
                    writers[split].add(tokens[keep], lengths[mask])
            n_tokens += len(tokens)
            now = time.perf_counter()
            n_closed = sum(len(w.closed) for w in writers.values())
            if now - last_checkpoint >= CHECKPOINT_SECONDS or n_closed != closed_at_checkpoint:
                checkpoint(seen)
                last_checkpoint, closed_at_checkpoint = now, n_closed
            position = done_bytes[0] + (readers[-1].bytes_read if readers and len(source_info) < len(readers) else 0)
            bar.update(max(0, min(position, total_bytes) - bar.n))
            bar.set_postfix_str(f"{n_tokens / max(now - started, 1e-9):,.0f} tokens/s", refresh=False)
        for w in writers.values():
            w.close_shard()
    finally:
        if saved_parallelism is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = saved_parallelism
        bar.close()
        if pool is not None:
            pool.terminate()
            pool.join()
        for w in writers.values():
            w.abandon()
    elapsed = time.perf_counter() - started
    splits = {
        s: {
            "documents": sum(e["documents"] for e in w.closed),
            "tokens": sum(e["tokens"] for e in w.closed),
            "shards": w.closed,
        }
        for s, w in writers.items()
    }
    manifest = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "header_bytes": HEADER_BYTES,
        "dtype": dtype.name,
        "bytes_per_token": dtype.itemsize,
        "tokenizer": {
            "path": str(tokenizer_path),
            "sha256": inputs["tokenizer_sha256"],
            "vocab_size": vocab_size,
            "bos_id": tok.bos_id,
            "eos_id": tok.eos_id,
        },
        "val_fraction": val_fraction,
        "split_rule": "sha256(document text)[:8] / 2**64 < val_fraction",
        "shard_tokens": shard_tokens,
        "text_field": text_field,
        "sources": source_info,
        "splits": splits,
        "inputs": inputs,
        "last_run": {
            "seconds": round(elapsed, 3),
            "tokens_encoded": n_tokens,
            "workers": workers,
            "continued_after_documents": skip,
        },
    }
    atomic_write_text(out / MANIFEST, json.dumps(manifest, indent=1))
    (out / STATE).unlink(missing_ok=True)
    return PreparedCorpus.open(out)


def _difference(old: dict | None, new: dict) -> str:
    if not isinstance(old, dict):
        return "its manifest is unreadable or from another Felix version"
    changed = [k for k in new if old.get(k) != new.get(k)]
    return "different " + ", ".join(changed) if changed else "different inputs"
