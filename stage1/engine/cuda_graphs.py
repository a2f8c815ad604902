"""Decode steps replayed from CUDA graphs: a step's hundreds of kernel launches issued by one call.

On a GPU a decode step of a small model is bound by the host: every op and Triton launch of every layer costs
microseconds of Python and driver time, far more than the GPU needs for it. A decode step's shapes depend only on
its batch size, so the model's forward is captured once per batch-size bucket into a graph that reads fixed input
buffers; each step copies its ids, positions, slots, context lengths and block tables into those buffers and
replays the smallest graph that holds the batch.

Rows past the batch are padding. Each writes its K/V into a sink block that no sequence owns and attends to that
one slot, so it computes finite numbers nobody reads; every op of the decoder is row-wise, so padding never
touches the real rows. Attention sizes its split-K from the block tables' width (the longest context the engine
allows), not from this step's lengths, so one graph serves every context length.

Off a GPU nothing can be captured and the same padded step runs eagerly (how the CPU tests check the padding). A
capture that fails, or whose first replay differs from the same step run eagerly, logs a warning and leaves every
later step eager, so a job never dies of it nor runs on a wrong graph.
"""

from __future__ import annotations

import logging
from typing import Callable

import torch

from stage1.contract import AttentionBackend, AttentionContext

from .kernel_check import compare, tolerance
from .model import Qwen2ForCausalLM

logger = logging.getLogger("stage1")


def batch_buckets(max_batch: int) -> list[int]:
    """1, 2, 4, 8, then every multiple of 8 up to max_batch (and max_batch itself)."""
    sizes = [b for b in (1, 2, 4) if b < max_batch] + list(range(8, max_batch, 8)) + [max_batch]
    return sorted(set(sizes))


class DecodeGraphs:
    def __init__(self, model: Qwen2ForCausalLM, kv_cache: list[torch.Tensor], attention: AttentionBackend | None,
                 max_batch: int, max_blocks_per_seq: int, sink_block: int, block_size: int, device: torch.device,
                 agree: Callable[[bool], bool] = bool):
        self.model = model
        self.agree = agree  # every tensor-parallel rank's verdict -> whether all of them succeeded
        self.kv_cache = kv_cache
        self.attention = attention
        self.buckets = batch_buckets(max_batch)
        self.sink_block = sink_block
        self.sink_slot = sink_block * block_size
        self.capture = device.type == "cuda"  # False also after a failed capture
        self.input_ids = torch.zeros(max_batch, dtype=torch.long, device=device)
        self.positions = torch.zeros(max_batch, dtype=torch.long, device=device)
        self.slot_mapping = torch.full((max_batch,), self.sink_slot, dtype=torch.long, device=device)
        self.context_lens = torch.ones(max_batch, dtype=torch.int32, device=device)
        self.block_tables = torch.full((max_batch, max_blocks_per_seq), sink_block, dtype=torch.int32, device=device)
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._pool = None

    @property
    def captured(self) -> list[int]:
        """The batch sizes captured so far."""
        return sorted(self._graphs)

    def fits(self, num_seqs: int) -> bool:
        return 0 < num_seqs <= self.buckets[-1]

    def run(self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        """The hidden states of a decode step's `len(input_ids)` sequences, [seqs, hidden]."""
        n = input_ids.shape[0]
        size = next(b for b in self.buckets if b >= n)
        width = ctx.block_tables.shape[1]
        self.input_ids[:n].copy_(input_ids)
        self.positions[:n].copy_(positions)
        self.slot_mapping[:n].copy_(ctx.slot_mapping)
        self.context_lens[:n].copy_(ctx.context_lens)
        self.block_tables[:n, :width].copy_(ctx.block_tables)
        # the rows this step leaves empty may hold a sequence of an earlier step: back to padding
        self.input_ids[n:size] = 0
        self.positions[n:size] = 0
        self.slot_mapping[n:size] = self.sink_slot
        self.context_lens[n:size] = 1
        self.block_tables[n:size, 0] = self.sink_block
        if not self.capture:
            return self._forward(size)[:n]
        if size not in self._graphs:
            return self._capture_and_check(size)[:n]
        graph, hidden = self._graphs[size]
        graph.replay()
        return hidden[:n]

    def _context(self, size: int) -> AttentionContext:
        # no host copies of the lengths: attention then sizes its splits from the block tables' width
        return AttentionContext(is_prefill=False, kv_cache=self.kv_cache, slot_mapping=self.slot_mapping[:size],
                                block_tables=self.block_tables[:size], context_lens=self.context_lens[:size],
                                backend=self.attention)

    def _forward(self, size: int) -> torch.Tensor:
        return self.model(self.input_ids[:size], self.positions[:size], self._context(size))

    def _capture_and_check(self, size: int) -> torch.Tensor:
        """This step's hidden states for `size` rows, run eagerly, after capturing its graph and checking the
        graph's first replay against it (its K/V writes write the same values again). With tensor parallelism the
        ranks `agree` twice, after the capture and after the check, so every rank runs the same collectives
        whatever failed where: one rank's failure leaves them all eager from then on."""
        self._warm_up(size)  # eager forwards, the same on every rank: a failure here is a real error
        graph, hidden, failure = None, None, ""
        try:
            graph, hidden = self._record(size)  # no collective runs while a graph records
        except Exception as error:  # noqa: BLE001 - any failure to capture: run on, eagerly
            failure = f"{type(error).__name__}: {error}"
        if not self.agree(graph is not None):
            return self._stay_eager(size, failure or "another tensor-parallel rank failed to capture")
        graph.replay()
        eager = self._forward(size)
        verdict = compare(f"the CUDA graph of the decode step for {size} rows", hidden, eager, tolerance(eager.dtype))
        if not self.agree(verdict.ok):
            return self._stay_eager(size, f"its replay does not match the eager step ({verdict.detail})"
                                    if not verdict.ok else "another tensor-parallel rank's replay did not match")
        self._graphs[size] = (graph, hidden)
        return eager

    def _stay_eager(self, size: int, why: str) -> torch.Tensor:
        logger.warning("stage1: capturing the decode step for %d rows in a CUDA graph failed (%s); decode steps run "
                       "eagerly from now on (pass enforce_eager=True to skip the attempt)", size, why)
        self.capture = False
        if self.input_ids.is_cuda:
            torch.cuda.synchronize(self.input_ids.device)
        return self._forward(size)

    def _warm_up(self, size: int) -> None:
        """Two eager runs on a side stream before a capture: they compile the Triton kernels and settle the
        allocator outside the graph (the buffers already hold this very step)."""
        if not self.input_ids.is_cuda:
            return
        stream = torch.cuda.Stream(self.input_ids.device)
        stream.wait_stream(torch.cuda.current_stream(self.input_ids.device))
        with torch.cuda.stream(stream):
            for _ in range(2):
                self._forward(size)
        torch.cuda.current_stream(self.input_ids.device).wait_stream(stream)

    def _record(self, size: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        """The forward for `size` rows recorded into a graph, and the graph's output tensor."""
        graph = torch.cuda.CUDAGraph()
        # one memory pool for all sizes: a step replays one graph and reads its output before the next replay
        with torch.cuda.graph(graph, pool=self._pool):
            hidden = self._forward(size)
        self._pool = graph.pool()
        return graph, hidden
