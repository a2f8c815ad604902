"""The paged KV cache: one preallocated pool of fixed-size blocks, and the manager that hands them to sequences."""

from __future__ import annotations

from collections import deque

import torch

from .config import ModelConfig


def bytes_per_block(config: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
    per_token = 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim  # K and V, all layers
    return per_token * block_size * torch.empty((), dtype=dtype).element_size()


def num_blocks_for_budget(config: ModelConfig, block_size: int, dtype: torch.dtype, budget_bytes: int) -> int:
    return int(budget_bytes // bytes_per_block(config, block_size, dtype))


def slot_index(block_table: list[int], position: int, block_size: int) -> int:
    """Where the K/V of the token at `position` lives in the flattened `[num_blocks * block_size]` slot space."""
    return block_table[position // block_size] * block_size + position % block_size


def allocate_kv_cache(config: ModelConfig, num_blocks: int, block_size: int, dtype: torch.dtype,
                      device: torch.device) -> list[torch.Tensor]:
    """One `[2, num_blocks, block_size, kv_heads, head_dim]` tensor per layer (K at 0, V at 1)."""
    shape = (2, num_blocks, block_size, config.num_key_value_heads, config.head_dim)
    return [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)]


class BlockManager:
    """Owns the pool's free list; each sequence holds a block table that grows as its tokens do."""

    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks < 1:
            raise ValueError("the KV cache has room for no block: raise kv_cache_memory or lower block_size")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free: deque[int] = deque(range(num_blocks))

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    def blocks_needed(self, num_tokens: int) -> int:
        return (num_tokens + self.block_size - 1) // self.block_size

    def can_allocate(self, block_table: list[int], num_tokens: int) -> bool:
        """Whether the table can grow to hold `num_tokens` tokens."""
        return self.blocks_needed(num_tokens) - len(block_table) <= len(self._free)

    def allocate(self, block_table: list[int], num_tokens: int) -> None:
        """Grows `block_table` in place to hold `num_tokens` tokens."""
        missing = self.blocks_needed(num_tokens) - len(block_table)
        if missing > len(self._free):
            raise RuntimeError(f"KV cache out of blocks: need {missing}, {len(self._free)} free")
        for _ in range(missing):
            block_table.append(self._free.popleft())

    def free(self, block_table: list[int]) -> None:
        self._free.extend(block_table)
        block_table.clear()

