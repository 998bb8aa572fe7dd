"""Felix build: the Python package plus the C++ extension felix._C, built with CMake.

`kernels/` (the Triton kernels) installs as `felix.kernels`: we never install a top-level module
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


class CMakeBuild(build_ext):
    """Configure and build CMakeLists.txt, placing the module where setuptools expects it."""

    def build_extension(self, ext):
        import pybind11

        out_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        build_dir = Path(self.build_temp).resolve() / ext.name
        build_dir.mkdir(parents=True, exist_ok=True)
        cfg = "Debug" if self.debug else "Release"
        configure = [
            "cmake", str(ROOT),
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out_dir}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DCMAKE_BUILD_TYPE={cfg}",
        ]
        jobs = str(max(1, os.cpu_count() or 1))
        subprocess.run(configure, cwd=build_dir, check=True)
        subprocess.run(["cmake", "--build", ".", "--config", cfg, "-j", jobs], cwd=build_dir, check=True)


packages = find_packages(include=["felix", "felix.*"]) + ["felix.kernels"]

setup(
    name="felix",
    version="0.1.0",
    description="Kernels, codecs and tooling to train Felix-LM v2 to survive its 4-bit deployment",
    long_description=(ROOT / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=packages,
    package_dir={"felix.kernels": "kernels"},
    ext_modules=[CMakeExtension("felix._C")],
    cmdclass={"build_ext": CMakeBuild},
    install_requires=["torch>=2.5", "numpy>=1.24", "tqdm>=4.60"],
    extras_require={
        "test": [
            "pytest>=8", "pytest-benchmark>=4", "hypothesis>=6.100", "triton>=3.2",
            "gguf==0.19.0", "llama-cpp-python==0.3.36", "matplotlib>=3.7",
        ],
    },
    entry_points={"console_scripts": ["felix=felix.cli:main"]},
    zip_safe=False,
)
