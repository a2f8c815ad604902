"""The streaming loop: requests enter the engine while others finish, up to `max_num_seqs` sequences in flight, and
their outputs come back in input order through a bounded reorder buffer.

A `RequestStream` takes an iterable of `Job`s (read lazily: a job is built only when it can enter) and yields, after
every engine step, the jobs that step released: each job once every earlier one is done. A job with no prompt (one
the caller decided not to send) is released in its place with output None. Nothing here knows about rows or files,
so a shard or a data-parallel worker runs the same loop over its own jobs.

Admission. Before each step the stream tops the engine up to `max_num_seqs` unfinished requests. Each of them has
at least one sequence waiting or running (a request's `n` samples are its sequences, and the step API reports a
request only when all are done), so the engine's `max_num_seqs` sequence slots always have a claimant; counting
sequences instead would leave the slots of finished siblings idle. The scheduler admits waiting sequences as soon as
a slot is free, prefill first, so topping up between steps keeps every slot busy; more waiting would only hold memory
(prompts are tokenized when added). With n > 1, up to (n - 1) * max_num_seqs sequences wait. The other bound is the
reorder window: a job enters only within `window` input positions of the oldest unreleased one, so the buffer holds
at most `window` outputs however long the oldest one runs. While the window is not full, decode steps run full, but
for the slots freed by a finish, which the scheduler fills at the next step with a prefill. A job with a keep goal
adds a third bound, `ahead` (`attempts_ahead`): only about as many jobs as the goal still needs enter.

Follow-ups. A job may go on once its output is back (`Job.then`): the requests it then asks for (the rating of each
completion, say) enter the engine at once and belong to the job's input position, which is released only when they
are all back, with their outputs beside the job's own (by the keys the job gave them). They count as requests in
flight like any other, and closing the stream aborts them too.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Hashable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from stage1.data.engine import Engine
from stage1.data.errors import PromptMismatchError

if TYPE_CHECKING:
    from stage1.engine.outputs import RequestOutput
    from stage1.engine.params import SamplingParams

T = TypeVar("T")

# The reorder window, in jobs per sequence slot. A response that runs to max_tokens holds the head while the other
# slots go through many short ones (256 tokens against a median of ~20: about 13 jobs per slot); 16 leaves room for
# that, at the cost of holding up to 16 * max_num_seqs outputs in memory.
WINDOW_PER_SEQ = 16

# A job that stops once `goal` rows are kept (the instruction job) judges in input order and aborts whatever is still
# in flight when it gets there, so every attempt past the one that reaches the goal is wasted compute (with 256 slots
# and 5 x count + 100 attempts allowed, most of a small run's). Such a stream admits only about what is still
# needed: the rows still missing over the kept rate seen so far, which starts at a prior (a few pseudo-attempts at
# PRIOR_KEPT_RATE, so one early reject does not triple the estimate), floored at MIN_KEPT_RATE so a run of rejects
# cannot flood the engine, plus a margin that keeps a few in reserve for the rejects still to come. Which attempts are
# kept does not depend on this: they are still judged in input order.
PRIOR_KEPT_RATE = 0.8
PRIOR_ATTEMPTS = 4
MIN_KEPT_RATE = 0.25
GOAL_MARGIN = 8


def attempts_ahead(missing: int, judged: int, kept: int) -> int:
    """How many jobs past the `judged` ones (of which `kept` were kept) may be in flight while `missing` rows are
    still needed for the goal."""
    if missing <= 0:
        return 0
    rate = (kept + PRIOR_KEPT_RATE * PRIOR_ATTEMPTS) / (judged + PRIOR_ATTEMPTS)
    return math.ceil(missing / max(rate, MIN_KEPT_RATE)) + GOAL_MARGIN


@dataclass(frozen=True)
class FollowUp:
    """A request a job asks for once its own output is back; `key` names its output in the released job's."""
    key: Hashable
    prompt: str
    params: SamplingParams


@dataclass(frozen=True)
class Job(Generic[T]):
    item: T  # the caller's, handed back with the output
    prompt: str | None  # None: nothing to generate, released in order with output None
    params: SamplingParams | None = None
    # called with the job's output when the engine has finished it: the follow-up requests the job waits for too
    then: Callable[[RequestOutput], list[FollowUp]] | None = None


# What the stream releases for each job: the job, its output (None: never sent), its follow-ups' outputs by key.
Released = tuple[Job[T], "RequestOutput | None", "dict[Hashable, RequestOutput]"]


@dataclass
class _Open(Generic[T]):
    """A job that entered and is not complete: its output, once back, and its follow-ups' as they come."""
    job: Job[T]
    out: RequestOutput | None = None
    follow_ups: dict[Hashable, RequestOutput] = field(default_factory=dict)
    waiting: int = 0  # follow-ups sent and not back


@dataclass
class StreamTail:
    """When the input ran out, and the decode steps below half occupancy that the stream could have filled.

    A decode step below half of max_num_seqs is underfilled when, as it ran, more jobs were waiting to enter than
    slots were free (the stream's room: max_num_seqs less the requests in flight): the engine could have been fuller,
    had the reorder window let them in. Once fewer wait than slots are free, all of them have entered or can: the end
    of the input, which every run has, is not counted."""
    at: float | None = None  # perf_counter() when the last job had entered; None while jobs remain
    underfilled_decode_steps: int = 0
    underfilled_decode_seconds: float = 0.0


class ReorderBuffer(Generic[T]):
    """Results by input position, released as one contiguous run from the first unreleased position."""

    def __init__(self) -> None:
        self.head = 0  # the first position not yet released
        self._done: dict[int, T] = {}

    def __len__(self) -> int:
        return len(self._done)

    def put(self, position: int, value: T) -> None:
        if position < self.head or position in self._done:
            raise ValueError(f"position {position} was already put")
        self._done[position] = value

    def pop_ready(self) -> list[T]:
        ready = []
        while self.head in self._done:
            ready.append(self._done.pop(self.head))
            self.head += 1
        return ready


class RequestStream(Generic[T]):
    """One pass of jobs through `llm`'s step API (see the module docstring). Use once."""

    def __init__(self, llm: Engine, *, window: int | None = None, ahead: Callable[[], int] | None = None):
        """`ahead()`: for a job with a keep goal, how many jobs past the released ones may have entered (read
        before each admission; `attempts_ahead`); None: as many as the window and max_num_seqs allow."""
        self.llm = llm
        self.ahead = ahead
        self.max_in_flight = llm.max_num_seqs
        self.window = window if window is not None else WINDOW_PER_SEQ * llm.max_num_seqs
        if self.window < 1:
            raise ValueError(f"the reorder window must be at least 1, got {self.window}")
        self.tail = StreamTail()
        # jobs complete (finished by the engine, their follow-ups too, in any order) or never sent: what progress counts
        self.done = 0
        self._buffer: ReorderBuffer[Released] = ReorderBuffer()
        # request id -> (position, the follow-up's key; _OWN for the job's own request): the unfinished requests
        self._sent: dict[str, tuple[int, Any]] = {}
        self._open: dict[int, _Open[T]] = {}  # position -> the job there, until it is complete
        self._next_position = 0

    def run(self, jobs: Iterable[Job[T]], total: int) -> Iterator[list[Released]]:
        """After each engine step (and once before the first): the jobs released, in input order, often none; each as
        (job, its output, its follow-ups' outputs by key).
        `total`: how many jobs `jobs` holds (it is read lazily). Closing the iterator early (an error or Ctrl-C in the
        caller) aborts the requests still in flight."""
        source = iter(jobs)
        try:
            while True:
                exhausted = self._admit(source)
                if not self._sent:
                    yield self._buffer.pop_ready()
                    if exhausted:
                        return
                    continue
                # those waiting to enter; past a keep goal's limit they are not wanted, so not counted
                waiting = min(total, self._goal_limit()) - self._next_position
                self._step(underfilled=waiting > self.max_in_flight - len(self._sent))
                yield self._buffer.pop_ready()
        finally:
            if self._sent:
                self.llm.abort(list(self._sent))
                self._sent.clear()

    def _admit(self, source: Iterator[Job[T]]) -> bool:
        """Adds jobs while there is room; True once the input is exhausted."""
        while len(self._sent) < self.max_in_flight and self._next_position < self._admit_limit():
            job = next(source, None)
            if job is None:
                self._input_ran_out()
                return True
            position, self._next_position = self._next_position, self._next_position + 1
            if job.prompt is None:
                self._buffer.put(position, (job, None, {}))
                self.done += 1
                continue
            request_id = self.llm.add_request(job.prompt, job.params)
            self._sent[request_id] = (position, _OWN)
            self._open[position] = _Open(job)
        return self.tail.at is not None

    def _goal_limit(self) -> int | float:
        """The first input position a keep goal (`ahead`) does not let in yet; infinite without one."""
        return math.inf if self.ahead is None else self._buffer.head + self.ahead()

    def _admit_limit(self) -> int | float:
        """The first input position that may not enter yet: the reorder window's, or a keep goal's."""
        return min(self._buffer.head + self.window, self._goal_limit())

    def _input_ran_out(self) -> None:
        if self.tail.at is None:
            self.tail.at = time.perf_counter()

    def _step(self, underfilled: bool) -> None:
        """One engine step; `underfilled`: more jobs wait than slots are free, so a low-occupancy decode step in it
        counts in the tail (the engine's running totals, read around it)."""
        stats = self.llm.stats
        low_steps, low_seconds = stats.low_occupancy_decode_steps, stats.low_occupancy_decode_seconds
        finished = self.llm.step()
        if underfilled:
            self.tail.underfilled_decode_steps += stats.low_occupancy_decode_steps - low_steps
            self.tail.underfilled_decode_seconds += stats.low_occupancy_decode_seconds - low_seconds
        for out in finished:
            sent = self._sent.pop(out.request_id, None)
            if sent is None:
                raise PromptMismatchError(f"the engine finished request {out.request_id!r}, which was never sent "
                                          "or already finished; refusing to guess which prompt it answers")
            self._finished(*sent, out)
        if not finished and self._sent and not self.llm.has_unfinished_requests():
            raise PromptMismatchError(f"the engine has no unfinished requests, but {len(self._sent)} sent requests "
                                      "never finished")

    def _finished(self, position: int, key: Any, out: RequestOutput) -> None:
        """A request of the job at `position` is back: its own (then its follow-ups are sent) or a follow-up's. The job
        is released once nothing of it is in flight."""
        open_ = self._open[position]
        if key is _OWN:
            open_.out = out
            follow_ups = open_.job.then(out) if open_.job.then else []
            keys = [f.key for f in follow_ups]
            if len(set(keys)) != len(keys):
                raise ValueError(f"the job at input position {position} asked for follow-ups with the same key: {keys}")
            for follow_up in follow_ups:
                self._sent[self.llm.add_request(follow_up.prompt, follow_up.params)] = (position, follow_up.key)
            open_.waiting = len(follow_ups)
        else:
            open_.follow_ups[key] = out
            open_.waiting -= 1
        if open_.waiting == 0:
            del self._open[position]
            self._buffer.put(position, (open_.job, open_.out, open_.follow_ups))
            self.done += 1


_OWN = object()  # the key of a job's own request in RequestStream._sent
