"""The generation loop: instructions -> prompts -> the engine's step API, streaming -> filters -> rows on disk.

Instructions enter the engine as others finish (stream.py: up to max_num_seqs sequences in flight); their outputs come
back in input order, are judged in that order (dedup decisions depend on it) and written every `batch_size`
instructions. Everything a row holds derives from the run seed and the row's id, so the data file does not depend on
how requests were batched, and a resumed run (rebuilt from the rows already written) finishes it exactly as an
uninterrupted run would.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import closing
from dataclasses import asdict, dataclass, replace
from typing import TYPE_CHECKING, Any, NamedTuple

from stage1.data.engine import Engine
from stage1.data.errors import PromptMismatchError
from stage1.data.filters import (CONTROL_TOKEN_TEXTS, Candidate, DatasetFilter, JudgeFilter, PromptFilter,
                                 Rejection, RowFilter, Selection, add_kept, build_filters, dedup_key, first_rejection,
                                 post_process, selected)
from stage1.data.hashing import derive_seed, sha256_text
from stage1.data.jobs import RESPONSES, JobKind
from stage1.data.judge import Judge
from stage1.data.prompts import Prompt
from stage1.data.readers import Instruction
from stage1.data.rows import row_key, with_reason
from stage1.data.settings import GenerationConfig
from stage1.data.stream import FollowUp, Job, Released, RequestStream, attempts_ahead
from stage1.data.writer import DatasetWriter, iter_jsonl

if TYPE_CHECKING:
    from stage1.engine.outputs import RequestOutput

# Qwen's <|endoftext|>, <|im_start|>, <|im_end|>: a base model may emit any of them where a text ends. Looked up by
# name in the tokenizer too, for checkpoints that number them differently.
QWEN_CONTROL_TOKEN_IDS = (151643, 151644, 151645)

Row = dict[str, Any]


@dataclass
class SessionStats:
    """This session only (a resumed run counts the whole dataset separately, from the files)."""
    instructions_todo: int = 0
    instructions_finished: int = 0  # generated (finished by the engine, in any order) or never sent: the progress
    instructions_done: int = 0  # judged, in input order (written at the next write)
    rows_written: int = 0
    kept: int = 0  # rows judged so far
    rejected: int = 0
    # each completion's prompt: a request's n samples are n sequences, the engine prefilling (or taking from its
    # prefix cache) the prompt for each
    prompt_tokens: int = 0
    prompt_tokens_cached: int = 0  # of those, taken from the engine's prefix cache (the shared few-shot prefix)
    # --judge: its rating requests (one per completion the selection kept), their prompt tokens and, of those, the
    # ones taken from the prefix cache (the rating prompt's examples): the judge's extra prefill (judge.judge_cost)
    judge_requests: int = 0
    judge_prompt_tokens: int = 0
    judge_prompt_tokens_cached: int = 0
    generated_tokens: int = 0
    generate_seconds: float = 0.0  # the streaming loop's wall time (generation, judging and writing overlap)
    # decode steps that ran below half of max_num_seqs and their time (engine deltas over the session); of those, the
    # underfilled ones: while more instructions waited to enter than slots were free (stream.StreamTail), the tail
    # the engine could have avoided; and the time from the last instruction entering to the end
    decode_steps: int = 0
    low_occupancy_decode_steps: int = 0
    low_occupancy_decode_seconds: float = 0.0
    underfilled_decode_steps: int = 0
    underfilled_decode_seconds: float = 0.0
    tail_seconds: float = 0.0
    repaired_bytes: int = 0  # a partial last line cut off the files on resume

    @property
    def tokens_per_s(self) -> float:
        return self.generated_tokens / self.generate_seconds if self.generate_seconds else 0.0

    @property
    def underfilled_share(self) -> float:
        """The underfilled decode time as a share of the loop's wall time."""
        return self.underfilled_decode_seconds / self.generate_seconds if self.generate_seconds else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "generate_seconds": round(self.generate_seconds, 3),
                "low_occupancy_decode_seconds": round(self.low_occupancy_decode_seconds, 3),
                "underfilled_decode_seconds": round(self.underfilled_decode_seconds, 3),
                "tail_seconds": round(self.tail_seconds, 3), "tokens_per_s": round(self.tokens_per_s, 2),
                "underfilled_share": round(self.underfilled_share, 4)}


def default_stop_token_ids(llm: Engine) -> list[int]:
    """The model's EOS ids plus the control tokens, only those inside the vocabulary."""
    named = [llm.tokenizer.token_to_id(token) for token in CONTROL_TOKEN_TEXTS]
    ids = dict.fromkeys([*llm.eos_token_ids, *QWEN_CONTROL_TOKEN_IDS, *(i for i in named if i is not None)])
    return [i for i in ids if i < llm.vocab_size]


class _Plan(NamedTuple):
    inst: Instruction
    seed: int
    prompt: Prompt
    n_tokens: int  # prompt tokens
    rejection: Rejection | None  # by a prompt filter (prompt_too_long): never sent


class Pipeline:
    """Each instruction goes through four steps: `plan` (seed, prompt, length check, as it enters) -> the engine
    (stream.py; each stored prompt must be what the model saw: `_verify`) -> `judge` (an instruction's completions
    through `self.checks`, in input order) -> `write` (one append per file, every `config.batch_size` instructions)."""

    def __init__(self, llm: Engine, config: GenerationConfig, writer: DatasetWriter, *, job: JobKind = RESPONSES,
                 job_options: Any = None, on_step: Callable[[SessionStats], None] | None = None,
                 dedup_at_merge: bool = False, keep_goal: int | None = None):
        """`job`: the kind of dataset (its prompts, rows and filters), `job_options` its own settings. `on_step(stats)`
        runs after every engine step (the progress display). `dedup_at_merge`: this is a shard, whose rows the merge
        deduplicates against the other shards' (merge.py), so only the per-row checks run. `keep_goal`: stop once
        this many rows are kept (on disk and new), judging in input order, so where it stops does not depend on
        batching; None: go through the whole input."""
        self.llm = llm
        self.config = config
        self.writer = writer
        self.job = job
        self.on_step = on_step
        self.keep_goal = keep_goal
        self.kept_on_disk = 0  # rows kept by earlier sessions (load_existing)
        self.prompts = job.prompts(config.style, job_options)
        # The job's filters, in order: the prompt's as it is planned, then the completions' (each alone, then the
        # selection among an instruction's, then against the dataset); a shard leaves the dataset-level ones to the
        # merge.
        self.prompt_checks = build_filters(config, PromptFilter, max_model_len=llm.max_model_len,
                                           filters=job.filters())
        self.checks = build_filters(config, *((RowFilter, Selection, JudgeFilter) if dedup_at_merge
                                              else (RowFilter, Selection, JudgeFilter, DatasetFilter)),
                                    filters=job.filters())
        self._row_checks = [f for f in self.checks if isinstance(f, RowFilter)]
        # after the selection: the judge's score (only the kept completions are rated), then the dataset
        self._later_checks = [f for f in self.checks if isinstance(f, (JudgeFilter, DatasetFilter))]
        # --judge: the same model rates each completion the selection kept, a follow-up of its job (stream.py)
        self.rating = Judge(config.judge_style, llm.tokenizer) if config.judge else None
        self.stop_token_ids = (default_stop_token_ids(llm) if config.stop_token_ids is None
                               else list(config.stop_token_ids))
        self.stats = SessionStats()
        self._done: set[tuple[str, int | None]] = set()

    # -- resume ------------------------------------------------------------------------------------------------
    def load_existing(self) -> None:
        """Takes in the rows already written (a resumed run): which completions exist, and the dedup state."""
        for row in iter_jsonl(self.writer.data_path):
            self._done.add(row_key(row))
            add_kept(self.checks, self.job.candidate_of_written(row))
            self.kept_on_disk += 1
        for row in iter_jsonl(self.writer.rejects_path):
            self._done.add(row_key(row))

    def missing(self, inst: Instruction) -> list[int]:
        """The completion indices of `inst` not yet on disk."""
        if (inst.id, None) in self._done:
            return []
        return [i for i in range(self.config.n) if (inst.id, i) not in self._done]

    # -- the loop ----------------------------------------------------------------------------------------------
    def todo(self, instructions: list[Instruction]) -> tuple[list[Instruction], int]:
        """The instructions with work left, and how many completions that is."""
        todo = [inst for inst in instructions if self.missing(inst)]
        return todo, sum(len(self.missing(inst)) for inst in todo)

    @property
    def goal_reached(self) -> bool:
        return self.keep_goal is not None and self.kept_on_disk + self.stats.kept >= self.keep_goal

    def run(self, instructions: list[Instruction]) -> SessionStats:
        todo, _ = self.todo(instructions)
        self.stats.instructions_todo = len(todo)
        if self.goal_reached:
            return self.stats  # a resumed run that had kept enough: nothing to generate
        # with a keep goal, only about what is still needed enters (stream.attempts_ahead); judged in input order,
        # the rows kept do not depend on it
        stream: RequestStream[_Plan] = RequestStream(self.llm, ahead=None if self.keep_goal is None else self._ahead)
        before, t0 = _engine_totals(self.llm), time.perf_counter()
        try:
            # closed at once on an error: aborts what runs
            with closing(stream.run(self._jobs(todo), len(todo))) as steps:
                self._consume(steps, lambda: self._account(before, t0, stream))
        finally:
            self._account(before, t0, stream)
        return self.stats

    def _ahead(self) -> int:
        s = self.stats
        return attempts_ahead(self.keep_goal - self.kept_on_disk - s.kept, s.instructions_done, s.kept)

    def _consume(self, steps: Iterator[list[Released]], account: Callable[[], None]) -> None:
        """Judges what each step released, in input order; writes every `batch_size` instructions and at the end.
        Rows judged but not yet written when something fails are not written: resume regenerates them."""
        kept: list[Row] = []
        rejected: list[Row] = []
        unwritten = 0  # instructions judged since the last write
        for released in steps:
            for job, out, ratings in released:
                if self.goal_reached:
                    break  # what comes after is not written; the stream aborts what is in flight when closed
                self.judge(job.item, out, kept, rejected, ratings)
                unwritten += 1
            if self.goal_reached:
                break
            if unwritten >= self.config.batch_size:
                self.write(kept, rejected)
                kept, rejected, unwritten = [], [], 0
            account()
            if self.on_step:
                self.on_step(self.stats)
        self.write(kept, rejected)

    def _jobs(self, todo: list[Instruction]) -> Iterator[Job[_Plan]]:
        """Each instruction's job, planned as it enters; a prompt too long for the context is never sent."""
        stop = self.prompts.style.stop
        for inst in todo:
            plan = self.plan(inst)
            if plan.rejection:
                yield Job(plan, None)
            else:
                yield Job(plan, plan.prompt.text, self.config.sampling_params(plan.seed, stop, self.stop_token_ids),
                          then=None if self.rating is None else lambda out, plan=plan: self._rating_requests(plan, out))

    def _account(self, before: dict[str, float], t0: float, stream: RequestStream) -> None:
        """The engine's work over this session, from its running totals."""
        now = _engine_totals(self.llm)
        delta = {k: now[k] - before[k] for k in now}
        s = self.stats
        s.generate_seconds = time.perf_counter() - t0
        s.prompt_tokens_cached = int(delta["prefix_cached_tokens"]) - s.judge_prompt_tokens_cached  # generation's
        s.decode_steps = int(delta["decode_steps"])
        s.low_occupancy_decode_steps = int(delta["low_occupancy_decode_steps"])
        s.low_occupancy_decode_seconds = delta["low_occupancy_decode_seconds"]
        s.underfilled_decode_steps = stream.tail.underfilled_decode_steps
        s.underfilled_decode_seconds = stream.tail.underfilled_decode_seconds
        s.instructions_finished = stream.done
        s.tail_seconds = time.perf_counter() - stream.tail.at if stream.tail.at is not None else 0.0

    # -- the steps ---------------------------------------------------------------------------------------------
    def plan(self, inst: Instruction) -> _Plan:
        """The instruction's seed and prompt, and the prompt filters' verdict (whether prompt + max_tokens fits the
        context: the engine raises on an over-long prompt and we never truncate). A prompt they reject is never sent:
        its row is rejected in `judge`."""
        seed = derive_seed(self.config.seed, inst.id)
        prompt = self.prompts.prompt_for(inst, seed)
        n_tokens = len(self.llm.tokenizer.encode(prompt.text))
        planned = Candidate(inst.instruction, None, None, {}, prompt_tokens=n_tokens)
        return _Plan(inst, seed, prompt, n_tokens, first_rejection(self.prompt_checks, planned))

    def judge(self, plan: _Plan, out: RequestOutput | None, kept: list[Row], rejected: list[Row],
              ratings: dict[int, RequestOutput] | None = None) -> None:
        """Appends the instruction's rows to `kept` / `rejected`. A kept row joins the dedup state at once: later
        rows are checked against it. `out` is None for a prompt that was never sent (a prompt filter rejected it).
        `ratings`: with --judge, the rating requests' outputs by completion index (`_rating_requests`)."""
        if out is None:
            rejected.append(self._rejected_prompt(plan))
        else:
            self._verify(plan.prompt.text, out)
            self._judge_completions(plan, out, kept, rejected, ratings or {})
        self.stats.instructions_done += 1

    def write(self, kept: list[Row], rejected: list[Row]) -> None:
        self.writer.write_chunk(kept, rejected)
        for row in kept + rejected:
            self._done.add(row_key(row))
        self.stats.rows_written += len(kept) + len(rejected)

    # -- inside the steps --------------------------------------------------------------------------------------
    def _row_fields(self, plan: _Plan) -> dict[str, Any]:
        """What every row of `plan` holds besides its prompt and completion."""
        return {"example_ids": plan.prompt.example_ids, "style": plan.prompt.style, "seed": plan.seed,
                "sampling": self.config.sampling_fields()}

    def _rejected_prompt(self, plan: _Plan) -> Row:
        self.stats.rejected += 1
        row = self.job.make_row(plan.inst, prompt=plan.prompt.text, prompt_tokens=plan.n_tokens, **self._row_fields(plan))
        return with_reason({**row, **self._judge_fields(None, None)}, *plan.rejection)

    def _judge_completions(self, plan: _Plan, out: RequestOutput, kept: list[Row], rejected: list[Row],
                           ratings: dict[int, RequestOutput]) -> None:
        """The row filters judge each completion alone, the selection (best-of-n) those that pass together, then the
        judge's score (--judge: `ratings`, by completion index) and the dataset filters each selected one in index
        order. Rows go to `kept` / `rejected` in index order."""
        self.stats.prompt_tokens += len(out.prompt_token_ids) * len(out.outputs)
        self.stats.generated_tokens += sum(len(comp.token_ids) for comp in out.outputs)
        rows, candidates, verdicts = self._screen(plan, out)
        for row, candidate, verdict in zip(rows, candidates, verdicts):
            if (plan.inst.id, candidate.index) in self._done:
                continue  # written before a crash (a kept one is in the dedup state); regenerated for its siblings
            if self.rating is not None:
                row, candidate = self._rated(row, candidate, ratings.get(candidate.index) if verdict is None else None)
            verdict = verdict or first_rejection(self._later_checks, candidate)
            if verdict:
                rejected.append(with_reason(row, *verdict))
                self.stats.rejected += 1
            else:
                add_kept(self.checks, candidate)
                kept.append(row)
                self.stats.kept += 1

    def _screen(self, plan: _Plan, out: RequestOutput) -> tuple[list[Row], list[Candidate], list[Rejection | None]]:
        """Each completion's row, its candidate and its verdict so far, in index order: the row filters' on each
        alone, then the selection's (best-of-n) among those that pass. A function of the output alone, so the judge's
        rating requests (`_rating_requests`, as the output comes back) and the judgement in input order agree."""
        inst = plan.inst
        examples = self.prompts.copy_sources(plan.prompt)
        rows, candidates = [], []
        for comp in sorted(out.outputs, key=lambda c: c.index):
            response = post_process(comp.text, self.prompts.style.stop)
            rows.append(self.job.make_row(inst, prompt=out.prompt, prompt_tokens=len(out.prompt_token_ids),
                                          completion=comp, response=response, **self._row_fields(plan)))
            candidates.append(Candidate(inst.instruction, response, comp.finish_reason, examples,
                                        dedup_key(inst.id, comp.index), len(out.prompt_token_ids), comp.index,
                                        rows[-1]["mean_logprob"]))
        verdicts = [first_rejection(self._row_checks, c) for c in candidates]
        # The selection sees every completion, those written before a crash too: a resumed run chooses as one
        # uninterrupted run does.
        passed = [i for i, v in enumerate(verdicts) if v is None]
        for i, verdict in zip(passed, selected(self.checks, [candidates[i] for i in passed])):
            verdicts[i] = verdict
        return rows, candidates, verdicts

    # -- the judge (--judge) -------------------------------------------------------------------------------------
    def _rating_requests(self, plan: _Plan, out: RequestOutput) -> list[FollowUp]:
        """What the job of `plan` asks for once its output is back: a rating of each completion the filters so far
        (`_screen`) keep and that is not on disk yet, keyed by its index. A rating prompt the context can't hold is not
        sent: its row has no score."""
        requests = []
        _, candidates, verdicts = self._screen(plan, out)
        for candidate, verdict in zip(candidates, verdicts):
            if verdict is None and (plan.inst.id, candidate.index) not in self._done:
                text = self.rating.prompt(candidate.instruction, candidate.response)
                # a token is at least one byte: only a long text needs counting
                if len(text.encode("utf-8")) < self.llm.max_model_len or \
                        len(self.llm.tokenizer.encode(text)) < self.llm.max_model_len:
                    requests.append(FollowUp(candidate.index, text, self.rating.params))
        return requests

    def _rated(self, row: Row, candidate: Candidate, rating: RequestOutput | None) -> tuple[Row, Candidate]:
        """The row and candidate with the judge's score of the completion (`rating`: its rating request's output;
        None: it was not rated), the rating prompt checked as the generation prompt is (`_verify`)."""
        sent = None
        if rating is not None:
            sent = self.rating.prompt(candidate.instruction, candidate.response)
            self._verify(sent, rating)
            self.stats.judge_requests += 1
            self.stats.judge_prompt_tokens += len(rating.prompt_token_ids)
            self.stats.judge_prompt_tokens_cached += rating.num_cached_tokens
        fields = self._judge_fields(sent, rating)
        return {**row, **fields}, replace(candidate, judge_score=fields["judge_score"])

    def _judge_fields(self, sent: str | None, rating: RequestOutput | None) -> Row:
        """A row's judge fields with --judge (none without): the expected score and the hash of the rating prompt the
        engine tokenized; None for a row that was not rated."""
        if self.rating is None:
            return {}
        return {"judge_score": None if rating is None else self.rating.score(rating),
                "judge_prompt_sha256": None if sent is None else sha256_text(sent)}

    def _verify(self, sent: str, out: RequestOutput) -> None:
        """The stored prompt must be what the engine tokenized, and re-tokenize to the ids the model received."""
        if out.prompt != sent:
            raise PromptMismatchError(f"request {out.request_id}: the engine reports another prompt text than was sent "
                                      f"(it starts {str(out.prompt)[:60]!r}); refusing to store it")
        ids = self.llm.tokenizer.encode(out.prompt)
        if ids != list(out.prompt_token_ids):
            at = next((i for i, (a, b) in enumerate(zip(ids, out.prompt_token_ids)) if a != b),
                      min(len(ids), len(out.prompt_token_ids)))
            raise PromptMismatchError(
                f"request {out.request_id}: the stored prompt re-tokenizes to {len(ids)} ids but the model received "
                f"{len(out.prompt_token_ids)} (first difference at position {at}); the dataset would misstate what "
                "the model saw, so the run stops (rows already written are intact)")


_ENGINE_TOTALS = ("prefix_cached_tokens", "decode_steps", "low_occupancy_decode_steps", "low_occupancy_decode_seconds")


def _engine_totals(llm: Engine) -> dict[str, float]:
    return {name: getattr(llm.stats, name) for name in _ENGINE_TOTALS}
