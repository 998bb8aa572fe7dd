"""Count the operations that make the host wait for the device, on any machine (a CPU included).

On a GPU, ``torch.cuda.set_sync_debug_mode("error")`` catches synchronizations; a CPU has none to catch. This
dispatch mode records, on any device, the aten operations that *would* synchronize a GPU stream: reading a
value to the host (``aten._local_scalar_dense``: ``.item()``, ``bool()``, ``float()``, ``int()``, Python
``if tensor``), and the ops whose output size depends on the data (``nonzero``, ``masked_select``, boolean
indexing, ``unique``, ...), plus explicit copies to the CPU of a non-CPU tensor. Used by the tests that
keep the training step free of avoidable syncs (tests/train/test_host_sync.py; tests/train/test_gpu_train.py checks the
same on a GPU with the CUDA sync debug mode).

Limitation: like every dispatch mode, it sees the aten ops a Felix custom op's *caller* runs and the custom op
itself, not the ops inside a backend's Python implementation; the tests call those implementations directly.
"""

from __future__ import annotations

import traceback

import torch
from torch.utils._python_dispatch import TorchDispatchMode

SYNCING_OPS = {
    "_local_scalar_dense",
    "nonzero",
    "masked_select",
    "unique",
    "_unique",
    "_unique2",
    "unique_consecutive",
    "unique_dim",
    "repeat_interleave",
    "_assert_async_msg_not_on_cpu",
}


_MACHINERY = ("host_sync", "torch/utils/_python_dispatch", "torch/_dynamo", "torch/_compile")


class HostSyncRecorder(TorchDispatchMode):
    """``with HostSyncRecorder() as rec: ...``; ``rec.syncs`` lists (op name, "file:line in function" of the
    innermost Python frame that asked)."""

    def __init__(self):
        super().__init__()
        self.syncs: list[tuple[str, str]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func._schema.name.split("::")[-1]
        to_cpu = (
            name in ("_to_copy", "copy_")
            and any(isinstance(a, torch.Tensor) and a.device.type != "cpu" for a in args)
            and (kwargs.get("device") is not None and torch.device(kwargs["device"]).type == "cpu")
        )
        bool_index = name in ("index", "index_put", "index_put_") and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] if len(args) > 1 else ()) or ()
        )
        if name in SYNCING_OPS or to_cpu or bool_index:
            stack = [f for f in traceback.extract_stack()[:-1] if not any(part in f.filename for part in _MACHINERY)]
            inner = stack[-1] if stack else None
            self.syncs.append((name, f"{inner.filename}:{inner.lineno} in {inner.name}" if inner else "?"))
        return func(*args, **kwargs)
