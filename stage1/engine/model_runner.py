"""The model runner: the weights, the KV cache and the decode graphs of one device, and every tensor of a step.

`run(batch)` is a step's inputs in (the scheduled sequences), sampled tokens (and logprobs) out: `prepare` packs
the sequences' tokens, positions, slots and block tables and the sampling rows' parameters into a `StepPlan` of
host arrays, `execute` moves it to the device, runs the model and samples (what a tensor-parallel worker
serves). The model sees packed ids and positions, the scheduler sees
sequences and blocks; this is the one place that turns the one into the other.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace

import numpy as np
import torch
import torch.distributed as dist

from stage1.contract import AttentionContext

from .cuda_graphs import DecodeGraphs
from .distributed import ParallelState, parallel_state
from .engine_config import EngineConfig
from .kv_cache import allocate_kv_cache, num_blocks_for_budget
from .params import SamplingParams
from .sampler import SamplingBatch, token_logprobs
from .scheduler import ScheduledBatch
from .sequence import PENDING
from .step_inputs import BlockTableRows, StagedUpload
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
    block_tables: np.ndarray  # [seqs, max blocks] int32 (entries past a sequence's blocks: stale, masked)
    cu_seqlens: np.ndarray  # [seqs + 1] int32: where each sequence's new tokens start
    context_lens: np.ndarray  # [seqs] int32: cached + new tokens
    sample_rows: np.ndarray  # [sampling rows] int64: the packed index of each sampling row's last token
    sampling: SamplingBatch  # host arrays
    # rows of input_ids whose token the previous step sampled and the host has not read (async scheduling), and
    # that step's sampling row of each: the device fills them in
    pending_rows: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    pending_from: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))


@dataclass
class StepInputs:
    """A step's inputs on the device, every one copied from the staging (no other host-to-device copy, no read
    back: with async scheduling the host prepares step N+1 while the device still runs step N)."""

    input_ids: torch.Tensor
    positions: torch.Tensor
    ctx: AttentionContext
    sample_rows: torch.Tensor  # [sampling rows] int64
    sampling: SamplingBatch
    pending_rows: torch.Tensor  # [pending] int64: input rows the device fills from the last step's tokens
    pending_from: torch.Tensor  # [pending] int64: the last step's sampling row of each


@dataclass
class PendingResult:
    """A launched step's sampled tokens, on their way to the host; `result()` waits for them."""

    tokens: torch.Tensor | None  # None: the step sampled nothing
    logprobs: tuple[torch.Tensor, ...] | None = None  # token_logprobs' tensors, when a request asked
    copied: "torch.cuda.Event | None" = None  # set when `tokens` is a host copy still in flight

    def result(self) -> StepResult:
        if self.tokens is None:
            return StepResult([])
        if self.copied is not None:
            self.copied.synchronize()
        logprobs = None if self.logprobs is None else list(zip(*(t.tolist() for t in self.logprobs)))
        return StepResult(self.tokens.tolist(), logprobs)


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
        if self.device.type == "cuda":  # Triton launches and new streams go to the current device: this one
            torch.cuda.set_device(self.device)
        with parallel_state(rank, config.tensor_parallel_size) as state:
            self.model = load_model(config.model_dir, config.model, config.dtype, self.device, config.kernels)
        free = None  # the KV cache's share of what is free, on a GPU measured after the largest step ran once
        if self.device.type == "cuda" and config.kv_cache_memory is None:
            peak = self._profile_step_peak(state)
            free = torch.cuda.mem_get_info(self.device)[0] - peak
            logger.info("stage1: rank %d: the largest step takes %.2f GiB beyond the weights (a %d-token prefill, the "
                        "LM head and sampler over %d rows); %.2f GiB left for the KV cache and its headroom", rank,
                        peak / 2**30, config.max_num_batched_tokens, config.max_num_seqs, free / 2**30)
        num_blocks = num_blocks_for_budget(config.model, config.block_size, config.dtype,
                                           config.kv_cache_budget(self.device, free=free), config.kv_heads_per_rank)
        num_blocks = _fewest_over_ranks(num_blocks, state, self.device)
        if rank == 0:  # the pool must hold one max_model_len sequence (the workers wait: rank 0 ends them)
            config.check_kv_cache(num_blocks - config.decode_graphs)
        if num_blocks < 1 + config.decode_graphs:
            raise ValueError("the KV cache has room for no block: raise kv_cache_memory or lower block_size")
        self.kv_cache = allocate_kv_cache(config.model, num_blocks, config.block_size, config.dtype, self.device,
                                          config.kv_heads_per_rank)
        # with decode graphs the pool's last block is their padding rows' sink, owned by no sequence
        self.num_kv_blocks = num_blocks - config.decode_graphs  # the blocks sequences may hold
        self.block_tables = BlockTableRows(config.max_num_seqs, config.max_blocks_per_seq)
        # seq_id -> its sampling row in the last step prepared: where a PENDING input of the next step is read from,
        # so kept only with async scheduling (the one mode whose inputs can be PENDING)
        self._sample_row_of: dict[int, int] = {}
        self._last_tokens: torch.Tensor | None = None  # the tokens the last step sampled, on the device
        max_tokens, max_seqs = max(config.max_num_batched_tokens, config.max_num_seqs), config.max_num_seqs
        # int64: ids, positions, slots; sample rows, top-k, seeds, steps, pending rows and their sources. int32:
        # block tables, context lengths, cu_seqlens; temperature, top-p, min-p (fp32 bits)
        self.staging = StagedUpload(self.device, 3 * max_tokens + 6 * max_seqs,
                                    max_seqs * (config.max_blocks_per_seq + 5) + 1)
        self.graphs = None
        if config.decode_graphs:
            self.graphs = DecodeGraphs(self.model, self.kv_cache, config.kernels.attention, config.max_num_seqs,
                                       config.max_blocks_per_seq, num_blocks - 1, config.block_size, self.device,
                                       agree=lambda ok: _all_ranks(ok, state, self.device))
        logger.info("stage1: %s rank %d/%d on %s in %s, kernels %s, decode %s, KV cache %d blocks x %d tokens "
                    "(%.2f GiB)", config.model_dir, rank, config.tensor_parallel_size, self.device,
                    str(config.dtype).removeprefix("torch."), config.kernels.name,
                    "through CUDA graphs" if self.graphs is not None else "eager", num_blocks, config.block_size,
                    num_blocks * config.bytes_per_block / 2**30)

    @torch.inference_mode()
    def _profile_step_peak(self, state: ParallelState) -> int:
        """Bytes the largest step takes on a GPU beyond what is allocated now (the weights), measured before the KV
        cache takes most of what is left (as vLLM profiles): a prefill of max_num_batched_tokens tokens (their
        activations; attention without a cache), the LM head and the sampler over max_num_seqs rows (the
        vocab-wide logits, the sampler's scratch, cuBLAS's workspace), after a first collective (NCCL creates its
        communicators lazily)."""
        config, device = self.config, self.device
        _all_ranks(True, state, device)
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        tokens = min(config.max_num_batched_tokens, config.max_model_len)
        ctx = AttentionContext(is_prefill=True, kv_cache=None, slot_mapping=None, block_tables=None,
                               context_lens=torch.tensor([tokens], dtype=torch.int32, device=device),
                               cu_seqlens_q=torch.tensor([0, tokens], dtype=torch.int32, device=device),
                               cu_seqlens_q_host=[0, tokens], context_lens_host=[tokens],
                               backend=config.kernels.attention)
        hidden = self.model(torch.zeros(tokens, dtype=torch.long, device=device),
                            torch.arange(tokens, device=device), ctx)
        rows = min(config.max_num_seqs, tokens)
        logits = self.model.compute_logits(hidden[:rows].repeat(-(-config.max_num_seqs // rows), 1)
                                           [:config.max_num_seqs])
        if logits is not None:
            params = [SamplingParams(max_tokens=1, temperature=1.0, top_k=50, top_p=0.9)] * config.max_num_seqs
            config.kernels.sample(logits.float(), SamplingBatch.build(params, device))
        del hidden, logits
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - before
        torch.cuda.empty_cache()  # what the profile cached is free again for the KV cache
        return peak

    def run(self, batch: ScheduledBatch) -> StepResult:
        return self.launch(batch).result()

    def launch(self, batch: ScheduledBatch) -> PendingResult:
        """The step queued on the device; its tokens are read back when the result is asked for."""
        return self.execute(self.prepare(batch))

    def prepare(self, batch: ScheduledBatch) -> StepPlan:
        """The step as host arrays (rank 0). A decode step takes each sequence's last token in a few list
        comprehensions and numpy; the block tables come from rows kept across steps (step_inputs.py)."""
        seqs, block_size = batch.seqs, self.config.block_size
        rows = self.block_tables.rows(seqs, full=batch.is_prefill)
        if batch.is_prefill:
            input_ids, positions, cu_seqlens, sample_rows = [], [], [0], []
            for seq, n, sampled in zip(seqs, batch.num_new_tokens, batch.samples):
                start = seq.num_computed_tokens
                input_ids.extend(seq.token_ids[start:start + n])
                positions.extend(range(start, start + n))
                cu_seqlens.append(cu_seqlens[-1] + n)
                if sampled:
                    sample_rows.append(cu_seqlens[-1] - 1)
            input_ids, positions = np.array(input_ids, dtype=np.int64), np.array(positions, dtype=np.int64)
            cu_seqlens = np.array(cu_seqlens, dtype=np.int32)
            context_lens = cu_seqlens[1:] - cu_seqlens[:-1] + np.array([s.num_computed_tokens for s in seqs],
                                                                       dtype=np.int32)
            seq_of_token = np.repeat(rows, batch.num_new_tokens)
        else:  # one token per sequence: its last, at position num_tokens - 1 (PENDING: still on the device)
            input_ids = np.array([seq.token_ids[-1] for seq in seqs], dtype=np.int64)
            positions = np.array([seq.num_computed_tokens for seq in seqs], dtype=np.int64)
            cu_seqlens = np.arange(len(seqs) + 1, dtype=np.int32)
            context_lens = (positions + 1).astype(np.int32)
            sample_rows = range(len(seqs))
            seq_of_token = rows
        table = self.block_tables.table
        slots = table[seq_of_token, positions // block_size].astype(np.int64) * block_size + positions % block_size
        block_tables = table[rows, :self.block_tables.width(rows)]
        # a PENDING input is the token the previous step sampled for that sequence, read from the device there
        pending_rows = np.flatnonzero(input_ids == PENDING)
        pending_from = np.array([self._sample_row_of[seqs[i].seq_id] for i in pending_rows.tolist()], dtype=np.int64)
        if batch.is_prefill and len(pending_rows):
            raise RuntimeError("a prefill step got a token not read back yet: only a decode step can take one")
        input_ids[pending_rows] = 0
        sampling = batch.sampling_seqs
        if self.config.async_scheduling:
            self._sample_row_of = {seq.seq_id: row for row, seq in enumerate(sampling)}
        sampling = SamplingBatch.of([s.params for s in sampling], seeds=[s.seed for s in sampling],
                                    steps=[s.num_output_tokens for s in sampling])
        return StepPlan(batch.is_prefill, input_ids, positions, slots, block_tables, cu_seqlens, context_lens,
                        np.array(sample_rows, dtype=np.int64), sampling, pending_rows, pending_from)

    @torch.inference_mode()
    def execute(self, plan: StepPlan) -> PendingResult | None:
        """Runs the step; rank 0 samples and returns its tokens (pending: read back when asked for), the other
        ranks return None."""
        inputs = self.upload(plan)
        if len(plan.pending_rows):
            inputs.input_ids[inputs.pending_rows] = self._last_tokens[inputs.pending_from]
        hidden = self.forward(inputs)
        if not len(plan.sample_rows):
            return PendingResult(None)
        logits = self.compute_logits(hidden, inputs, plan.is_prefill)
        return None if logits is None else self.sample(logits, inputs.sampling)

    def upload(self, plan: StepPlan) -> StepInputs:
        """The plan's host arrays as the step's device tensors and attention context, in one staged copy per dtype
        (the sampling rows' fp32 parameters travel as their int32 bits)."""
        rows = plan.sampling
        (input_ids, positions, slots, sample_rows, top_k, seeds, steps, pending_rows, pending_from, block_tables,
         context_lens, cu_seqlens, temperature, top_p, min_p) = self.staging.upload(
            [plan.input_ids, plan.positions, plan.slot_mapping, plan.sample_rows, rows.top_k, rows.seeds, rows.steps,
             plan.pending_rows, plan.pending_from],
            [plan.block_tables, plan.context_lens, plan.cu_seqlens, rows.temperature.view(np.int32),
             rows.top_p.view(np.int32), rows.min_p.view(np.int32)])
        ctx = AttentionContext(is_prefill=plan.is_prefill, kv_cache=self.kv_cache, slot_mapping=slots,
                               block_tables=block_tables, context_lens=context_lens, cu_seqlens_q=cu_seqlens,
                               cu_seqlens_q_host=plan.cu_seqlens.tolist(),
                               context_lens_host=plan.context_lens.tolist(), backend=self.config.kernels.attention)
        sampling = replace(rows, temperature=temperature.view(torch.float32), top_k=top_k,
                           top_p=top_p.view(torch.float32), min_p=min_p.view(torch.float32), seeds=seeds, steps=steps)
        return StepInputs(input_ids, positions, ctx, sample_rows, sampling, pending_rows, pending_from)

    def forward(self, inputs: StepInputs) -> torch.Tensor:
        """Every packed token's hidden state: a decode step through its CUDA graph where one is captured."""
        if self.graphs is not None and not inputs.ctx.is_prefill and self.graphs.fits(len(inputs.input_ids)):
            return self.graphs.run(inputs.input_ids, inputs.positions, inputs.ctx)
        return self.model(inputs.input_ids, inputs.positions, inputs.ctx)

    def compute_logits(self, hidden: torch.Tensor, inputs: StepInputs, is_prefill: bool) -> torch.Tensor | None:
        """fp32 logits of the sampling rows on rank 0 (None on the others). Only the rows that get a new token go
        through the LM head (the vocab-wide matmul is the step's largest); with tensor parallelism their logits
        are gathered on rank 0, which alone samples. A decode step samples every row: a slice, no index."""
        rows = inputs.sample_rows
        logits = self.model.compute_logits(hidden.index_select(0, rows) if is_prefill else hidden[:len(rows)])
        return None if logits is None else logits.float()

    def sample(self, logits: torch.Tensor, sampling: SamplingBatch) -> PendingResult:
        """The sampled tokens, kept on the device for the next step's PENDING inputs and copied to the host without
        waiting (on a GPU into pinned memory, an event on this device's stream marking the copy's end)."""
        tokens = self.config.kernels.sample(logits, sampling)
        self._last_tokens = tokens
        logprobs = None
        if sampling.max_logprobs is not None:
            logprobs = token_logprobs(logits, tokens, sampling.max_logprobs)
        if self.device.type != "cuda":
            return PendingResult(tokens, logprobs)
        host = torch.empty(tokens.shape, dtype=tokens.dtype, pin_memory=True)
        host.copy_(tokens, non_blocking=True)
        copied = torch.cuda.Event()
        copied.record(torch.cuda.current_stream(self.device))
        return PendingResult(host, logprobs, copied)


def _all_ranks(ok: bool, state: ParallelState, device: torch.device) -> bool:
    """Whether `ok` holds on every rank (one collective: each rank calls it at the same point)."""
    if state.size == 1:
        return ok
    flag = torch.tensor([int(ok)], dtype=torch.int64, device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=state.group)
    return bool(flag.item())


def _fewest_over_ranks(num_blocks: int, state: ParallelState, device: torch.device) -> int:
    """Every rank holds the same block ids, so the pool is as large as the smallest rank's."""
    if state.size == 1:
        return num_blocks
    count = torch.tensor([num_blocks], dtype=torch.int64, device=device)
    dist.all_reduce(count, op=dist.ReduceOp.MIN, group=state.group)
    return int(count.item())
