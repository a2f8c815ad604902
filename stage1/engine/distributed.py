"""Tensor-parallel state: which rank this process is, how many there are, and the collectives the parallel layers
call (an all-reduce after a row-parallel matmul, a gather of the vocabulary shards' logits to rank 0).

One engine's ranks form one process group of their own (not the process's default group, so two engines can live
in one process); at size 1 (no tensor parallelism) every collective is a no-op and no process group exists. The
parallel layers take the current state when they are built (`current()`), so the model is built under the state
of the rank that runs it (`with parallel_state(rank, size, group): ...`) and keeps it.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .config import ModelConfig


@dataclass(frozen=True)
class ParallelState:
    """The ranks a model is split over. Layers keep the state they were built under and call its collectives, so
    a model built at size 1 never communicates, whatever else the process runs."""

    rank: int = 0
    size: int = 1
    # the ranks' own group (a ProcessGroup or a bare backend such as ProcessGroupGloo); None: the default group
    group: "dist.ProcessGroup | None" = None

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sums x over the ranks, in place; x itself at size 1."""
        if self.size > 1:
            dist.all_reduce(x, group=self.group)
        return x

    def gather_to_first(self, x: torch.Tensor) -> torch.Tensor | None:
        """The ranks' x concatenated along the last dimension on rank 0 (in rank order), None on the others; x
        itself at size 1. Every rank's x has the same shape."""
        if self.size == 1:
            return x
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(self.size)] if self.rank == 0 else None
        # the group's own gather: dist.gather maps dst through the registry of groups, which a private group is not in
        options = dist.GatherOptions()
        options.rootRank = 0
        group = self.group if self.group is not None else dist.group.WORLD
        group.gather([parts] if parts is not None else [], [x], options).wait()
        return torch.cat(parts, dim=-1) if parts is not None else None


_STATE = ParallelState()


def current() -> ParallelState:
    """The state a layer being built now belongs to."""
    return _STATE


@contextlib.contextmanager
def parallel_state(rank: int, size: int, group: "dist.ProcessGroup | None" = None):
    """Builds inside the block belong to rank `rank` of `size` (the model is built inside it). Without a group, a
    block inside one for the same rank and size keeps that block's group: the tensor-parallel runner opens one
    with its engine's group around the model runner, which names only its rank and size."""
    global _STATE
    if group is None and (_STATE.rank, _STATE.size) == (rank, size):
        group = _STATE.group
    previous, _STATE = _STATE, ParallelState(rank, size, group)
    try:
        yield _STATE
    finally:
        _STATE = previous


# ---- how a model is split over the ranks ----


def kv_heads_per_rank(num_kv_heads: int, size: int) -> int:
    """KV heads are sharded while there are at least as many as ranks, else each rank keeps one (replicated)."""
    return num_kv_heads // size if size <= num_kv_heads else 1


def first_kv_head(rank: int, num_kv_heads: int, size: int) -> int:
    """The first KV head rank `rank` keeps: its shard's, or with replication `rank // (size // num_kv_heads)`."""
    if size <= num_kv_heads:
        return rank * (num_kv_heads // size)
    return rank // (size // num_kv_heads)


def valid_tensor_parallel_sizes(config: ModelConfig) -> list[int]:
    heads, kv = config.num_attention_heads, config.num_key_value_heads
    return [n for n in range(1, heads + 1)
            if heads % n == 0 and (kv % n == 0 or n % kv == 0) and config.intermediate_size % n == 0]


def check_tensor_parallel_size(config: ModelConfig, size: int) -> None:
    if not isinstance(size, int) or size < 1:
        raise ValueError(f"tensor_parallel_size must be an int >= 1, got {size!r}")
    if size not in valid_tensor_parallel_sizes(config):
        raise ValueError(
            f"tensor_parallel_size={size} does not split this model: it must divide its {config.num_attention_heads} "
            f"attention heads and {config.intermediate_size} MLP channels, and divide its "
            f"{config.num_key_value_heads} KV heads or be a multiple of them. Sizes that work: "
            f"{', '.join(map(str, valid_tensor_parallel_sizes(config)))}")
