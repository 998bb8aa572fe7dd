"""Felix build: the Python package plus the C++ extension felix._C, built with CMake.

`kernels/` (the Triton kernels) installs as `felix.ops.kernels`: we never install a top-level module
called `kernels` (Hugging Face's `kernels` package owns that name).
"""

import os
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


class CMakeExtension(Extension):
    def __init__(self, name: str):
        super().__init__(name, sources=[])


GPU_EXT_SOURCES = ["csrc/hip/quant_matmul.cu", "csrc/hip/quant_matmul_torch.cpp"]


def gpu_extensions():
    """felix._C_gpu (csrc/hip, HIP/CUDA common subset) via torch.utils.cpp_extension, only when the torch
    in the build environment has CUDA or ROCm and its compiler is found (FELIX_GPU_EXT=0 turns it off).
    Without it felix still builds and imports; `felix backends` says what is missing."""
    if os.environ.get("FELIX_GPU_EXT", "auto") == "0":
        return [], None
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        print(
            "felix: torch is not importable in this build environment: skipping the GPU extension felix._C_gpu "
            "(build with `pip install --no-build-isolation -e .` to use the installed torch)"
        )
        return [], None
    if torch.version.hip is None and torch.version.cuda is None:
        print(f"felix: torch {torch.__version__} has neither CUDA nor ROCm: skipping the GPU extension felix._C_gpu")
        return [], None
    home = cpp_extension.ROCM_HOME if torch.version.hip else cpp_extension.CUDA_HOME
    if home is None:
        print(
            "felix: torch has " + ("ROCm" if torch.version.hip else "CUDA") + " but no toolkit was found "
            "(ROCM_HOME / CUDA_HOME): skipping the GPU extension felix._C_gpu"
        )
        return [], None
    ext = cpp_extension.CUDAExtension(
        "felix._C_gpu",
        GPU_EXT_SOURCES,
        include_dirs=[str(ROOT / "csrc" / "hip")],
        extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3"]},
    )
    return [ext], cpp_extension.BuildExtension


GPU_EXTS, TORCH_BUILD_EXT = gpu_extensions()


class CMakeBuild(TORCH_BUILD_EXT or build_ext):
    """Configure and build CMakeLists.txt, placing the module where setuptools expects it; the optional
    GPU extension goes through torch's BuildExtension."""

    def build_extension(self, ext):
        if not isinstance(ext, CMakeExtension):
            return super().build_extension(ext)
        import pybind11

        out_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        build_dir = Path(self.build_temp).resolve() / ext.name
        build_dir.mkdir(parents=True, exist_ok=True)
        cfg = "Debug" if self.debug else "Release"
        configure = [
            "cmake",
            str(ROOT),
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out_dir}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DCMAKE_BUILD_TYPE={cfg}",
        ]
        jobs = str(max(1, os.cpu_count() or 1))
        subprocess.run(configure, cwd=build_dir, check=True)
        subprocess.run(["cmake", "--build", ".", "--config", cfg, "-j", jobs], cwd=build_dir, check=True)


packages = find_packages(include=["felix", "felix.*"]) + ["felix.ops.kernels"]

setup(
    name="felix",
    version="0.1.0",
    description="Kernels, codecs and tooling to train Felix-LM v2 to survive its 4-bit deployment",
    long_description=(ROOT / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=packages,
    package_dir={"felix.ops.kernels": "kernels"},
    ext_modules=[CMakeExtension("felix._C"), *GPU_EXTS],
    cmdclass={"build_ext": CMakeBuild},
    install_requires=[
        "torch>=2.5",
        "numpy>=1.24",
        "tqdm>=4.60",
        "tokenizers>=0.19",
        "safetensors>=0.4",
        "matplotlib>=3.7",
        "PyYAML>=6.0",  # PyYAML: `felix train --config` run configs (safe_load)
        "pyarrow>=14",
        "zstandard>=0.22",  # felix data prepare / tokenizer train: parquet, .jsonl.zst
        "gguf==0.19.0",
    ],  # felix export / inspect / fidelity write and read GGUF with gguf-py
    extras_require={
        # `felix serve`: llama-cpp-python's OpenAI-compatible server (fastapi, uvicorn, sse-starlette, ...)
        "serve": ["llama-cpp-python[server]==0.3.36"],
        "test": [
            "pytest>=8",
            "pytest-benchmark>=4",
            "hypothesis>=6.100",
            "triton>=3.2",
            "ruff>=0.6",
            "llama-cpp-python[server]==0.3.36",
        ],
        "tensorboard": ["tensorboard>=2.14"],  # felix train --tensorboard (torch.utils.tensorboard)
    },
    entry_points={"console_scripts": ["felix=felix.cli.main:main"]},
    zip_safe=False,
)
