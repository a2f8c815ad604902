"""Continuous batching: which sequences run in the next step, and how many of their tokens.

A step is either a prefill step (prompts, possibly in chunks, packed without padding) or a decode step (one
token for every running sequence). New requests join as soon as blocks and the token budget allow; finished
sequences leave at once. When a decoding sequence needs a block and none is free, the most recently admitted
sequence is preempted: its blocks are freed and it is later recomputed from its tokens, which gives the same
output as if it had never been interrupted.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from .kv_cache import BlockManager
from .sequence import Sequence, Status


@dataclass
class ScheduledBatch:
    is_prefill: bool
    seqs: list[Sequence]
    num_new_tokens: list[int]  # tokens each sequence computes in this step

    def samples(self, i: int) -> bool:
        """Whether sequence i gets a new token after this step (its last prefill chunk, or any decode)."""
        seq = self.seqs[i]
        return seq.num_computed_tokens + self.num_new_tokens[i] == seq.num_tokens


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int):
        self.blocks = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> ScheduledBatch:
        batch = self._schedule_prefill()
        if batch.seqs:
            return batch
        return self._schedule_decode()

    def _schedule_prefill(self) -> ScheduledBatch:
        batch = ScheduledBatch(True, [], [])
        budget = self.max_num_batched_tokens
        # A sequence whose prompt was cut into chunks goes on first; then new (or preempted) ones join.
        for seq in self.running:
            if seq.is_prefilling and budget > 0:
                n = min(seq.num_uncomputed_tokens, budget)
                if not self.blocks.can_allocate(seq.block_table, seq.num_computed_tokens + n):
                    continue
                self.blocks.allocate(seq.block_table, seq.num_computed_tokens + n)
                batch.seqs.append(seq)
                batch.num_new_tokens.append(n)
                budget -= n
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            n = min(seq.num_uncomputed_tokens, budget)
            if not self.blocks.can_allocate(seq.block_table, seq.num_computed_tokens + n):
                break
            self.blocks.allocate(seq.block_table, seq.num_computed_tokens + n)
            self.waiting.popleft()
            seq.status = Status.RUNNING
            self.running.append(seq)
            batch.seqs.append(seq)
            batch.num_new_tokens.append(n)
            budget -= n
        return batch

    def _schedule_decode(self) -> ScheduledBatch:
        batch = ScheduledBatch(False, [], [])
        for seq in list(self.running):
            if seq.status is not Status.RUNNING or seq.is_prefilling:
                continue
            # room for the token this step computes; preempt the newest others until there is
            while not self.blocks.can_allocate(seq.block_table, seq.num_tokens):
                victim = self.running[-1]
                self._preempt(victim)
                if victim is seq:
                    break
            if seq.status is Status.RUNNING:
                self.blocks.allocate(seq.block_table, seq.num_tokens)
                batch.seqs.append(seq)
                batch.num_new_tokens.append(1)
        return batch

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.blocks.free(seq.block_table)
        seq.num_computed_tokens = 0
        seq.status = Status.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def update(self, batch: ScheduledBatch) -> None:
        """After the model ran the batch: the computed tokens are in the cache now."""
        for seq, n in zip(batch.seqs, batch.num_new_tokens):
            seq.num_computed_tokens += n

    def finish(self, seq: Sequence) -> None:
        seq.status = Status.FINISHED
        self.running.remove(seq)
        self.blocks.free(seq.block_table)

    def abort(self, seq: Sequence) -> None:
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.blocks.free(seq.block_table)
        seq.status = Status.FINISHED
