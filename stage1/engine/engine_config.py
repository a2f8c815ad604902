"""`EngineConfig`: how this engine runs a checkpoint, decided once from the user's arguments and the machine.

Every build decision lives here (device, dtype, kernels, block size, context limit, prefill chunk, decode
graphs, the KV cache budget); the engine's parts receive this one object and read what they need from it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from .backends import Kernels, resolve
from .config import ModelConfig, read_eos_token_ids
from .distributed import check_tensor_parallel_size, kv_heads_per_rank, valid_tensor_parallel_sizes
from .kv_cache import blocks_for_tokens, bytes_per_block
from .memory import describe_bytes, device_memory, weight_bytes_per_rank

logger = logging.getLogger("stage1")

_CPU_KV_CACHE_BYTES = 4 << 30
_GPU_FREE_MEMORY_SHARE = 0.85


class StartupError(ValueError):
    """These settings cannot run this model on this machine (the weights, the KV cache or the context do not
    fit); the message names the numbers and the argument (and CLI flag) to change."""


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
        if dev.type == "cuda" and (dev.index or 0) + tensor_parallel_size > max(1, torch.cuda.device_count()):
            raise ValueError(f"tensor_parallel_size={tensor_parallel_size} from {dev} needs GPUs {dev.index or 0}.."
                             f"{(dev.index or 0) + tensor_parallel_size - 1}, but this node shows "
                             f"{torch.cuda.device_count()} (CUDA_VISIBLE_DEVICES)")
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
        if max_model_len is not None and max_model_len < 1:
            raise ValueError(f"max_model_len must be >= 1, got {max_model_len}")
        if max_model_len is not None and max_model_len > model_config.max_position_embeddings:
            raise StartupError(f"max_model_len={max_model_len} is longer than this model's context, "
                               f"max_position_embeddings={model_config.max_position_embeddings} (config.json): pass "
                               f"--max-model-len (max_model_len) {model_config.max_position_embeddings} or less, "
                               "or leave it unset for the model's")
        # which kernels run and in which dtype, each fast one checked on this device: decided in backends.resolve
        chosen, run_dtype = resolve(kernels, dev, dtype, model_config)
        config = cls(
            model_dir=model_dir, model=model_config,
            eos_token_ids=tuple(read_eos_token_ids(model_dir, model_config)), device=dev,
            dtype=run_dtype, kernels=chosen, block_size=block_size,
            max_model_len=max_model_len or model_config.max_position_embeddings,
            max_num_seqs=max_num_seqs, max_num_batched_tokens=chunk, kv_cache_memory=kv_cache_memory,
            decode_graphs=not enforce_eager and chosen.decode_graphs,
            enable_prefix_caching=enable_prefix_caching, seed=seed, skip_tokenizer_init=skip_tokenizer_init,
            tensor_parallel_size=tensor_parallel_size, async_scheduling=async_scheduling)
        return config.fitted(max_model_len_given=max_model_len is not None)

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

    def kv_cache_budget(self, device: torch.device, free: int | None = None) -> int:
        """Bytes for one rank's KV cache on `device`, asked once its weights are loaded: `kv_cache_memory` if
        given (per rank), else on a GPU most of what the weights leave free (`free`: those bytes, default: asked
        now), on the CPU a fixed share of the host split between the ranks; never more than `max_num_seqs`
        full-length sequences could use."""
        if self.kv_cache_memory is not None:
            return self.kv_cache_memory
        most_needed = self.max_num_seqs * self.max_blocks_per_seq * self.bytes_per_block
        if device.type == "cuda":
            free = device_memory(device) if free is None else free
            return min(max(int(free * _GPU_FREE_MEMORY_SHARE), 0), most_needed)
        return min(_CPU_KV_CACHE_BYTES // self.tensor_parallel_size, most_needed)

    # ---- what must fit, checked before anything is loaded (and the KV cache again once it is sized) ----

    @property
    def weight_bytes_per_rank(self) -> int:
        return weight_bytes_per_rank(self.model, self.tensor_parallel_size, self.dtype, self.kernels.weight_dtype)

    def fitted(self, max_model_len_given: bool = True) -> "EngineConfig":
        """This config once the weights and the KV cache are known to fit this machine, else a `StartupError`
        that says what to change. Where `max_model_len` was not given, an explicit `kv_cache_memory` that holds
        less than the model's context lowers it to what that holds. On a GPU without `kv_cache_memory` the KV
        cache is sized once the weights are loaded; this checks what they will leave at most (`check_kv_cache`
        checks the real pool)."""
        device = self.rank_device(0)
        weights = self.weight_bytes_per_rank
        memory = device_memory(device)  # 0: unknown (no check)
        self._check_weights_fit(weights, memory)
        budget = None
        if device.type == "cuda" and self.kv_cache_memory is None:
            if memory <= 0:
                return self
            kv_bytes = self.kv_cache_budget(device, free=memory - weights)
            budget = (f"the KV cache of {kv_bytes} bytes per rank ({_GPU_FREE_MEMORY_SHARE:.0%} of the "
                      f"{memory - weights} bytes {device} has free after the weights)")
        else:
            kv_bytes = self.kv_cache_budget(device)
        usable = kv_bytes // self.bytes_per_block - self.decode_graphs  # the sink block is the decode graphs'
        if (not max_model_len_given and self.kv_cache_memory is not None
                and 1 <= usable < self.max_blocks_per_seq):
            logger.info("stage1: max_model_len %d instead of the model's %d: kv_cache_memory=%d holds %d blocks of "
                        "%d tokens", usable * self.block_size, self.max_model_len, self.kv_cache_memory, usable,
                        self.block_size)
            return replace(self, max_model_len=usable * self.block_size)
        self.check_kv_cache(usable, budget)
        return self

    def check_kv_cache(self, num_blocks: int, budget: str | None = None) -> None:
        """A `StartupError` unless `num_blocks` blocks (those sequences may hold; the fewest over the ranks) hold
        one sequence of max_model_len tokens. `budget`: what sized them, in words (default: from this config)."""
        needed = self.max_blocks_per_seq
        if num_blocks >= needed:
            return
        bpb = self.bytes_per_block
        if budget is None:
            budget = (f"kv_cache_memory={self.kv_cache_memory} bytes" if self.kv_cache_memory is not None
                      else f"the KV cache that {_GPU_FREE_MEMORY_SHARE:.0%} of {self.rank_device(0)}'s free memory "
                           "after the weights gives" if self.device.type == "cuda"
                      else f"the CPU default KV cache of {self.kv_cache_budget(self.device)} bytes per rank")
        sink = " (+1 block for the decode graphs)" if self.decode_graphs else ""
        fixes = [f"kv_cache_memory={(needed + self.decode_graphs) * bpb} or more (bytes per rank{sink})"]
        if num_blocks >= 1:
            fixes.append(f"--max-model-len {num_blocks * self.block_size} or less (max_model_len)")
        if self.device.type == "cuda" or self.kv_cache_memory is not None:  # the CPU default shrinks with --tp
            fixes.append("a larger --tp (tensor_parallel_size)")
        raise StartupError(
            f"KV cache too small: one sequence of max_model_len={self.max_model_len} tokens needs {needed} blocks "
            f"of {self.block_size} tokens ({bpb} bytes each per rank), but {budget} holds {max(num_blocks, 0)}: "
            f"pass {', '.join(fixes[:-1])}{' or ' if len(fixes) > 1 else ''}{fixes[-1]}")

    def _check_weights_fit(self, weights: int, memory: int) -> None:
        """A `StartupError` where a rank's `weights` (on a CPU every rank's: they share the host), or those plus
        an explicit kv_cache_memory, exceed `memory`: the device's free bytes (0: unknown, no check)."""
        if memory <= 0:
            return
        tp, on_gpu = self.tensor_parallel_size, self.device.type == "cuda"
        ranks = 1 if on_gpu else tp  # the processes whose weights share `memory`
        matmul_dtype = self.kernels.weight_dtype or self.dtype
        where = (f"the {describe_bytes(memory)} free on {self.rank_device(0)}" if on_gpu
                 else f"the {describe_bytes(memory)} this host has available (MemAvailable)")
        if weights * ranks > memory:
            fixes = []
            if on_gpu:
                larger = [n for n in valid_tensor_parallel_sizes(self.model) if n > tp and weight_bytes_per_rank(
                    self.model, n, self.dtype, self.kernels.weight_dtype) < memory]
                fixes.append(f"pass --tp {larger[0]} or more (tensor_parallel_size)" if larger
                             else "free GPU memory (no --tp this model allows fits them)")
                what = f"{describe_bytes(weights)} per rank at --tp {tp} (tensor_parallel_size)"
            else:
                what = describe_bytes(weights * tp) + (f" ({tp} ranks of {describe_bytes(weights)})" if tp > 1 else "")
            if matmul_dtype == torch.float32:
                fixes.append("pass --dtype bfloat16 (dtype='bfloat16'; half the bytes)")
            if not on_gpu:
                fixes.append("free memory (a larger --tp does not help on a CPU: its ranks share the host's)")
            raise StartupError(f"model too large: its weights in {str(matmul_dtype).removeprefix('torch.')} take "
                               f"{what}, more than {where}: {', or '.join(fixes)}")
        if self.kv_cache_memory is not None and (weights + self.kv_cache_memory) * ranks > memory:
            per_rank = f" per rank ({tp} ranks)" if ranks > 1 else " per rank"
            raise StartupError(
                f"KV cache too large: kv_cache_memory={self.kv_cache_memory} bytes plus the weights' "
                f"{weights} bytes{per_rank} exceed {where}: pass kv_cache_memory={memory // ranks - weights} or "
                "less, or leave it unset for the default")
