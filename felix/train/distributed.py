"""`felix train` on several processes: torchrun with DDP or FSDP2 (torch.distributed.fsdp.fully_shard).

The trainer (felix/train/loop.py) asks one object, :func:`from_environment`, for everything that differs between
one process and many; without torchrun's environment it is :class:`SingleProcess` and nothing changes.

Under torchrun (``WORLD_SIZE`` > 1), :class:`Distributed`:

* starts the process group (NCCL/RCCL on GPUs, gloo on CPUs) and puts rank r on ``cuda:LOCAL_RANK``;
* wraps the model so its loss runs through a module *forward* (:class:`LossModule`), which DDP's reducer
  and FSDP2's root hooks need: ``ddp`` -> DistributedDataParallel; ``fsdp`` -> ``fully_shard`` on every
  block, then on the root (parameters, gradients and optimizer state sharded; full precision);
* splits every optimizer step's micro-batches: all ranks follow the same stream cursor, rank r reads
  micro-batches r, r + W, r + 2W, ... and skips the others without reading them (so the data cursor -- and
  resume -- is the same on every rank, and the ranks read disjoint samples);
* skips the gradient all-reduce / reduce-scatter on all but the last micro-batch of a step (DDP
  ``no_sync``, FSDP2 ``set_requires_gradient_sync(False)``);
* averages the logged loss parts over ranks once per logging interval;
* writes consolidated checkpoints: the full model state dict (gathered from the shards) as the same
  ``model.safetensors`` a single-process run writes, and the full optimizer state in the trainer state
  (``trainer_state.safetensors`` + ``.json``, felix.train.runs), by rank 0 only (rank 0 also holds the run directory's
  lock); resume loads them on every rank and re-shards. A checkpoint is interchangeable between
  1 process, DDP and FSDP2.

Equivalence: with W ranks, per-rank batch B and accumulation A, one step sees W·A micro-batches of B rows
-- the same as a single process with batch B and ``--grad-accum`` W·A, micro-batch for micro-batch; the
loss is the mean over those micro-batches either way. tests/train/test_distributed.py derives how close the curves
must be and checks it with 2 gloo processes on a CPU.
"""

from __future__ import annotations

import contextlib
import datetime
import os

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)
from torch.nn.parallel import DistributedDataParallel

PARALLEL_MODES = ("ddp", "fsdp")


class LossModule(nn.Module):
    """The model's training loss as ``forward`` (DDP and FSDP2 hook module calls, not other methods)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, tokens, targets, whitelist=None, margin=2.0, lambda_q=0.0):
        return self.model.loss(tokens, targets, whitelist, margin, lambda_q)

    def loss(self, tokens, targets, whitelist=None, margin=2.0, lambda_q=0.0):
        return self(tokens, targets, whitelist, margin, lambda_q)


class SingleProcess:
    """One process: the trainer's behaviour before distributed training existed, unchanged."""

    world_size, rank, is_main, mode = 1, 0, True, None

    def device(self, requested: torch.device) -> torch.device:
        return requested

    def wrap(self, model):
        return model

    def my_micro_batches(self, stream, batch_size: int, grad_accum: int):
        return [stream.next_batch(batch_size) for _ in range(grad_accum)]

    def gradient_sync(self, module, last: bool):
        return contextlib.nullcontext()

    def mean_over_ranks(self, t: torch.Tensor) -> torch.Tensor:
        return t

    def full_model_state(self, model, module) -> dict:
        return model.state_dict()

    def full_optimizer_state(self, module, optimizer) -> dict:
        return optimizer.state_dict()

    def load_optimizer_state(self, module, optimizer, state: dict) -> None:
        optimizer.load_state_dict(state)

    def any_rank(self, flag: bool, device: torch.device) -> bool:
        """True when `flag` is true on any rank (a run-directory claim failed, a stop signal arrived)."""
        return flag

    def barrier(self) -> None:
        pass

    def close(self) -> None:
        pass


class Distributed(SingleProcess):
    def __init__(self, mode: str):
        if mode not in PARALLEL_MODES:
            raise ValueError(f"parallel mode must be one of {', '.join(PARALLEL_MODES)}, got {mode!r}")
        self.mode = mode
        self.local_rank = int(os.environ.get("LOCAL_RANK", 0))
        if not dist.is_initialized():
            backend = "nccl" if torch.cuda.is_available() else "gloo"
            dist.init_process_group(backend, timeout=datetime.timedelta(minutes=30))
        self.dist = dist
        self.world_size, self.rank = dist.get_world_size(), dist.get_rank()
        self.is_main = self.rank == 0

    def device(self, requested: torch.device) -> torch.device:
        if requested.type == "cuda":
            torch.cuda.set_device(self.local_rank)
            return torch.device("cuda", self.local_rank)
        return requested

    def wrap(self, model):
        module = LossModule(model)
        if self.mode == "ddp":

            class LossDDP(DistributedDataParallel):
                def loss(self, *args):  # the trainer's call, through DDP's forward
                    return self(*args)

            device_ids = [self.local_rank] if next(model.parameters()).is_cuda else None
            return LossDDP(module, device_ids=device_ids)
        from torch.distributed.fsdp import fully_shard  # local: here since torch 2.6; setup.py allows 2.5 (ddp only)

        for block in model.blk:
            fully_shard(block)
        fully_shard(module)
        return module

    def my_micro_batches(self, stream, batch_size: int, grad_accum: int):
        mine = []
        for m in range(grad_accum * self.world_size):
            if m % self.world_size == self.rank:
                mine.append(stream.next_batch(batch_size))
            else:
                stream.skip(batch_size)  # another rank's micro-batch: the cursor moves, nothing is read
        return mine

    def gradient_sync(self, module, last: bool):
        if self.mode == "ddp":
            return contextlib.nullcontext() if last else module.no_sync()
        module.set_requires_gradient_sync(last)
        return contextlib.nullcontext()

    def mean_over_ranks(self, t: torch.Tensor) -> torch.Tensor:
        t = t.clone()
        self.dist.all_reduce(t)
        return t / self.world_size

    def full_model_state(self, model, module) -> dict:
        if self.mode == "ddp":
            return model.state_dict()
        full = get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return {k.removeprefix("model."): v for k, v in full.items()}

    def full_optimizer_state(self, module, optimizer) -> dict:
        if self.mode == "ddp":
            return optimizer.state_dict()
        return get_optimizer_state_dict(
            module, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
        )

    def load_optimizer_state(self, module, optimizer, state: dict) -> None:
        if self.mode == "ddp":
            optimizer.load_state_dict(state)
            return
        set_optimizer_state_dict(module, optimizer, state, options=StateDictOptions(full_state_dict=True))

    def any_rank(self, flag: bool, device: torch.device) -> bool:
        t = torch.tensor([float(flag)], device=device)
        self.dist.all_reduce(t, op=self.dist.ReduceOp.MAX)
        return bool(t.item())

    def barrier(self) -> None:
        self.dist.barrier()

    def close(self) -> None:
        if self.dist.is_initialized():
            self.dist.destroy_process_group()


def from_environment(mode: str = "ddp") -> SingleProcess:
    """:class:`Distributed` under torchrun (WORLD_SIZE > 1), else :class:`SingleProcess`."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return Distributed(mode)
    return SingleProcess()


class StateView:
    """What felix.model.felix_lm.save_checkpoint reads from a model (``state_dict()`` and ``cfg``), given full tensors."""

    def __init__(self, state: dict, cfg):
        self._state, self.cfg = state, cfg

    def state_dict(self) -> dict:
        return self._state
