"""`felix selftest` runs on CPU (cpu + reference backends; Triton too under the interpreter), prints its
table, exits 0 when every check passes and 1 when one fails."""

from felix.ops import dispatch as oplib
from felix.ops import selftest
from felix.cli.main import main


def test_selftest_passes_on_cpu(capsys):
    assert main(["selftest", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    for header in ("op", "backend", "device", "max error", "bound", "result", "ms"):
        assert header in out
    assert "quant_matmul  reference cpu" in out and "attention     reference cpu" in out and "FAIL" not in out
    assert " checks passed" in out


def test_selftest_fails_loudly_on_a_wrong_backend(capsys, monkeypatch):
    reference = oplib._IMPLS["quant_matmul"]["reference"]
    monkeypatch.setitem(oplib._IMPLS["quant_matmul"], "reference", lambda *args: reference(*args) * 1.01)
    assert main(["selftest", "--device", "cpu", "--op", "quant_matmul"]) == 1
    out = capsys.readouterr().out
    assert "FAIL" in out and "FAILED" in out


def triton_selftest_rows():
    """Runs in the interpreter worker: the selftest exercises the Triton backend on tiny CPU shapes."""
    rows = selftest.run("cpu", ["quant_matmul", "attention", "linear_ce_quail", "lowrank_linear"], seed=1)
    return [(r.backend, r.case, r.passed) for r in rows]


def test_selftest_covers_triton_under_the_interpreter(interpret):
    rows = interpret(triton_selftest_rows)
    triton_rows = [r for r in rows if r[0] == "triton"]
    assert len([r for r in triton_rows if "M=" in r[1]]) == 3 * 3 * 2  # formats x shapes x (fp32, fp16)
    assert len([r for r in triton_rows if " causal " in r[1] or " full " in r[1]]) == 2 * 2  # attention x (fp32, fp16)
    assert len([r for r in triton_rows if " chunk " in r[1]]) == 2  # the loss case x (fp32, fp16)
    assert len([r for r in triton_rows if " r8 " in r[1]]) == 2  # the low-rank case x (fp32, fp16)
    assert all(r[2] for r in rows), [r for r in rows if not r[2]]
