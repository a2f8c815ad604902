"""`EngineConfig`: how this engine runs a checkpoint, decided once from the user's arguments and the machine.

Every build decision lives here (device, dtype, kernels, block size, context limit, prefill chunk, decode
graphs, the KV cache budget); the engine's parts receive this one object and read what they need from it.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from .backends import Kernels, cpu_has_native_bf16, select_kernels
from .config import ModelConfig, parse_dtype, read_eos_token_ids
from .distributed import check_tensor_parallel_size, kv_heads_per_rank
from .kv_cache import blocks_for_tokens, bytes_per_block

logger = logging.getLogger("stage1")

_CPU_KV_CACHE_BYTES = 4 << 30
_GPU_FREE_MEMORY_SHARE = 0.85


@dataclass(frozen=True)
class EngineConfig:
    model_dir: Path
    model: ModelConfig
    eos_token_ids: tuple[int, ...]
    device: torch.device
    dtype: torch.dtype
    kernels: Kernels
    block_size: int
    max_model_len: int
    max_num_seqs: int
    max_num_batched_tokens: int  # tokens per prefill step (longer prompts are cut into chunks)
    kv_cache_memory: int | None  # bytes; None: the default budget (kv_cache_budget)
    decode_graphs: bool  # decode steps through CUDA graphs (cuda_graphs.py)
    enable_prefix_caching: bool
    seed: int  # seeds the requests that set none
    skip_tokenizer_init: bool
    tensor_parallel_size: int = 1  # ranks the model is split over (tp_workers.py), rank 0 in this process
    # step N+1 is scheduled and launched before step N's tokens are read back (engine_core.py)
    async_scheduling: bool = False

    @classmethod
    def build(cls, model: str | Path, *, dtype: str | torch.dtype = "auto", device: str = "auto",
              block_size: int = 16, kv_cache_memory: int | None = None, max_num_seqs: int = 256,
              max_model_len: int | None = None, max_num_batched_tokens: int | None = None, seed: int = 0,
              skip_tokenizer_init: bool = False, kernels: str = "auto", enforce_eager: bool = False,
              enable_prefix_caching: bool = True, tensor_parallel_size: int = 1,
              async_scheduling: bool | None = None) -> "EngineConfig":
        model_dir = Path(model)
        model_config = ModelConfig.from_dir(model_dir)
        check_tensor_parallel_size(model_config, tensor_parallel_size)
        dev = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device)
        if dev.type == "cuda" and tensor_parallel_size > max(1, torch.cuda.device_count()):
            raise ValueError(f"tensor_parallel_size={tensor_parallel_size} needs as many GPUs, but this node shows "
                             f"{torch.cuda.device_count()} (CUDA_VISIBLE_DEVICES)")
        chosen = select_kernels(kernels, dev)  # before any loading, so a bad choice fails at once
        if async_scheduling is None:  # where the host would otherwise wait for the device at every step
            async_scheduling = dev.type == "cuda" and tensor_parallel_size == 1
        if async_scheduling and tensor_parallel_size > 1:
            raise ValueError("async_scheduling=True needs tensor_parallel_size=1: the other ranks would need each "
                             "step's sampled tokens before rank 0 reads them back")
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        if max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {max_num_seqs}")
        # Tokens per prefill step. On the CPU, 512 keeps a layer's activations in the last-level cache (gate_up's
        # output: 20 MB of fp32 at the 0.5B shape) while the weights are still read once per 512 tokens: 1024 was
        # 1.1-1.2x slower with oneDNN, and no faster with MKL or bf16 weights (2026-12-02). A GPU wants bigger steps.
        chunk = max(max_num_batched_tokens or (8192 if dev.type == "cuda" else 512), 1)
        run_dtype = (auto_dtype(model_config.torch_dtype, dev, chosen, model_config) if dtype == "auto"
                     else parse_dtype(dtype))
        chosen, run_dtype = chosen.for_dtype(run_dtype, dev)
        return cls(
            model_dir=model_dir, model=model_config,
            eos_token_ids=tuple(read_eos_token_ids(model_dir, model_config)), device=dev,
            dtype=run_dtype, kernels=chosen, block_size=block_size,
            max_model_len=min(max_model_len or model_config.max_position_embeddings,
                              model_config.max_position_embeddings),
            max_num_seqs=max_num_seqs, max_num_batched_tokens=chunk, kv_cache_memory=kv_cache_memory,
            # CUDA graphs need the Triton kernels: the reference attention would gather every row's full-width
            # block table (max_model_len tokens) in each replay
            decode_graphs=not enforce_eager and dev.type == "cuda" and chosen.name == "triton",
            enable_prefix_caching=enable_prefix_caching, seed=seed, skip_tokenizer_init=skip_tokenizer_init,
            tensor_parallel_size=tensor_parallel_size, async_scheduling=async_scheduling)

    @property
    def max_blocks_per_seq(self) -> int:
        return blocks_for_tokens(self.max_model_len, self.block_size)

    @property
    def kv_heads_per_rank(self) -> int:
        return kv_heads_per_rank(self.model.num_key_value_heads, self.tensor_parallel_size)

    @property
    def bytes_per_block(self) -> int:
        """One block of one rank's KV cache (its own KV heads)."""
        return bytes_per_block(self.model, self.block_size, self.dtype, self.kv_heads_per_rank)

    def rank_device(self, rank: int) -> torch.device:
        """GPU `rank` on a node (counted from the device rank 0 was given), the CPU for every rank on a CPU."""
        if self.device.type != "cuda":
            return self.device
        return torch.device("cuda", (self.device.index or 0) + rank)

    def kv_cache_budget(self, device: torch.device) -> int:
        """Bytes for one rank's KV cache on `device`, asked once its weights are loaded: `kv_cache_memory` if
        given (per rank), else on a GPU most of what the weights leave free, on the CPU a fixed share of the
        host split between the ranks; never more than `max_num_seqs` full-length sequences could use."""
        if self.kv_cache_memory is not None:
            return self.kv_cache_memory
        most_needed = self.max_num_seqs * self.max_blocks_per_seq * self.bytes_per_block
        if device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
            return min(int(free * _GPU_FREE_MEMORY_SHARE), most_needed)
        return min(_CPU_KV_CACHE_BYTES // self.tensor_parallel_size, most_needed)


def auto_dtype(checkpoint_dtype: torch.dtype, device: torch.device, kernels: Kernels,
               model: ModelConfig | None = None) -> torch.dtype:
    """The checkpoint's dtype, except half precision on a CPU. With the native kernels a CPU computes in fp32
    whatever the weights' dtype, so the rows are fp32's: a bf16 checkpoint runs with fp32 weights (oneDNN,
    prepacked) on a CPU with native bf16 where they fit (`model`'s fp32 weights within half the available memory),
    else keeps bf16 weights (Kernels.for_dtype); on the main job the first was 1.3x the second on an avx512_bf16
    VM, and where memory streams slower (the AVX2-only VMs) half the bytes should count for more. Without the
    native kernels a CPU without native bf16 runs fp32 (its bf16 matmuls are emulated), one with it the
    checkpoint's dtype."""
    if device.type != "cpu" or checkpoint_dtype == torch.float32:
        return checkpoint_dtype
    if kernels.name == "native":
        if checkpoint_dtype != torch.bfloat16:
            return torch.float32
        if cpu_has_native_bf16() and model is not None and 2 * fp32_weight_bytes(model) <= available_memory():
            logger.info("stage1: dtype auto: float32 weights for the native kernels (%.1f GB, within half of the "
                        "available memory); pass dtype='bfloat16' to keep bf16 weights", fp32_weight_bytes(model) / 1e9)
            return torch.float32
        return torch.bfloat16
    if not cpu_has_native_bf16():
        logger.info("stage1: this CPU has no native bf16 (avx512_bf16/AMX): running in float32; "
                    "pass dtype='bfloat16' to force it")
        return torch.float32
    return checkpoint_dtype


def fp32_weight_bytes(model: ModelConfig) -> int:
    """The bytes of every weight of `model` in fp32."""
    from .weights import checkpoint_layout

    return 4 * sum(math.prod(target.shape) for target in checkpoint_layout(model).values())


def available_memory() -> int:
    """MemAvailable (bytes): what this machine can still give without swapping; 0 where unknown."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0
