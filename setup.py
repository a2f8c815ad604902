"""Builds the `stage1` package; `kernels/` ships inside it as `stage1.kernels`.

`kernels/` has no `__init__.py` and `stage1/kernels` is a symlink to it: from the repository root (the first entry
of sys.path under `python -m pytest`) a folder with an `__init__.py` would shadow Hugging Face's `kernels`
distribution, which transformers imports; a folder without one is a namespace portion, which never wins over an
installed package. Through the symlink, `stage1.kernels` resolves the same way in a checkout, an editable install
and a wheel (whose build copies the modules), with no package_dir mapping for setuptools' editable finder to miss.

The native module `stage1._C` (csrc/, see csrc/README.md) is optional. It is built through CMake against the
torch this Python imports, so pip must not hide that torch behind build isolation:

    pip install --no-build-isolation -e .

Its Python functions are bound with pybind11, a build requirement (pyproject.toml) that --no-build-isolation does
not install: `pip install pybind11` first. If it cannot be built (torch or pybind11 not importable at build time,
no cmake, no compiler, a compile error) the package still installs, with a warning, and the engine runs on its
other kernels; STAGE1_BUILD_CSRC=0 skips the build.
The CUDA sources build only when torch itself was built with CUDA (torch.version.cuda), never because .cu files
exist: a CPU torch has nothing to link them against.
"""

import os
import shutil
import subprocess
import sys
import sysconfig
import traceback
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).parent.resolve()


class CMakeExtension(Extension):
    def __init__(self, name: str):
        super().__init__(name, sources=[])


def _warn(message: str) -> None:
    line = "=" * 100
    print(f"\n{line}\nWARNING: stage1._C (native kernels) not built: {message}\nstage1 installs without it; "
          f"kernels='native' will be unavailable. Install with `pip install --no-build-isolation -e .` where "
          f"torch, pybind11, cmake and a C++17 compiler are present to build it.\n{line}\n", file=sys.stderr,
          flush=True)


def _warn_pybind11_fallback(bundled: Path) -> None:
    print(f"stage1._C: pybind11 is not installed; building its Python functions against the pybind11 headers torch "
          f"ships ({bundled}). `pip install pybind11` to build against the package.", file=sys.stderr, flush=True)


class CMakeBuild(build_ext):
    """Builds stage1._C with CMake; a failure is a warning, not an error (the module is optional)."""

    def run(self) -> None:
        try:
            super().run()
        except Exception as exc:  # noqa: BLE001 - any failure leaves the pure-Python package installable
            _warn(f"{type(exc).__name__}: {exc}")
            traceback.print_exc(file=sys.stderr)
            self.extensions = []

    def get_outputs(self) -> list:  # only what was built: editable installs map/copy these
        return [path for path in super().get_outputs() if os.path.exists(path)]

    def build_extension(self, ext: CMakeExtension) -> None:
        try:
            import torch
        except ImportError as exc:
            raise RuntimeError("torch is not importable by the build (pip's build isolation hides it: use "
                               "--no-build-isolation)") from exc
        try:
            import pybind11  # the Python module's bindings (plain pybind11, no torch types)
            pybind11_arg = f"-Dpybind11_DIR={pybind11.get_cmake_dir()}"
        except ImportError:
            # An offline machine without the package (a GPU node's image): the copy of pybind11's headers that torch
            # ships, used alone (the module still sees no torch header or type).
            bundled = Path(torch.__file__).parent / "include"
            if not (bundled / "pybind11" / "pybind11.h").exists():
                raise RuntimeError("pybind11 is not importable by the build (`pip install pybind11` first; pip's "
                                   "build isolation would install it but hide torch: use --no-build-isolation)")
            _warn_pybind11_fallback(bundled)
            pybind11_arg = f"-DSTAGE1_PYBIND11_INCLUDE={bundled}"
        cmake = shutil.which("cmake")
        if cmake is None:
            raise RuntimeError("cmake is not on PATH")
        out_path = Path(self.get_ext_fullpath(ext.name)).resolve()
        build_dir = Path(self.build_temp).resolve() / ext.name
        build_dir.mkdir(parents=True, exist_ok=True)
        args = [cmake, str(ROOT), f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out_path.parent}",
                f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}", f"-DPython_EXECUTABLE={sys.executable}",
                pybind11_arg, f"-DSTAGE1_TORCH_VERSION={torch.__version__}",
                f"-DSTAGE1_EXT_SUFFIX={sysconfig.get_config_var('EXT_SUFFIX')}",
                f"-DSTAGE1_CUDA={'ON' if torch.version.cuda else 'OFF'}", "-DCMAKE_BUILD_TYPE=Release"]
        if shutil.which("ninja") and not (build_dir / "CMakeCache.txt").exists():
            args += ["-G", "Ninja"]
        subprocess.check_call(args, cwd=build_dir)
        subprocess.check_call([cmake, "--build", ".", "--parallel", str(os.cpu_count() or 1)], cwd=build_dir)
        if not out_path.exists():
            raise RuntimeError(f"the build did not produce {out_path}")


def native_extensions() -> list:
    sources = [p for p in (ROOT / "csrc").rglob("*") if p.suffix in {".cpp", ".cu"}]
    if not sources or os.environ.get("STAGE1_BUILD_CSRC", "1") == "0":
        return []
    return [CMakeExtension("stage1._C")]


setup(
    name="stage1",
    version="0.1.0",
    description="A small, fast Qwen-2.5 inference engine and a few-shot SFT data generator for base models",
    python_requires=">=3.10",
    # stage1/kernels has no __init__.py, so find_packages stops there: it and its subpackages (kernels/sampling/)
    packages=find_packages(include=["stage1", "stage1.*"]) + ["stage1.kernels"]
    + [f"stage1.kernels.{name}" for name in find_packages(str(ROOT / "kernels"))],
    package_data={"stage1.data": ["*.json", "*.jsonl"]},
    install_requires=["torch>=2.4", "safetensors>=0.4", "tokenizers>=0.19", "tqdm", "numpy", "gguf>=0.19",
                      "datasketch>=1.6"],
    # triton 3.7.1 is the release torch 2.13 pairs with; the tests run its kernels in the CPU interpreter
    extras_require={"test": ["pytest", "transformers>=4.45", "accelerate", "triton==3.7.1", "submitit>=1.5",
                             "matplotlib>=3.5", "selenium>=4.10", "pyarrow>=21", "datasets>=5.0", "pyyaml"],
                    "triton": ["triton"], "slurm": ["submitit>=1.5"],
                    "report": ["matplotlib>=3.5"],  # the charts of OUT/report.html (the page has its tables without)
                    # parquet and `datasets` input, the parquet export (datasets 5 reads mixed-type columns as Json)
                    "hf": ["pyarrow>=21", "datasets>=5.0"]},
    ext_modules=native_extensions(),
    cmdclass={"build_ext": CMakeBuild},
)
