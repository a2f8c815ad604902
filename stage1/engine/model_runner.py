"""The model runner: the weights, the KV cache and the decode graphs of one device, and every tensor of a step.

`run(batch)` is a step's inputs in (the scheduled sequences), sampled tokens (and logprobs) out: `prepare` packs
the sequences' tokens, positions, slots and block tables and the sampling rows' parameters into `StepInputs`,
`execute` runs the model on them and samples. The model sees packed ids and positions, the scheduler sees
sequences and blocks; this is the one place that turns the one into the other.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from stage1.contract import AttentionContext

from .cuda_graphs import DecodeGraphs
from .engine_config import EngineConfig
from .kv_cache import allocate_kv_cache, num_blocks_for_budget, slot_index
from .sampler import SamplingBatch, token_logprobs
from .scheduler import ScheduledBatch
from .weights import load_model

logger = logging.getLogger("stage1")


@dataclass
class StepInputs:
    """A step as tensors: what the model and the sampler need, nothing about requests."""

    input_ids: torch.Tensor  # [tokens] packed
    positions: torch.Tensor  # [tokens]
    ctx: AttentionContext
    sample_rows: list[int]  # the packed index of each sampling row's last token
    sampling: SamplingBatch | None  # None when no row samples (a prefill chunk that ends mid-prompt)


@dataclass
class StepResult:
    tokens: list[int]  # one per sampling sequence, in batch order
    logprobs: list[tuple[float, int, list[int], list[float]]] | None = None  # per row, when a request asked


class ModelRunner:
    def __init__(self, config: EngineConfig):
        self.config = config
        self.device = config.device
        self.model = load_model(config.model_dir, config.model, config.dtype, config.device)
        num_blocks = num_blocks_for_budget(config.model, config.block_size, config.dtype, config.kv_cache_budget())
        if num_blocks < 1 + config.decode_graphs:
            raise ValueError("the KV cache has room for no block: raise kv_cache_memory or lower block_size")
        self.kv_cache = allocate_kv_cache(config.model, num_blocks, config.block_size, config.dtype, config.device)
        # with decode graphs the pool's last block is their padding rows' sink, owned by no sequence
        self.num_kv_blocks = num_blocks - config.decode_graphs  # the blocks sequences may hold
        self.graphs = None
        if config.decode_graphs:
            self.graphs = DecodeGraphs(self.model, self.kv_cache, config.kernels.attention, config.max_num_seqs,
                                       config.max_blocks_per_seq, num_blocks - 1, config.block_size, config.device)
        logger.info("stage1: %s on %s in %s, kernels %s, decode %s, KV cache %d blocks x %d tokens (%.2f GiB)",
                    config.model_dir, config.device, str(config.dtype).removeprefix("torch."), config.kernels.name,
                    "through CUDA graphs" if self.graphs is not None else "eager", num_blocks, config.block_size,
                    num_blocks * config.bytes_per_block / 2**30)

    @torch.inference_mode()
    def run(self, batch: ScheduledBatch) -> StepResult:
        return self.execute(self.prepare(batch))

    def prepare(self, batch: ScheduledBatch) -> StepInputs:
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
        as_tensor = lambda xs, dtype=torch.long: torch.tensor(xs, dtype=dtype, device=self.device)  # noqa: E731
        width = max(len(seq.block_table) for seq in batch.seqs)
        ctx = AttentionContext(
            is_prefill=batch.is_prefill,
            kv_cache=self.kv_cache,
            slot_mapping=as_tensor(slots),
            block_tables=as_tensor([s.block_table + [0] * (width - len(s.block_table)) for s in batch.seqs],
                                   torch.int32),
            context_lens=as_tensor(context_lens, torch.int32),
            cu_seqlens_q=as_tensor(cu_seqlens, torch.int32),
            cu_seqlens_q_host=cu_seqlens,
            context_lens_host=context_lens,
            backend=self.config.kernels.attention,
        )
        sampling_seqs = batch.sampling_seqs
        sampling = SamplingBatch.build([s.params for s in sampling_seqs], self.device,
                                       seeds=[s.seed for s in sampling_seqs],
                                       steps=[s.num_output_tokens for s in sampling_seqs]) if sampling_seqs else None
        return StepInputs(as_tensor(input_ids), as_tensor(positions), ctx, sample_rows, sampling)

    @torch.inference_mode()
    def execute(self, inputs: StepInputs) -> StepResult:
        ctx = inputs.ctx
        if self.graphs is not None and not ctx.is_prefill and self.graphs.fits(len(inputs.input_ids)):
            hidden = self.graphs.run(inputs.input_ids, inputs.positions, ctx)
        else:
            hidden = self.model(inputs.input_ids, inputs.positions, ctx)
        if inputs.sampling is None:
            return StepResult([])
        # Only the rows that get a new token go through the LM head (the vocab-wide matmul is the step's largest).
        logits = self.model.compute_logits(hidden[inputs.sample_rows]).float()
        tokens = self.config.kernels.sample(logits, inputs.sampling)
        logprobs = None
        if inputs.sampling.max_logprobs is not None:
            logprobs = list(zip(*(t.tolist() for t in token_logprobs(logits, tokens, inputs.sampling.max_logprobs))))
        return StepResult(tokens.tolist(), logprobs)
