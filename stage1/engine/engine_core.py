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
from .model_runner import ModelRunner, PendingResult, StepResult
from .postprocess import Postprocessor
from .scheduler import ScheduledBatch, Scheduler
from .sequence import PENDING, Sequence, Status
from .tokenizer import Tokenizer
from .tp_workers import TensorParallelRunner


class EngineCore:
    def __init__(self, config: EngineConfig, tokenizer: Tokenizer | None):
        self.config = config
        self.runner = ModelRunner(config) if config.tensor_parallel_size == 1 else TensorParallelRunner(config)
        try:  # the workers run from here: a failure must end them now, not when the garbage collector runs
            self.block_manager = BlockManager(self.runner.num_kv_blocks, config.block_size,
                                              config.enable_prefix_caching)
            self.scheduler = Scheduler(self.block_manager, config.max_num_seqs, config.max_num_batched_tokens)
            self.postprocessor = Postprocessor(config, tokenizer)
        except BaseException:
            self.shutdown()
            raise
        self.stats = StepStats()
        self._in_flight: _InFlight | None = None  # async scheduling: the step launched and not yet read back

    def add(self, seq: Sequence) -> None:
        self.scheduler.add(seq)

    def abort(self, seq: Sequence) -> None:
        if seq.finish_reason is None:
            self.scheduler.abort(seq)

    def has_unfinished(self) -> bool:
        # a step still in flight holds either running sequences (the scheduler's) or only void work
        return self.scheduler.has_unfinished()

    def shutdown(self) -> None:
        """Ends the tensor-parallel workers and their process group, if any; idempotent (they also end when the
        runner is garbage collected, and with this process)."""
        if isinstance(self.runner, TensorParallelRunner):
            self.runner.shutdown()

    def step(self) -> list[Sequence]:
        """Runs one scheduled step (a prefill or a decode); returns the sequences that finished in it.

        With async scheduling the step is scheduled and launched first, and only then is the previous step's
        result read back and postprocessed: the host's work for step N+1 overlaps the device's for step N. Its
        sequences carry a PENDING token (sequence.py) until then, which the device feeds to the next step itself;
        a sequence that step N finishes has one more step of work in flight, whose token is dropped. The tokens
        are those of the synchronous loop (tested)."""
        batch = self.scheduler.schedule()
        if not self.config.async_scheduling:
            if not batch.seqs:
                self._check_progress()
                return []
            result = self._run(batch)
            return self._postprocess(batch, result)
        launched = self._launch(batch) if batch.seqs else None
        if launched is None and self._in_flight is None:
            self._check_progress()
        finished = self._complete(self._in_flight) if self._in_flight is not None else []
        self._in_flight = launched
        return finished

    def _check_progress(self) -> None:
        if self.scheduler.has_unfinished():
            raise RuntimeError("scheduler found nothing to run although requests are pending: raise kv_cache_memory")

    def _launch(self, batch: ScheduledBatch) -> "_InFlight":
        started = time.perf_counter()
        try:
            pending = self.runner.launch(batch)
        except BaseException:
            self.scheduler.discard_step(batch)
            raise
        self.scheduler.update(batch)  # the next step is scheduled before this one's tokens are read back
        placeholders = []
        for seq in batch.sampling_seqs:
            placeholders.append(len(seq.token_ids))
            seq.token_ids.append(PENDING)
            seq.num_pending += 1
        return _InFlight(batch, pending, placeholders, started)

    def _complete(self, step: "_InFlight") -> list[Sequence]:
        """Reads a launched step's tokens back and postprocesses them in place of their PENDING tokens."""
        result = step.pending.result()
        self.stats.record(step.batch, time.perf_counter() - step.started, self.config.max_num_seqs)
        return self._append(step.batch.sampling_seqs, result, step.placeholders)

    def _run(self, batch: ScheduledBatch) -> StepResult:
        started = time.perf_counter()
        try:
            result = self.runner.run(batch)
        except BaseException:
            self.scheduler.discard_step(batch)  # its blocks were registered for prefix caching, never filled
            raise
        self.stats.record(batch, time.perf_counter() - started, self.config.max_num_seqs)
        return result

    def _postprocess(self, batch: ScheduledBatch, result: StepResult) -> list[Sequence]:
        self.scheduler.update(batch)
        return self._append(batch.sampling_seqs, result)

    def _append(self, seqs: list[Sequence], result: StepResult, placeholders: list[int] | None = None
                ) -> list[Sequence]:
        """Each sampled token joins its sequence (`placeholders`: in place of its PENDING token, where the
        sequence's token_ids hold it), and only those count as generated; returns the sequences that finished."""
        finished = []
        logprobs = result.logprobs or [None] * len(result.tokens)
        for i, (seq, token, token_logprobs) in enumerate(zip(seqs, result.tokens, logprobs)):
            later = []
            if placeholders is not None:
                if seq.status is Status.FINISHED:  # finished (or aborted) while this step ran: its token is void
                    continue
                at = placeholders[i]
                later = seq.token_ids[at + 1:]  # the next step's PENDING token, if that step took this sequence
                del seq.token_ids[at:]
                seq.num_pending -= 1
            self.postprocessor.append(seq, token, token_logprobs)
            self.stats.generated_tokens += 1
            if seq.finish_reason is not None:
                seq.num_pending = 0  # a later step's token for it is void
                self.scheduler.finish(seq)
                finished.append(seq)
            else:
                seq.token_ids.extend(later)
        return finished


@dataclass
class _InFlight:
    """A step launched and not yet read back: its batch, its pending tokens, and where each sampling sequence's
    PENDING token sits in its token_ids."""

    batch: ScheduledBatch
    pending: PendingResult
    placeholders: list[int]
    started: float


@dataclass
class StepStats:
    """Where the time went, for benchmarks and run manifests (a clock read per step, nothing more)."""

    prefill_steps: int = 0
    prefill_tokens: int = 0
    prefill_seconds: float = 0.0
    decode_steps: int = 0
    decode_tokens: int = 0
    decode_seconds: float = 0.0
    generated_tokens: int = 0  # tokens appended to sequences (async scheduling's void ones not among them)
    prefix_cached_tokens: int = 0  # prompt tokens taken from the prefix cache instead of computed
    # decode steps that ran fewer than half of max_num_seqs sequences (a batch's tail), and their time
    low_occupancy_decode_steps: int = 0
    low_occupancy_decode_seconds: float = 0.0

    def record(self, batch: ScheduledBatch, seconds: float, max_num_seqs: int) -> None:
        """One step's work and time (its generated tokens are counted as they join their sequences)."""
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

    def reset(self) -> None:
        """Counts from zero again (a benchmark's timed run after its warm-up)."""
        for f in fields(self):
            setattr(self, f.name, f.default)
