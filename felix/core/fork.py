"""The llama.cpp fork Felix ships to: what its ``felix`` architecture loads, and where its CPU build lives here.

The fork (public repository AppSprout-dev/llama.cpp, branch ``felix``) adds RQ4 (ggml type 42) and the ``felix``
arch: a llama block followed, in every layer, by a gated low-rank "spoke" residual (src/models/felix.cpp)::

    h += sigmoid(gate_bias) * W_up · silu(W_down · rmsnorm(h, spoke_norm)) / n_spokes

Its loader (src/llama-model.cpp, ``case LLM_ARCH_FELIX``) is strict, and this module is the one place Felix
writes that down (docs/fork.md has the prose):

* metadata ``felix.num_spokes`` and ``felix.spoke_rank`` are required, like the llama keys
  (``felix.attention.layer_norm_rms_epsilon`` ...);
* every layer needs ``blk.N.spoke.norm.weight`` [d] and ``blk.N.spoke.gate_bias`` [1], and either the fused
  pair ``blk.N.spoke.w_down_fused.weight`` [S*r, d] / ``w_up_fused.weight`` [d, S*r] or, per spoke s,
  ``blk.N.spoke.w_down.s.weight`` [r, d] / ``w_up.s.weight`` [d, r] (shapes in PyTorch order);
* it knows no other tensors: a file with any extra tensor (a native SpliceCore tensor, say) fails with
  "wrong number of tensors".

A model with spokes (felix.model.spokes) exports them as they are, in the fused form (:func:`spoke_tensors_for`); for a
model without spokes the exporter writes :func:`noop_spoke_tensors`: one spoke of rank 1 whose W_down and W_up
are zero. ``W_up = 0`` makes the spoke's update exactly 0.0 in floating point (0 · anything
finite), so the fork computes the same numbers as the plain llama block: an exact no-op, not an approximation.
:func:`check_loadable` applies the loader's rules to what an export is about to write, so a file the fork
would reject is refused before a byte is written.

The CPU build: ``scripts/setup.sh --test`` runs ``../shared/llama-fork/build.sh`` once per machine into
:func:`build_dir` (``$FELIX_LLAMA_FORK_DIR``, default ``~/.cache/felix-llama-fork``). It leaves the fork's
shared libraries in ``cmake-build/bin`` and the llama-cpp-python sources it was vendored from beside them;
:func:`worker_environment` points a Python process at both (``LLAMA_CPP_LIB_PATH``, which llama-cpp-python
honours, and ``PYTHONPATH``). The stock and fork ``llama_cpp`` modules cannot share a process, so the fork
always runs in a worker process (felix.ship.llamacpp).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from felix.core.formats import FORMATS, RUNTIME_TYPES

ARCH = "felix"
NUM_SPOKES_KEY = f"{ARCH}.num_spokes"
SPOKE_RANK_KEY = f"{ARCH}.spoke_rank"

# The fork's spoke tensor names (src/llama-arch.cpp: LLM_TENSOR_SPOKE_*), one table.
SPOKE_TENSOR_NAMES = {
    "norm": "blk.{layer}.spoke.norm.weight",
    "gate_bias": "blk.{layer}.spoke.gate_bias",
    "w_down_fused": "blk.{layer}.spoke.w_down_fused.weight",
    "w_up_fused": "blk.{layer}.spoke.w_up_fused.weight",
    "w_down": "blk.{layer}.spoke.w_down.{spoke}.weight",
    "w_up": "blk.{layer}.spoke.w_up.{spoke}.weight",
}
# The hub: the llama block's tensors (same names as the stock llama arch, and as felix.model.felix_lm's parameters).
LAYER_TENSORS = ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm", "ffn_gate", "ffn_up", "ffn_down")
# ggml types that only the fork knows (stock llama.cpp rejects a file holding one): felix.core.formats' table says which
FORK_ONLY_TYPES = tuple(name for name in RUNTIME_TYPES["fork"] if name not in RUNTIME_TYPES["stock"])


def runtime_of(quant: str) -> str:
    """The llama.cpp runtime an export to `quant` runs in: "fork" for the fork-only formats (RQ4), else "stock"."""
    return FORMATS[quant].runtime if quant in FORMATS else "stock"


def arch_of(quant: str) -> str:
    """The GGUF architecture an export to `quant` is written in: the fork's ``felix`` arch for fork-only formats."""
    return ARCH if runtime_of(quant) == "fork" else "llama"


# (num_spokes, spoke_rank) of the exact no-op spoke written for a model without spokes
NOOP_SPOKES = (1, 1)
# The per-spoke form (w_down.S / w_up.S) lands in fixed arrays of 4 per layer (src/llama-model.h: spoke_w_down[4]);
# more spokes than that only load in the fused form. Felix writes the fused form.
MAX_PER_SPOKE_TENSORS = 4
UINT32_MAX = 2**32 - 1

DEFAULT_BUILD_DIR = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "felix-llama-fork"


class ForkLoadError(ValueError):
    """What an export would write is something the fork's felix arch cannot load."""


# ------------------------------------------------------------------------------------ the file the fork loads
def hub_shapes(cfg) -> dict[str, tuple[int, ...]]:
    """Every non-spoke tensor a felix-arch file of FelixConfig `cfg` holds, by name, in PyTorch order."""
    d, kv, f = cfg.d_model, cfg.n_kv_head * cfg.head_dim, cfg.ffn_hidden
    per_layer = {
        "attn_norm": (d,),
        "attn_q": (d, d),
        "attn_k": (kv, d),
        "attn_v": (kv, d),
        "attn_output": (d, d),
        "ffn_norm": (d,),
        "ffn_gate": (f, d),
        "ffn_up": (f, d),
        "ffn_down": (d, f),
    }
    shapes = {"token_embd.weight": (cfg.vocab_size, d), "output_norm.weight": (d,)}
    if not cfg.tie_embeddings:
        shapes["output.weight"] = (cfg.vocab_size, d)
    for i in range(cfg.n_layer):
        shapes.update({f"blk.{i}.{t}.weight": s for t, s in per_layer.items()})
    return shapes


def spoke_shapes(
    n_layer: int, d_model: int, num_spokes: int, spoke_rank: int, fused: bool = True
) -> dict[str, tuple[int, ...]]:
    """The spoke tensors the fork requires in every layer (fused pair, or per-spoke pairs), PyTorch order."""
    out = {}
    for i in range(n_layer):
        out[SPOKE_TENSOR_NAMES["norm"].format(layer=i)] = (d_model,)
        out[SPOKE_TENSOR_NAMES["gate_bias"].format(layer=i)] = (1,)
        if fused:
            out[SPOKE_TENSOR_NAMES["w_down_fused"].format(layer=i)] = (num_spokes * spoke_rank, d_model)
            out[SPOKE_TENSOR_NAMES["w_up_fused"].format(layer=i)] = (d_model, num_spokes * spoke_rank)
        else:
            for s in range(num_spokes):
                out[SPOKE_TENSOR_NAMES["w_down"].format(layer=i, spoke=s)] = (spoke_rank, d_model)
                out[SPOKE_TENSOR_NAMES["w_up"].format(layer=i, spoke=s)] = (d_model, spoke_rank)
    return out


def noop_spoke_tensors(n_layer: int, d_model: int) -> dict[str, torch.Tensor]:
    """Spoke tensors that make the fork's spoke residual exactly zero: norm 1, gate_bias 0, W_down = W_up = 0."""
    num_spokes, rank = NOOP_SPOKES
    out = {}
    for name, shape in spoke_shapes(n_layer, d_model, num_spokes, rank).items():
        out[name] = torch.ones(shape) if name.endswith(".norm.weight") else torch.zeros(shape)
    return out


def spoke_tensors_for(cfg, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The fused spoke tensors of every layer for a model with `cfg.n_spokes` spokes of rank `cfg.spoke_rank`:
    the model's own (from `state`, float32) where a layer has spokes, exact no-op spokes of the same shape
    (W_up = 0) where it has none, since the fork needs them in every layer."""
    out = {}
    for name, shape in spoke_shapes(cfg.n_layer, cfg.d_model, cfg.n_spokes, cfg.spoke_rank).items():
        if name in state:
            out[name] = state[name].detach().float()
        else:
            out[name] = torch.ones(shape) if name.endswith(".norm.weight") else torch.zeros(shape)
    return out


def is_spoke_tensor(name: str) -> bool:
    return ".spoke." in name


def spokes_are_noop(tensors: dict[str, torch.Tensor]) -> bool:
    """True when every spoke's W_up (fused or per spoke) is all zero: the spokes change nothing."""
    ups = [v for k, v in tensors.items() if is_spoke_tensor(k) and ".w_up" in k]
    return all(not bool(v.any()) for v in ups)


def check_loadable(shapes: dict[str, tuple[int, ...]], metadata: dict, cfg) -> None:
    """Raise ForkLoadError listing every rule of the fork's felix loader that a file with these tensors
    (name -> PyTorch shape) and metadata would break."""
    problems = []
    for key in (NUM_SPOKES_KEY, SPOKE_RANK_KEY):
        if key not in metadata:
            problems.append(f"metadata {key} is missing (the fork requires it)")
    n_spokes, rank = int(metadata.get(NUM_SPOKES_KEY, 0)), int(metadata.get(SPOKE_RANK_KEY, 0))
    if NUM_SPOKES_KEY in metadata and (n_spokes < 1 or rank < 1):
        problems.append(
            f"num_spokes {n_spokes} and spoke_rank {rank} must be >= 1: the fork requires spoke "
            "tensors in every layer, and a zero-sized one cannot be created"
        )
    if max(n_spokes, rank, n_spokes * rank) > UINT32_MAX:
        problems.append(f"num_spokes {n_spokes} x spoke_rank {rank} does not fit the fork's uint32 metadata")
    want = dict(hub_shapes(cfg))
    fused_names = {SPOKE_TENSOR_NAMES["w_down_fused"].format(layer=i) for i in range(cfg.n_layer)}
    fused = any(n in shapes for n in fused_names) or not any(".spoke.w_down." in n for n in shapes)
    if not fused and n_spokes > MAX_PER_SPOKE_TENSORS:
        problems.append(
            f"{n_spokes} spokes in the per-spoke form (w_down.S / w_up.S): the fork holds at most "
            f"{MAX_PER_SPOKE_TENSORS} per layer; write the fused form (w_down_fused / w_up_fused)"
        )
    elif n_spokes >= 1 and rank >= 1:
        want.update(spoke_shapes(cfg.n_layer, cfg.d_model, n_spokes, rank, fused=fused))
    missing = [n for n in want if n not in shapes]
    extra = [n for n in shapes if n not in want]
    wrong = [
        f"{n} {tuple(shapes[n])} (the fork expects {want[n]})"
        for n in want
        if n in shapes and tuple(shapes[n]) != tuple(want[n])
    ]
    if missing:
        problems.append(
            f"missing tensor(s) the fork requires: {', '.join(missing[:6])}"
            + (f" and {len(missing) - 6} more" if len(missing) > 6 else "")
        )
    if extra:
        problems.append(
            f"tensor(s) the felix arch does not know ({len(extra)}; the fork fails with 'wrong number of "
            f"tensors'): {', '.join(extra[:6])}"
        )
    if wrong:
        problems.append("mis-shaped: " + "; ".join(wrong[:6]))
    if cfg.head_dim % 2:
        problems.append(f"head_dim {cfg.head_dim} must be even (the fork ropes the whole head)")
    if problems:
        raise ForkLoadError(
            "the llama.cpp fork could not load this felix-arch file, so nothing was written:\n  "
            + "\n  ".join(problems)
        )


# ------------------------------------------------------------------------------------ the CPU build
def build_dir() -> Path:
    return Path(os.environ.get("FELIX_LLAMA_FORK_DIR") or DEFAULT_BUILD_DIR)


def lib_dir() -> Path:
    """The fork's shared libraries (libllama.so, libggml-base.so, ...) as build.sh leaves them."""
    return build_dir() / "cmake-build" / "bin"


def python_dir() -> Path | None:
    """The llama-cpp-python source tree build.sh vendored the fork into (its ``llama_cpp`` package binds the
    fork's libllama through LLAMA_CPP_LIB_PATH). None when there is none."""
    found = sorted(build_dir().glob("llama_cpp_python-*/llama_cpp/__init__.py"))
    return found[-1].parent.parent if found else None


def available() -> tuple[bool, str]:
    """Whether the fork's CPU build is here, and if not, how to get it."""
    libs = lib_dir()
    if not (libs / "libllama.so").is_file() or not (libs / "libggml-base.so").is_file():
        return False, (
            f"the llama.cpp fork is not built in {build_dir()} (set FELIX_LLAMA_FORK_DIR, or run "
            "`bash scripts/setup.sh --test`, which builds it from ../shared/llama-fork once per machine)"
        )
    if python_dir() is None:
        return False, f"the fork's llama-cpp-python sources are missing from {build_dir()}; rerun its build"
    return True, f"fork build in {build_dir()}"


def worker_environment() -> dict[str, str]:
    """Environment for a Python process whose ``import llama_cpp`` loads the fork, not stock llama.cpp."""
    ok, why = available()
    if not ok:
        raise ImportError(why)
    env = dict(os.environ)
    env["LLAMA_CPP_LIB_PATH"] = str(lib_dir())
    env["PYTHONPATH"] = os.pathsep.join([str(python_dir()), *filter(None, [env.get("PYTHONPATH")])])
    return env
