"""Pretraining text sources, read as a stream of documents: what `felix tokenizer train` and `felix data prepare`
read (docs/data-format.md).

* ``.jsonl``, ``.jsonl.gz``, ``.jsonl.zst``: one JSON object per line, ``{"text": ...}`` (the key is
  `text_field`) or ``{"prompt": ..., "response": ...}`` (rendered with felix.model.chat.chat_text), as ``felix train
  --data`` reads them (felix.data.corpus.load_user_data). Read line by line (lines split on "\\n" only), never as one
  string. Malformed lines are reported as path:line; a file where more than half the non-empty lines are bad is
  refused (checked when its end is reached).
* ``.parquet``: the string column `text_field` (default ``text``, as FineWeb ships), one document per row, read
  one record batch at a time; null or empty values are skipped and count as bad rows.
* ``.txt``: the whole file is one document (as ``felix train --data`` does), so split a large plain-text
  collection into one file per document.
* a folder: every file of the above kinds below it, recursively, in sorted path order; a glob pattern
  (``data/*.parquet``, ``**`` allowed): its matches of the above kinds in sorted order.

Every problem is a :class:`felix.data.corpus.DataError` (a ValueError) naming the file."""

from __future__ import annotations

import glob
import gzip
import io
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import pyarrow as pa
import pyarrow.parquet as pq
import zstandard

from felix.data.corpus import DataError
from felix.model.chat import chat_text
from felix.core.files import jsonl_stream, read_text

JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.zst")
SUPPORTED_SUFFIXES = (*JSONL_SUFFIXES, ".parquet", ".txt")
MAX_BAD_FRACTION = 0.5
SHOWN_PROBLEMS = 10


def source_kind(path) -> str | None:
    """ "jsonl", "jsonl.gz", "jsonl.zst", "parquet" or "txt" by the file name's ending; None if unsupported."""
    name = Path(path).name.lower()
    for suffix in sorted(SUPPORTED_SUFFIXES, key=len, reverse=True):
        if name.endswith(suffix):
            return suffix[1:]
    return None


def expand_sources(sources) -> list[Path]:
    """The files named by `sources` (files, folders, glob patterns), in order; a source that names nothing
    readable is an error. A file named twice is read twice (its documents concatenate)."""
    files: list[Path] = []
    if isinstance(sources, (str, Path)):
        sources = [sources]
    for source in sources:
        path = Path(source)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and source_kind(p))
            if not found:
                raise DataError(f"folder {path} holds no {'/'.join(SUPPORTED_SUFFIXES)} files")
        elif path.is_file():
            if source_kind(path) is None:
                raise DataError(f"{path}: unsupported file type (expected one of {', '.join(SUPPORTED_SUFFIXES)})")
            found = [path]
        elif glob.has_magic(str(source)):
            found = sorted(
                Path(p) for p in glob.glob(str(source), recursive=True) if Path(p).is_file() and source_kind(p)
            )
            if not found:
                raise DataError(f"pattern {source!r} matches no {'/'.join(SUPPORTED_SUFFIXES)} files")
        else:
            raise DataError(f"data source {path} does not exist")
        files += found
    if not files:
        raise DataError("no data sources given")
    return files


@dataclass
class SourceStats:
    """What reading one file gave: usable documents, their characters, and the bad lines or rows skipped."""

    path: str
    documents: int = 0
    chars: int = 0
    bad: int = 0
    problems: list[str] = field(default_factory=list)  # the first SHOWN_PROBLEMS, "path:line: reason"

    def note_bad(self, problem: str) -> None:
        self.bad += 1
        if len(self.problems) < SHOWN_PROBLEMS:
            self.problems.append(problem)

    def check(self) -> None:
        """Refuse a file that gave no document, or where most lines/rows were bad."""
        total = self.documents + self.bad
        if self.bad and self.bad > MAX_BAD_FRACTION * total:
            shown = "\n  ".join(self.problems) + (
                f"\n  ... and {self.bad - len(self.problems)} more" if self.bad > len(self.problems) else ""
            )
            raise DataError(
                f"{self.path}: {self.bad} of {total} non-empty lines/rows are malformed; refusing to "
                f"use the rest:\n  {shown}"
            )
        if not self.documents:
            raise DataError(f"{self.path}: no usable documents (empty file, or no non-empty text)")


class SourceReader:
    """The documents (strings) of one file, streamed; ``stats`` fills in as it goes and ``bytes_read`` tells how
    far into the file (in its on-disk bytes) reading has come, for progress bars."""

    def __init__(self, path, text_field: str = "text"):
        self.path = Path(path)
        self.kind = source_kind(self.path)
        if self.kind is None:
            raise DataError(f"{self.path}: unsupported file type (expected one of {', '.join(SUPPORTED_SUFFIXES)})")
        self.text_field = text_field
        self.stats = SourceStats(str(self.path))
        self.size = self.path.stat().st_size if self.path.is_file() else 0
        self._position = lambda: 0

    @property
    def bytes_read(self) -> int:
        return self._position()

    def __iter__(self) -> Iterator[str]:
        if not self.path.is_file():
            raise DataError(f"data file {self.path} does not exist")
        if self.kind == "txt":
            yield from self._txt()
        elif self.kind == "parquet":
            yield from self._parquet()
        else:
            yield from self._jsonl()
        self._position = lambda: self.size
        self.stats.check()

    def _emit(self, text: str) -> str:
        self.stats.documents += 1
        self.stats.chars += len(text)
        return text

    def _txt(self) -> Iterator[str]:
        text = read_text(self.path, DataError, "data file")
        self._position = lambda: self.size
        if text.strip():
            yield self._emit(text)

    def _jsonl(self) -> Iterator[str]:
        key = self.text_field
        try:
            with open(self.path, "rb") as raw:
                self._position = raw.tell
                if self.kind == "jsonl.gz":
                    stream = gzip.GzipFile(fileobj=raw, mode="rb")
                elif self.kind == "jsonl.zst":
                    stream = zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True)
                else:
                    stream = raw
                lines = io.TextIOWrapper(stream, encoding="utf-8", newline="\n")
                for where, obj, problem in jsonl_stream(lines, self.path):
                    if problem:
                        self.stats.note_bad(f"{where}: {problem}")
                    elif isinstance(obj, dict) and isinstance(obj.get(key), str) and obj[key].strip():
                        yield self._emit(obj[key])
                    elif (
                        isinstance(obj, dict)
                        and isinstance(obj.get("prompt"), str)
                        and isinstance(obj.get("response"), str)
                    ):
                        yield self._emit(chat_text(obj["prompt"], obj["response"]))
                    else:
                        self.stats.note_bad(
                            f"{where}: expected an object with a non-empty string {key!r}, or "
                            f"string 'prompt' and 'response'"
                        )
        except UnicodeDecodeError as e:
            raise DataError(f"{self.path}: not UTF-8 text ({e})") from e
        except (OSError, EOFError, zlib.error, zstandard.ZstdError) as e:  # gzip.BadGzipFile is an OSError
            raise DataError(f"cannot read {self.path} as {self.kind}: {e}") from e

    def _parquet(self) -> Iterator[str]:
        key = self.text_field
        try:
            pf = pq.ParquetFile(self.path)
        except (pa.ArrowException, OSError) as e:
            raise DataError(f"cannot read {self.path} as parquet: {e}") from e
        schema = pf.schema_arrow
        if key not in schema.names:
            raise DataError(
                f"{self.path}: no column {key!r} (columns: {', '.join(schema.names)}); choose one with --text-field"
            )
        if not (pa.types.is_string(schema.field(key).type) or pa.types.is_large_string(schema.field(key).type)):
            raise DataError(f"{self.path}: column {key!r} holds {schema.field(key).type}, not strings")
        n_rows = max(1, pf.metadata.num_rows)
        rows_done = 0
        self._position = lambda: self.size * rows_done // n_rows
        try:
            for batch in pf.iter_batches(batch_size=1024, columns=[key]):
                for i, text in enumerate(batch.column(0).to_pylist()):
                    if isinstance(text, str) and text.strip():
                        yield self._emit(text)
                    else:
                        self.stats.note_bad(f"{self.path}: row {rows_done + i}: null or empty {key!r}")
                rows_done += batch.num_rows
        except (pa.ArrowException, OSError) as e:
            raise DataError(f"cannot read {self.path} as parquet (corrupt?): {e}") from e
