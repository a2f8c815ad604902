"""Continuous batching: which sequences run in the next step, and how many of their tokens.

A step is either a prefill step (prompts, possibly in chunks, packed without padding) or a decode step (one
token for every running sequence). New requests join as soon as blocks and the token budget allow; finished
sequences leave at once. When a decoding sequence needs a block and none is free, the most recently admitted
sequence is preempted: its blocks are freed and it is later recomputed from its tokens, which gives the same
output as if it had never been interrupted. A sequence that starts, or restarts, first takes the longest prefix
of its tokens that the block manager has cached (kv_cache.py) and computes only the rest.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from .kv_cache import BlockManager
from .sequence import Sequence, Status


@dataclass
class ScheduledBatch:
    is_prefill: bool
    seqs: list[Sequence] = field(default_factory=list)
    num_new_tokens: list[int] = field(default_factory=list)  # tokens each sequence computes in this step
    # whether each sequence gets a new token after this step (its last prefill chunk, or any decode): decided
    # here, once, and read by the model runner (which rows to sample) and the postprocess (who gets a token)
    samples: list[bool] = field(default_factory=list)
    num_cached_tokens: int = 0  # prompt (or recomputed) tokens its new sequences took from the prefix cache

    def add(self, seq: Sequence, num_new_tokens: int) -> None:
        self.seqs.append(seq)
        self.num_new_tokens.append(num_new_tokens)
        self.samples.append(seq.num_computed_tokens + num_new_tokens == seq.num_tokens)

    @property
    def sampling_seqs(self) -> list[Sequence]:
        if not self.is_prefill:  # every decoding sequence samples
            return self.seqs
        return [seq for seq, sampled in zip(self.seqs, self.samples) if sampled]


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int):
        self.blocks = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens  # per prefill step
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        self._registered_this_step: list[int] = []

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> ScheduledBatch:
        self._registered_this_step = []
        batch = self._schedule_prefill()
        if batch.seqs:
            return batch
        return self._schedule_decode()

    def _schedule_prefill(self) -> ScheduledBatch:
        batch = ScheduledBatch(is_prefill=True)
        budget = self.max_num_batched_tokens
        # A sequence whose prompt was cut into chunks goes on first; then new (or preempted) ones join.
        for seq in self.running:
            # seq.is_prefilling, inline: this scan runs over every running sequence at every step
            if (len(seq.token_ids) - seq.num_computed_tokens > 1 or seq.num_computed_tokens == 0) and budget > 0:
                n = min(seq.num_uncomputed_tokens, budget)
                if not self.blocks.can_allocate(seq.block_table, seq.num_computed_tokens + n):
                    continue
                self._allocate_prefill(seq, n)
                batch.add(seq, n)
                budget -= n
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            # start from the longest cached prefix (leaving at least the last token to compute: its logits)
            seq.prefix_ids = self.blocks.match_prefix(seq.block_table, seq.token_ids, seq.num_tokens - 1)
            seq.num_computed_tokens = len(seq.prefix_ids) * self.blocks.block_size
            n = min(seq.num_uncomputed_tokens, budget)
            if not self.blocks.can_allocate(seq.block_table, seq.num_computed_tokens + n):
                self._release(seq)
                break
            batch.num_cached_tokens += seq.num_computed_tokens
            seq.num_cached_tokens += seq.num_computed_tokens
            self._allocate_prefill(seq, n)
            self.waiting.popleft()
            seq.status = Status.RUNNING
            self.running.append(seq)
            batch.add(seq, n)
            budget -= n
        return batch

    def _schedule_decode(self) -> ScheduledBatch:
        batch = ScheduledBatch(is_prefill=False)
        block_capacity = self.blocks.block_size
        for seq in list(self.running):
            # what this loop asks of every sequence at every step is written inline (seq.is_prefilling, and
            # whether this step's token starts a new block: rarely)
            num_tokens, computed = len(seq.token_ids), seq.num_computed_tokens
            if seq.status is not Status.RUNNING or num_tokens - computed > 1 or computed == 0:
                continue
            if len(seq.block_table) * block_capacity < num_tokens:  # preempt the newest others until it fits
                while not self.blocks.can_allocate(seq.block_table, seq.num_tokens):
                    victim = self.running[-1]
                    self._preempt(victim)
                    if victim is seq:
                        break
                if seq.status is not Status.RUNNING:
                    continue
                self.blocks.allocate(seq.block_table, seq.num_tokens)
            batch.seqs.append(seq)
        # every decoding sequence computes its one uncomputed token and samples the next
        batch.num_new_tokens = [1] * len(batch.seqs)
        batch.samples = [True] * len(batch.seqs)
        return batch

    def _allocate_prefill(self, seq: Sequence, n: int) -> None:
        """Blocks for the sequence's next n tokens. The full blocks this step will compute are registered at
        once: a sequence admitted after it in the same step can share them, since each layer writes the whole
        step's K/V before any sequence attends (undone by discard_step if the step fails)."""
        self.blocks.allocate(seq.block_table, seq.num_computed_tokens + n)
        self._registered_this_step += self.blocks.register(seq.block_table, seq.token_ids, seq.prefix_ids,
                                                           seq.num_computed_tokens + n)

    def discard_step(self, batch: ScheduledBatch) -> None:
        """The scheduled batch did not run to the end: the blocks it was to fill hold no valid K/V. They are
        unregistered, and its sequences start over (a caller that goes on stepping gets right tokens)."""
        self.blocks.unregister(self._registered_this_step)
        self._registered_this_step = []
        for seq in batch.seqs:
            if seq in self.running:
                self._preempt(seq)

    def _release(self, seq: Sequence) -> None:
        """Gives the sequence's blocks back: it has no K/V in the cache any more."""
        self.blocks.free(seq.block_table)
        seq.num_computed_tokens = 0
        seq.prefix_ids = []

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self._release(seq)
        seq.status = Status.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def update(self, batch: ScheduledBatch) -> None:
        """The batch's tokens are computed (after the model ran it; with async scheduling, once it is launched:
        the device runs steps in order, so the next step reads their K/V after they are written). Full blocks are
        registered for prefix caching as far as the tokens are known (a PENDING one waits for the next update)."""
        block_size = self.blocks.block_size
        for seq, n in zip(batch.seqs, batch.num_new_tokens):
            seq.num_computed_tokens += n
            known = min(seq.num_computed_tokens, len(seq.token_ids) - seq.num_pending)
            if known // block_size > len(seq.prefix_ids):  # it filled a block: register that
                self.blocks.register(seq.block_table, seq.token_ids, seq.prefix_ids, known)

    def finish(self, seq: Sequence) -> None:
        """`seq` is done. With async scheduling it may have been preempted since its last token was sampled."""
        seq.status = Status.FINISHED
        if seq in self.running:
            self.running.remove(seq)
        else:
            self.waiting.remove(seq)
        self.blocks.free(seq.block_table)

    def abort(self, seq: Sequence) -> None:
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.blocks.free(seq.block_table)
        seq.status = Status.FINISHED
