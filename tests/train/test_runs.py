"""Run safety (felix.train.runs + the trainer): no pickle on resume, run-directory ownership and its lock, crash-safe
checkpoints at every filesystem operation, retention, the on-device step guard (non-finite losses, loss spikes,
too many skipped steps in a row), SIGTERM and --auto-resume."""

from __future__ import annotations

import json
import math
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from felix.model import felix_lm as felix_model
from felix.train import runs
from felix.testing.payload import pickle_payload
from felix.model.felix_lm import CheckpointError, FelixLM
from felix.train.loop import TrainConfig, TrainingHalted, train

ROOT = Path(__file__).resolve().parents[2]
QUIET = {"log": lambda *a: None}


def cfg_for(out, **kw):
    base = dict(
        preset="tiny",
        out_dir=str(out),
        vocab_size=300,
        seq_len=32,
        batch_size=4,
        steps=8,
        warmup_steps=1,
        eval_every=4,
        eval_batches=1,
        n_records=40,
        prose=False,
        seed=0,
        device="cpu",
    )
    return TrainConfig(**{**base, **kw})


def files_of(directory: Path) -> dict[str, bytes]:
    """Every file under `directory` (symlinks as their target text) by relative path."""
    found = {}
    for p in sorted(directory.rglob("*")):
        rel = str(p.relative_to(directory))
        if p.is_symlink():
            found[rel] = b"-> " + os.readlink(p).encode()
        elif p.is_file():
            found[rel] = p.read_bytes()
    return found


def weights(out) -> dict[str, torch.Tensor]:
    return load_file(str(Path(out) / "checkpoint" / "model.safetensors"))


def assert_same_weights(a, b):
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A finished 2-step run (copy it before changing it)."""
    out = tmp_path_factory.mktemp("finished") / "run"
    train(cfg_for(out, steps=2, eval_every=2), **QUIET)
    return out


@pytest.fixture(scope="module")
def reference_at_6(tmp_path_factory) -> Path:
    """An 8-step run stopped at step 6 (the state a run with steps 7, 8 skipped must keep)."""
    out = tmp_path_factory.mktemp("ref") / "run"
    train(cfg_for(out, eval_every=2), stop_at=6, **QUIET)
    return out


def test_trainer_state_round_trips_without_pickle():
    import random

    rng = random.Random(3)
    state = {
        "optimizer": {
            "state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.randn(2, 3)}},
            "param_groups": [{"params": [0], "betas": (0.9, 0.95), "fused": True}],
        },
        "python_rng": rng.getstate(),
        "losses": [1.5, math.nan, math.inf],
        "none": None,
        "__odd": {"x": 1},
        "torch_rng": torch.get_rng_state(),
    }
    tensors, skeleton = runs.flatten_state(state)
    text = json.dumps(skeleton, allow_nan=False)  # strict JSON: NaN / Inf are tagged
    back = runs.unflatten_state(tensors, json.loads(text))
    assert back["python_rng"] == rng.getstate() and isinstance(back["python_rng"], tuple)
    assert back["optimizer"]["param_groups"] == state["optimizer"]["param_groups"]
    assert torch.equal(back["optimizer"]["state"][0]["exp_avg"], state["optimizer"]["state"][0]["exp_avg"])
    assert back["losses"][0] == 1.5 and math.isnan(back["losses"][1]) and back["losses"][2] == math.inf
    assert back["__odd"] == {"x": 1} and back["none"] is None and torch.equal(back["torch_rng"], state["torch_rng"])
    with pytest.raises(TypeError, match="cannot store a set"):
        runs.flatten_state({"x": {1, 2}})


def test_a_planted_pickle_payload_never_runs_on_resume(tmp_path, finished):
    base = finished
    marker = tmp_path / "MARKER"
    payload = pickle_payload(marker)
    pickle.loads(payload)  # the payload works ...
    assert marker.exists()
    marker.unlink()
    in_checkpoint = sorted(p.name for p in (base / "checkpoint").iterdir())
    assert in_checkpoint == [
        "config.json",
        "model.safetensors",
        "run.yaml",
        "tokenizer.json",
        "trainer_state.json",
        "trainer_state.safetensors",
    ]
    # train() reads all but run.yaml, which `felix train --resume` resolves its settings from (a payload there:
    # tests/train/test_runconfig.py)
    read_on_resume = [name for name in in_checkpoint if name != "run.yaml"]
    for name in [*read_on_resume, "trainer_state.pt"]:
        out = tmp_path / f"planted-{name}"
        shutil.copytree(base, out, symlinks=True)
        ckpt = out / "checkpoint"
        if name == "trainer_state.pt":  # an older Felix's pickled trainer state
            for state_file in ("trainer_state.json", "trainer_state.safetensors"):
                (ckpt / state_file).unlink()
        (ckpt / name).write_bytes(payload)
        with pytest.raises((CheckpointError, ValueError, FileNotFoundError)) as err:
            train(cfg_for(out, steps=4, eval_every=2), resume=True, **QUIET)
        assert name in str(err.value), (name, str(err.value))
        assert not marker.exists(), f"the payload in {name} ran"
        if name == "trainer_state.pt":
            assert "--init-from" in str(err.value) and "no longer loads" in str(err.value)
        assert files_of(out)[f"checkpoints/step-00000002/{name}"] == payload  # refused, left as it was
    # the lock record and metrics.jsonl are read as bytes (the lock holder, the record count), never unpickled
    out = tmp_path / "planted-lock"
    shutil.copytree(base, out, symlinks=True)
    for name in (".lock", "metrics.jsonl"):
        (out / name).write_bytes(payload)
    logs = []
    train(cfg_for(out, steps=2, eval_every=2), resume=True, log=logs.append)
    assert not marker.exists() and any("taking over the stale lock" in line for line in logs)


def test_a_directory_holding_a_run_is_refused_and_left_intact(tmp_path, capsys, finished):
    from felix.cli.main import main

    out = tmp_path / "run"
    shutil.copytree(finished, out, symlinks=True)
    before = files_of(out)
    args = [
        "train",
        "--out-dir",
        str(out),
        "--n-records",
        "40",
        "--no-prose",
        "--vocab-size",
        "300",
        "--seq-len",
        "32",
        "--batch-size",
        "4",
        "--steps",
        "2",
        "--warmup-steps",
        "1",
        "--eval-every",
        "2",
        "--eval-batches",
        "1",
        "--device",
        "cpu",
    ]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "already holds a run" in err and "--resume" in err and "--overwrite" in err
    assert files_of(out) == before  # byte for byte: checkpoint, metrics, plot
    logs = []
    train(cfg_for(out, steps=2, eval_every=2, seed=1), overwrite=True, log=logs.append)
    assert any(
        line.startswith(f"--overwrite: replacing the run in {out}")
        and "metrics.jsonl (1 record(s))" in line
        and "checkpoint -> checkpoints/step-00000002" in line
        for line in logs
    ), logs
    assert (
        files_of(out)["checkpoints/step-00000002/model.safetensors"]
        != before["checkpoints/step-00000002/model.safetensors"]
    )  # another seed: really replaced


def test_a_live_run_directory_is_refused_and_a_stale_lock_taken_over(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            (
                "import fcntl, json, os, sys, time\n"
                f"fd = os.open({str(out / '.lock')!r}, os.O_RDWR | os.O_CREAT)\n"
                "fcntl.flock(fd, fcntl.LOCK_EX)\n"
                "os.write(fd, json.dumps({'pid': os.getpid(), 'host': 'lockhost', 'started': 'then'}).encode())\n"
                "print('locked', flush=True)\n"
                "time.sleep(120)\n"
            ),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(runs.RunDirectoryError, match=f"in use by pid {holder.pid} on host lockhost"):
            train(cfg_for(out, steps=2, eval_every=2), **QUIET)
    finally:
        holder.kill()  # dies holding the lock: the kernel drops the flock, the record stays
        holder.wait()
    assert str(holder.pid) in (out / ".lock").read_text()
    logs = []
    train(cfg_for(out, steps=2, eval_every=2), log=logs.append)
    assert any("taking over the stale lock" in line and f"pid {holder.pid}" in line for line in logs), logs
    assert (out / ".lock").read_text() == ""  # released on exit
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [2]


def test_retention_keeps_the_last_k_and_the_milestones(tmp_path):
    out = tmp_path / "run"
    train(cfg_for(out, steps=6, eval_every=6, checkpoint_every=1, keep_last=2, milestone_every=4), **QUIET)
    assert [s for s, _, _ in runs.step_directories(out)] == [4, 5, 6]
    assert os.readlink(out / "checkpoint") == os.path.join("checkpoints", "step-00000006")
    assert sorted(p.name for p in out.iterdir()) == [
        ".lock",
        "checkpoint",
        "checkpoints",
        "data",
        "loss_curve.png",
        "metrics.jsonl",
        "run.yaml",
    ]


class Killed(BaseException):
    """The injected crash (a BaseException, as a kill: no handler of the writer may swallow it)."""


FS_OPS = [
    (os, "rename"),
    (os, "replace"),
    (os, "symlink"),
    (os, "unlink"),
    (os, "mkdir"),
    (os, "fsync"),
    (shutil, "rmtree"),
]


def inject_crash(monkeypatch, at: int):
    """From the `at`-th filesystem operation on, every one raises Killed (the process is dead from there on);
    returns the counter: calls["n"] operations were attempted."""
    calls = {"n": 0, "armed": False}
    for mod, name in FS_OPS:
        real = getattr(mod, name)

        def op(*args, _real=real, **kwargs):
            if calls["armed"]:
                calls["n"] += 1
                if calls["n"] >= at:
                    raise Killed(f"crash at filesystem operation {calls['n']}")
            return _real(*args, **kwargs)

        monkeypatch.setattr(mod, name, op)
    return calls


def test_a_crash_at_any_filesystem_operation_of_a_save_leaves_a_resumable_run(tmp_path, monkeypatch):
    """Steps 0-2 committed; the save of step 4 is killed at its k-th filesystem operation, for every k (retention
    included: keep_last 1 removes step 2 after the commit). The next run (its cleanup and roll-forward) finds a
    checkpoint of step 2 or step 4, equal to the uninterrupted run's; resuming from it reproduces that run."""
    from felix.train.loop import build_run, read_pending, save_run_checkpoint, train_step

    kw = dict(steps=4, eval_every=2, checkpoint_every=2, keep_last=1)
    full = train(cfg_for(tmp_path / "full", **kw), **QUIET)
    template = tmp_path / "template"
    train(cfg_for(template, **kw), stop_at=2, **QUIET)
    at_2 = runs.load_trainer_state(template / "checkpoint")
    shutil.copytree(template, tmp_path / "live", symlinks=True)
    run = build_run(cfg_for(tmp_path / "live", **kw), resume=True, **QUIET)  # the run about to save step 4
    run.lock.release()
    while run.step < 4:
        train_step(run)
    read_pending(run)
    outcomes = {}
    for at in range(1, 100):
        out = tmp_path / f"crash-{at}"
        shutil.copytree(template, out, symlinks=True)
        run.out, run.ckpt_dir = out, out / "checkpoint"
        with monkeypatch.context() as m:
            calls = inject_crash(m, at)
            calls["armed"] = True
            try:
                save_run_checkpoint(run)
                crashed = False
            except Killed:
                crashed = True
        if not crashed:  # `at` is past the save's last operation: every crash point was tried
            break
        lock, resume = runs.claim_run_directory(out, resume=True, log=lambda *a: None)  # the next run's cleanup
        lock.release()
        state = runs.load_trainer_state(out / "checkpoint")
        felix_model.load_checkpoint(out / "checkpoint")
        outcomes[at] = state["step"]
        if state["step"] == 4:
            assert state["step_losses"] == full.step_losses
            assert_same_weights(out, tmp_path / "full")
        else:
            assert state["step"] == 2 and state["step_losses"] == at_2["step_losses"]
        hidden = [p.name for p in [*out.iterdir(), *(out / "checkpoints").iterdir()] if p.name.startswith(".")]
        assert hidden == [".lock"], (at, hidden)  # leftovers of the killed writer are gone
    assert len(outcomes) >= 12 and set(outcomes.values()) == {2, 4}, outcomes
    # end to end, from a crash before the commit and from one between the commit and the pointer swap
    for at in (1, next(a for a, s in outcomes.items() if s == 4)):
        resumed = train(cfg_for(tmp_path / f"crash-{at}", **kw), resume=True, **QUIET)
        assert resumed.step_losses == full.step_losses


def test_save_checkpoint_never_removes_the_old_copy_first(tmp_path, monkeypatch, gen):
    cfg = felix_model.FelixConfig(
        vocab_size=64, n_layer=2, d_model=64, n_head=2, n_kv_head=1, ffn_hidden=64, max_seq_len=16
    )
    old, new = FelixLM(cfg), FelixLM(cfg)
    with torch.no_grad():
        for p in new.parameters():
            p.add_(1.0)
    tokens = torch.randint(0, 64, (1, 8), generator=gen)
    want = {"old": old(tokens), "new": new(tokens)}
    seen = set()
    for at in range(1, 100):
        directory = tmp_path / f"ck-{at}"
        felix_model.save_checkpoint(directory, old)
        with monkeypatch.context() as m:
            calls = inject_crash(m, at)
            calls["armed"] = True
            try:
                felix_model.save_checkpoint(directory, new)
                crashed = False
            except Killed:
                crashed = True
        got = felix_model.load_checkpoint(directory)(tokens)
        seen |= {k for k, v in want.items() if torch.equal(got, v)}
        assert any(torch.equal(got, v) for v in want.values()), at
        if not crashed:
            break
    assert seen == {"old", "new"}


def nan_or_spike_from(monkeypatch, first_step: int, factor: float, last_step: int | None = None):
    """Training calls of FelixLM.loss (one per step at grad_accum 1) from `first_step` on return loss * factor."""
    real = FelixLM.loss
    calls = {"n": 0}

    def loss(self, *args, **kwargs):
        parts = real(self, *args, **kwargs)
        if torch.is_grad_enabled():
            calls["n"] += 1
            if first_step <= calls["n"] <= (last_step or 10**9):
                parts = parts._replace(loss=parts.loss * factor, ce=parts.ce * factor)
        return parts

    monkeypatch.setattr(FelixLM, "loss", loss)


def test_non_finite_steps_are_skipped_and_too_many_in_a_row_halt(tmp_path, monkeypatch, reference_at_6):
    kw = dict(steps=8, eval_every=2, max_skipped_in_a_row=2)
    logs = []
    with monkeypatch.context() as m:
        nan_or_spike_from(m, 7, float("nan"))
        with pytest.raises(TrainingHalted, match="2 steps in a row skipped"):
            train(cfg_for(tmp_path / "nan", **kw), log=logs.append)
    assert any("step 7: update skipped: loss nan" in line for line in logs), logs
    state = runs.load_trainer_state(tmp_path / "nan" / "checkpoint")
    assert state["step"] == 8 and state["skipped_steps"] == 2
    assert all(math.isnan(x) for x in state["step_losses"][6:])
    assert_same_weights(tmp_path / "nan", reference_at_6)  # the skipped steps changed nothing
    ref = runs.load_trainer_state(reference_at_6 / "checkpoint")
    for k, v in ref["optimizer"]["state"].items():  # nor the optimizer state (step counts included)
        assert all(torch.equal(v[name], state["optimizer"]["state"][k][name]) for name in v)
    last = json.loads((tmp_path / "nan" / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["step"] == 8 and last["skipped_steps"] == 2 and last["train_ce"] is None


def test_loss_spikes_are_logged_and_optionally_skipped(tmp_path, monkeypatch, reference_at_6):
    """A step whose loss is 50x the recent ones: logged (log line, metrics.jsonl) and, with skip_loss_spikes,
    skipped: the weights stay those of step 6."""
    out, logs = tmp_path / "spike", []
    with monkeypatch.context() as m:
        nan_or_spike_from(m, 7, 50.0, last_step=7)
        result = train(
            cfg_for(out, eval_every=1, loss_spike_window=4, loss_spike_threshold=3.0, skip_loss_spikes=True),
            stop_at=7,
            log=logs.append,
        )
    spikes = [s for r in result.metrics for s in r["loss_spikes"]]
    assert [s["step"] for s in spikes] == [7] and spikes[0]["z"] > 3.0 and spikes[0]["skipped"] is True
    assert json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])["loss_spikes"] == spikes
    assert any("step 7: loss spike" in line and "update skipped" in line for line in logs)
    assert_same_weights(out, reference_at_6)


def test_sigterm_saves_and_auto_resume_continues_exactly(tmp_path):
    out = tmp_path / "run"
    args = [
        "--out-dir",
        str(out),
        "--n-records",
        "40",
        "--no-prose",
        "--vocab-size",
        "300",
        "--seq-len",
        "32",
        "--batch-size",
        "4",
        "--steps",
        "300",
        "--warmup-steps",
        "1",
        "--eval-every",
        "2",
        "--eval-batches",
        "1",
        "--device",
        "cpu",
    ]
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.Popen(
        [sys.executable, "-m", "felix", "train", "--auto-resume", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    deadline = time.monotonic() + 120
    while not ((out / "metrics.jsonl").is_file() and (out / "metrics.jsonl").read_text().strip()):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[0]
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    output = proc.communicate(timeout=120)[0]
    assert proc.returncode == 0, output
    assert "SIGTERM: finishing this step" in output and "stopped by SIGTERM at step" in output
    stopped = runs.load_trainer_state(out / "checkpoint")["step"]
    assert 2 <= stopped < 300
    torch.set_num_threads(1)  # as the subprocess (OMP_NUM_THREADS=1): the same arithmetic
    cfg = cfg_for(out, steps=300, eval_every=2)
    logs = []
    resumed = train(cfg, auto_resume=True, stop_at=stopped + 2, log=logs.append)
    assert any(line.startswith("--auto-resume: continuing") for line in logs)
    straight = train(
        cfg_for(tmp_path / "straight", steps=300, eval_every=2), auto_resume=True, stop_at=stopped + 2, **QUIET
    )  # --auto-resume on an empty directory starts fresh
    assert resumed.step_losses == straight.step_losses and len(straight.step_losses) == stopped + 2


def test_tensorboard_logs_beside_metrics(tmp_path):
    pytest.importorskip("tensorboard")
    out = tmp_path / "run"
    train(cfg_for(out, steps=2, eval_every=2, tensorboard=True), **QUIET)
    assert any(p.name.startswith("events.out.tfevents") for p in (out / "tensorboard").iterdir())
