"""The fused Triton sampler: temperature, top-k, top-p, min-p and one draw per row, without sorting the vocabulary.

`fused_sample` is the engine's entry point (backends.triton_sample). The package is one sampler in one module per
part: launch.py (fused_sample, its launcher `_sample` for tests and benchmarks, the launch configurations; its
docstring describes the algorithm), stats.py, shortcut.py, search.py and draw.py (the passes, one or more Triton
kernels each, in launch order) and common.py (the per-row state the passes hand each other, the noise, the race).
"""

from .launch import GPU_CONFIG, INTERPRETER_CONFIG, fused_sample

__all__ = ["GPU_CONFIG", "INTERPRETER_CONFIG", "fused_sample"]
