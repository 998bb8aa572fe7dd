"""`felix train` under torchrun, 2 processes, gloo on the CPU: DDP and FSDP2 give the single-process loss curve.

Equivalence (felix/train/distributed.py): W ranks x per-rank batch B x accumulation A see, step for step, the same
micro-batches as one process with batch B and --grad-accum W*A; the loss is their mean either way. What can
differ is only floating-point association:

* W = 2, A = 1. One process accumulates .grad = fl(g0/2 + g1/2); DDP all-reduces fl(g0 + g1) and divides by
  2. Halving is exact and fl(a + b) = fl(b + a), so the gradients are bit-identical, and so is everything after
  (the optimizer is elementwise, the clip norm is computed from identical full gradients): the curves must be
  EQUAL. FSDP2 reduce-scatters the same two-term sums (bit-identical shards); only the clip norm's sum of
  squares is associated differently (per shard, then across ranks), a relative change delta <= 2 * 2^-24 of
  the clip coefficient per step, which Adam's m / sqrt(v) passes on at most as a relative change delta of
  each update. Over S steps |d theta| <= S * lr * delta * sqrt(P) (2-norm, P parameters, per-element updates
  <= lr), so |dL| <= |grad L| * S * lr * delta * sqrt(P): for S = 6, lr = 3e-3, P = 1e6, |grad L| <= 10:
  ~4e-5. Measured: 0 (equal).
* W = 2, A = 2 (no_sync on the first micro-batch): each rank sums its two halves first, so the four-term sum
  is associated differently from one process's running sum: delta <= 3 * 2^-24 relative per gradient
  element, the same bound with 3 instead of 2: ~6e-5. BOUND = 1e-4 covers both.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from felix.train.runs import load_trainer_state
from felix.train.loop import TrainConfig, train

BOUND = 1e-4
ROOT = Path(__file__).resolve().parents[2]
STEPS = 6


def _data(tmp_path) -> Path:
    import random

    rng = random.Random(0)
    words = 'the model trains on json structure and refusal paths with margins over tokens { } : " , true false'.split()
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(json.dumps({"text": " ".join(rng.choice(words) for _ in range(150))}) for _ in range(80)))
    return path


def _common(data, **over):
    args = dict(
        preset="tiny",
        data=[str(data)],
        steps=STEPS,
        batch_size=2,
        seq_len=32,
        eval_every=3,
        eval_batches=1,
        warmup_steps=1,
        device="cpu",
        vocab_size=300,
    )
    args.update(over)
    return args


def _torchrun(tmp_path, out, args: dict, extra=()):
    cli = ["--" + k.replace("_", "-") + "=" + (v[0] if isinstance(v, list) else str(v)) for k, v in args.items()]
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "felix",
        "train",
        *cli,
        f"--out-dir={out}",
        *extra,
    ]
    run = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return run


def _losses(out) -> list[float]:
    return load_trainer_state(Path(out) / "checkpoint")["step_losses"]


def _weights(out):
    from safetensors.torch import load_file

    return load_file(str(Path(out) / "checkpoint" / "model.safetensors"))


@pytest.fixture(scope="module")
def single_runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dist")
    data = _data(tmp)
    torch.set_num_threads(1)  # as the torchrun ranks (OMP_NUM_THREADS=1): same GEMM blocking
    a2 = train(TrainConfig(**_common(data, grad_accum=2, out_dir=str(tmp / "single-a2"))), log=lambda *a: None)
    a4 = train(
        TrainConfig(
            **_common(
                data, grad_accum=4, out_dir=str(tmp / "single-a4"), tokenizer=str(tmp / "single-a2" / "checkpoint")
            )
        ),
        log=lambda *a: None,
    )
    return tmp, data, a2.step_losses, a4.step_losses


def test_ddp_equals_single_process(single_runs):
    tmp, data, single, _ = single_runs
    args = _common(data, grad_accum=1, tokenizer=str(tmp / "single-a2" / "checkpoint"))
    run = _torchrun(tmp, tmp / "ddp", {**args, "parallel": "ddp"})
    assert _losses(tmp / "ddp") == single  # W = 2, A = 1: bit-identical (module docstring)
    assert run.stdout.count("finished at step") == 1  # rank-0 logging
    ref = _weights(tmp / "single-a2")
    got = _weights(tmp / "ddp")
    assert got.keys() == ref.keys() and all(torch.equal(got[k], ref[k]) for k in ref)


def test_fsdp2_matches_single_process_and_resumes_exactly(single_runs):
    tmp, data, single, _ = single_runs
    args = _common(data, grad_accum=1, tokenizer=str(tmp / "single-a2" / "checkpoint"), parallel="fsdp")
    _torchrun(tmp, tmp / "fsdp", args)
    fsdp = _losses(tmp / "fsdp")
    assert len(fsdp) == STEPS and max(abs(a - b) for a, b in zip(fsdp, single)) <= BOUND
    # consolidated checkpoint: the same model.safetensors a single process writes, loadable by felix
    from felix.model.felix_lm import load_checkpoint

    model = load_checkpoint(tmp / "fsdp" / "checkpoint")
    ref = _weights(tmp / "single-a2")
    assert all((model.state_dict()[k] - ref[k]).abs().max() <= 1e-4 for k in ref)
    # exact resume: stop at 3, resume to 6 == the uninterrupted FSDP2 run
    _torchrun(tmp, tmp / "fsdp-resume", args, extra=["--stop-at=3"])
    _torchrun(tmp, tmp / "fsdp-resume", args, extra=["--resume"])
    assert _losses(tmp / "fsdp-resume") == fsdp


def test_ddp_gradient_accumulation_with_no_sync(single_runs):
    tmp, data, _, single_a4 = single_runs
    args = _common(data, grad_accum=2, tokenizer=str(tmp / "single-a2" / "checkpoint"), parallel="ddp")
    _torchrun(tmp, tmp / "ddp-a2", args)
    got = _losses(tmp / "ddp-a2")
    assert len(got) == STEPS and max(abs(a - b) for a, b in zip(got, single_a4)) <= BOUND
