#!/usr/bin/env bash
# Installs Felix and what it needs on a fresh machine (Python, gcc and pip are assumed), idempotently.
#   bash scripts/setup.sh          the package + C++ extension (enough for `felix quantize`)
#   bash scripts/setup.sh --test   plus the test tools: Triton (interpreter + AOT), gguf-py, hypothesis,
#                                  pytest-benchmark, and llama-cpp-python built from source (CPU only;
#                                  ~8 minutes the first time, then pip's wheel cache makes it instant),
#                                  and hipcc (apt-get, where possible) for the gfx1101 compile check
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
pip() { "$PY" -m pip install --disable-pip-version-check --no-input "$@"; }

# torch first and pinned: a bare `torch` requirement would download a multi-GB CUDA build. On a GPU
# machine that already has a ROCm/CUDA torch, keep it.
if ! "$PY" -c "import torch" 2>/dev/null; then
  pip "torch==2.13.0"
fi
pip "setuptools>=64" wheel "pybind11>=2.12" "cmake>=3.18" ninja numpy tqdm

if [[ "${1:-}" == "--test" ]]; then
  # hipcc for the gfx1101 compile check of csrc/hip (tests/test_hip_compile.py); Debian's ROCm 5.2 packages
  if ! command -v hipcc >/dev/null && command -v apt-get >/dev/null; then
    SUDO=""; [[ $(id -u) -ne 0 ]] && command -v sudo >/dev/null && SUDO="sudo -n"
    $SUDO apt-get install -y -q hipcc libamdhip64-dev >/dev/null 2>&1 \
      || { $SUDO apt-get update -q >/dev/null 2>&1 && $SUDO apt-get install -y -q hipcc libamdhip64-dev >/dev/null 2>&1; } \
      || echo "setup: could not install hipcc with apt-get; the gfx1101 compile check will be skipped" >&2
  fi
  if ! "$PY" -c "import llama_cpp" 2>/dev/null; then
    CMAKE_ARGS="-DGGML_NATIVE=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF" \
      pip "llama-cpp-python==0.3.36"
  fi
  pip --no-build-isolation -e ".[test]"
else
  pip --no-build-isolation -e .
fi
"$PY" -c "import felix; [print(f'  backend {n:9}', 'yes' if s.available else 'no ', s.reason) for n, s in felix.backends().items()]"
