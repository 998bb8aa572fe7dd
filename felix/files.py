"""Writing report and data files: never a partial file at the destination, and JSON without NaN/Inf.

Every report writer in Felix (fidelity, task evaluation, teacher data, SODA, the experiment scripts) goes through
these, so an interrupted or failing run leaves either the previous file or nothing, never half of a new one.
Checkpoint directories have their own atomic writer (felix.model.save_checkpoint), as does the GGUF exporter."""
from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path
from typing import Callable


def atomic_write(path, write: Callable[[Path], object]) -> Path:
    """Call ``write(tmp)`` on a temporary file beside `path`, then rename it over `path`. On any error the temporary
    file is removed and `path` is untouched."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def atomic_write_text(path, text: str) -> Path:
    """`text` to `path` (UTF-8), atomically."""
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def save_figure(fig, path, dpi: int = 100) -> Path:
    """A matplotlib figure as PNG, atomically (the format is explicit: the temporary name has no .png suffix)."""
    return atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=dpi, format="png"))


def jsonable(x):
    """`x` with every non-finite float replaced by None (JSON has no NaN/Inf) and numpy scalars made Python
    numbers; dicts, lists and tuples are walked."""
    if hasattr(x, "item") and getattr(x, "ndim", None) == 0:  # numpy / torch scalars
        x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    return x


def read_text(path, error: type[Exception] = ValueError, kind: str = "file") -> str:
    """The UTF-8 text of `path`; a missing or unreadable file raises `error` naming it ("<kind> <path> does not
    exist", "cannot read <path> as UTF-8 text: ...")."""
    path = Path(path)
    if not path.is_file():
        raise error(f"{kind} {path} does not exist")
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise error(f"cannot read {path} as UTF-8 text: {e}") from e


def jsonl_lines(text: str, path):
    """(where, object, problem) for every non-empty line of JSONL `text` read from `path`: where is "path:line",
    object the parsed value (None when the line is not JSON) and problem None or "not valid JSON (...)". The
    callers check the objects' shape and report every bad line with its `where`."""
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            yield where, json.loads(line), None
        except json.JSONDecodeError as e:
            yield where, None, f"not valid JSON ({e.msg})"


def jsonl_stream(lines, path):
    """:func:`jsonl_lines` over an iterable of lines (an open text file read lazily, so a large file is never one
    string in memory): the same (where, object, problem) triples. Open the file with ``newline="\\n"`` so that
    lines split on "\\n" only (JSON strings may hold U+2028 and other characters str.splitlines() breaks on)."""
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            yield where, json.loads(line), None
        except json.JSONDecodeError as e:
            yield where, None, f"not valid JSON ({e.msg})"


def file_sha256(path, chunk: int = 1 << 20) -> str:
    """The hex sha256 of a file's bytes, read in chunks (how tokenizers, sources and shards are identified)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()
