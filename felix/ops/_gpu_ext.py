"""Loads the optional GPU extension `felix._C_gpu` (csrc/hip: the HIP/CUDA quantized matmul), or explains
why it is missing. Felix imports and works without it: the Triton and reference backends remain."""

from __future__ import annotations

import functools
import importlib

import torch


@functools.lru_cache(maxsize=None)
def load():
    """Return (module, "") or (None, reason)."""
    if torch.version.cuda is None and torch.version.hip is None:
        return None, (
            f"torch {torch.__version__} is a CPU build: the HIP/CUDA extension felix._C_gpu needs a CUDA or ROCm torch"
        )
    try:
        ext = importlib.import_module("felix._C_gpu")
    except ImportError as exc:
        kind = "ROCm (hipcc)" if torch.version.hip else "CUDA (nvcc)"
        return None, (
            f"the GPU extension felix._C_gpu is not built ({exc}); rebuild with "
            f"`pip install --no-build-isolation -e .` where torch and the {kind} toolkit are installed"
        )
    if not torch.cuda.is_available():
        return None, "felix._C_gpu is built, but torch sees no CUDA/ROCm device"
    return ext, ""
