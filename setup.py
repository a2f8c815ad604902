"""Builds the `stage1` package; `kernels/` ships inside it as `stage1.kernels`.

The C++/CUDA extension in csrc/ is optional: it is built through CMake only when csrc/ holds sources and
STAGE1_BUILD_CSRC is not "0"; the engine runs without it.
"""

import os
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).parent.resolve()


class CMakeExtension(Extension):
    def __init__(self, name: str):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def build_extension(self, ext: CMakeExtension) -> None:
        out_dir = Path(self.get_ext_fullpath(ext.name)).parent.resolve()
        build_dir = Path(self.build_temp).resolve() / ext.name
        build_dir.mkdir(parents=True, exist_ok=True)
        subprocess.check_call(["cmake", str(ROOT), f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out_dir}",
                               f"-DPython_EXECUTABLE={sys.executable}", "-DCMAKE_BUILD_TYPE=Release"], cwd=build_dir)
        subprocess.check_call(["cmake", "--build", ".", "--parallel"], cwd=build_dir)


def native_extensions() -> list:
    sources = [p for p in (ROOT / "csrc").glob("*") if p.suffix in {".cpp", ".cu"}]
    if not sources or os.environ.get("STAGE1_BUILD_CSRC", "1") == "0":
        return []
    return [CMakeExtension("stage1._C")]


setup(
    name="stage1",
    version="0.1.0",
    description="A small, fast Qwen-2.5 inference engine and a few-shot SFT data generator for base models",
    python_requires=">=3.10",
    packages=find_packages(include=["stage1", "stage1.*"]) + ["stage1.kernels"],
    package_dir={"stage1.kernels": "kernels"},
    package_data={"stage1.data": ["*.json", "*.jsonl"]},
    install_requires=["torch>=2.4", "safetensors>=0.4", "tokenizers>=0.19", "tqdm", "numpy", "gguf>=0.19",
                      "datasketch>=1.6"],
    # triton 3.7.1 is the release torch 2.13 pairs with; the tests run its kernels in the CPU interpreter
    extras_require={"test": ["pytest", "transformers>=4.45", "accelerate", "triton==3.7.1"], "triton": ["triton"]},
    ext_modules=native_extensions(),
    cmdclass={"build_ext": CMakeBuild},
)
