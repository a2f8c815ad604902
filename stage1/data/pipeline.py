"""The generation loop: instructions -> prompts -> `LLM.generate` in large chunks -> filters -> rows on disk.

Everything a row holds derives from the run seed and the row's id, and rows are written in input order, so the data
file does not depend on batch size, and a resumed run (rebuilt from the rows already written) finishes it exactly as
an uninterrupted run would.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, NamedTuple

from stage1.data.engine import Engine
from stage1.data.errors import PromptMismatchError
from stage1.data.filters import (CONTROL_TOKEN_TEXTS, Candidate, Deduplicator, QualityFilter, checks_in_order,
                                 first_rejection)
from stage1.data.hashing import derive_seed
from stage1.data.prompts import CompletionStylePrompts, Prompt
from stage1.data.readers import Instruction
from stage1.data.rows import REASON_PROMPT_TOO_LONG, make_row, row_key, with_reason
from stage1.data.settings import GenerationConfig
from stage1.data.writer import DatasetWriter, read_jsonl

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
    rows_written: int = 0
    kept: int = 0
    rejected: int = 0
    prompt_tokens: int = 0
    prompt_tokens_cached: int = 0  # of those, taken from the engine's prefix cache (the shared few-shot prefix)
    generated_tokens: int = 0
    generate_seconds: float = 0.0
    repaired_bytes: int = 0  # a partial last line cut off the files on resume

    @property
    def tokens_per_s(self) -> float:
        return self.generated_tokens / self.generate_seconds if self.generate_seconds else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "tokens_per_s": round(self.tokens_per_s, 2)}


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
    fits: bool  # prompt + max_tokens within max_model_len


class Pipeline:
    """Each chunk of instructions goes through four steps: `plan` (seed, prompt, length check) ->
    `generate_and_verify` (one engine call; each stored prompt must be what the model saw) -> `judge` (each completion
    through `self.checks`, in order) -> `write` (one append per file)."""

    def __init__(self, llm: Engine, config: GenerationConfig, writer: DatasetWriter, *,
                 on_chunk: Callable[[SessionStats, int], None] | None = None, engine_progress: bool = False):
        """`on_chunk(stats, completions_done)` runs after each chunk is on disk (the progress bar)."""
        self.llm = llm
        self.config = config
        self.writer = writer
        self.on_chunk = on_chunk
        self.engine_progress = engine_progress
        self.prompts = CompletionStylePrompts(config.style)
        self.quality = QualityFilter(self.prompts.style, config.allow_run_on, config.copy_threshold)
        self.dedup = Deduplicator(config.near_dedup, config.near_dup_threshold)
        self.checks = checks_in_order(self.quality, self.dedup)
        self.stop_token_ids = (default_stop_token_ids(llm) if config.stop_token_ids is None
                               else list(config.stop_token_ids))
        self.stats = SessionStats()
        self._done: set[tuple[str, int | None]] = set()

    # -- resume ------------------------------------------------------------------------------------------------
    def load_existing(self) -> None:
        """Takes in the rows already written (a resumed run): which completions exist, and the dedup state."""
        for row in read_jsonl(self.writer.data_path):
            self._done.add(row_key(row))
            self.dedup.add(_dedup_key(row["id"], row["index"]), row["instruction"], row["response"])
        for row in read_jsonl(self.writer.rejects_path):
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

    def run(self, instructions: list[Instruction]) -> SessionStats:
        todo, _ = self.todo(instructions)
        self.stats.instructions_todo = len(todo)
        for start in range(0, len(todo), self.config.batch_size):
            chunk = todo[start:start + self.config.batch_size]
            completions = sum(len(self.missing(inst)) for inst in chunk)
            self.run_chunk(chunk)
            if self.on_chunk:
                self.on_chunk(self.stats, completions)
        return self.stats

    def run_chunk(self, chunk: list[Instruction]) -> None:
        plans = self.plan(chunk)
        outputs = self.generate_and_verify([p for p in plans if p.fits])
        kept, rejected = self.judge(plans, outputs)
        self.write(kept, rejected)

    # -- the steps ---------------------------------------------------------------------------------------------
    def plan(self, chunk: list[Instruction]) -> list[_Plan]:
        """Each instruction's seed and prompt, and whether prompt + max_tokens fits the context. The engine raises on
        an over-long prompt and we never truncate: such a row is rejected in `judge`, never sent."""
        plans = []
        for inst in chunk:
            seed = derive_seed(self.config.seed, inst.id)
            prompt = self.prompts.build(inst.instruction, seed, inst.type)
            n_tokens = len(self.llm.tokenizer.encode(prompt.text))
            fits = n_tokens + self.config.max_tokens <= self.llm.max_model_len
            plans.append(_Plan(inst, seed, prompt, n_tokens, fits))
        return plans

    def generate_and_verify(self, requests: list[_Plan]) -> dict[str, RequestOutput]:
        """One engine call for all of `requests`, each output checked by `_verify`; the outputs by instruction id."""
        if not requests:
            return {}
        stop = self.prompts.style.stop
        params = [self.config.sampling_params(p.seed, stop, self.stop_token_ids) for p in requests]
        t0, cached = time.perf_counter(), self.llm.stats.prefix_cached_tokens
        results = self.llm.generate([p.prompt.text for p in requests], params, use_tqdm=self.engine_progress)
        self.stats.generate_seconds += time.perf_counter() - t0
        self.stats.prompt_tokens_cached += self.llm.stats.prefix_cached_tokens - cached
        if len(results) != len(requests):
            raise PromptMismatchError(f"the engine returned {len(results)} outputs for {len(requests)} prompts")
        for plan, out in zip(requests, results):
            self._verify(plan.prompt.text, out)
        return {plan.inst.id: out for plan, out in zip(requests, results)}

    def judge(self, plans: list[_Plan], outputs: dict[str, RequestOutput]) -> tuple[list[Row], list[Row]]:
        """(kept rows, rejected rows), each in input order. A kept row joins the dedup state at once: later rows,
        of this chunk too, are checked against it."""
        kept: list[Row] = []
        rejected: list[Row] = []
        for plan in plans:
            if plan.fits:
                self._judge_completions(plan, outputs[plan.inst.id], kept, rejected)
            else:
                rejected.append(self._too_long(plan))
        return kept, rejected

    def write(self, kept: list[Row], rejected: list[Row]) -> None:
        self.writer.write_chunk(kept, rejected)
        for row in kept + rejected:
            self._done.add(row_key(row))
        self.stats.kept += len(kept)
        self.stats.rejected += len(rejected)
        self.stats.rows_written += len(kept) + len(rejected)

    # -- inside the steps --------------------------------------------------------------------------------------
    def _row_fields(self, plan: _Plan) -> dict[str, Any]:
        """What every row of `plan` holds besides its prompt and completion."""
        return {"example_ids": plan.prompt.example_ids, "style": plan.prompt.style, "seed": plan.seed,
                "sampling": self.config.sampling_fields()}

    def _too_long(self, plan: _Plan) -> Row:
        row = make_row(plan.inst, prompt=plan.prompt.text, prompt_tokens=plan.n_tokens, **self._row_fields(plan))
        return with_reason(row, REASON_PROMPT_TOO_LONG,
                           f"{plan.n_tokens} prompt tokens + max_tokens {self.config.max_tokens} > max_model_len "
                           f"{self.llm.max_model_len}")

    def _judge_completions(self, plan: _Plan, out: RequestOutput, kept: list[Row], rejected: list[Row]) -> None:
        inst = plan.inst
        self.stats.prompt_tokens += len(out.prompt_token_ids)
        examples = {ex_id: self.prompts.example(ex_id).completion for ex_id in plan.prompt.example_ids}
        for comp in sorted(out.outputs, key=lambda c: c.index):
            self.stats.generated_tokens += len(comp.token_ids)
            if (inst.id, comp.index) in self._done:
                continue  # written before a crash; regenerated only to complete its siblings
            response = self.quality.post_process(comp.text)
            row = make_row(inst, prompt=out.prompt, prompt_tokens=len(out.prompt_token_ids), completion=comp,
                           response=response, **self._row_fields(plan))
            verdict = first_rejection(self.checks, Candidate(inst.instruction, response, comp.finish_reason, examples))
            if verdict:
                rejected.append(with_reason(row, *verdict))
            else:
                self.dedup.add(_dedup_key(inst.id, comp.index), inst.instruction, response)
                kept.append(row)

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


def _dedup_key(row_id: str, index: int | None) -> str:
    return f"{row_id}#{index}"
