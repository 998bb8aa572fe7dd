"""Run configs for `felix train`: a YAML file in sections, dotted overrides, and the resolved config of every run.

YAML because the trainers Felix's users come from use it for exactly this: litgpt (``config_hub/pretrain/*.yaml``,
dotted command-line overrides, the resolved ``hyperparameters.yaml`` saved beside each checkpoint) and OLMo (YAML
plus an OmegaConf dot-list). Files are read with ``yaml.safe_load`` only: plain data, never code.

A config has the sections of :data:`SECTIONS`; each maps its keys onto fields of the flat
:class:`TrainConfig` (that table is the only place the two layouts meet)::

    model:     {preset: felix-300m}
    data:
      sources:                       # prepared corpora (`felix data prepare`) or raw files, with weights
        web:        {path: data/web, weight: 0.7}
        structured: {path: data/structured, weight: 0.3}
      seq_len: 2048
    optimizer: {lr: 3.0e-4, batch_size: 4, grad_accum: 32}
    schedule:  {steps: 40000, warmup_steps: 2000, decay_fraction: 0.2}

Precedence, lowest first: TrainConfig's defaults (or, with ``--resume``, the run's own ``run.yaml``), the
``--config`` file, ``--set section.key=value`` overrides (values in YAML syntax: ``--set data.sources.web.weight=0.6``,
``--set data.sources.code="{path: data/code, weight: 0.1}"``), then the classic flags (``--lr 1e-3``). Unknown
sections or keys are refused, naming them. Values are checked against TrainConfig's field types (a YAML ``1e-3``,
which YAML 1.1 reads as a string, is accepted for a float field).

:func:`write_resolved` saves the resolved config as ``run.yaml`` (paths absolute) in the run directory, so
``felix train --resume --out-dir RUN`` needs nothing else.
"""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from felix.tasks import records as task_records
from felix.model import felix_lm as felix_model
from felix.model import qat as felix_qat
from felix.core.files import atomic_write_text, read_text
from felix.data.mix import MixError, normalize_weights
from felix.train.runs import POINTER as CHECKPOINT_POINTER
from felix.core.quail import DEFAULT_LAMBDA_Q, DEFAULT_MARGIN, DEFAULT_NOISE_QUANTILE, QuailConfig, margin_from_fidelity

RUN_CONFIG_FILE = "run.yaml"


SOURCE_NAME = re.compile(r"[A-Za-z0-9_.-]+")  # a data source's name: a metrics key and a directory name
TRAIN_ONLY = (None, "spokes")  # what --train-only may name (None: everything trains)

# settings that change how a run is kept and guarded, not its curve: no warning when they change on resume
RUN_KEEPING = ("keep_last", "milestone_every", "max_skipped_in_a_row", "tensorboard")


@dataclass
class TrainConfig:
    preset: str = "tiny"
    out_dir: str = "runs/felix-tiny"
    data: list[str] = field(default_factory=list)  # sources: prepared dirs or files; empty = built-in corpus
    data_weights: list[float] = field(default_factory=list)  # one per source (fractions of samples); empty = by tokens
    data_names: list[str] = field(default_factory=list)  # one per source (metrics, OUT/data/NAME); empty = from paths
    val_data: list[str] = field(default_factory=list)  # explicit validation files; empty = split from data
    teacher_data: list[str] = field(default_factory=list)  # distillation: {prompt, response, teacher} JSONL
    init_from: str | None = None  # start from this checkpoint directory (model + tokenizer), e.g. to distill
    spokes: int = 0  # spokes per layer (felix.model.spokes): from scratch, or added to an --init-from hub
    spoke_rank: int | None = None  # None = the preset's (or the checkpoint config's) spoke_rank
    train_only: str | None = None  # "spokes": freeze the hub, train (and keep optimizer state for) the spokes only
    n_records: int = 2000  # structured records added to the built-in corpus
    tasks: list[str] = field(default_factory=lambda: list(task_records.TASKS))  # their task kinds (felix.tasks.records)
    prose: bool = True  # built-in corpus: include the prose (False: structured records only)
    val_fraction: float = 0.05
    tokenizer: str | None = None  # an existing tokenizer.json (or a directory holding one); None = train one
    vocab_size: int | None = None  # None = the preset's
    seq_len: int = 128
    batch_size: int = 16
    grad_accum: int = 1
    steps: int = 600
    lr: float = 3e-3
    warmup_steps: int = 50
    decay_fraction: float = 0.2  # WSD: the last 20% of steps decay linearly to final_lr_fraction * lr
    final_lr_fraction: float = 0.0
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    lambda_q: float = DEFAULT_LAMBDA_Q  # QUAIL hinge weight (0 = plain CE)
    margin: float = DEFAULT_MARGIN  # QUAIL logit margin for whitelisted (JSON structure) targets
    margin_from: str | None = None  # a `felix fidelity` JSON: margin = its measured noise (quail.margin_from_noise)
    margin_quantile: float = DEFAULT_NOISE_QUANTILE  # ... at this lower-tail quantile of the margin change
    eval_every: int = 50
    eval_batches: int = 8
    checkpoint_every: int = 0  # 0 = only at the end (and when stopped early)
    seed: int = 0
    device: str = "auto"
    checkpoint_activations: bool = False
    peak_tflops: float | None = None  # overrides the device table for MFU
    memorization_gap: float = 0.1  # val below train by this fraction of train loss ...
    memorization_min_wraps: int = 3  # ... after this many passes over the corpus
    parallel: str = "ddp"  # under torchrun: "ddp" or "fsdp" (FSDP2 fully_shard); felix/train/distributed.py
    qat: str | None = None  # quantization-aware training: a felix.model.qat mode (rq4 ... tq2_0, bitnet)
    # the weeks-long run (felix.train.runs): checkpoint retention, the on-device step guard, an experiment logger
    keep_last: int = 3  # step checkpoints kept (newest first; 0 = every one); the latest always stays
    milestone_every: int = 0  # checkpoints at steps divisible by this are never removed (0 = none)
    max_skipped_in_a_row: int = 8  # stop (with a checkpoint) after this many skipped steps in a row
    loss_spike_window: int = 128  # loss spike = z-score of the step loss over this many previous steps ...
    loss_spike_threshold: float = 5.0  # ... above this many standard deviations (llm.c's outlier detector)
    skip_loss_spikes: bool = False  # skip the update of a spiking step (else only logged)
    tensorboard: bool = False  # also log the metrics to OUT/tensorboard (torch.utils.tensorboard)

    def __post_init__(self):
        problems = []
        for name in ("seq_len", "batch_size", "grad_accum", "steps", "eval_every", "eval_batches"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.decay_fraction <= 1:
            problems.append(f"decay_fraction must be in [0, 1], got {self.decay_fraction}")
        if self.warmup_steps < 0 or self.warmup_steps + round(self.decay_fraction * self.steps) > self.steps:
            problems.append(
                f"warmup_steps {self.warmup_steps} + decay steps {round(self.decay_fraction * self.steps)}"
                f" exceed steps {self.steps}"
            )
        if self.teacher_data and (self.data or self.val_data):
            problems.append(
                "--teacher-data (distillation) and --data/--val-data (pretraining) are separate runs; "
                "give one or the other"
            )
        problems += _source_problems(self)
        if self.spokes < 0 or (self.spoke_rank is not None and self.spoke_rank < 1):
            problems.append(f"spokes must be >= 0 and spoke_rank >= 1, got {self.spokes} and {self.spoke_rank}")
        if self.train_only not in TRAIN_ONLY:
            problems.append(f"train_only must be one of {[t for t in TRAIN_ONLY if t]}, got {self.train_only!r}")
        for name in ("keep_last", "milestone_every"):
            if getattr(self, name) < 0:
                problems.append(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.max_skipped_in_a_row < 1 or self.loss_spike_window < 2 or not self.loss_spike_threshold > 0:
            problems.append(
                f"max_skipped_in_a_row must be >= 1, loss_spike_window >= 2 and loss_spike_threshold "
                f"> 0, got {self.max_skipped_in_a_row}, {self.loss_spike_window}, "
                f"{self.loss_spike_threshold}"
            )
        if self.lr <= 0:
            problems.append(f"lr must be positive, got {self.lr}")
        if self.margin < 0:
            problems.append(f"margin must be >= 0, got {self.margin}")
        unknown = [t for t in self.tasks if t not in task_records.MAKERS]
        if unknown or not self.tasks:
            problems.append(
                f"unknown or no structured task(s) {unknown or self.tasks}; known: {', '.join(task_records.MAKERS)}"
            )
        if self.qat is not None and str(self.qat).lower() not in felix_qat.QAT_MODES:
            problems.append(f"unknown qat mode {self.qat!r}; choose from {', '.join(felix_qat.QAT_MODES)}")
        elif self.qat is not None and self.parallel == "fsdp":
            problems.append(
                "--qat does not run under --parallel fsdp: FSDP2 shards the latent weights in place, and "
                "the fake-quant parametrization (torch.nn.utils.parametrize) cannot read sharded storage; "
                "use --parallel ddp"
            )
        if problems:
            raise ValueError("invalid TrainConfig: " + "; ".join(problems))
        if self.preset not in felix_model.PRESETS:
            raise ValueError(f"unknown preset {self.preset!r}; available presets: {', '.join(felix_model.PRESETS)}")
        if self.margin_from is not None:  # the calibrated margin replaces the given one (CalibrationError otherwise)
            self.margin = margin_from_fidelity(self.margin_from, self.margin_quantile)
        try:
            QuailConfig(self.margin, self.lambda_q, self.margin_quantile)  # validates the three together
        except ValueError as e:
            raise ValueError(f"invalid TrainConfig: {e}") from None

    @property
    def quail(self) -> QuailConfig:
        """This run's QUAIL settings as the one config object (felix.core.quail.QuailConfig)."""
        return QuailConfig(self.margin, self.lambda_q, self.margin_quantile)


def _source_problems(cfg: TrainConfig) -> list[str]:
    """What is wrong with the data sources' weights and names (felix.data.mix checks the weights themselves)."""
    if cfg.data_weights and len(cfg.data_weights) != len(cfg.data):
        return [f"{len(cfg.data_weights)} data weights for {len(cfg.data)} data sources"]
    if cfg.data_names and len(cfg.data_names) != len(cfg.data):
        return [f"{len(cfg.data_names)} data source names for {len(cfg.data)} data sources"]
    problems = []
    if cfg.data_weights:
        try:
            normalize_weights(cfg.data_weights, cfg.data_names or cfg.data)
        except MixError as e:
            problems.append(str(e))
    bad = [n for n in cfg.data_names if not SOURCE_NAME.fullmatch(n)]
    if bad or len(set(cfg.data_names)) != len(cfg.data_names):
        problems.append(
            f"data source names must be unique and made of letters, digits, '.', '_' or '-': {cfg.data_names}"
        )
    return problems


# section -> its keys; a key is a TrainConfig field name, or (key, field) when the section names it differently.
# "sources" is the one composite key: a mapping name -> {path, weight} stored as TrainConfig.data / data_weights /
# data_names (see _sources_to_fields).
SECTIONS: dict[str, tuple] = {
    "run": ("seed",),
    "model": (
        "preset",
        "vocab_size",
        "init_from",
        "spokes",
        "spoke_rank",
        "train_only",
        "checkpoint_activations",
        "qat",
    ),
    "data": (
        "sources",
        "val_data",
        "teacher_data",
        "tokenizer",
        "seq_len",
        "val_fraction",
        "n_records",
        "tasks",
        "prose",
    ),
    "optimizer": (
        "lr",
        "weight_decay",
        "grad_clip",
        "batch_size",
        "grad_accum",
        "max_skipped_in_a_row",
        "loss_spike_window",
        "loss_spike_threshold",
        "skip_loss_spikes",
    ),
    "schedule": ("steps", "warmup_steps", "decay_fraction", "final_lr_fraction"),
    "quail": ("lambda_q", "margin", "margin_from", "margin_quantile"),
    "eval": ("eval_every", "eval_batches", "memorization_gap", "memorization_min_wraps", "tensorboard"),
    "checkpoint": ("out_dir", "checkpoint_every", "keep_last", "milestone_every"),
    "parallel": (("mode", "parallel"), "device", "peak_tflops"),
}
SOURCES_FIELDS = ("data", "data_weights", "data_names")  # what data.sources stands for in TrainConfig
SOURCE_KEYS = ("path", "weight")
PATH_FIELDS = ("out_dir", "data", "val_data", "teacher_data", "init_from", "tokenizer", "margin_from")


class RunConfigError(ValueError):
    """A run config (file or override) cannot be used: unknown section or key, wrong type, bad YAML."""


def section_keys(section: str) -> dict[str, str]:
    """{config key: TrainConfig field} of one section ("sources" maps to itself: it is composite)."""
    return dict((k, k) if isinstance(k, str) else k for k in SECTIONS[section])


def field_locations() -> dict[str, str]:
    """{TrainConfig field: "section.key"} for every field the table maps."""
    out = {}
    for section in SECTIONS:
        for key, name in section_keys(section).items():
            for f in SOURCES_FIELDS if key == "sources" else (name,):
                out[f] = f"{section}.{key}"
    return out


def _train_config_fields() -> dict:
    return {f.name: f for f in dataclasses.fields(TrainConfig)}


# ------------------------------------------------------------------------------------------------ types
def _coerce(value, annotation: str, where: str):
    """`value` as the TrainConfig field type `annotation` (a string: the module uses postponed annotations)."""
    kinds = [k.strip() for k in annotation.split("|")]
    if value is None:
        if "None" in kinds:
            return None
        raise RunConfigError(f"{where}: a value is required (got null)")
    kind = next(k for k in kinds if k != "None")
    try:
        if kind == "bool":
            if isinstance(value, bool):
                return value
        elif kind == "int":
            if isinstance(value, int) and not isinstance(value, bool):
                return value
            if isinstance(value, float) and value.is_integer():
                return int(value)
        elif kind == "float":
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                return float(value)
            if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
                return float(value)
        elif kind == "str":
            if isinstance(value, (str, int, float)) and not isinstance(value, bool):
                return str(value)
        elif kind.startswith("list["):
            inner = kind[5:-1]
            items = value if isinstance(value, list) else [value]
            return [_coerce(v, inner, f"{where}[{i}]") for i, v in enumerate(items)]
    except ValueError:
        pass
    raise RunConfigError(f"{where}: expected {annotation}, got {value!r}")


# ------------------------------------------------------------------------------------------------ sources
def _sources_to_fields(sources, where: str) -> dict:
    """data.sources (a mapping name -> path or {path, weight}) as TrainConfig's data / data_weights / data_names.
    Weights are all given or all omitted (then each source weighs as many tokens as it has)."""
    if sources is None:
        return {"data": [], "data_weights": [], "data_names": []}
    if not isinstance(sources, dict):
        raise RunConfigError(
            f"{where}: expected a mapping of source name -> {{path, weight}}, got {type(sources).__name__}"
        )
    paths, weights, names = [], [], []
    for name, spec in sources.items():
        at = f"{where}.{name}"
        if isinstance(spec, str):
            spec = {"path": spec}
        if not isinstance(spec, dict):
            raise RunConfigError(f"{at}: expected a path or a mapping with keys {', '.join(SOURCE_KEYS)}")
        unknown = sorted(set(spec) - set(SOURCE_KEYS))
        if unknown:
            raise RunConfigError(f"{at}: unknown key(s) {', '.join(unknown)}; known: {', '.join(SOURCE_KEYS)}")
        if not spec.get("path"):
            raise RunConfigError(f"{at}: needs a path (a prepared directory or a data file)")
        names.append(str(name))
        paths.append(_coerce(spec["path"], "str", f"{at}.path"))
        if spec.get("weight") is not None:
            weights.append(_coerce(spec["weight"], "float", f"{at}.weight"))
    if weights and len(weights) != len(paths):
        raise RunConfigError(
            f"{where}: give a weight for every source or for none (then sources weigh by their "
            f"token counts); weighted: {len(weights)} of {len(paths)}"
        )
    return {"data": paths, "data_weights": weights, "data_names": names}


def _fields_to_sources(data: list, weights: list, names: list) -> dict | None:
    if not data:
        return None
    names = names or default_source_names(data)
    return {
        name: ({"path": path, "weight": w} if weights else {"path": path})
        for name, path, w in zip(names, data, weights or [None] * len(data))
    }


def default_source_names(paths) -> list[str]:
    """A name per source from its path (a directory's name, a file's stem), made unique with -2, -3, ..."""
    names, seen = [], {}
    for p in paths:
        p = Path(str(p).rstrip("/"))
        base = (p.name if p.is_dir() else p.name.split(".")[0]) or "data"
        seen[base] = seen.get(base, 0) + 1
        names.append(base if seen[base] == 1 else f"{base}-{seen[base]}")
    return names


# ------------------------------------------------------------------------------------------------ layouts
def check_sections(tree, origin: str) -> dict:
    """`tree` (a parsed config) checked for shape: a mapping of known sections, each a mapping of known keys."""
    if tree is None:
        return {}
    if not isinstance(tree, dict):
        raise RunConfigError(
            f"{origin}: a run config is a mapping of sections ({', '.join(SECTIONS)}), got {type(tree).__name__}"
        )
    unknown = [s for s in tree if s not in SECTIONS]
    if unknown:
        raise RunConfigError(
            f"{origin}: unknown section(s) {', '.join(map(str, unknown))}; known: {', '.join(SECTIONS)}"
        )
    problems = []
    for section, body in tree.items():
        if body is None:
            continue
        if not isinstance(body, dict):
            problems.append(f"section {section} must be a mapping, got {type(body).__name__}")
            continue
        known = section_keys(section)
        bad = [f"{section}.{k}" for k in body if k not in known]
        if bad:
            problems.append(f"unknown key(s) {', '.join(bad)} (known in {section}: {', '.join(known)})")
    if problems:
        raise RunConfigError(f"{origin}: " + "; ".join(problems))
    return tree


def sections_to_fields(tree: dict, origin: str) -> dict:
    """A checked config tree as TrainConfig keyword arguments (only the keys it sets)."""
    fields = _train_config_fields()
    out = {}
    for section, body in check_sections(tree, origin).items():
        for key, value in (body or {}).items():
            name = section_keys(section)[key]
            if key == "sources":
                out.update(_sources_to_fields(value, f"{origin}: {section}.sources"))
            else:
                out[name] = _coerce(value, fields[name].type, f"{origin}: {section}.{key}")
    return out


def fields_to_sections(values: dict) -> dict:
    """TrainConfig values (asdict) in the sectioned layout, every mapped field present."""
    tree = {}
    for section in SECTIONS:
        body = {}
        for key, name in section_keys(section).items():
            if key == "sources":
                body[key] = _fields_to_sources(values["data"], values["data_weights"], values["data_names"])
            else:
                body[key] = values[name]
        tree[section] = body
    return tree


# ------------------------------------------------------------------------------------------------ inputs
def load_file(path) -> dict:
    """A config file, parsed (safe_load) and checked for known sections and keys."""
    text = read_text(path, RunConfigError, "run config")
    try:
        tree = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise RunConfigError(f"{path}: not valid YAML ({e})") from None
    return check_sections(tree, str(path))


def apply_overrides(tree: dict, overrides) -> dict:
    """``section.key=value`` (value in YAML syntax) applied to a config tree, deeper keys allowed under
    data.sources (``data.sources.web.weight=0.5``)."""
    tree = {s: (dict(b) if isinstance(b, dict) else b) for s, b in (tree or {}).items()}
    for item in overrides:
        key, sep, raw = item.partition("=")
        parts = key.strip().split(".")
        if not sep or len(parts) < 2 or not all(parts):
            raise RunConfigError(f"override {item!r}: expected section.key=value, e.g. optimizer.lr=1e-3")
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError as e:
            raise RunConfigError(f"override {item!r}: the value is not valid YAML ({e})") from None
        section, rest = parts[0], parts[1:]
        if section not in SECTIONS:
            raise RunConfigError(f"override {item!r}: unknown section {section!r}; known: {', '.join(SECTIONS)}")
        if rest[0] not in section_keys(section):
            raise RunConfigError(
                f"override {item!r}: unknown key {section}.{rest[0]} (known in {section}: "
                f"{', '.join(section_keys(section))})"
            )
        if len(rest) > 1 and rest[0] != "sources":
            raise RunConfigError(f"override {item!r}: {section}.{rest[0]} has no sub-keys")
        if rest[0] != "sources":  # checked here, so that a bad value is reported as this override's
            _coerce(value, _train_config_fields()[section_keys(section)[rest[0]]].type, f"override {item!r}")
        if not isinstance(tree.get(section), dict):
            tree[section] = {}
        node = tree[section]
        for depth, part in enumerate(rest[:-1]):
            child = node.get(part)
            if isinstance(child, str) and depth == 1:  # data.sources.NAME given as a bare path
                child = {"path": child}
            if not isinstance(child, dict):
                child = {}
            node[part] = child = dict(child)
            node = child
        node[rest[-1]] = value
    return check_sections(tree, "command line")


def merge(base: dict, top: dict) -> dict:
    """Config tree `top` over `base`, key by key within each section (a source mapping is replaced whole)."""
    out = {s: dict(b or {}) for s, b in (base or {}).items()}
    for section, body in (top or {}).items():
        out.setdefault(section, {}).update(body or {})
    return out


def resolve(config_file=None, overrides=(), flags: dict | None = None, resume: bool = False):
    """The TrainConfig of a run: defaults -- or, when `resume`, the run's own run.yaml (in the out_dir the flags,
    overrides, config file or defaults name) -- then the `config_file`, then `overrides` (section.key=value), then
    `flags` (TrainConfig field -> value, only the flags given). Raises RunConfigError (or TrainConfig's
    ValueError) naming what is wrong."""
    file_tree = load_file(config_file) if config_file is not None else {}
    tree = {}
    if resume:
        out_dir = (
            (flags or {}).get("out_dir")
            or (apply_overrides(file_tree, overrides).get("checkpoint") or {}).get("out_dir")
            or TrainConfig.__dataclass_fields__["out_dir"].default
        )
        # the config the checkpoint being resumed was trained with, else the run's latest resolved config
        for where in (Path(out_dir) / CHECKPOINT_POINTER / RUN_CONFIG_FILE, Path(out_dir) / RUN_CONFIG_FILE):
            if where.is_file():
                tree = load_file(where)
                break
    tree = merge(tree, file_tree)
    values = sections_to_fields(apply_overrides(tree, overrides), str(config_file or "command line"))
    flags = dict(flags or {})
    if "data" in flags:  # --data replaces the file's sources, names and weights with it
        values.update(data_weights=[], data_names=[])
    values.update(flags)
    return TrainConfig(**values)


def resolved_tree(cfg) -> dict:
    """A TrainConfig as the sectioned config that reproduces it (paths absolute)."""
    values = dataclasses.asdict(cfg)
    for name in PATH_FIELDS:
        v = values[name]
        if isinstance(v, list):
            values[name] = [os.path.abspath(p) for p in v]
        elif v is not None:
            values[name] = os.path.abspath(v)
    if values["data"] and not values["data_names"]:
        values["data_names"] = default_source_names(cfg.data)
    return fields_to_sections(values)


def dump(cfg) -> str:
    return (
        "# felix train: the resolved run config (felix/train/config.py). `felix train --resume --out-dir DIR` reads "
        "it;\n# `felix train --config` accepts it.\n"
        + yaml.safe_dump(resolved_tree(cfg), sort_keys=False, default_flow_style=False)
    )


def write_resolved(cfg, directory) -> Path:
    """``run.yaml`` (the resolved config) into `directory`, atomically."""
    return atomic_write_text(Path(directory) / RUN_CONFIG_FILE, dump(cfg))
