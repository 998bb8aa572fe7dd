"""Writing report and data files: never a partial file at the destination, and JSON without NaN/Inf.

Every report writer in Felix (fidelity, task evaluation, teacher data, SODA, the experiment scripts) goes through
these, so an interrupted or failing run leaves either the previous file or nothing, never half of a new one.
Checkpoint directories have their own atomic writer (felix.model.felix_lm.save_checkpoint), as does the GGUF exporter."""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import re
from pathlib import Path
from typing import Callable


def temp_path(path) -> Path:
    """The temporary name a writer of `path` uses in this process: ``.NAME.tmp-PID`` beside it."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def fsync_path(path, directory: bool = False) -> None:
    """fsync a file, or a directory (so that a rename or unlink in it survives a power loss)."""
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def pid_alive(pid: int) -> bool:
    """Whether a process with this id exists (one owned by another user counts as alive)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temps(path) -> list[Path]:
    """Remove the leftovers of killed writers of `path`: every ``.NAME.tmp-PID`` beside it whose process no longer
    exists (a live writer's temporary file, this process's included, is never touched). Returns what was removed."""
    path = Path(path)
    pattern = re.compile(re.escape(f".{path.name}.tmp-") + r"(\d+)")
    removed = []
    try:
        siblings = list(path.parent.iterdir())
    except OSError:
        return removed
    for p in siblings:
        m = pattern.fullmatch(p.name)
        if m is None or int(m.group(1)) == os.getpid() or pid_alive(int(m.group(1))) or not p.is_file():
            continue
        try:
            p.unlink()
            removed.append(p)
        except FileNotFoundError:  # another writer cleaned it first
            pass
    return removed


def atomic_write(path, write: Callable[[Path], object]) -> Path:
    """Call ``write(tmp)`` on a temporary file beside `path`, then rename it over `path`. On any error the temporary
    file is removed and `path` is untouched. Temporary files that killed writers of `path` left behind are removed
    first (felix.core.files.remove_stale_temps)."""
    path = Path(path)
    remove_stale_temps(path)
    tmp = temp_path(path)
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


def read_json(path, error: type[Exception] = ValueError, kind: str = "file", expect: type | None = dict):
    """The parsed JSON document in `path`; a missing or non-UTF-8 file (read_text), a file that is not JSON, or
    one whose top level is not an `expect` (None: anything) raises `error` naming the file and the problem. JSON is
    data: nothing read here can run code."""
    text = read_text(path, error, kind)
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise error(f"cannot read {kind} {path} as JSON: {e.msg} at line {e.lineno} column {e.colno}") from e
    except RecursionError as e:
        raise error(f"{kind} {path} is nested too deeply to read as JSON") from e
    if expect is not None and not isinstance(value, expect):
        raise error(
            f"{kind} {path} holds a JSON {type(value).__name__}, expected a JSON "
            f"{'object' if expect is dict else expect.__name__}"
        )
    return value


def jsonl_lines(text: str, path):
    """(where, object, problem) for every non-empty line of JSONL `text` read from `path`: where is "path:line",
    object the parsed value (None when the line is not JSON) and problem None or "not valid JSON (...)". The
    callers check the objects' shape and report every bad line with its `where`.

    Lines end at "\\n" only (a "\\r" before it is dropped), as JSON Lines defines them: str.splitlines() would
    also split at U+2028, U+2029, U+0085 and other separators that json.dumps(ensure_ascii=False) leaves inside
    strings, breaking valid records and shifting every later line number."""
    return jsonl_stream(text.split("\n"), path)


def jsonl_stream(lines, path):
    """:func:`jsonl_lines` over an iterable of lines (an open text file read lazily, so a large file is never one
    string in memory): the same (where, object, problem) triples. Open the file with ``newline="\\n"`` so that
    lines split on "\\n" only (JSON strings may hold U+2028 and other characters str.splitlines() breaks on)."""
    for lineno, line in enumerate(lines, 1):
        line = line.removesuffix("\n").removesuffix("\r")
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            yield where, json.loads(line), None
        except json.JSONDecodeError as e:
            yield where, None, f"not valid JSON ({e.msg})"
        except RecursionError:
            yield where, None, "not valid JSON (nested too deeply)"


def named_path(text: str) -> tuple[str, str]:
    """An argparse type for ``NAME=PATH`` options (a system or teacher named by its checkpoint directory)."""
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"expected NAME=CHECKPOINT_DIR, got {text!r}")
    return name, path


def file_sha256(path, chunk: int = 1 << 20) -> str:
    """The hex sha256 of a file's bytes, read in chunks (how tokenizers, sources and shards are identified)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()
