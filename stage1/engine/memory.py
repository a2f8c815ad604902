"""How much memory this machine can give and how much a model's weights take: what the build decisions (the run
dtype in backends.py, the start-up checks and the KV cache budget in engine_config.py) are weighed against."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from .config import ModelConfig
from .distributed import parallel_state
from .model import Qwen2ForCausalLM
from .weights import checkpoint_layout


def fp32_weight_bytes(model: ModelConfig) -> int:
    """The bytes of every weight of `model` in fp32."""
    return 4 * sum(math.prod(target.shape) for target in checkpoint_layout(model).values())


def weight_bytes_per_rank(model: ModelConfig, tensor_parallel_size: int, dtype: torch.dtype,
                          weight_dtype: torch.dtype | None = None) -> int:
    """The bytes of rank 0's share of `model`'s parameters as the loader stores them (the matmul weights in
    `weight_dtype` when given, the rest in `dtype`): the model built on the meta device, nothing allocated."""
    with parallel_state(0, tensor_parallel_size), torch.device("meta"):
        meta = Qwen2ForCausalLM(model)
    size = lambda dtype: torch.empty((), dtype=dtype).element_size()  # noqa: E731
    return sum(p.numel() * size(weight_dtype if weight_dtype is not None and getattr(p, "matmul_weight", False)
                                 else dtype) for p in meta.parameters())


def device_memory(device: torch.device) -> int:
    """Bytes `device` can still give: a GPU's free memory, on the CPU the host's available memory (0: unknown)."""
    if device.type == "cuda":
        try:
            return torch.cuda.mem_get_info(device)[0]
        except (RuntimeError, AssertionError):  # no usable CUDA here: the model runner will say so
            return 0
    return available_memory()


def describe_bytes(num_bytes: int) -> str:
    unit, scale = ("GiB", 2**30) if num_bytes >= 2**30 else ("MiB", 2**20)
    return f"{num_bytes} bytes ({num_bytes / scale:.2f} {unit})"


def available_memory() -> int:
    """MemAvailable (bytes): what this machine can still give without swapping; 0 where unknown."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0
