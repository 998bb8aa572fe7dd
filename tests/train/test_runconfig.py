"""Run configs (felix/train/config.py): the section table covers TrainConfig, YAML round trips, dotted overrides,
precedence, errors naming the bad key, and the shipped configs in configs/ load and validate."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from felix.train import config as rc
from felix.cli.main import main
from felix.testing.payload import pickle_payload
from felix.train.loop import TrainConfig

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = sorted((ROOT / "configs").glob("*.yaml"))


def test_the_table_maps_every_trainconfig_field_exactly_once():
    mapped = []
    for section in rc.SECTIONS:
        for key, name in rc.section_keys(section).items():
            mapped += list(rc.SOURCES_FIELDS) if key == "sources" else [name]
    assert sorted(mapped) == sorted(f.name for f in dataclasses.fields(TrainConfig))
    assert set(rc.field_locations()) == set(mapped)


def test_resolved_config_round_trips(tmp_path):
    cfg = TrainConfig(
        preset="tiny",
        out_dir=str(tmp_path / "run"),
        data=[str(tmp_path / "a"), str(tmp_path / "b.jsonl")],
        data_weights=[0.25, 0.75],
        data_names=["alpha", "beta"],
        lr=1.5e-3,
        steps=40,
        warmup_steps=3,
        seq_len=64,
        batch_size=3,
        grad_accum=2,
        lambda_q=0.0,
        qat="q4_0",
        tasks=["encoding"],
        prose=False,
        checkpoint_every=10,
        parallel="ddp",
        peak_tflops=12.5,
        seed=7,
    )
    out = tmp_path / "run"
    out.mkdir()
    path = rc.write_resolved(cfg, out)
    assert path.name == "run.yaml" and not list(out.glob(".run.yaml.tmp*"))
    tree = yaml.safe_load(path.read_text())
    assert tree["data"]["sources"] == {
        "alpha": {"path": str(tmp_path / "a"), "weight": 0.25},
        "beta": {"path": str(tmp_path / "b.jsonl"), "weight": 0.75},
    }
    assert tree["optimizer"]["lr"] == 1.5e-3 and tree["parallel"]["mode"] == "ddp"
    assert rc.resolve(path) == cfg
    assert rc.resolve(flags={"out_dir": str(out)}, resume=True) == cfg  # what --resume --out-dir reads
    assert rc.resolve(overrides=[f"checkpoint.out_dir={out}", "schedule.steps=80"], resume=True).steps == 80


def test_overrides_and_precedence(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(
        "model: {preset: tiny}\n"
        "data:\n  sources:\n    web: {path: w, weight: 0.7}\n    code: c\n"
        "optimizer: {lr: 1e-3, batch_size: 8}\nschedule: {steps: 100, warmup_steps: 5}\n"
    )
    with pytest.raises(rc.RunConfigError, match="weight for every source or for none"):
        rc.resolve(config)
    cfg = rc.resolve(
        config, ["data.sources.code.weight=0.3", "optimizer.lr=2e-3", "schedule.steps=50"], {"batch_size": 2}
    )
    assert (cfg.data, cfg.data_weights, cfg.data_names) == (["w", "c"], [0.7, 0.3], ["web", "code"])
    assert cfg.lr == 2e-3 and cfg.steps == 50 and cfg.batch_size == 2 and cfg.preset == "tiny"
    assert isinstance(cfg.lr, float)  # YAML 1.1 reads 1e-3 as a string: coerced by the field's type
    cfg = rc.resolve(config, ["data.sources={web: w}", "data.sources.new=n"])  # replaced whole, then one added
    assert (cfg.data, cfg.data_weights, cfg.data_names) == (["w", "n"], [], ["web", "new"])
    flagged = rc.resolve(config, ["data.sources.code.weight=0.3"], {"data": ["x"]})  # --data replaces the sources
    assert (flagged.data, flagged.data_weights, flagged.data_names) == (["x"], [], [])


@pytest.mark.parametrize(
    "text, overrides, match",
    [
        ("optimizer: {lrr: 1}\n", [], r"unknown key\(s\) optimizer.lrr \(known in optimizer: lr,"),
        ("optim: {lr: 1}\n", [], r"unknown section\(s\) optim; known: run, model"),
        ("- 1\n- 2\n", [], "a run config is a mapping of sections"),
        ("optimizer: {lr: fast}\n", [], r"optimizer.lr: expected float, got 'fast'"),
        ("schedule: {steps: 1.5}\n", [], r"schedule.steps: expected int"),
        ("model: {checkpoint_activations: 1}\n", [], "expected bool"),
        ("data: {sources: {web: {path: w, wieght: 1}}}\n", [], r"data.sources.web: unknown key\(s\) wieght"),
        ("data: {sources: [a, b]}\n", [], "expected a mapping of source name"),
        ("optimizer: {lr: [1\n", [], "not valid YAML"),
        ("", ["optimizer.lr"], "expected section.key=value"),
        ("", ["optimizer.lr=abc"], r"override 'optimizer.lr=abc': expected float"),
        ("", ["nope.lr=1"], "unknown section 'nope'"),
        ("", ["optimizer.lr.x=1"], "has no sub-keys"),
        ("", ["data.sources.web.weight=-1", "data.sources.web.path=w"], "finite and >= 0; got web: -1.0"),
        ("", ["data.sources.a={path: a, weight: 0}", "data.sources.b={path: b, weight: 0}"], "sum to zero"),
    ],
)
def test_bad_configs_name_the_problem(tmp_path, text, overrides, match):
    config = tmp_path / "bad.yaml"
    config.write_text(text)
    with pytest.raises(ValueError, match=match):
        rc.resolve(config, overrides)


def test_missing_config_file(tmp_path):
    with pytest.raises(rc.RunConfigError, match="run config .*nope.yaml does not exist"):
        rc.resolve(tmp_path / "nope.yaml")


@pytest.mark.parametrize("path", SHIPPED, ids=[p.name for p in SHIPPED])
def test_shipped_configs_load_and_validate(path):
    cfg = rc.resolve(path)  # builds and validates the TrainConfig; trains nothing
    assert cfg.preset == path.stem
    assert cfg.data_names == ["web", "structured", "distill"] and sum(cfg.data_weights) == pytest.approx(1.0)
    assert cfg.seq_len == 2048 and cfg.warmup_steps > 0 and 0 < cfg.decay_fraction < 1  # the seed's WSD
    assert rc.resolve(path, ["schedule.steps=4000", "optimizer.lr=1e-4"]).steps == 4000


def test_shipped_configs_exist():
    assert {p.name for p in SHIPPED} >= {"pilot-50m.yaml", "felix-300m.yaml"}


def test_cli_refuses_unknown_keys_with_exit_2(tmp_path, capsys):
    config = tmp_path / "bad.yaml"
    config.write_text("optimizer: {learning_rate: 1}\n")
    assert main(["train", "--config", str(config), "--out-dir", str(tmp_path / "x")]) == 2
    assert "unknown key(s) optimizer.learning_rate" in capsys.readouterr().err
    assert main(["train", "--set", "optimizer.lr=-1", "--out-dir", str(tmp_path / "y")]) == 2
    assert "lr must be positive" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_resume_reads_the_checkpoints_run_yaml_and_a_planted_payload_there_never_runs(tmp_path, capsys):
    """`felix train --resume --out-dir X` resolves its settings from the checkpoint's own run.yaml (safe_load: data,
    never code); pickle bytes planted there are refused naming the file."""
    import shutil

    out = tmp_path / "run"
    args = [
        "train",
        "--out-dir",
        str(out),
        "--n-records",
        "20",
        "--no-prose",
        "--steps",
        "2",
        "--warmup-steps",
        "1",
        "--eval-every",
        "1",
        "--eval-batches",
        "1",
        "--seq-len",
        "32",
        "--batch-size",
        "2",
        "--device",
        "cpu",
        "--vocab-size",
        "300",
    ]
    assert main(args + ["--stop-at", "1"]) == 0
    step_dir = (out / "checkpoint").resolve()
    assert rc.load_file(step_dir / rc.RUN_CONFIG_FILE)["schedule"]["steps"] == 2
    planted = tmp_path / "planted"
    shutil.copytree(out, planted, symlinks=True)
    marker = tmp_path / "MARKER"
    (planted / "checkpoint" / rc.RUN_CONFIG_FILE).write_bytes(pickle_payload(marker))
    capsys.readouterr()
    assert main(["train", "--resume", "--out-dir", str(planted)]) == 2
    err = capsys.readouterr().err
    assert rc.RUN_CONFIG_FILE in err and not marker.exists()
    assert main(["train", "--resume", "--out-dir", str(out)]) == 0  # the intact run continues from its own config
