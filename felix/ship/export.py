"""Export a Felix checkpoint to GGUF for llama.cpp (stock ``llama`` arch) or the fork (``felix`` arch).

    felix export CHECKPOINT OUT.gguf --arch llama|felix --quant f32|f16|bf16|q8_0|q4_0|iq4_nl|tq2_0|rq4
                 --splice merge|adapter

What goes in the file:

* Metadata llama.cpp needs (``<arch>.context_length`` ... ``<arch>.attention.layer_norm_rms_epsilon``, rope
  base and dimensions), ``general.file_type``, and the tokenizer: the byte-level BPE vocabulary (GPT-2
  ``bytes_to_unicode`` strings, which is what HF ``ByteLevel`` stores), its merges, token types (Felix's
  specials CONTROL) and the special ids, pre-tokenizer ``gpt-2`` (the regex HF's ByteLevel uses), so llama.cpp
  tokenizes exactly as felix.model.tokenizer does; BOS added in front of a prompt (``add_bos_token``, as Felix's token
  streams begin), END as the end-of-turn token (``eot_token_id``: generation stops there), and
  ``tokenizer.chat_template``: felix.model.chat.CHAT_TEMPLATE, the Jinja form of Felix's chat format, so a runtime's chat
  API (``/v1/chat/completions``, ``create_chat_completion``) prompts the model as it was trained.
* Tensors under the model's own parameter names, which already ARE llama.cpp's (felix/model/felix_lm.py). The model
  rotates adjacent RoPE pairs like llama.cpp's ``llama`` arch, so q/k rows need no permutation (docs/platform-notes.md).
  Types come from :mod:`felix.ops.quant_policy` (one policy for the exporter and the fidelity harness).
* SpliceCore, per ``--splice``:

  - ``merge``: W <- W + B diag(gate) A (in float64), the splice tensors dropped: one self-contained model.
  - ``adapter``: the base model as is, plus a LoRA adapter GGUF (``general.type = adapter``, ``adapter.type =
    lora``, ``adapter.lora.alpha = rank``, tensors ``<base>.weight.lora_a`` = A ``[r, in]`` and ``lora_b`` =
    B diag(gate) ``[out, r]``, F32) that llama.cpp loads beside the base and can re-scale (llama.cpp applies
    user_scale * alpha / rank = user_scale) or drop at run time.
  There is no third, "native" mode: the fork's felix arch has no SpliceCore tensors and rejects a file with
  tensors it does not know ("wrong number of tensors"); it applies LoRA adapters through ``build_lora_mm`` on
  every projection a splice can sit on, so ``adapter`` is the fork's live-scalable splice.
* ``--arch felix`` (the fork, felix.core.fork): the llama tensors plus, in every layer, the spoke tensors the fork
  requires. A model with spokes (felix.model.spokes; or a hub plus ``spokes=`` a spoke file) writes them as trained, in
  the fused form (``blk.N.spoke.w_down_fused`` / ``w_up_fused``, the model's own parameter names), typed by the
  policy (F32: the spokes are a runtime-edit surface), with ``felix.num_spokes`` / ``felix.spoke_rank``; layers
  without spokes get no-op spokes of the same shape. A model without spokes writes the exact no-op of
  felix.core.fork.noop_spoke_tensors (one spoke of rank 1, W_down = W_up = 0: the spoke residual is exactly 0.0).
  felix.core.fork.check_loadable applies the fork loader's rules before anything is written. ``--arch llama`` has no
  spokes: a model whose spokes do something is refused there (spokes that are still exact no-ops are dropped).

RQ4 (ggml type 42) exists only in the fork, so ``--quant rq4`` needs ``--arch felix``. Files are written to a
temporary name beside the output and renamed into place, so an error or a full disk never leaves a partial file.
"""

from __future__ import annotations

import json
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from felix.core import fork
from felix.model import qat as felix_qat
from felix.model.chat import CHAT_TEMPLATE, END
from felix.model.felix_lm import (
    CONFIG_FILE,
    CONFIG_LIMITS,
    WEIGHTS_FILE,
    FelixConfig,
    FelixLM,
    load_checkpoint,
    load_state_into,
)
from felix.model.spokes import SpokeError, load_spokes
from felix.model.tokenizer import PAD, SPECIAL_TOKENS, TOKENIZER_FILE, Tokenizer
from felix.core.files import remove_stale_temps, temp_path
from felix.core.formats import FILE_TYPES, FORMATS  # FILE_TYPES: llama_ftype per export type (none for fork-only)
from felix.ship.gguf_file import (
    GGML_TYPE_IDS,
    FelixGGUFWriter,
    metadata,
    open_gguf,
    remove_quietly,
    tensor_to_torch,
    torch_shape,
)
from felix.ops.quant_policy import FLOAT_TYPES, TensorChoice, check_type, choose_tensor_type, encode_tensor
from felix.ops.spoke import MAX_WIDTH

ARCHES = ("llama", "felix")
SPLICE_MODES = ("merge", "adapter")
TOKEN_TYPE_NORMAL, TOKEN_TYPE_CONTROL, TOKEN_TYPE_UNUSED = 1, 3, 5
TOKENIZER_PRE = "gpt-2"  # llama.cpp's name for the GPT-2 split regex, which HF ByteLevel(use_regex=True) applies


class ExportError(ValueError):
    """An export cannot be made as asked (bad combination of options, missing tokenizer, existing output)."""


@dataclass
class ExportedTensor:
    name: str
    shape: tuple[int, ...]
    type: str
    nbytes: int
    note: str = ""


@dataclass
class ExportResult:
    path: Path
    adapter_path: Path | None
    arch: str
    quant: str
    splice: str
    tensors: list[ExportedTensor]
    adapter_tensors: list[ExportedTensor] = field(default_factory=list)
    file_bytes: int = 0
    seconds_prepare: float = 0.0  # load checkpoint, merge splices
    seconds_quantize: float = 0.0  # encode every tensor (felix.quantize / casts)
    seconds_write: float = 0.0  # gguf-py writing + rename

    @property
    def n_weights(self) -> int:
        return sum(_numel(t.shape) for t in self.tensors)

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * sum(t.nbytes for t in self.tensors) / max(1, self.n_weights)

    def table(self) -> str:
        """The per-tensor summary: name, shape, type, bytes (and why a tensor fell back), then the totals."""
        rows = [("tensor", "shape", "type", "bytes", "note")]
        for t in self.tensors + self.adapter_tensors:
            rows.append((t.name, "x".join(map(str, t.shape)), t.type.upper(), f"{t.nbytes:,}", t.note))
        widths = [max(len(r[i]) for r in rows) for i in range(4)]
        lines = [
            "  ".join(c.ljust(w) if i != 3 else c.rjust(w) for i, (c, w) in enumerate(zip(r[:4], widths)))
            + (f"  {r[4]}" if r[4] else "")
            for r in rows
        ]
        lines.insert(1, "-" * len(lines[0]))
        by_type: dict[str, int] = {}
        for t in self.tensors:
            by_type[t.type.upper()] = by_type.get(t.type.upper(), 0) + 1
        lines.append("-" * len(lines[0]))
        lines.append(
            f"{self.path}: {len(self.tensors)} tensors ({', '.join(f'{n} {k}' for k, n in by_type.items())}), "
            f"{self.file_bytes / 2**20:.2f} MiB, {self.n_weights / 1e6:.2f}M weights at "
            f"{self.bits_per_weight:.2f} bits/weight"
        )
        if self.adapter_path is not None:
            lines.append(
                f"{self.adapter_path}: LoRA adapter, {len(self.adapter_tensors)} tensors, "
                f"{self.adapter_path.stat().st_size / 2**10:.1f} KiB"
            )
        lines.append(
            f"time: prepare {self.seconds_prepare:.2f}s, quantize {self.seconds_quantize:.2f}s, "
            f"write {self.seconds_write:.2f}s"
        )
        return "\n".join(lines)


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


# ------------------------------------------------------------------------------------ the tokenizer
def tokenizer_metadata(tokenizer, vocab_size: int) -> dict:
    """GGUF tokenizer fields for a byte-level BPE felix.model.tokenizer.Tokenizer, padded to the model's vocab_size."""
    spec = json.loads(tokenizer.hf.to_str())
    model = spec["model"]
    if model.get("type") != "BPE":
        raise ExportError(
            f"only byte-level BPE tokenizers export to GGUF's gpt2 model; this one is {model.get('type')}"
        )
    vocab = tokenizer.hf.get_vocab(with_added_tokens=True)
    n = tokenizer.vocab_size
    if n > vocab_size:
        raise ExportError(f"the tokenizer has {n} tokens but the model's embedding only {vocab_size} rows")
    by_id = [None] * n
    for tok, i in vocab.items():
        by_id[i] = tok
    if any(t is None for t in by_id):
        raise ExportError("the tokenizer's ids are not contiguous 0..n-1")
    specials = set(SPECIAL_TOKENS) | {t["content"] for t in spec.get("added_tokens", []) if t.get("special")}
    tokens = by_id + [f"[PAD{i}]" for i in range(n, vocab_size)]
    types = [TOKEN_TYPE_CONTROL if t in specials else TOKEN_TYPE_NORMAL for t in by_id] + [TOKEN_TYPE_UNUSED] * (
        vocab_size - n
    )
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    if not merges:
        raise ExportError("the tokenizer has no merges; llama.cpp's gpt2 tokenizer needs at least one")
    return {
        "tokens": tokens,
        "types": types,
        "merges": merges,
        "bos": tokenizer.bos_id,
        "eos": tokenizer.eos_id,
        "pad": tokenizer.hf.token_to_id(PAD),
        "eot": tokenizer.token_id(END),
    }


def _add_tokenizer(w: FelixGGUFWriter, tok: dict) -> None:
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(TOKENIZER_PRE)
    w.add_token_list(tok["tokens"])
    w.add_token_types(tok["types"])
    w.add_token_merges(tok["merges"])
    w.add_bos_token_id(tok["bos"])
    w.add_eos_token_id(tok["eos"])
    w.add_pad_token_id(tok["pad"])
    w.add_eot_token_id(tok["eot"])  # END closes a turn: llama.cpp stops generating there (an end-of-generation token)
    # Felix's token streams are BOS + text (felix.data.corpus): llama.cpp adds BOS to a raw prompt; the chat template writes
    # {{ bos_token }} itself (llama-cpp-python then adds none; llama-server strips a doubled one)
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)
    w.add_chat_template(CHAT_TEMPLATE)  # felix.data.corpus's chat format, so /v1/chat/completions speaks it


def _add_hparams(w: FelixGGUFWriter, cfg, quant: str, name: str) -> None:
    w.add_name(name)
    w.add_vocab_size(cfg.vocab_size)
    w.add_context_length(cfg.max_seq_len)
    w.add_embedding_length(cfg.d_model)
    w.add_block_count(cfg.n_layer)
    w.add_feed_forward_length(cfg.ffn_hidden)
    w.add_head_count(cfg.n_head)
    w.add_head_count_kv(cfg.n_kv_head)
    w.add_rope_dimension_count(cfg.head_dim)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_layer_norm_rms_eps(cfg.norm_eps)
    if quant in FILE_TYPES:
        w.add_file_type(FILE_TYPES[quant])
    w.add_quantization_version(2)


# ------------------------------------------------------------------------------------ splices
def splice_factors(model) -> list[tuple[int, str, torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(layer, projection, A [r, in], B [out, r], gate) for every SpliceCore of a FelixLM."""
    out = []
    for layer, block in enumerate(model.blk):
        for proj, core in block.splice.items():
            out.append((layer, proj, core.a.detach(), core.b.detach(), core.gate.detach()))
    return out


def _gated_b(b: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """B diag(gate): a scalar gate scales all of B, a per-output gate scales B's rows."""
    g = gate.double()
    return b.double() * (g if g.numel() == 1 else g[:, None])


def base_tensors(model, splice: str) -> dict[str, torch.Tensor]:
    """The hub tensors of the base file, float32, by GGUF name: splices merged into their weights (`merge`) or
    left out (`adapter`, which writes them to the adapter file). Spokes are not in it (fork.spoke_tensors_for)."""
    state = {k: v.detach().float() for k, v in model.state_dict().items()}
    out = {k: v for k, v in state.items() if ".splice." not in k and not fork.is_spoke_tensor(k)}
    for layer, proj, a, b, gate in splice_factors(model):
        if splice == "merge":
            wname = f"blk.{layer}.{proj}.weight"
            out[wname] = (out[wname].double() + _gated_b(b, gate) @ a.double()).float()
    return out


def adapter_tensors(model) -> dict[str, torch.Tensor]:
    """llama.cpp LoRA tensors for every splice: ``<weight>.lora_a`` = A, ``<weight>.lora_b`` = B diag(gate)."""
    out = {}
    for layer, proj, a, b, gate in splice_factors(model):
        out[f"blk.{layer}.{proj}.weight.lora_a"] = a.float()
        out[f"blk.{layer}.{proj}.weight.lora_b"] = _gated_b(b, gate).float()
    return out


# ------------------------------------------------------------------------------------ writing
def _check_output(path: Path, force: bool) -> None:
    if path.exists() and not force:
        raise ExportError(f"{path} exists; pass --force (force=True) to overwrite it")
    if path.exists() and path.is_dir():
        raise ExportError(f"{path} is a directory")
    if not path.parent.is_dir():
        raise ExportError(f"output directory {path.parent} does not exist")


def _same_file(a: Path, b: Path) -> bool:
    """Whether two paths name one file (symlinks, hard links and relative spellings included)."""
    try:
        return os.path.samefile(a, b)
    except OSError:  # one does not exist (yet): compare where they would resolve
        return a.resolve() == b.resolve()


def _check_not_inputs(outputs: list[Path], checkpoint, spokes) -> None:
    """Refuse an output that is one of the export's own inputs (the checkpoint's config, weights, tokenizer and QAT
    record, the spoke file) or another output: --force overwrites earlier results, never what is being read."""
    inputs = []
    if checkpoint is not None and Path(checkpoint).is_dir():
        inputs = [Path(checkpoint) / n for n in (CONFIG_FILE, WEIGHTS_FILE, TOKENIZER_FILE, felix_qat.QAT_FILE)]
    if spokes is not None:
        inputs.append(Path(spokes))
    for i, out in enumerate(outputs):
        for src in inputs:
            if src.exists() and _same_file(out, src):
                raise ExportError(
                    f"{out} is an input of this export ({src}): refusing to overwrite it, even with "
                    "--force; write the GGUF elsewhere"
                )
        for other in outputs[:i]:
            if _same_file(out, other):
                raise ExportError(
                    f"the adapter and the base model would both be written to {out}: give --adapter-out another path"
                )


def _write(tmp: Path, arch: str, fill, tensors: list[tuple[str, torch.Tensor, str]]) -> None:
    """Write one GGUF to `tmp`: `fill(writer)` adds the metadata, then `tensors` (name, stored, type) in order."""
    w = FelixGGUFWriter(str(tmp), arch)
    try:
        fill(w)
        for name, stored, type_name in tensors:
            w.add_stored_tensor(name, stored, type_name)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file(progress=False)
    finally:
        w.close()


def export_gguf(
    checkpoint,
    out,
    arch: str = "llama",
    quant: str = "f16",
    splice: str = "merge",
    force: bool = False,
    embedding_type: str | None = None,
    adapter_out=None,
    backend: str | None = None,
    progress: bool = False,
    model=None,
    tokenizer=None,
    spokes=None,
) -> ExportResult:
    """Export the checkpoint directory `checkpoint` (felix.model.felix_lm.save_checkpoint, with tokenizer.json) to `out`.

    `model`/`tokenizer` may be passed instead of loading them from `checkpoint` (then `checkpoint` is only a
    label). `adapter_out` (splice="adapter") defaults to ``<out stem>.splice-lora.gguf``. `backend` picks the
    quantization backend (None = automatic: the C++ codecs on CPU). `spokes`: a spoke file (felix.model.spokes.save_spokes)
    to attach to the checkpoint's hub first; refused when it was trained on another hub. Returns what was written,
    with timings."""
    t0 = time.perf_counter()
    quant = check_type(quant)
    if arch not in ARCHES:
        raise ExportError(f"unknown arch {arch!r}; choose from {', '.join(ARCHES)}")
    if splice == "native":
        raise ExportError(
            "--splice native is not a mode: the fork's felix arch has no SpliceCore tensors and "
            "refuses a file with tensors it does not know ('wrong number of tensors'); use "
            "--splice adapter (a LoRA adapter the fork applies, with a live scale) or --splice merge"
        )
    if splice not in SPLICE_MODES:
        raise ExportError(f"unknown splice mode {splice!r}; choose from {', '.join(SPLICE_MODES)}")
    if quant in fork.FORK_ONLY_TYPES and arch != fork.ARCH:
        f = FORMATS[quant]
        raise ExportError(
            f"{f.ggml_name} (ggml type {f.ggml_type}) exists only in the llama.cpp fork: use --arch "
            f"{fork.ARCH} (stock llama.cpp cannot load it)"
        )
    out = Path(out)
    _check_output(out, force)
    _check_not_inputs([out], checkpoint, spokes)
    model_given = model is not None
    if model is None:
        model = load_checkpoint(checkpoint)
    if spokes is not None:
        try:
            load_spokes(model, spokes)
        except SpokeError as e:
            raise ExportError(str(e)) from e
    if tokenizer is None:
        try:
            tokenizer = Tokenizer.load(checkpoint)
        except FileNotFoundError as e:
            raise ExportError(f"{checkpoint} has no tokenizer.json; llama.cpp needs the vocabulary ({e})") from e
    cfg = model.cfg
    splices = splice_factors(model)
    # a quantization-aware-trained model: its quantized tensors are written with the codec its forward used
    # (a model passed in is exported as it is: patched by felix.model.qat.apply_qat or not; a checkpoint by its qat.json)
    qat = felix_qat.qat_config_of(model) if model_given else felix_qat.read_qat_config(checkpoint)
    if qat is not None and splice == "merge" and quant not in FLOAT_TYPES:  # a float file is the latent model: exact
        live = [
            f"blk.{layer}.{proj}"
            for layer, proj, _, b, gate in splices
            if f"blk.{layer}.{proj}.weight" in qat.tensor_types and bool((_gated_b(b, gate) != 0).any())
        ]
        if live:
            raise ExportError(
                f"{checkpoint} was trained quantization-aware ({qat.mode}): its forward quantizes the "
                f"base weight and adds the splice in F32, so --splice merge would re-quantize W + gate B A "
                f"(bytes the forward never saw) for {', '.join(live)}; export with --splice adapter"
            )
    if qat is not None and quant not in FLOAT_TYPES and quant != qat.export_type:
        warnings.warn(
            f"{checkpoint} was trained quantization-aware for {qat.export_type} ({qat.mode}); exporting "
            f"{quant} is post-training quantization of its latent weights",
            RuntimeWarning,
            stacklevel=2,
        )
    adapter_path = None
    if splice == "adapter":
        if not splices:
            raise ExportError(f"{checkpoint} has no SpliceCore tensors to write as an adapter")
        adapter_path = Path(adapter_out) if adapter_out else out.with_name(f"{out.stem}.splice-lora.gguf")
        _check_output(adapter_path, force)
        _check_not_inputs([out, adapter_path], checkpoint, spokes)
    tok = tokenizer_metadata(tokenizer, cfg.vocab_size)

    tensors = base_tensors(model, splice)
    fork_meta = {}
    model_spokes = {k: v for k, v in model.state_dict().items() if fork.is_spoke_tensor(k)}
    if arch == fork.ARCH:
        if cfg.n_spokes:
            tensors.update(fork.spoke_tensors_for(cfg, model_spokes))
            fork_meta = {fork.NUM_SPOKES_KEY: cfg.n_spokes, fork.SPOKE_RANK_KEY: cfg.spoke_rank}
        else:
            tensors.update(fork.noop_spoke_tensors(cfg.n_layer, cfg.d_model))
            fork_meta = dict(zip((fork.NUM_SPOKES_KEY, fork.SPOKE_RANK_KEY), fork.NOOP_SPOKES))
        fork.check_loadable({k: tuple(v.shape) for k, v in tensors.items()}, fork_meta, cfg)
    elif model_spokes and not fork.spokes_are_noop(model_spokes):
        raise ExportError(
            f"{checkpoint} has trained spokes ({cfg.n_spokes} of rank {cfg.spoke_rank} per layer), and "
            "stock llama.cpp's llama arch has no tensors for them: export with --arch felix (the fork)"
        )
    bad = [k for k, v in tensors.items() if not torch.isfinite(v).all()]
    if bad:
        raise ExportError(f"non-finite values (NaN/Inf) in {len(bad)} tensor(s): {', '.join(bad[:5])}")
    t1 = time.perf_counter()

    choices: list[TensorChoice] = [choose_tensor_type(k, v.shape, quant, embedding_type) for k, v in tensors.items()]
    stored = []
    for c in tqdm(choices, desc=f"quantize {quant}", unit="tensor", disable=not progress, leave=False):
        codec = qat.codec(c.name) if qat is not None and qat.tensor_types.get(c.name) == c.type else None
        stored.append((c.name, encode_tensor(tensors[c.name], c.type, backend, codec), c.type))
    adapter = adapter_tensors(model) if adapter_path else {}
    adapter_stored = [(k, encode_tensor(v, "f32"), "f32") for k, v in adapter.items()]
    t2 = time.perf_counter()

    name = f"felix-lm {cfg.n_layer}x{cfg.d_model}"

    def fill_base(w):
        _add_hparams(w, cfg, quant, name)
        _add_tokenizer(w, tok)
        for key, value in fork_meta.items():
            w.add_uint32(key, value)

    def fill_adapter(w):
        w.add_type("adapter")
        w.add_name(f"{name} splice")
        w.add_string("adapter.type", "lora")
        w.add_float32("adapter.lora.alpha", float(cfg.splice_rank))

    for path in (out, adapter_path) if adapter_path else (out,):
        remove_stale_temps(path)  # what killed exports of the same file left behind
    tmp = temp_path(out)
    tmp_adapter = temp_path(adapter_path) if adapter_path else None
    try:
        _write(tmp, arch, fill_base, stored)
        if adapter_path:
            _write(tmp_adapter, arch, fill_adapter, adapter_stored)
            os.replace(tmp_adapter, adapter_path)
        os.replace(tmp, out)
    except BaseException:
        remove_quietly(tmp)
        if tmp_adapter is not None:
            remove_quietly(tmp_adapter)
        raise
    t3 = time.perf_counter()

    def note(c):
        if qat is not None and qat.tensor_types.get(c.name) == c.type:
            return f"QAT {qat.codec(c.name)}"
        return c.reason if c.fallback else ""

    listed = [
        ExportedTensor(c.name, c.shape, c.type, st.numel() * st.element_size(), note(c))
        for c, (_, st, _) in zip(choices, stored)
    ]
    listed_adapter = [ExportedTensor(k, tuple(v.shape), "f32", v.numel() * 4) for k, v in adapter.items()]
    result = ExportResult(
        out, adapter_path, arch, quant, splice, listed, listed_adapter, out.stat().st_size, t1 - t0, t2 - t1, t3 - t2
    )
    return result


def describe_types() -> str:
    """One line per export type: name, ggml id, bits/weight (for --help and the README)."""
    lines = [f"{t}: ggml {GGML_TYPE_IDS[t]}, {32 if t == 'f32' else 16} bits" for t in FLOAT_TYPES]
    lines += [f"{n}: ggml {f.ggml_type}, {f.bits_per_weight:.3g} bits" for n, f in FORMATS.items()]
    return "; ".join(lines)


# ------------------------------------------------------------------------------------ reading back
# FelixConfig field -> the GGUF metadata key (under "<arch>.") that holds it
GGUF_INT_KEYS = {
    "n_layer": "block_count",
    "d_model": "embedding_length",
    "n_head": "attention.head_count",
    "n_kv_head": "attention.head_count_kv",
    "ffn_hidden": "feed_forward_length",
    "max_seq_len": "context_length",
}
GGUF_FLOAT_KEYS = {"rope_theta": "rope.freq_base", "norm_eps": "attention.layer_norm_rms_epsilon"}


def _layer_index(name: str) -> int | None:
    parts = name.split(".")
    return int(parts[1]) if len(parts) > 2 and parts[0] == "blk" and parts[1].isdigit() else None


def config_from_gguf(meta: dict, path="the GGUF file", shapes: dict[str, tuple[int, ...]] | None = None):
    """The FelixConfig a Felix-written GGUF (either arch) describes, from its metadata, checked before anything is
    built: every hyperparameter present, an integer (or number) of sane size (felix.model.felix_lm.CONFIG_LIMITS), the
    divisibility rules of FelixConfig, and -- given the file's tensor table `shapes` (name -> PyTorch shape) -- the
    tensors the file really holds: block_count must be the number of blk.N layers present and every hub tensor
    must have the shape the hyperparameters give it. Errors name the file and the metadata key."""
    arch = meta.get("general.architecture")
    if arch not in ARCHES:
        raise ExportError(f"{path}: architecture {arch!r} is not one Felix writes ({', '.join(ARCHES)})")

    def key(k):
        full = f"{arch}.{k}"
        if full not in meta:
            raise ExportError(f"{path}: metadata key {full} is missing")
        return full, meta[full]

    values = {}
    for name, k in GGUF_INT_KEYS.items():
        full, v = key(k)
        if isinstance(v, bool) or not isinstance(v, int):
            raise ExportError(f"{path}: metadata {full} = {v!r} is not an integer")
        if not 1 <= v <= CONFIG_LIMITS[name]:
            raise ExportError(f"{path}: metadata {full} = {v} is outside 1..{CONFIG_LIMITS[name]:,}")
        values[name] = v
    for name, k in GGUF_FLOAT_KEYS.items():
        full, v = key(k)
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise ExportError(f"{path}: metadata {full} = {v!r} is not a number")
        values[name] = float(v)
    tokens = meta.get("tokenizer.ggml.tokens")
    if not isinstance(tokens, list) or not tokens:
        raise ExportError(f"{path}: metadata tokenizer.ggml.tokens is missing or not a list of tokens")
    if len(tokens) > CONFIG_LIMITS["vocab_size"]:
        raise ExportError(
            f"{path}: {len(tokens):,} tokens in tokenizer.ggml.tokens exceed {CONFIG_LIMITS['vocab_size']:,}"
        )
    tied = shapes is None or "output.weight" not in shapes
    try:
        cfg = FelixConfig(
            vocab_size=len(tokens), **values, tie_embeddings=tied, splice_layers=[]
        )  # splices are merged or in the adapter file: none in the base
    except ValueError as e:
        raise ExportError(f"{path}: its {arch}.* hyperparameters are invalid: {e}") from e
    if shapes is not None:
        _check_tensor_table(cfg, shapes, path, arch)
    return cfg


def _check_tensor_table(cfg, shapes: dict[str, tuple[int, ...]], path, arch: str) -> None:
    """The hyperparameters against the tensors the file holds (the file's tensor table is what the model is)."""
    layers = sorted({i for i in map(_layer_index, shapes) if i is not None})
    if layers != list(range(cfg.n_layer)):
        held = f"blk.{layers[0]}..blk.{layers[-1]}, {len(layers)} layers" if layers else "no blk.N tensors"
        raise ExportError(f"{path}: metadata {arch}.block_count = {cfg.n_layer}, but the file holds {held}")
    embd = shapes.get("token_embd.weight")
    if embd != (cfg.vocab_size, cfg.d_model):
        raise ExportError(
            f"{path}: token_embd.weight is {embd}, but tokenizer.ggml.tokens ({cfg.vocab_size}) and "
            f"{arch}.embedding_length ({cfg.d_model}) say ({cfg.vocab_size}, {cfg.d_model})"
        )
    want = fork.hub_shapes(cfg)
    hub = {k: v for k, v in shapes.items() if not fork.is_spoke_tensor(k)}
    missing = [k for k in want if k not in hub]
    extra = [k for k in hub if k not in want]
    wrong = [f"{k} {hub[k]} (the hyperparameters give {want[k]})" for k in want if k in hub and hub[k] != want[k]]
    problems = (
        [f"missing {', '.join(missing[:4])}" + (f" and {len(missing) - 4} more" if len(missing) > 4 else "")]
        if missing
        else []
    )
    problems += [f"unexpected {', '.join(extra[:4])}"] if extra else []
    problems += ["mis-shaped " + "; ".join(wrong[:4])] if wrong else []
    if problems:
        raise ExportError(f"{path}: its tensors do not match its {arch}.* hyperparameters: " + "; ".join(problems))


def fused_spokes_from_file(tensors: dict[str, torch.Tensor], n_layer: int, n_spokes: int) -> dict[str, torch.Tensor]:
    """The file's spoke tensors in the fused form: per-spoke ``w_down.S`` [r, d] / ``w_up.S`` [d, r] (the fork's
    legacy form) are concatenated in spoke order, which is what the fork's fused path computes with."""
    names = fork.SPOKE_TENSOR_NAMES
    out = {}
    for i in range(n_layer):
        for key in ("norm", "gate_bias"):
            out[names[key].format(layer=i)] = tensors[names[key].format(layer=i)]
        fused_down, fused_up = names["w_down_fused"].format(layer=i), names["w_up_fused"].format(layer=i)
        if fused_down in tensors:
            out[fused_down], out[fused_up] = tensors[fused_down], tensors[fused_up]
        else:
            out[fused_down] = torch.cat([tensors[names["w_down"].format(layer=i, spoke=s)] for s in range(n_spokes)], 0)
            out[fused_up] = torch.cat([tensors[names["w_up"].format(layer=i, spoke=s)] for s in range(n_spokes)], 1)
    return out


def model_from_gguf(path):
    """A FelixLM holding the weights of a Felix-written GGUF as llama.cpp sees them (every tensor decoded to
    float32 with Felix's codecs): the PyTorch side of a runtime-vs-PyTorch comparison."""
    reader = open_gguf(path)
    meta = metadata(reader, path)
    cfg = config_from_gguf(meta, path, {t.name: torch_shape(t) for t in reader.tensors})  # before building
    model = FelixLM(cfg)
    tensors = {t.name: tensor_to_torch(t) for t in reader.tensors}
    spokes = {k: v for k, v in tensors.items() if fork.is_spoke_tensor(k)}
    hub = {k: v for k, v in tensors.items() if k not in spokes}
    if spokes and not fork.spokes_are_noop(spokes):  # trained spokes: the model gets them (every layer)
        n_spokes, rank = meta.get(fork.NUM_SPOKES_KEY, 0), meta.get(fork.SPOKE_RANK_KEY, 0)
        if (
            not all(isinstance(v, int) and not isinstance(v, bool) for v in (n_spokes, rank))
            or n_spokes < 1
            or rank < 1
            or n_spokes * rank > MAX_WIDTH
        ):
            raise ExportError(
                f"{path}: {n_spokes} spokes of rank {rank} (felix.num_spokes / felix.spoke_rank) "
                f"cannot be held by Felix-LM (each >= 1, n_spokes x rank <= {MAX_WIDTH})"
            )
        try:
            spokes = fused_spokes_from_file(spokes, cfg.n_layer, n_spokes)
        except KeyError as e:
            raise ExportError(f"{path}: spoke tensor {e} is missing") from e
        except RuntimeError as e:
            raise ExportError(f"{path}: its per-spoke tensors do not fit together ({e})") from e
        cfg.n_spokes, cfg.spoke_rank = n_spokes, rank
        cfg.__post_init__()
        model = FelixLM(cfg)
        bad = [k for k, v in spokes.items() if k.endswith("gate_bias") and v.numel() != 1]
        if bad:
            raise ExportError(f"{path}: {', '.join(bad[:4])} must hold one value")
        hub.update(
            {
                k: v.float().reshape(model.state_dict()[k].shape) if k.endswith("gate_bias") else v.float()
                for k, v in spokes.items()
            }
        )
    load_state_into(model, hub, source=str(path))
    return model
