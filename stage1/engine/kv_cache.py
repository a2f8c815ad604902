"""The paged KV cache: one preallocated pool of fixed-size blocks, and the manager that hands them to sequences."""

from __future__ import annotations

import itertools
from collections import OrderedDict, deque

import torch

from .config import ModelConfig


def bytes_per_block(config: ModelConfig, block_size: int, dtype: torch.dtype, num_kv_heads: int | None = None) -> int:
    """`num_kv_heads`: the KV heads this rank holds (default: all of them)."""
    kv_heads = config.num_key_value_heads if num_kv_heads is None else num_kv_heads
    per_token = 2 * config.num_hidden_layers * kv_heads * config.head_dim  # K and V, all layers
    return per_token * block_size * torch.empty((), dtype=dtype).element_size()


def num_blocks_for_budget(config: ModelConfig, block_size: int, dtype: torch.dtype, budget_bytes: int,
                          num_kv_heads: int | None = None) -> int:
    return int(budget_bytes // bytes_per_block(config, block_size, dtype, num_kv_heads))


def blocks_for_tokens(num_tokens: int, block_size: int) -> int:
    return -(-num_tokens // block_size)


def slot_index(block_table: list[int], position: int, block_size: int) -> int:
    """Where the K/V of the token at `position` lives in the flattened `[num_blocks * block_size]` slot space."""
    return block_table[position // block_size] * block_size + position % block_size


def allocate_kv_cache(config: ModelConfig, num_blocks: int, block_size: int, dtype: torch.dtype,
                      device: torch.device, num_kv_heads: int | None = None) -> list[torch.Tensor]:
    """One `[2, num_blocks, block_size, kv_heads, head_dim]` tensor per layer (K at 0, V at 1)."""
    kv_heads = config.num_key_value_heads if num_kv_heads is None else num_kv_heads
    shape = (2, num_blocks, block_size, kv_heads, config.head_dim)
    return [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)]


class BlockManager:
    """Owns the pool's blocks; each sequence holds a block table that grows as its tokens do.

    Prefix caching: a block whose slots are all computed is registered under its content: the tokens it holds and
    the registered block before it, so that a key names a whole prefix exactly (a dict key, compared in full: no
    hash collision can alias two prefixes). A sequence that starts (or restarts after a preemption) takes the
    longest registered prefix of its tokens and computes only the rest; few-shot prompts share most of their
    tokens. Blocks are reference-counted; a registered block that no sequence holds keeps its K/V in an LRU list
    and is handed out again only when no never-registered block is free. Registered blocks are full, so nobody
    writes to them again: sharing needs no copies.
    """

    def __init__(self, num_blocks: int, block_size: int, prefix_caching: bool = True):
        if num_blocks < 1:
            raise ValueError("the KV cache has room for no block: raise kv_cache_memory or lower block_size")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.prefix_caching = prefix_caching
        self._free: deque[int] = deque(range(num_blocks))  # blocks holding nothing worth keeping
        self._idle: OrderedDict[int, None] = OrderedDict()  # registered blocks nobody holds, least recent first
        self._refs = [0] * num_blocks
        self._key_of: dict[int, tuple[int, tuple[int, ...]]] = {}  # registered block -> (parent id, tokens)
        self._block_of: dict[tuple[int, tuple[int, ...]], int] = {}
        self._id_of: dict[int, int] = {}  # registered block -> its prefix's id (the parent id of the next block)
        self._ids = itertools.count()

    @property
    def num_free_blocks(self) -> int:
        return len(self._free) + len(self._idle)

    def blocks_needed(self, num_tokens: int) -> int:
        return blocks_for_tokens(num_tokens, self.block_size)

    def can_allocate(self, block_table: list[int], num_tokens: int) -> bool:
        """Whether the table can grow to hold `num_tokens` tokens."""
        return self.blocks_needed(num_tokens) - len(block_table) <= self.num_free_blocks

    def allocate(self, block_table: list[int], num_tokens: int) -> None:
        """Grows `block_table` in place to hold `num_tokens` tokens."""
        missing = self.blocks_needed(num_tokens) - len(block_table)
        if missing > self.num_free_blocks:
            raise RuntimeError(f"KV cache out of blocks: need {missing}, {self.num_free_blocks} free")
        for _ in range(missing):
            if self._free:
                block = self._free.popleft()
            else:  # the least recently used cached prefix gives its block up
                block, _ = self._idle.popitem(last=False)
                del self._block_of[self._key_of.pop(block)], self._id_of[block]
            self._refs[block] = 1
            block_table.append(block)

    def free(self, block_table: list[int]) -> None:
        for block in block_table:
            self._refs[block] -= 1
            if self._refs[block] == 0:
                if block in self._key_of:
                    self._idle[block] = None
                else:
                    self._free.append(block)
        block_table.clear()

    def match_prefix(self, block_table: list[int], token_ids: list[int], max_tokens: int) -> list[int]:
        """Fills the empty `block_table` with the registered blocks that hold the longest prefix of `token_ids`
        (at most `max_tokens` tokens, whole blocks) and returns their prefix ids (see `register`)."""
        ids: list[int] = []
        if not self.prefix_caching:
            return ids
        size = self.block_size
        for i in range(max_tokens // size):
            block = self._block_of.get((ids[-1] if ids else -1, tuple(token_ids[i * size:(i + 1) * size])))
            if block is None:
                break
            if self._refs[block] == 0:
                del self._idle[block]
            self._refs[block] += 1
            block_table.append(block)
            ids.append(self._id_of[block])
        return ids

    def register(self, block_table: list[int], token_ids: list[int], prefix_ids: list[int],
                 num_computed: int) -> list[int]:
        """Registers the blocks of `block_table` that `num_computed` computed tokens fill, and returns those it
        registered. `prefix_ids`, one per full block the sequence has registered so far, grows with them: a block
        whose content another block already holds under the same prefix stays unregistered, and the sequence goes
        on from that one's id."""
        registered: list[int] = []
        if not self.prefix_caching:
            return registered
        size = self.block_size
        for i in range(len(prefix_ids), num_computed // size):
            key = (prefix_ids[-1] if prefix_ids else -1, tuple(token_ids[i * size:(i + 1) * size]))
            block = self._block_of.get(key)
            if block is None:
                block = block_table[i]
                self._block_of[key], self._key_of[block], self._id_of[block] = block, key, next(self._ids)
                registered.append(block)
            prefix_ids.append(self._id_of[block])
        return registered

    def unregister(self, blocks: list[int]) -> None:
        """Forgets what `blocks` were registered as (a step that was to compute them failed)."""
        for block in blocks:
            if block in self._key_of:
                del self._block_of[self._key_of.pop(block)], self._id_of[block]
                if block in self._idle:
                    del self._idle[block]
                    self._free.append(block)
