"""The generation loop: instructions -> prompts -> `LLM.generate` in large chunks -> filters -> rows on disk.

Everything a row holds derives from the run seed and the row's id, and rows are written in input order, so the data
file does not depend on batch size, and a resumed run (rebuilt from the rows already written) finishes it exactly as
an uninterrupted run would.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any, NamedTuple

from stage1.data.errors import PromptMismatchError
from stage1.data.filters import CONTROL_TOKEN_TEXTS, COPY_THRESHOLD, NEAR_DUP_THRESHOLD, Deduplicator, QualityFilter
from stage1.data.hashing import derive_seed
from stage1.data.prompts import DEFAULT_STYLE, CompletionStylePrompts, Prompt
from stage1.data.readers import Instruction
from stage1.data.rows import REASON_PROMPT_TOO_LONG, make_row, row_key, with_reason
from stage1.data.writer import DatasetWriter, read_jsonl
from stage1.engine.params import SamplingParams

# Qwen's <|endoftext|>, <|im_start|>, <|im_end|>: a base model may emit any of them where a text ends. Looked up by
# name in the tokenizer too, for checkpoints that number them differently.
QWEN_CONTROL_TOKEN_IDS = (151643, 151644, 151645)


@dataclass
class GenerationConfig:
    style: str = DEFAULT_STYLE
    n: int = 1
    max_tokens: int = 256
    temperature: float = 0.7
    top_p: float = 0.9
    top_k: int = 0
    seed: int = 0
    batch_size: int = 256  # prompts per LLM.generate call; rows are written after each
    allow_run_on: bool = False
    near_dedup: bool = True
    near_dup_threshold: float = NEAR_DUP_THRESHOLD
    copy_threshold: float = COPY_THRESHOLD
    stop_token_ids: list[int] | None = None  # None: the model's EOS ids plus the Qwen control ids it has

    def sampling_fields(self) -> dict[str, Any]:
        """What each row records of its sampling (the seed is a field of its own)."""
        return {"temperature": self.temperature, "top_p": self.top_p, "top_k": self.top_k,
                "max_tokens": self.max_tokens, "n": self.n}


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


def _prefix_cached_tokens(llm) -> int:
    stats = getattr(llm, "stats", None)  # an engine without prefix-cache stats counts none
    return getattr(stats, "prefix_cached_tokens", 0)


def vocab_size(llm) -> int | None:
    for obj in (llm, getattr(llm, "tokenizer", None)):
        size = getattr(obj, "vocab_size", None)
        if isinstance(size, int):
            return size
    return None


def default_stop_token_ids(llm) -> list[int]:
    """The model's EOS ids plus the control tokens, only those inside the vocabulary."""
    token_to_id = getattr(llm.tokenizer, "token_to_id", lambda token: None)
    named = [token_to_id(token) for token in CONTROL_TOKEN_TEXTS]
    vocab = vocab_size(llm)
    ids = dict.fromkeys([*llm.eos_token_ids, *QWEN_CONTROL_TOKEN_IDS, *(i for i in named if i is not None)])
    return [i for i in ids if vocab is None or i < vocab]


class Pipeline:
    def __init__(self, llm, config: GenerationConfig, writer: DatasetWriter, *,
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
            self._run_chunk(chunk)
            if self.on_chunk:
                self.on_chunk(self.stats, completions)
        return self.stats

    def _run_chunk(self, chunk: list[Instruction]) -> None:
        cfg = self.config
        encode = self.llm.tokenizer.encode
        plans = []
        for inst in chunk:
            seed = derive_seed(cfg.seed, inst.id)
            prompt = self.prompts.build(inst.instruction, seed, inst.type)
            n_tokens = len(encode(prompt.text))
            # The engine raises on an over-long prompt and we never truncate: such a row is rejected up front.
            plans.append(_Plan(inst, seed, prompt, n_tokens, n_tokens + cfg.max_tokens <= self.llm.max_model_len))
        requests = [p for p in plans if p.fits]
        params = [SamplingParams(max_tokens=cfg.max_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
                                 top_k=cfg.top_k, seed=p.seed, stop=list(self.prompts.style.stop),
                                 stop_token_ids=self.stop_token_ids, n=cfg.n)
                  for p in requests]
        outputs = {}
        if requests:
            t0, cached = time.perf_counter(), _prefix_cached_tokens(self.llm)
            results = self.llm.generate([p.prompt.text for p in requests], params, use_tqdm=self.engine_progress)
            self.stats.generate_seconds += time.perf_counter() - t0
            self.stats.prompt_tokens_cached += _prefix_cached_tokens(self.llm) - cached
            if len(results) != len(requests):
                raise PromptMismatchError(f"the engine returned {len(results)} outputs for {len(requests)} prompts")
            for plan, out in zip(requests, results):
                self._verify(plan.prompt.text, out)
                outputs[plan.inst.id] = out
        kept, rejected = [], []
        for inst, seed, prompt, n_tokens, fits in plans:  # input order, in both files
            common = {"example_ids": prompt.example_ids, "style": prompt.style, "seed": seed,
                      "sampling": cfg.sampling_fields()}
            if not fits:
                row = make_row(inst, prompt=prompt.text, prompt_tokens=n_tokens, **common)
                rejected.append(with_reason(row, REASON_PROMPT_TOO_LONG,
                                            f"{n_tokens} prompt tokens + max_tokens {cfg.max_tokens} > max_model_len "
                                            f"{self.llm.max_model_len}"))
                continue
            out = outputs[inst.id]
            self.stats.prompt_tokens += len(out.prompt_token_ids)
            completions = {ex_id: self.prompts.example(ex_id).completion for ex_id in prompt.example_ids}
            for comp in sorted(out.outputs, key=lambda c: c.index):
                self.stats.generated_tokens += len(comp.token_ids)
                if (inst.id, comp.index) in self._done:
                    continue  # written before a crash; regenerated only to complete its siblings
                response = self.quality.post_process(comp.text)
                row = make_row(inst, prompt=out.prompt, prompt_tokens=len(out.prompt_token_ids), completion=comp,
                               response=response, **common)
                verdict = (self.quality.check(response, comp.finish_reason, completions, inst.instruction)
                           or self.dedup.check(inst.instruction, response))
                if verdict:
                    rejected.append(with_reason(row, *verdict))
                else:
                    self.dedup.add(_dedup_key(inst.id, comp.index), inst.instruction, response)
                    kept.append(row)
        self.writer.write_chunk(kept, rejected)
        for row in kept + rejected:
            self._done.add(row_key(row))
        self.stats.kept += len(kept)
        self.stats.rejected += len(rejected)
        self.stats.rows_written += len(kept) + len(rejected)

    def _verify(self, sent: str, out) -> None:
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


class _Plan(NamedTuple):
    inst: Instruction
    seed: int
    prompt: Prompt
    n_tokens: int  # prompt tokens
    fits: bool  # prompt + max_tokens within max_model_len


def _dedup_key(row_id: str, index: int | None) -> str:
    return f"{row_id}#{index}"
