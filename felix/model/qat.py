"""Quantization-aware training: train the weights a GGUF export will hold, not weights it will round.

    felix train --preset tiny-256 --qat bitnet        # BitNet b1.58 ternary from step 0, ships as TQ2_0
    felix train --init-from runs/fp/checkpoint --qat rq4 --steps 100 --out-dir runs/qat   # a short QAT phase

``apply_qat(model, mode)`` patches a model in place so that any training loop trains it quantization-aware:

* Every tensor the export policy (felix.ops.quant_policy, the one the exporter and the fidelity harness use) would
  store in a block format gets a *fake-quant* parametrization: reading ``module.weight`` returns
  ``dequantize(encode(latent))`` -- the exact values the exported file decodes to, from the same codec bytes
  the exporter writes (``felix.quantize``: the C++ codecs on CPU, the Triton kernels on GPU, all byte-exact with
  ggml). The backward is the straight-through estimator: the gradient of the quantized weight is applied to
  the latent full-precision weight unchanged. Tensors the policy keeps in a float type (norms, splices, small
  tensors) train as they are; the embedding / tied head gets the policy's embedding type (Q8_0 by default).
* Modes: one per export format (``rq4``, ``iq4_nl``, ``q4_0``, ``q8_0``, ``tq2_0``: that format's own codec;
  ``tq2_0`` is ggml's absmax ternary rounding, i.e. post-training quantization's codec) and ``bitnet``, BitNet
  b1.58: per group of weights the scale is the mean |w| (absmean) and w -> clamp(round(w / scale), -1, 1) * scale,
  written as TQ2_0 blocks (so the group is TQ2_0's block of 256 weights, the only grouping TQ2_0 can store; the
  scale is stored as fp16 and the forward uses that fp16 value; the codec is felix.ops.reference.codecs'
  quantize_tq2_0_absmean, which the exporter reaches through felix.ops.quant_policy.encode_tensor). In ``bitnet`` mode the matmul inputs are also
  rounded to int8 the way llama.cpp rounds them for that weight type (``activations="runtime"``: Q8_K blocks of
  256 for TQ2_0 weights, Q8_0 blocks of 32 for Q8_0 weights; felix.ops.activation_rounding), with the STE -- the
  runtime's own int8 activation blocks rather than the seed's blocks of 64, so what trains is what ships.
* The latent weights stay the parameters (the optimizer updates them) and ``model.state_dict()`` keeps their
  plain names (``blk.0.attn_q.weight``), so checkpoints hold the latent full-precision weights and load into an
  unpatched model; ``qat.json`` beside them (``write_qat_config``) tells the exporter which codec the forward
  used. ``felix export`` of a QAT checkpoint then writes ``encode(latent)``: the very bytes the forward decoded.

What the exporter cannot reproduce is refused there: ``--splice merge`` would re-quantize W + gate B A, which the
forward never saw (the forward quantizes W and adds the splice in F32, which is what ``--splice adapter`` ships).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.nn.utils import parametrize

from felix.ops.activation_rounding import round_activations, vec_dot_type
from felix.core.files import read_text
from felix.core.formats import FORMATS
from felix.model.felix_lm import load_checkpoint
from felix.ops.attention import attention
from felix.ops.quant_policy import (
    BITNET_CODEC,
    FLOAT_TYPES,
    check_type,
    choose_tensor_type,
    decode_tensor,
    encode_tensor,
)
from felix.ops.reference.codecs import quantize_tq2_0_absmean, tq2_0_absmean_values

BITNET = BITNET_CODEC  # the mode is named after the codec its ternary tensors are written with
QAT_MODES = tuple(FORMATS) + (BITNET,)
ACTIVATION_MODES = (None, "runtime")
QAT_FILE = "qat.json"
QAT_SCHEMA = "felix-qat"


def check_mode(mode: str) -> str:
    m = str(mode).lower()
    if m not in QAT_MODES:
        raise ValueError(f"unknown QAT mode {mode!r}; choose from {', '.join(QAT_MODES)}")
    return m


def export_type(mode: str) -> str:
    """The GGUF type a QAT mode ships as (``bitnet`` -> ``tq2_0``; a format mode -> itself)."""
    mode = check_mode(mode)
    return "tq2_0" if mode == BITNET else mode


def codec_of(type_name: str, mode: str) -> str:
    """The codec that writes a tensor stored as `type_name` in a `mode` QAT model: ``bitnet`` for the ternary
    tensors of a bitnet model, else the format's own (ggml's) codec, named by the type."""
    return BITNET if type_name == "tq2_0" and check_mode(mode) == BITNET else type_name


# ------------------------------------------------------------------------------------------ codecs
# BitNet's codec lives in the codec layer with the format's own (felix.ops.reference.codecs); its names here predate that
quantize_ternary_absmean = quantize_tq2_0_absmean
ternary_absmean_values = tq2_0_absmean_values


def encode(w: torch.Tensor, type_name: str, mode: str, backend: str | None = None) -> torch.Tensor:
    """The bytes a `mode` QAT model's tensor stored as `type_name` is written as (uint8 ggml blocks)."""
    if type_name in FLOAT_TYPES:
        raise ValueError(f"{type_name} is a float type: nothing to encode")
    return encode_tensor(w, type_name, backend, codec_of(type_name, mode))


def fake_quant(w: torch.Tensor, type_name: str, mode: str, backend: str | None = None) -> torch.Tensor:
    """dequantize(encode(w)) as float32: the weights the exported file decodes to."""
    if codec_of(type_name, mode) == BITNET:
        return tq2_0_absmean_values(w)
    return decode_tensor(encode(w, type_name, mode, backend), type_name, tuple(w.shape), torch.float32, backend)


class _FakeQuantSTE(torch.autograd.Function):
    """forward: the exact fake-quantized weight; backward: the straight-through estimator (identity)."""

    @staticmethod
    def forward(ctx, w, type_name, mode, backend):
        return fake_quant(w, type_name, mode, backend).to(w.dtype)

    @staticmethod
    def backward(ctx, grad):
        return grad, None, None, None


class _RoundSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, activation_type):
        return round_activations(x, activation_type)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class FakeQuant(nn.Module):
    """A parametrization (torch.nn.utils.parametrize): latent weight -> its fake-quantized value, STE backward."""

    def __init__(self, type_name: str, mode: str, backend: str | None = None):
        super().__init__()
        self.type_name, self.mode, self.backend = type_name, check_mode(mode), backend

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return _FakeQuantSTE.apply(w, self.type_name, self.mode, self.backend)

    def extra_repr(self) -> str:
        return f"type={self.type_name}, codec={codec_of(self.type_name, self.mode)}"


class QATActivations:
    """Matmul inputs rounded to int8 as llama.cpp's CPU matmul rounds them for each weight's type (vec_dot_type),
    with the STE, for training: the `activation_rounding` seam of felix.model.felix_lm.FelixLM (attention stays Felix's
    exact attention; felix.ops.activation_rounding.ActivationRounding models the runtime's f16 attention for
    inference-time comparisons)."""

    # a QAT model's live splices ship as a LoRA adapter, whose F32 matmuls take the unrounded input
    splice_takes_raw_input = True

    def __init__(self, weight_types: dict[str, str], attention_backend: str | None = None):
        self.activation_types = {name: vec_dot_type(t) for name, t in weight_types.items()}
        self.attention_backend = attention_backend

    def attention(self, q, k, v):
        return attention(q, k, v, causal=True, backend=self.attention_backend)

    def __call__(self, site: str, x: torch.Tensor) -> torch.Tensor:
        t = self.activation_types.get(site)
        if t is None:
            return x
        return _RoundSTE.apply(x, t)


# ------------------------------------------------------------------------------------------ the plan
@dataclass
class QATConfig:
    """What a QAT model computes, recorded in ``qat.json`` beside a checkpoint's weights."""

    mode: str
    embedding_type: str | None = None
    activations: str | None = None
    tensor_types: dict[str, str] = field(default_factory=dict)  # tensor -> GGUF type (float types left out)

    @property
    def export_type(self) -> str:
        return export_type(self.mode)

    def codec(self, name: str) -> str | None:
        t = self.tensor_types.get(name)
        return None if t is None else codec_of(t, self.mode)

    def to_json(self) -> str:
        return json.dumps({"schema": QAT_SCHEMA, **asdict(self)}, indent=2)

    @classmethod
    def from_json(cls, text: str, source: str = "qat.json") -> QATConfig:
        """The record in `text`, every field checked; a problem raises ValueError naming `source` and the field."""
        try:
            d = json.loads(text)
        except (json.JSONDecodeError, RecursionError) as e:
            raise ValueError(f"{source} is not JSON: {e}") from e
        if not isinstance(d, dict) or d.pop("schema", None) != QAT_SCHEMA:
            raise ValueError(f"{source} is not a Felix QAT record (schema {QAT_SCHEMA!r})")
        try:
            cfg = cls(**d)
        except TypeError as e:
            raise ValueError(f"{source}: {e}") from e
        try:
            check_mode(cfg.mode)
            if cfg.embedding_type is not None:
                check_type(cfg.embedding_type, "embedding_type")
            if cfg.activations not in ACTIVATION_MODES:
                raise ValueError(f"unknown activations {cfg.activations!r}")
            if not isinstance(cfg.tensor_types, dict):
                raise ValueError(f"tensor_types must be an object, got a JSON {type(cfg.tensor_types).__name__}")
            for name, t in cfg.tensor_types.items():
                check_type(t, f"type of tensor {name!r}")
        except (ValueError, TypeError) as e:
            raise ValueError(f"{source}: {e}") from e
        return cfg


def plan(model: nn.Module, mode: str, embedding_type: str | None = None) -> dict[str, str]:
    """{parameter name: GGUF type} for every parameter the export policy stores in a block format."""
    quant = export_type(mode)
    out = {}
    for name, p in model.named_parameters():
        c = choose_tensor_type(name, tuple(p.shape), quant, embedding_type)
        if c.type not in FLOAT_TYPES:
            out[name] = c.type
    return out


def _rename_to_latent(module, state_dict, prefix, local_metadata):
    """state_dict hook: ``X.parametrizations.weight.original`` -> ``X.weight`` (the latent weight, plain name), in
    the unpatched model's key order (so an export's tensor order does not depend on the patch)."""
    marker = "parametrizations."
    for key in [k for k in state_dict if k.startswith(prefix) and marker in k and k.endswith(".original")]:
        head, _, tail = key.rpartition(marker)
        state_dict[head + tail[: -len(".original")]] = state_dict.pop(key)
    order = getattr(module, "_felix_qat_key_order", None) if module is not None else None
    if order:
        for key in [prefix + k for k in order if prefix + k in state_dict]:
            state_dict[key] = state_dict.pop(key)
    return state_dict


def _rename_to_parametrized(module, state_dict, prefix, local_metadata, strict, missing, unexpected, errors):
    for name in getattr(module, "_felix_qat").tensor_types:
        key = prefix + name
        if key in state_dict:
            owner, _, attr = name.rpartition(".")
            state_dict[f"{prefix}{owner + '.' if owner else ''}parametrizations.{attr}.original"] = state_dict.pop(key)


def apply_qat(
    model: nn.Module,
    mode: str,
    embedding_type: str | None = None,
    activations: str | None = "default",
    backend: str | None = None,
) -> nn.Module:
    """Patch `model` (in place; also returned) for quantization-aware training in `mode` (see the module doc).

    `activations`: ``"default"`` (``"runtime"`` for bitnet, None otherwise), ``"runtime"`` (round matmul inputs
    as llama.cpp does, STE; needs a model with ``set_activation_rounding``, as felix.model.felix_lm.FelixLM) or None.
    `backend` forces the codec backend (None: automatic -- Triton on GPU, C++ on CPU). A model already patched is
    refused; :func:`remove_qat` undoes the patch (keeping the latent weights)."""
    mode = check_mode(mode)
    if activations == "default":
        activations = "runtime" if mode == BITNET else None
    if activations not in ACTIVATION_MODES:
        raise ValueError(f"unknown activations {activations!r}; choose from None, 'runtime'")
    if getattr(model, "_felix_qat", None) is not None:
        raise ValueError(f"the model is already patched for QAT ({model._felix_qat.mode}); remove_qat it first")
    types = plan(model, mode, embedding_type)
    model._felix_qat_key_order = list(model.state_dict())
    if not types:
        raise ValueError(f"QAT {mode}: the export policy quantizes none of this model's tensors")
    for name, type_name in types.items():
        owner_name, _, attr = name.rpartition(".")
        owner = model.get_submodule(owner_name) if owner_name else model
        parametrize.register_parametrization(owner, attr, FakeQuant(type_name, mode, backend), unsafe=True)
    cfg = QATConfig(mode, embedding_type, activations, types)
    model._felix_qat = cfg
    model._felix_qat_hooks = [
        model._register_state_dict_hook(_rename_to_latent),
        model._register_load_state_dict_pre_hook(_rename_to_parametrized, with_module=True),
    ]
    if activations == "runtime":
        if not hasattr(model, "set_activation_rounding"):
            raise ValueError(
                "activations='runtime' needs a model with set_activation_rounding (felix.model.felix_lm.FelixLM)"
            )
        all_types = {
            n: choose_tensor_type(n, tuple(p.shape), export_type(mode), embedding_type).type
            for n, p in model.named_parameters(remove_duplicate=True)
        }
        all_types.update(types)
        model.set_activation_rounding(QATActivations(all_types))
    return model


def remove_qat(model: nn.Module) -> nn.Module:
    """Undo apply_qat: the latent weights become plain parameters again (the same Parameter objects)."""
    cfg = getattr(model, "_felix_qat", None)
    if cfg is None:
        return model
    for name in cfg.tensor_types:
        owner_name, _, attr = name.rpartition(".")
        owner = model.get_submodule(owner_name) if owner_name else model
        parametrize.remove_parametrizations(owner, attr, leave_parametrized=False)
    for h in model._felix_qat_hooks:
        h.remove()
    if cfg.activations == "runtime":
        model.set_activation_rounding(None)
    model._felix_qat = None
    return model


def qat_config_of(model: nn.Module) -> QATConfig | None:
    return getattr(model, "_felix_qat", None)


def quantized_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """{name: the weight the QAT forward computes with} for every fake-quantized tensor (float32, detached)."""
    cfg = qat_config_of(model)
    if cfg is None:
        raise ValueError("the model is not patched for QAT (felix.model.qat.apply_qat)")
    with torch.no_grad():
        return {n: _read(model, n).detach().float() for n in cfg.tensor_types}


def _read(model: nn.Module, name: str) -> torch.Tensor:
    owner_name, _, attr = name.rpartition(".")
    return getattr(model.get_submodule(owner_name) if owner_name else model, attr)


# ------------------------------------------------------------------------------------------ checkpoints
def write_qat_config(path, model: nn.Module) -> None:
    """Write the model's QAT record (``qat.json``) to `path` (a file path; save_checkpoint's extra_files)."""
    cfg = qat_config_of(model)
    if cfg is None:
        raise ValueError("the model is not patched for QAT (felix.model.qat.apply_qat)")
    Path(path).write_text(cfg.to_json())


def read_qat_config(checkpoint) -> QATConfig | None:
    """The QAT record of a checkpoint directory, or None if it was not trained quantization-aware."""
    path = Path(checkpoint) / QAT_FILE
    if not path.is_file():
        return None
    return QATConfig.from_json(read_text(path, ValueError, "QAT record"), str(path))


def load_qat_checkpoint(checkpoint, device="cpu", backend: str | None = None) -> nn.Module:
    """A checkpoint as its QAT forward computes (latent weights loaded, then patched as recorded in qat.json)."""
    cfg = read_qat_config(checkpoint)
    if cfg is None:
        raise ValueError(f"{checkpoint} has no {QAT_FILE}: it was not trained quantization-aware")
    model = load_checkpoint(checkpoint, device)
    apply_qat(model, cfg.mode, cfg.embedding_type, cfg.activations, backend)
    if model._felix_qat.tensor_types != cfg.tensor_types:
        raise ValueError(f"{checkpoint}/{QAT_FILE} lists other quantized tensors than the policy gives this model")
    return model


def describe(cfg: QATConfig) -> str:
    """One line: how many tensors train at which type/codec."""
    counts: dict[str, int] = {}
    for name, t in cfg.tensor_types.items():
        key = f"{t}{' (bitnet absmean)' if codec_of(t, cfg.mode) == BITNET else ''}"
        counts[key] = counts.get(key, 0) + 1
    acts = ", int8 activations as llama.cpp rounds them (STE)" if cfg.activations == "runtime" else ""
    return f"QAT {cfg.mode}: fake-quant STE on " + ", ".join(f"{n} x {k}" for k, n in counts.items()) + acts
