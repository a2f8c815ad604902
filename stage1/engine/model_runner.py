"""Runs one scheduled step: packs the sequences' tokens, builds the attention context, runs the model and samples.

The one place that turns requests into tensors: the model sees packed ids and positions, the scheduler sees
sequences and blocks.
"""

from __future__ import annotations

import torch

from .attention import AttentionContext
from .backends import Kernels
from .cuda_graphs import DecodeGraphs
from .kv_cache import slot_index
from .model import Qwen2ForCausalLM
from .sampler import SamplingBatch, token_logprobs
from .scheduler import ScheduledBatch


class StepResult:
    def __init__(self, tokens: list[int], logprobs=None):
        self.tokens = tokens  # one per sampling sequence, in batch order
        self.logprobs = logprobs  # (chosen, rank, top_ids, top_values) lists, or None


class ModelRunner:
    def __init__(self, model: Qwen2ForCausalLM, kv_cache: list[torch.Tensor], block_size: int, kernels: Kernels,
                 device: torch.device, graphs: DecodeGraphs | None = None):
        self.model = model
        self.kv_cache = kv_cache
        self.block_size = block_size
        self.kernels = kernels
        self.device = device
        self.graphs = graphs  # decode steps through CUDA graphs (cuda_graphs.py), or None: every step eager

    def _block_tables(self, batch: ScheduledBatch) -> torch.Tensor:
        width = max(len(seq.block_table) for seq in batch.seqs)
        rows = [seq.block_table + [0] * (width - len(seq.block_table)) for seq in batch.seqs]
        return torch.tensor(rows, dtype=torch.int32, device=self.device)

    def prepare(self, batch: ScheduledBatch) -> tuple[torch.Tensor, torch.Tensor, AttentionContext, list[int]]:
        """Packed ids, positions, the attention context, and the packed index of each sampling row."""
        input_ids, positions, slots, cu_seqlens, context_lens, sample_rows = [], [], [], [0], [], []
        for i, (seq, n) in enumerate(zip(batch.seqs, batch.num_new_tokens)):
            start = seq.num_computed_tokens
            input_ids.extend(seq.token_ids[start:start + n])
            positions.extend(range(start, start + n))
            slots.extend(slot_index(seq.block_table, p, self.block_size) for p in range(start, start + n))
            cu_seqlens.append(cu_seqlens[-1] + n)
            context_lens.append(start + n)
            if batch.samples(i):
                sample_rows.append(cu_seqlens[-1] - 1)
        as_tensor = lambda xs: torch.tensor(xs, dtype=torch.long, device=self.device)  # noqa: E731
        ctx = AttentionContext(
            is_prefill=batch.is_prefill,
            kv_cache=self.kv_cache,
            slot_mapping=as_tensor(slots),
            block_tables=self._block_tables(batch),
            context_lens=torch.tensor(context_lens, dtype=torch.int32, device=self.device),
            cu_seqlens_q=torch.tensor(cu_seqlens, dtype=torch.int32, device=self.device),
            cu_seqlens_q_host=cu_seqlens,
            context_lens_host=context_lens,
            backend=self.kernels.attention,
        )
        return as_tensor(input_ids), as_tensor(positions), ctx, sample_rows

    @torch.inference_mode()
    def run(self, batch: ScheduledBatch, sampling: SamplingBatch | None) -> StepResult:
        input_ids, positions, ctx, sample_rows = self.prepare(batch)
        if self.graphs is not None and not batch.is_prefill and self.graphs.fits(len(batch.seqs)):
            hidden = self.graphs.run(input_ids, positions, ctx)
        else:
            hidden = self.model(input_ids, positions, ctx)
        if not sample_rows:
            return StepResult([])
        # Only the rows that get a new token go through the LM head (the vocab-wide matmul is the step's largest).
        logits = self.model.compute_logits(hidden[sample_rows]).float()
        tokens = self.kernels.sample(logits, sampling)
        logprobs = None
        if sampling.max_logprobs is not None:
            logprobs = [t.tolist() for t in token_logprobs(logits, tokens, sampling.max_logprobs)]
        return StepResult(tokens.tolist(), logprobs)
