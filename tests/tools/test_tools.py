"""The CLI main job, the benchmark harness (its bookkeeping, and a smoke run of bench/), AOT parsing."""

import json
import os
import subprocess
import sys

import pytest
import torch

from felix.cli.main import main
from felix.testing.bench import BenchRecorder, Measurement

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_cli_quantize_demo_runs_every_format(capsys):
    assert main(["quantize", "--rows", "8", "--cols", "512", "--repeats", "1", "--backend", "reference"]) == 0
    out = capsys.readouterr().out
    for fmt in ("rq4", "iq4_nl", "q4_0", "q8_0", "tq2_0"):
        assert f"\n{fmt} " in out
    assert "NO" not in out.split("same bytes", 1)[1].split("\n", 1)[1]


def test_cli_quantize_backends_agree(capsys):
    import felix

    backends = [b for b in ("reference", "cpu") if felix.backends()[b].available]
    args = ["quantize", "--rows", "4", "--cols", "256", "--repeats", "1"]
    for b in backends:
        args += ["--backend", b]
    assert main(args) == 0, capsys.readouterr().out


def test_cli_rejects_bad_columns(capsys):
    with pytest.raises(SystemExit):
        main(["quantize", "--cols", "100"])
    assert "multiple of 256" in capsys.readouterr().err


def test_cli_backends(capsys):
    from felix.ship import llamacpp

    assert main(["backends"]) == 0
    out = capsys.readouterr().out
    assert "reference  yes" in out
    for runtime in llamacpp.RUNTIMES:  # the GGUF runtimes are reported with the same yes/no rule
        ok, why = llamacpp.available(runtime)
        assert f"{runtime:10} {'yes' if ok else 'no ':3}  {why}" in out


def test_bench_recorder_ratios_and_atomic_report(tmp_path):
    rec = BenchRecorder(torch.device("cpu"), copy_gbps=10.0)
    rec.add(Measurement("quantize q8_0 8x32 cpu", "felix-cpu", True, 0.5, 2e9))
    rec.add(Measurement("quantize q8_0 8x32 cpu", "ggml-c", False, 1.0, 2e9))
    rows = {r["impl"]: r for r in rec.rows()}
    assert rows["felix-cpu"]["speedup_vs"]["ggml-c"] == pytest.approx(2.0)
    assert rows["felix-cpu"]["gbps"] == pytest.approx(4.0)
    assert rows["felix-cpu"]["pct_copy_bandwidth"] == pytest.approx(40.0)
    path = rec.write(str(tmp_path))
    data = json.load(open(path))
    assert len(data["measurements"]) == 2 and data["copy_gbps"] == 10.0
    assert "| quantize q8_0 8x32 cpu | ggml-c | 1000.000 | 2.00 | 20.0 | 2.00x |" in open(path[:-5] + ".md").read()
    assert os.path.getsize(path[:-5] + ".png") > 1000
    assert not [p for p in os.listdir(tmp_path) if ".tmp" in p]
    # a second run of another case merges into the same device file; each row keeps the % roofline of the
    # bandwidth measured in its own session
    rec2 = BenchRecorder(torch.device("cpu"), copy_gbps=20.0)
    rec2.add(Measurement("dequantize q8_0 8x32 cpu", "felix-cpu", True, 0.25, 2e9))
    rec2.write(str(tmp_path))
    data = json.load(open(path))
    assert len(data["measurements"]) == 3
    pct = {(r["case"], r["impl"]): r["pct_copy_bandwidth"] for r in data["rows"]}
    assert pct["quantize q8_0 8x32 cpu", "felix-cpu"] == pytest.approx(40.0)
    assert pct["dequantize q8_0 8x32 cpu", "felix-cpu"] == pytest.approx(40.0)  # 8 GB/s of 20


def test_benchmarks_still_run():
    """Every bench/ case runs once at smoke size (no timing, nothing written)."""
    env = dict(os.environ, FELIX_BENCH_QUICK="1")
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "bench", "-q", "-p", "no:cacheprovider", "--benchmark-disable"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert " passed" in proc.stdout


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path):
    from felix.core.files import atomic_write, atomic_write_text

    path = tmp_path / "report.json"
    atomic_write_text(path, "old")

    def half_then_fail(tmp):
        tmp.write_text("new, but only ha")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(path, half_then_fail)
    assert path.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json"]  # no temporary left behind
    atomic_write_text(path, "new")
    assert path.read_text() == "new"


def test_jsonable_replaces_non_finite_and_numpy_scalars():
    import numpy as np

    from felix.core.files import jsonable

    x = {
        "a": float("nan"),
        "b": [1.5, float("inf"), (np.float32(2.5), np.int64(3))],
        "c": np.float64(-np.inf),
        "d": "text",
    }
    out = jsonable(x)
    assert out == {"a": None, "b": [1.5, None, [2.5, 3]], "c": None, "d": "text"}
    json.dumps(out, allow_nan=False)  # strict JSON
