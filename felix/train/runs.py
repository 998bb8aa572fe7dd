"""Run directories that lose nothing and trust no file: trainer state without pickle, run-directory ownership (an
exclusive lock, no silent overwrite), versioned checkpoints behind an atomically replaced pointer, retention, and
the on-device step guard (non-finite losses and loss spikes) of a weeks-long run. felix/train/loop.py uses these.

A run directory ``OUT`` holds::

    OUT/.lock                         flock'ed by the live trainer (rank 0); holds its pid, host and start time
    OUT/checkpoints/step-00000600/    one complete checkpoint per save (model.safetensors, config.json,
                                      tokenizer.json, trainer_state.json + trainer_state.safetensors, ...)
    OUT/checkpoint -> checkpoints/step-00000600    the latest checkpoint: a symlink, replaced atomically
    OUT/metrics.jsonl, OUT/loss_curve.png, OUT/tensorboard/

A save writes a hidden temporary step directory, fsyncs its files and itself, renames it to ``step-N`` (the
commit: a ``step-N`` directory is always complete), fsyncs ``checkpoints/``, then points ``checkpoint`` at it
(a temporary symlink renamed over the old one) and fsyncs ``OUT``. Nothing is removed before its replacement is
in place, so a crash between any two operations leaves the previous checkpoint or the new one; a step directory
newer than the pointer (a crash between the rename and the pointer swap) is completed by the next run.
Retention renames an old step directory to a hidden name before removing it, so a half-removed directory is
never mistaken for a checkpoint.
"""

from __future__ import annotations

import datetime
import errno
import fcntl
import json
import math
import os
import re
import shutil
import socket
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from felix.core.files import fsync_path, jsonl_lines, pid_alive, read_text
from felix.model.felix_lm import CheckpointError

POINTER, STEPS_DIR, LOCK_FILE = "checkpoint", "checkpoints", ".lock"
STATE_JSON, STATE_TENSORS = "trainer_state.json", "trainer_state.safetensors"
LEGACY_STATE = "trainer_state.pt"  # pickled (torch.save) by Felix before run safety: refused, never unpickled
METRICS_FILE = "metrics.jsonl"  # one JSON object per evaluation, appended as it happens (read_metrics reads it)
RUN_OUTPUTS = (METRICS_FILE, "loss_curve.png", "tensorboard")  # what a run writes beside its checkpoints
_STEP_RE = re.compile(r"^step-(\d{8})(?:-(\d+))?$")
_PID_RE = re.compile(r"\.(?:tmp|old)-(\d+)(?:-|$)|^\.(?:tmp|deleting)-.*-(\d+)$")


class RunDirectoryError(ValueError):
    """A run directory that this command may not use: held by a live process, or holding a run it was not told
    to continue (--resume) or replace (--overwrite)."""


# ---------------------------------------------------------------------------------------------------------------
# trainer state: nested dicts / lists / tuples of tensors and plain values <-> safetensors + a JSON skeleton


def flatten_state(state) -> tuple[dict[str, torch.Tensor], object]:
    """(tensors, skeleton): every tensor of the nested `state` under its path ("optimizer/state/0/exp_avg"), and a
    JSON-able copy of `state` with each tensor replaced by {"__tensor__": path}. Tuples, dicts with non-string
    keys and non-finite floats get tagged forms, so :func:`unflatten_state` restores the exact value."""
    tensors: dict[str, torch.Tensor] = {}

    def enc(x, path):
        if isinstance(x, torch.Tensor):
            name = path or "tensor"
            if name in tensors:
                raise ValueError(f"two tensors at {name!r} in a trainer state")
            tensors[name] = x.detach().cpu().contiguous()
            return {"__tensor__": name}
        if x is None or isinstance(x, (bool, int, str)):
            return x
        if isinstance(x, float):
            return x if math.isfinite(x) else {"__float__": repr(x)}
        if isinstance(x, tuple):
            return {"__tuple__": [enc(v, f"{path}/{i}") for i, v in enumerate(x)]}
        if isinstance(x, list):
            return [enc(v, f"{path}/{i}") for i, v in enumerate(x)]
        if isinstance(x, dict):
            if all(isinstance(k, str) and not k.startswith("__") for k in x):
                return {k: enc(v, f"{path}/{k}" if path else k) for k, v in x.items()}
            return {
                "__items__": [[enc(k, f"{path}/key"), enc(v, f"{path}/{k}" if path else str(k))] for k, v in x.items()]
            }
        raise TypeError(f"cannot store a {type(x).__name__} (at {path or 'the top'}) in a trainer state")

    return tensors, enc(state, "")


def unflatten_state(tensors: dict[str, torch.Tensor], skeleton, source: str = "trainer state"):
    """The nested value :func:`flatten_state` took apart. Plain data only: nothing here can run code."""

    def dec(x):
        if isinstance(x, list):
            return [dec(v) for v in x]
        if not isinstance(x, dict):
            return x
        if len(x) == 1:
            ((tag, v),) = x.items()
            if tag == "__tensor__":
                if not isinstance(v, str) or v not in tensors:
                    raise CheckpointError(f"{source}: tensor {v!r} is not in {STATE_TENSORS}")
                return tensors[v]
            if tag == "__float__":
                if v not in ("nan", "inf", "-inf"):
                    raise CheckpointError(f"{source}: {v!r} is not a non-finite float")
                return float(v)
            if tag == "__tuple__":
                return tuple(dec(i) for i in v)
            if tag == "__items__":
                return {dec(k): dec(i) for k, i in v}
        return {k: dec(v) for k, v in x.items()}

    try:
        return dec(skeleton)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{source} is corrupt: {e}") from e


def save_trainer_state(directory, state: dict) -> None:
    """`state` as ``trainer_state.safetensors`` (its tensors) + ``trainer_state.json`` (the rest, strict JSON)."""
    directory = Path(directory)
    tensors, skeleton = flatten_state(state)
    save_file(tensors, str(directory / STATE_TENSORS), metadata={"format": "felix-trainer-state"})
    (directory / STATE_JSON).write_text(json.dumps(skeleton, allow_nan=False), encoding="utf-8")


def check_trainer_state(directory) -> None:
    """Raise unless `directory` holds a trainer state Felix can load: an old pickled ``trainer_state.pt`` is refused
    (unpickling a file can run code), naming it and how to continue from its weights."""
    directory = Path(directory)
    if (directory / STATE_JSON).is_file() and (directory / STATE_TENSORS).is_file():
        return
    if (directory / LEGACY_STATE).exists():
        raise CheckpointError(
            f"{directory / LEGACY_STATE} is a pickled trainer state from an older Felix, which Felix no longer loads "
            f"(unpickling a file can run arbitrary code). Its weights are safe to use: continue from them with "
            f"`felix train --init-from {directory} --out-dir NEW_DIR` (the optimizer state and data position start "
            f"fresh)"
        )
    missing = [n for n in (STATE_JSON, STATE_TENSORS) if not (directory / n).is_file()]
    raise FileNotFoundError(f"cannot resume: no {' or '.join(missing)} in {directory}")


def load_trainer_state(directory) -> dict:
    """The trainer state :func:`save_trainer_state` wrote into `directory` (safetensors + JSON, never pickle)."""
    directory = Path(directory)
    check_trainer_state(directory)
    json_path, tensor_path = directory / STATE_JSON, directory / STATE_TENSORS
    try:
        skeleton = json.loads(read_text(json_path, CheckpointError, "trainer state"))
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{json_path} is corrupt: not valid JSON ({e})") from e
    try:
        tensors = load_file(str(tensor_path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{tensor_path} is corrupt or truncated ({e})") from e
    state = unflatten_state(tensors, skeleton, str(json_path))
    if not isinstance(state, dict):
        raise CheckpointError(f"{json_path} is corrupt: not a JSON object")
    return state


# ---------------------------------------------------------------------------------------------------------------
# filesystem helpers


def _leftover_pid(name: str) -> int | None:
    m = _PID_RE.search(name)
    return int(m.group(1) or m.group(2)) if m else None


def step_directories(out) -> list[tuple[int, int, Path]]:
    """The committed step directories of run `out` as (step, version, path), oldest first."""
    steps = Path(out) / STEPS_DIR
    if not steps.is_dir():
        return []
    found = []
    for p in steps.iterdir():
        m = _STEP_RE.match(p.name)
        if m and p.is_dir() and not p.is_symlink():
            found.append((int(m.group(1)), int(m.group(2) or 0), p))
    return sorted(found)


def pointer_target(out) -> Path | None:
    """The step directory ``OUT/checkpoint`` points at (None when there is no pointer, or it dangles)."""
    link = Path(out) / POINTER
    if not link.is_symlink():
        return None
    target = Path(out) / os.readlink(link)
    return target if target.is_dir() else None


# ---------------------------------------------------------------------------------------------------------------
# ownership: the lock, the "does it hold a run" check, leftovers


def _describe_holder(holder: dict | None) -> str:
    if not holder:
        return "another process (no holder recorded)"
    return (
        f"pid {holder.get('pid')} on host {holder.get('host')} (started {holder.get('started')}"
        f"{', ' + holder['command'] if holder.get('command') else ''})"
    )


class RunLock:
    """An exclusive flock on ``OUT/.lock``; the file names the holder (pid, host, start time) while it is held and
    is emptied on release. A non-empty file found unlocked is the record of a holder that died without releasing
    (the kernel drops a dead process's flock): it is taken over with a log line."""

    def __init__(self, out, log=print):
        self.path, self.log, self.fd = Path(out) / LOCK_FILE, log, None

    def _read_holder(self, fd) -> dict | None:
        os.lseek(fd, 0, os.SEEK_SET)
        raw = os.read(fd, 4096)
        if not raw.strip():
            return None
        try:
            holder = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            return {"pid": "?", "host": "?", "started": f"unreadable lock record {raw[:40]!r}"}
        return holder if isinstance(holder, dict) else {"pid": "?", "host": "?", "started": "?"}

    def acquire(self) -> RunLock:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = self._read_holder(fd)
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise RunDirectoryError(
                    f"run directory {self.path.parent} is in use by {_describe_holder(holder)} "
                    f"(lock {self.path}); wait for it to end or stop it first"
                ) from None
            raise RunDirectoryError(f"cannot lock run directory {self.path.parent} ({self.path}: {e})") from e
        stale = self._read_holder(fd)
        if stale:
            self.log(
                f"taking over the stale lock {self.path}: its holder, {_describe_holder(stale)}, is gone "
                f"without releasing it (killed or crashed)"
            )
        holder = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        }
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, (json.dumps(holder) + "\n").encode())
        os.fsync(fd)
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is None:
            return
        fd, self.fd = self.fd, None
        try:
            os.ftruncate(fd, 0)  # a clean release leaves no holder record
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)


def run_contents(out) -> list[str]:
    """What run directory `out` holds, in words (empty: nothing a new run would replace)."""
    out = Path(out)
    held = []
    target = pointer_target(out)
    if target is not None:
        held.append(f"{POINTER} -> {target.relative_to(out)}")
    elif (out / POINTER).is_symlink() or (out / POINTER).exists():
        held.append(f"{POINTER}{'/ (an older layout)' if (out / POINTER).is_dir() else ' (dangling)'}")
    steps = step_directories(out)
    if steps:
        held.append(f"{len(steps)} checkpoint(s) in {STEPS_DIR}/ (steps {', '.join(str(s) for s, _, _ in steps)})")
    metrics = out / RUN_OUTPUTS[0]
    if metrics.is_file() and metrics.stat().st_size:
        n = sum(1 for line in metrics.read_bytes().splitlines() if line.strip())
        held.append(f"{RUN_OUTPUTS[0]} ({n} record(s))")
    return held


def read_metrics(path) -> list[dict]:
    """The records of a run's ``metrics.jsonl`` (one dict per evaluation, in file order); `path` is the file or the
    run directory that holds it (felix train's OUT, or a felix train --soda run's). Read by felix.core.files' JSONL
    reader: a missing or non-UTF-8 file raises ValueError naming it, and every line that is not a JSON object is
    reported as path:line (the first five, then how many more)."""
    path = Path(path)
    if path.is_dir():
        path = path / METRICS_FILE
    records, problems = [], []
    for where, record, problem in jsonl_lines(read_text(path, ValueError, "metrics file"), path):
        if problem is None and not isinstance(record, dict):
            problem = f"a JSON {type(record).__name__}, expected an object (one evaluation's metrics)"
        if problem is not None:
            problems.append(f"{where}: {problem}")
            continue
        records.append(record)
    if problems:
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        raise ValueError("bad metrics records: " + "; ".join(problems[:5]) + more)
    return records


def remove_run(out, log) -> None:
    """--overwrite: remove the run in `out` (the pointer first, so it never dangles into removed files), saying what."""
    out = Path(out)
    held = run_contents(out)
    extra = [n for n in RUN_OUTPUTS[1:] if (out / n).exists()]
    if not held and not extra:
        return
    log(f"--overwrite: replacing the run in {out}: " + "; ".join(held + extra))
    link = out / POINTER
    if link.is_symlink():
        os.unlink(link)
    elif link.is_dir():
        shutil.rmtree(link)
    if (out / STEPS_DIR).is_dir():
        shutil.rmtree(out / STEPS_DIR)
    for name in RUN_OUTPUTS:
        p = out / name
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()


def clean_leftovers(out, log) -> None:
    """Remove what killed writers left (temporary step directories and pointer links, half-removed retention
    victims, ``.checkpoint.old-PID`` / ``.checkpoint.tmp-PID-*`` of felix.model.felix_lm.save_checkpoint) whose owner
    process is gone, and complete a save that was interrupted after its step directory was committed (a step
    directory newer than the pointer: complete, since the rename is the commit) by pointing at it."""
    out = Path(out)
    me = os.getpid()
    places = [out] + ([out / STEPS_DIR] if (out / STEPS_DIR).is_dir() else [])
    for place in places:
        for p in place.iterdir():
            if not p.name.startswith(".") or p.name == LOCK_FILE:
                continue
            pid = _leftover_pid(p.name)
            if pid is None or (pid != me and pid_alive(pid)):
                continue
            log(f"removing {p} (left by process {pid}, which is gone)")
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                os.unlink(p)
    steps, link = step_directories(out), out / POINTER
    if steps and (link.is_symlink() or not link.exists()):
        target = pointer_target(out)
        order = {p.resolve(): (s, v) for s, v, p in steps}
        newest = steps[-1]
        if target is None or order.get(target.resolve(), (-1, -1)) < newest[:2]:
            log(f"completing an interrupted checkpoint save: {POINTER} -> {STEPS_DIR}/{newest[2].name}")
            _point_at(out, newest[2])


def claim_run_directory(out, resume: bool, overwrite: bool = False, auto_resume: bool = False, log=print):
    """Lock run directory `out` and decide what this run does with it. Returns (lock, resume):

    * held by a live process -> RunDirectoryError naming the holder;
    * leftovers of killed writers are cleaned, an interrupted save completed (:func:`clean_leftovers`);
    * `auto_resume`: resume when a checkpoint exists, else start fresh (replacing metrics of a run that never
      reached its first checkpoint, with a log line);
    * `overwrite`: the old run is removed, saying what;
    * neither, nor `resume`: a directory holding a run is refused (RunDirectoryError naming the flags)."""
    if resume and overwrite:
        raise RunDirectoryError("give --resume (continue the run) or --overwrite (replace it), not both")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    lock = RunLock(out, log).acquire()
    try:
        clean_leftovers(out, log)
        if auto_resume and not overwrite:
            link = out / POINTER
            if link.is_dir() and not link.is_symlink():
                check_trainer_state(link)  # an older layout: refused with its message, never replaced silently
            resume = pointer_target(out) is not None
            if not resume and run_contents(out):
                log(f"--auto-resume: no checkpoint in {out} to continue; starting fresh")
                remove_run(out, log)
            elif resume:
                log(f"--auto-resume: continuing {out / POINTER} -> {pointer_target(out).relative_to(out)}")
        elif overwrite:
            remove_run(out, log)
        elif not resume:
            held = run_contents(out)
            if held:
                raise RunDirectoryError(
                    f"{out} already holds a run ({'; '.join(held)}): continue it with --resume "
                    f"(or --auto-resume), or replace it with --overwrite"
                )
    except BaseException:
        lock.release()
        raise
    return lock, resume


# ---------------------------------------------------------------------------------------------------------------
# checkpoints: versioned step directories behind an atomically replaced pointer


def _point_at(out: Path, step_dir: Path) -> None:
    link = out / POINTER
    if link.exists() and not link.is_symlink():
        raise CheckpointError(
            f"{link} is a directory (an older run layout), not the pointer Felix maintains; "
            f"move it away or start this run with --overwrite"
        )
    tmp = out / f".{POINTER}.tmp-{os.getpid()}"
    if tmp.is_symlink() or tmp.exists():
        os.unlink(tmp)
    os.symlink(os.path.join(STEPS_DIR, step_dir.name), tmp)
    os.replace(tmp, link)
    fsync_path(out, directory=True)


def commit_checkpoint(out, step: int, write_files, keep_last: int = 0, milestone_every: int = 0, log=print) -> Path:
    """Write a checkpoint of `step` (``write_files(directory)`` fills a fresh directory) as
    ``OUT/checkpoints/step-N`` and point ``OUT/checkpoint`` at it; then apply retention. Crash-safe at every
    operation (module docstring)."""
    out = Path(out)
    steps = out / STEPS_DIR
    if not steps.is_dir():
        os.mkdir(steps)
        fsync_path(out, directory=True)
    name, current = f"step-{step:08d}", pointer_target(out)
    final = steps / name
    version = 0
    while final.exists() and current is not None and final.resolve() == current.resolve():
        version += 1  # the same step saved again (e.g. resumed and stopped at once): a new version beside it
        final = steps / f"{name}-{version}"
    if final.exists():  # committed by a save whose pointer swap never happened: superseded by this one
        shutil.rmtree(final)
    tmp = steps / f".tmp-{final.name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    os.mkdir(tmp)
    try:
        write_files(tmp)
        for p in sorted(tmp.rglob("*")):
            if p.is_file():
                fsync_path(p)
        fsync_path(tmp, directory=True)
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_path(steps, directory=True)
    _point_at(out, final)
    apply_retention(out, keep_last, milestone_every, log)
    return final


def apply_retention(out, keep_last: int, milestone_every: int, log=print) -> None:
    """Remove step directories beyond the newest `keep_last` (0 keeps all), except milestones (steps divisible by
    `milestone_every`) and the pointer's target, which are never removed."""
    if keep_last <= 0:
        return
    out = Path(out)
    target = pointer_target(out)
    found = step_directories(out)
    keep = {p for _, _, p in found[-keep_last:]}
    keep |= {p for s, _, p in found if milestone_every and s % milestone_every == 0}
    for step, _, p in found:
        if p in keep or (target is not None and p.resolve() == target.resolve()):
            continue
        doomed = p.with_name(f".deleting-{p.name}-{os.getpid()}")
        os.rename(p, doomed)  # never a half-removed directory under a checkpoint's name
        shutil.rmtree(doomed)
