"""The model runner: the weights, the KV cache and the decode graphs of one device, and every tensor of a step.

`run(batch)` is a step's inputs in (the scheduled sequences), sampled tokens (and logprobs) out: `prepare` packs
the sequences' tokens, positions, slots and block tables and the sampling rows' parameters into a `StepPlan` of
host arrays, `execute` moves it to the device, runs the model and samples (what a tensor-parallel worker
serves). The model sees packed ids and positions, the scheduler sees
sequences and blocks; this is the one place that turns the one into the other.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from stage1.contract import AttentionContext

from .cuda_graphs import DecodeGraphs
from .distributed import ParallelState, parallel_state
from .engine_config import EngineConfig
from .kv_cache import allocate_kv_cache, num_blocks_for_budget, slot_index
from .params import SamplingParams
from .sampler import SamplingBatch, token_logprobs
from .scheduler import ScheduledBatch
from .weights import load_model

logger = logging.getLogger("stage1")


@dataclass
class StepPlan:
    """A step as host arrays: what the model and the sampler need, nothing about requests. Small and picklable:
    rank 0 sends it to the tensor-parallel workers (a decode step: one new token and one slot per sequence)."""

    is_prefill: bool
    input_ids: np.ndarray  # [tokens] int64, packed
    positions: np.ndarray  # [tokens] int64
    slot_mapping: np.ndarray  # [tokens] int64: the cache slot each new token's K/V goes to
    block_tables: np.ndarray  # [seqs, max blocks] int32, padded with 0
    cu_seqlens: list[int]  # [seqs + 1]: where each sequence's new tokens start
    context_lens: list[int]  # [seqs]: cached + new tokens
    sample_rows: list[int]  # the packed index of each sampling row's last token
    sampling: list[tuple[SamplingParams, int, int]]  # per sampling row: its params, seed and step


@dataclass
class StepResult:
    tokens: list[int]  # one per sampling sequence, in batch order
    logprobs: list[tuple[float, int, list[int], list[float]]] | None = None  # per row, when a request asked


class ModelRunner:
    """One rank's share of the model: rank 0 runs in the engine's process, ranks 1..N-1 in tp_workers.py."""

    def __init__(self, config: EngineConfig, rank: int = 0):
        self.config = config
        self.rank = rank
        self.device = config.rank_device(rank)
        with parallel_state(rank, config.tensor_parallel_size) as state:
            self.model = load_model(config.model_dir, config.model, config.dtype, self.device,
                                    config.kernels.weight_dtype, config.kernels.linear, config.kernels.elementwise)
        num_blocks = num_blocks_for_budget(config.model, config.block_size, config.dtype,
                                           config.kv_cache_budget(self.device), config.kv_heads_per_rank)
        num_blocks = _fewest_over_ranks(num_blocks, state, self.device)
        if num_blocks < 1 + config.decode_graphs:
            raise ValueError("the KV cache has room for no block: raise kv_cache_memory or lower block_size")
        self.kv_cache = allocate_kv_cache(config.model, num_blocks, config.block_size, config.dtype, self.device,
                                          config.kv_heads_per_rank)
        # with decode graphs the pool's last block is their padding rows' sink, owned by no sequence
        self.num_kv_blocks = num_blocks - config.decode_graphs  # the blocks sequences may hold
        self.graphs = None
        if config.decode_graphs:
            self.graphs = DecodeGraphs(self.model, self.kv_cache, config.kernels.attention, config.max_num_seqs,
                                       config.max_blocks_per_seq, num_blocks - 1, config.block_size, self.device)
        logger.info("stage1: %s rank %d/%d on %s in %s, kernels %s, decode %s, KV cache %d blocks x %d tokens "
                    "(%.2f GiB)", config.model_dir, rank, config.tensor_parallel_size, self.device,
                    str(config.dtype).removeprefix("torch."), config.kernels.name,
                    "through CUDA graphs" if self.graphs is not None else "eager", num_blocks, config.block_size,
                    num_blocks * config.bytes_per_block / 2**30)

    def run(self, batch: ScheduledBatch) -> StepResult:
        return self.execute(self.prepare(batch))

    def prepare(self, batch: ScheduledBatch) -> StepPlan:
        block_size = self.config.block_size
        input_ids, positions, slots, cu_seqlens, context_lens, sample_rows = [], [], [], [0], [], []
        for seq, n, sampled in zip(batch.seqs, batch.num_new_tokens, batch.samples):
            start = seq.num_computed_tokens
            input_ids.extend(seq.token_ids[start:start + n])
            positions.extend(range(start, start + n))
            slots.extend(slot_index(seq.block_table, p, block_size) for p in range(start, start + n))
            cu_seqlens.append(cu_seqlens[-1] + n)
            context_lens.append(start + n)
            if sampled:
                sample_rows.append(cu_seqlens[-1] - 1)
        block_tables = np.zeros((len(batch.seqs), max(len(s.block_table) for s in batch.seqs)), dtype=np.int32)
        for row, seq in enumerate(batch.seqs):
            block_tables[row, :len(seq.block_table)] = seq.block_table
        sampling = [(s.params, s.seed, s.num_output_tokens) for s in batch.sampling_seqs]
        as_array = lambda xs: np.array(xs, dtype=np.int64)  # noqa: E731
        return StepPlan(batch.is_prefill, as_array(input_ids), as_array(positions), as_array(slots), block_tables,
                        cu_seqlens, context_lens, sample_rows, sampling)

    @torch.inference_mode()
    def execute(self, plan: StepPlan) -> StepResult | None:
        """Runs the step; rank 0 samples and returns the tokens, the other ranks return None."""
        on_device = lambda a: torch.from_numpy(a).to(self.device)  # noqa: E731
        host_tensor = lambda xs: torch.tensor(xs, dtype=torch.int32, device=self.device)  # noqa: E731
        ctx = AttentionContext(is_prefill=plan.is_prefill, kv_cache=self.kv_cache,
                               slot_mapping=on_device(plan.slot_mapping), block_tables=on_device(plan.block_tables),
                               context_lens=host_tensor(plan.context_lens), cu_seqlens_q=host_tensor(plan.cu_seqlens),
                               cu_seqlens_q_host=plan.cu_seqlens, context_lens_host=plan.context_lens,
                               backend=self.config.kernels.attention)
        input_ids, positions = on_device(plan.input_ids), on_device(plan.positions)
        if self.graphs is not None and not plan.is_prefill and self.graphs.fits(len(input_ids)):
            hidden = self.graphs.run(input_ids, positions, ctx)
        else:
            hidden = self.model(input_ids, positions, ctx)
        if not plan.sampling:
            return StepResult([])
        # Only the rows that get a new token go through the LM head (the vocab-wide matmul is the step's largest);
        # with tensor parallelism their logits are gathered on rank 0, which alone samples.
        logits = self.model.compute_logits(hidden[plan.sample_rows])
        if logits is None:
            return None
        logits = logits.float()
        params, seeds, steps = zip(*plan.sampling)
        sampling = SamplingBatch.build(list(params), self.device, seeds=list(seeds), steps=list(steps))
        tokens = self.config.kernels.sample(logits, sampling)
        logprobs = None
        if sampling.max_logprobs is not None:
            logprobs = list(zip(*(t.tolist() for t in token_logprobs(logits, tokens, sampling.max_logprobs))))
        return StepResult(tokens.tolist(), logprobs)


def _fewest_over_ranks(num_blocks: int, state: ParallelState, device: torch.device) -> int:
    """Every rank holds the same block ids, so the pool is as large as the smallest rank's."""
    if state.size == 1:
        return num_blocks
    count = torch.tensor([num_blocks], dtype=torch.int64, device=device)
    dist.all_reduce(count, op=dist.ReduceOp.MIN, group=state.group)
    return int(count.item())
