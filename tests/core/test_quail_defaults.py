"""One QUAIL default (margin, lambda) across the op, the spec, the trainer, the CLI, the harness and the README;
the margin calibration rule (felix.core.quail.margin_from_noise / margin_from_fidelity) and `felix train --margin-from`."""

from __future__ import annotations

import inspect
import json
import re
from pathlib import Path

import pytest

from felix.verify import fidelity as F
from felix.model import felix_lm as M
from felix.core import quail
from felix.ops import loss as loss_ops
from felix.ops.reference import loss as reference_loss
from felix.train.loop import TrainConfig

ROOT = Path(__file__).resolve().parents[2]


def _default(fn, name):
    return inspect.signature(fn).parameters[name].default


def test_one_default_everywhere(capsys):
    m, lam = quail.DEFAULT_MARGIN, quail.DEFAULT_LAMBDA_Q
    assert m > 0 and lam > 0
    for fn in (loss_ops.linear_ce_quail, loss_ops.LinearCEQuail.__init__, reference_loss.full_logits_loss):
        assert (_default(fn, "margin"), _default(fn, "lambda_q")) == (m, lam), fn
    assert _default(M.FelixLM.loss, "margin") == m  # lambda_q 0 there: model.loss alone is plain CE
    cfg = TrainConfig()
    assert (cfg.margin, cfg.lambda_q) == (m, lam)
    assert _default(F.summarize, "low_margin") is None  # None = DEFAULT_MARGIN, read at call time
    from felix.cli.main import build_parser

    help_text = build_parser()._subparsers._group_actions[0].choices["train"].format_help()
    assert f"default {m}" in help_text and f"default {lam}" in help_text
    readme = (ROOT / "README.md").read_text()
    found = re.search(r"QUAIL default: margin `([0-9.]+)` logits, `lambda_q` `([0-9.]+)`", readme)
    assert found, "README states the QUAIL default"
    assert (float(found[1]), float(found[2])) == (m, lam)


def test_harness_low_margin_threshold_is_the_default():
    import torch

    ref = torch.tensor([[1.5, 0.0], [3.0, 0.0]])
    stats = F.compare_logits(ref, ref.clone(), torch.zeros(2, dtype=torch.long), torch.tensor([True, False]))
    s = F.summarize(stats)["margin"]
    assert s["low_threshold"] == quail.DEFAULT_MARGIN
    assert s["low_reference_correct"] == sum(x < quail.DEFAULT_MARGIN for x in (1.5, 3.0))


# ------------------------------------------------------------------------------------- calibration
def test_margin_from_noise_rule():
    assert quail.margin_from_noise(-0.8) == 0.8
    assert quail.margin_from_noise(-1e-3) == 1e-3
    for bad in (0.0, 0.3, float("nan"), float("inf")):
        with pytest.raises(quail.CalibrationError):
            quail.margin_from_noise(bad)


def _report(quantiles=None, path="simulated", version=F.SCHEMA_VERSION, schema=F.SCHEMA_NAME):
    margin = {"change_p01": -0.7}
    if quantiles is not None:
        margin["change_quantiles"] = quantiles
    return {"schema": schema, "schema_version": version, "results": {path: {"summary": {"margin": margin}}}}


def test_margin_from_fidelity_reads_the_measured_quantile(tmp_path):
    rep = _report({"0.001": -1.9, "0.01": -1.25, "0.05": -0.4, "0.5": 0.01})
    assert quail.margin_from_fidelity(rep) == 1.25
    assert quail.margin_from_fidelity(rep, quantile=0.05) == 0.4
    f = tmp_path / "fidelity-rq4.json"
    f.write_text(json.dumps(rep))
    assert quail.margin_from_fidelity(f) == 1.25 and quail.margin_from_fidelity(str(f), 0.001) == 1.9


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing", "does not exist"),
        ("not_json", "cannot read"),
        ("not_report", "not a felix fidelity report"),
        ("no_path", "no 'simulated' path"),
        ("old_schema", "lacks summary.margin.change_quantiles"),
        ("no_quantile", "not 0.2"),
        ("positive", "did not lower"),
        ("null", "not 0.01"),
    ],
)
def test_margin_from_fidelity_bad_input(tmp_path, case, message):
    f = tmp_path / "r.json"
    q = 0.2 if case == "no_quantile" else 0.01
    content = {
        "not_json": "{nope",
        "not_report": json.dumps({"schema": "other"}),
        "no_path": json.dumps(_report({"0.01": -1.0}, path="runtime")),
        "old_schema": json.dumps(_report(None, version=1)),
        "no_quantile": json.dumps(_report({"0.01": -1.0})),
        "positive": json.dumps(_report({"0.01": 0.25})),
        "null": json.dumps(_report({"0.01": None})),
    }.get(case)
    if content is not None:
        f.write_text(content)
    with pytest.raises(quail.CalibrationError, match=message):
        quail.margin_from_fidelity(f, q)


def test_train_config_and_cli_take_the_calibrated_margin(tmp_path, capsys):
    f = tmp_path / "fidelity-rq4.json"
    f.write_text(json.dumps(_report({"0.01": -0.9, "0.05": -0.35})))
    assert TrainConfig(margin_from=str(f)).margin == 0.9
    assert TrainConfig(margin_from=str(f), margin_quantile=0.05).margin == 0.35
    with pytest.raises(ValueError, match="did not lower"):
        TrainConfig(margin_from=str(_write(tmp_path / "pos.json", _report({"0.01": 0.1}))))
    from felix.cli.main import main

    assert main(["train", "--out-dir", str(tmp_path / "x"), "--margin", "1", "--margin-from", str(f)]) == 2
    assert "not both" in capsys.readouterr().err
    assert main(["train", "--out-dir", str(tmp_path / "y"), "--margin-from", str(tmp_path / "none.json")]) == 2
    assert "does not exist" in capsys.readouterr().err


def _write(path, obj):
    path.write_text(json.dumps(obj))
    return path


def test_one_quail_config_object():
    """QuailConfig bundles the defaults, validates them, and is what the trainer, the op and the harness read."""
    import torch

    assert quail.DEFAULT_QUAIL == quail.QuailConfig(
        quail.DEFAULT_MARGIN, quail.DEFAULT_LAMBDA_Q, quail.DEFAULT_NOISE_QUANTILE
    )
    assert TrainConfig(margin=1.5, lambda_q=0.3).quail == quail.QuailConfig(1.5, 0.3)
    loss = loss_ops.LinearCEQuail.from_config(quail.QuailConfig(1.5, 0.3), z_loss=1e-3)
    assert (loss.margin, loss.lambda_q, loss.z_loss) == (1.5, 0.3, 1e-3)
    for bad in (dict(margin=-1.0), dict(lambda_q=float("nan")), dict(noise_quantile=1.5)):
        with pytest.raises(ValueError, match="QUAIL"):
            quail.QuailConfig(**bad)
    with pytest.raises(ValueError, match="invalid TrainConfig: QUAIL lambda_q"):
        TrainConfig(lambda_q=-0.1)
    ref = torch.tensor([[1.5, 0.0]])
    stats = F.compare_logits(ref, ref.clone(), torch.zeros(1, dtype=torch.long), torch.tensor([True, False]))
    assert F.summarize(stats)["margin"]["low_threshold"] == quail.DEFAULT_QUAIL.margin
