"""Compiles the CUDA kernels of csrc/cuda/fused_ops.cuh with nvcc for Ampere (sm_80) and Hopper (sm_90), on a
machine without a GPU or a CUDA torch, as tests/kernels/compile_sm90.py does for the Triton kernels: catches what
only a CUDA build would (template errors, bf16/fp16 intrinsics an architecture lacks, spills) before a GPU run.

cuda_compile_check.cu instantiates every launcher for bf16, fp16 and fp32 without any torch header; ptxas's
resource usage must list every kernel and no spill. nvcc is looked for on PATH, in CUDA_HOME / CUDA_PATH,
/usr/local/cuda, and in the nvidia-cuda-nvcc PyPI package; the CUDA headers are nvcc's own or, for those it lacks
(the nvcc wheel has no cuda_runtime.h), triton's bundled copy. Skipped, saying so, only where no nvcc exists.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
UNIT = Path(__file__).with_name("cuda_compile_check.cu")
# 3 storage types x (RMSNorm: 2 vector widths x with/without residual; silu_and_mul: 2 widths; rotary: 2 widths)
KERNELS = {"rms_norm_kernel": 12, "silu_and_mul_kernel": 6, "rotary_write_kv_kernel": 6}


def find_nvcc() -> Path | None:
    candidates = [shutil.which("nvcc")]
    candidates += [os.path.join(os.environ[var], "bin", "nvcc") for var in ("CUDA_HOME", "CUDA_PATH")
                   if os.environ.get(var)]
    candidates.append("/usr/local/cuda/bin/nvcc")
    spec = importlib.util.find_spec("nvidia")  # the namespace package of NVIDIA's PyPI wheels
    for root in (spec.submodule_search_locations or []) if spec else []:
        candidates += sorted(str(p) for p in Path(root).glob("*/bin/nvcc"))  # cuda_nvcc/ (CUDA 12), cu13/ (13)
    return next((Path(c) for c in candidates if c and os.access(c, os.X_OK)), None)


def nvcc_includes(nvcc: Path) -> list[Path]:
    """The include directories nvcc itself passes (nvcc may be a wrapper script: ask it, do not guess)."""
    dryrun = subprocess.run([str(nvcc), "--dryrun", "-c", "probe.cu"], capture_output=True, text=True, timeout=60)
    found = re.search(r'INCLUDES="([^"]*)"', dryrun.stdout + dryrun.stderr)
    return [Path(d) for d in re.findall(r"-I(\S+)", found.group(1))] if found else []


def cuda_include_dirs(nvcc: Path, scratch: Path) -> list[Path]:
    """Extra -I directories: none where nvcc has the runtime headers; else (nvcc's PyPI wheel alone) a directory of
    links to the headers of triton's bundled copy that nvcc lacks. Only those: triton's crt/ headers may be of
    another CUDA version than nvcc, whose own crt/ must win."""
    own = nvcc_includes(nvcc)
    if any((d / "cuda_runtime.h").exists() for d in own):
        return []
    spec = importlib.util.find_spec("triton")
    bundled = Path(spec.origin).parent / "backends" / "nvidia" / "include" if spec and spec.origin else None
    if bundled is None or not (bundled / "cuda_runtime.h").exists():
        return []
    links = scratch / "cuda_include"
    links.mkdir()
    for entry in bundled.iterdir():
        if not any((d / entry.name).exists() for d in own):
            (links / entry.name).symlink_to(entry)
    return [links]


NVCC = find_nvcc()


@pytest.mark.skipif(NVCC is None, reason="no nvcc (not on PATH, in CUDA_HOME, /usr/local/cuda or the "
                                         "nvidia-cuda-nvcc PyPI package): the CUDA kernels were not compiled")
@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_cuda_kernels_compile(arch, tmp_path):
    includes = [f"-I{d}" for d in [ROOT / "csrc", *cuda_include_dirs(NVCC, tmp_path)]]
    command = [str(NVCC), "-std=c++17", "-O3", f"-arch={arch}", "-allow-unsupported-compiler", "--resource-usage",
               *includes, "-c", str(UNIT), "-o", str(tmp_path / f"fused_ops_{arch}.o")]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    log = result.stdout + result.stderr
    assert result.returncode == 0, f"{' '.join(command)}\n{log}"
    print(f"{NVCC} {arch}: compiled", flush=True)
    functions = re.findall(r"Function properties for (\S+)", log)
    for kernel, count in KERNELS.items():
        assert sum(kernel in f for f in functions) == count, f"{kernel}: {count} instantiations expected\n{log}"
    spills = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    assert spills and all(s == ("0", "0") for s in spills), f"register spills:\n{log}"
