"""A forged GGUF does not kill the caller in stock llama.cpp (llamacpp tier: needs llama-cpp-python)."""

import os
import subprocess
import sys
import textwrap

import pytest
from export_fixtures import make_checkpoint
from test_hostile_inputs import _forge


@pytest.fixture(scope="module")
def gguf_path(tmp_path_factory):
    from felix.ship.export import export_gguf

    root = tmp_path_factory.mktemp("hostile-llamacpp")
    directory, _, _ = make_checkpoint(root / "ck", seed=3, d_model=64, n_layer=2, vocab_size=300)
    return export_gguf(directory, root / "m.gguf", quant="f32").path


_STOCK_LOAD = textwrap.dedent("""
    import sys
    from felix.ship.llamacpp import LlamaCppModel
    try:
        LlamaCppModel(sys.argv[1], runtime="stock")
    except Exception as e:
        print(f"{type(e).__name__}: {e}")
        sys.exit(3)
    print("loaded")
""")


def test_forged_gguf_does_not_kill_the_interpreter_in_stock_llamacpp(gguf_path, tmp_path):
    """Stock llama.cpp aborts the process (GGML_ASSERT) on a block_count of 1000000; it runs in a worker
    process, so the caller gets an error naming the file and lives. The attempt itself runs in a subprocess so
    that a regression cannot take pytest down with it."""
    pytest.importorskip("llama_cpp")
    path = _forge(gguf_path, tmp_path / "forged.gguf", llama__block_count=1_000_000)
    out = subprocess.run(
        [sys.executable, "-c", _STOCK_LOAD, str(path)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "GGML_NO_BACKTRACE": "1"},
    )
    assert out.returncode == 3, (out.returncode, out.stdout, out.stderr[-2000:])  # caught, not killed
    assert out.stdout.startswith("LlamaCppLoadError") and f"{path} aborted llama.cpp" in out.stdout, out.stdout
