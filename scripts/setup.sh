#!/usr/bin/env bash
# Installs Felix and what it needs on a fresh machine (Python, gcc and pip are assumed), idempotently.
#   bash scripts/setup.sh          the package + C++ extension (enough for `felix quantize`)
#   bash scripts/setup.sh --test   plus the test tools: Triton (interpreter + AOT), gguf-py, hypothesis,
#                                  pytest-benchmark, and llama-cpp-python built from source (CPU only;
#                                  ~8 minutes the first time, then pip's wheel cache makes it instant),
#                                  hipcc (apt-get, where possible) for the gfx1101 compile check, and the
#                                  llama.cpp fork (RQ4, felix arch) from ../shared/llama-fork, CPU only, once per
#                                  machine (~15 minutes; cached in felix.core.fork.build_dir(), rebuilt only when its
#                                  sources change)
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
  # hipcc for the gfx1101 compile check of csrc/hip (tests/ops/test_hip_compile.py); Debian's ROCm 5.2 packages
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
  # The fork: its build.sh downloads the llama-cpp-python sdist it overlays, which needs scikit-build-core here
  # (no build isolation). Its own libraries and Python sources stay in the cache dir; stock llama_cpp is untouched.
  FORK_SRC=${FELIX_LLAMA_FORK_SRC:-../shared/llama-fork}
  if [[ -f "$FORK_SRC/build.sh" ]]; then
    FORK_DIR=$("$PY" -c "from felix.core import fork; print(fork.build_dir())")
    stamp=$(cat "$FORK_SRC/build.sh" $(find "$FORK_SRC/overlay" -type f | sort) | sha256sum | cut -c1-16)
    if [[ -f "$FORK_DIR/cmake-build/bin/libllama.so" && "$(cat "$FORK_DIR/.felix-stamp" 2>/dev/null)" == "$stamp" ]]; then
      echo "setup: llama.cpp fork already built in $FORK_DIR"
    else
      pip "scikit-build-core>=0.9"
      mkdir -p "$FORK_DIR"
      echo "setup: building the llama.cpp fork into $FORK_DIR (CPU only, ~15 minutes the first time)"
      bash "$FORK_SRC/build.sh" "$FORK_DIR" > "$FORK_DIR.build.log" 2>&1 \
        || { tail -30 "$FORK_DIR.build.log" >&2; echo "setup: the fork build failed (log: $FORK_DIR.build.log)" >&2; exit 1; }
      echo "$stamp" > "$FORK_DIR/.felix-stamp"
    fi
  else
    echo "setup: no fork sources at $FORK_SRC; the fork's tests will be skipped" >&2
  fi
else
  pip --no-build-isolation -e .
fi
"$PY" -m felix backends
