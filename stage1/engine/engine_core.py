"""The engine core: sequences in, finished sequences out, one step at a time.

A step reads schedule -> run -> postprocess: the scheduler picks the sequences and how many tokens each computes,
the model runner computes them and samples, and the postprocess appends each sampled token to its sequence and
applies the stop rules; finished sequences leave the scheduler at once. Requests, prompts and outputs are the
API's business (llm.py), not the core's.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, fields

from .engine_config import EngineConfig
from .kv_cache import BlockManager
from .model_runner import ModelRunner, StepResult
from .postprocess import Postprocessor
from .scheduler import ScheduledBatch, Scheduler
from .sequence import Sequence
from .tokenizer import Tokenizer
from .tp_workers import TensorParallelRunner


class EngineCore:
    def __init__(self, config: EngineConfig, tokenizer: Tokenizer | None):
        self.config = config
        self.runner = ModelRunner(config) if config.tensor_parallel_size == 1 else TensorParallelRunner(config)
        self.block_manager = BlockManager(self.runner.num_kv_blocks, config.block_size,
                                          config.enable_prefix_caching)
        self.scheduler = Scheduler(self.block_manager, config.max_num_seqs, config.max_num_batched_tokens)
        self.postprocessor = Postprocessor(config, tokenizer)
        self.stats = StepStats()

    def add(self, seq: Sequence) -> None:
        self.scheduler.add(seq)

    def abort(self, seq: Sequence) -> None:
        if seq.finish_reason is None:
            self.scheduler.abort(seq)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    def shutdown(self) -> None:
        """Ends the tensor-parallel workers, if any (they also end with this process)."""
        if isinstance(self.runner, TensorParallelRunner):
            self.runner.shutdown()

    def step(self) -> list[Sequence]:
        """Runs one scheduled step (a prefill or a decode); returns the sequences that finished in it."""
        batch = self.scheduler.schedule()
        if not batch.seqs:
            if self.scheduler.has_unfinished():
                raise RuntimeError("scheduler found nothing to run although requests are pending: "
                                   "raise kv_cache_memory")
            return []
        result = self._run(batch)
        return self._postprocess(batch, result)

    def _run(self, batch: ScheduledBatch) -> StepResult:
        started = time.perf_counter()
        try:
            result = self.runner.run(batch)
        except BaseException:
            self.scheduler.discard_step(batch)  # its blocks were registered for prefix caching, never filled
            raise
        self.stats.record(batch, len(result.tokens), time.perf_counter() - started, self.config.max_num_seqs)
        return result

    def _postprocess(self, batch: ScheduledBatch, result: StepResult) -> list[Sequence]:
        self.scheduler.update(batch)
        finished = []
        logprobs = result.logprobs or [None] * len(result.tokens)
        for seq, token, token_logprobs in zip(batch.sampling_seqs, result.tokens, logprobs):
            self.postprocessor.append(seq, token, token_logprobs)
            if seq.finish_reason is not None:
                self.scheduler.finish(seq)
                finished.append(seq)
        return finished


@dataclass
class StepStats:
    """Where the time went, for benchmarks and run manifests (a clock read per step, nothing more)."""

    prefill_steps: int = 0
    prefill_tokens: int = 0
    prefill_seconds: float = 0.0
    decode_steps: int = 0
    decode_tokens: int = 0
    decode_seconds: float = 0.0
    generated_tokens: int = 0
    prefix_cached_tokens: int = 0  # prompt tokens taken from the prefix cache instead of computed
    # decode steps that ran fewer than half of max_num_seqs sequences (a batch's tail), and their time
    low_occupancy_decode_steps: int = 0
    low_occupancy_decode_seconds: float = 0.0

    def record(self, batch: ScheduledBatch, sampled: int, seconds: float, max_num_seqs: int) -> None:
        self.prefix_cached_tokens += batch.num_cached_tokens
        computed = sum(batch.num_new_tokens)
        if batch.is_prefill:
            self.prefill_steps += 1
            self.prefill_tokens += computed
            self.prefill_seconds += seconds
        else:
            self.decode_steps += 1
            self.decode_tokens += computed
            self.decode_seconds += seconds
            if 2 * len(batch.seqs) < max_num_seqs:
                self.low_occupancy_decode_steps += 1
                self.low_occupancy_decode_seconds += seconds
        self.generated_tokens += sampled

    def reset(self) -> None:
        """Counts from zero again (a benchmark's timed run after its warm-up)."""
        for f in fields(self):
            setattr(self, f.name, f.default)
