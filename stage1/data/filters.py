"""The filters: each one object that passes a row or rejects it with a reason, after datatrove's pipeline steps.

A filter is one class: its `name` is the reason written into rejects.jsonl, its `description` what --help and the
README say of it, its thresholds are its constructor's arguments (defaults: the named constants below; `build` takes
them from the run's settings), and `check(row)` returns None (pass) or `self.reject(detail)`. `FILTERS` lists the
classes in the order they run: the first that rejects a row gives its reason. The reasons the CLI lists
(`reject_reasons()`) are that list's names. Adding a filter is one class and one entry in `FILTERS`.

There are five kinds, by what a check compares a row with:
- `PromptFilter`: the planned prompt, before it is sent (a rejected one is never generated from);
- `RowFilter`: one completion alone (each shard runs them);
- `Selection`: the completions of one instruction that passed the row filters, together (best-of-n): `select(rows)`
  keeps some and rejects the others. Each shard runs them: all of an instruction's completions are in its shard;
- `JudgeFilter`: one completion the selection kept, with the judge's score of it (judge.py, --judge; each shard);
- `DatasetFilter`: one completion against the rows kept before it in input order (exact and near duplicates). It
  keeps state: `add(row)` feeds it each kept row, in input order, and `reset()` forgets them. A shard runs none; the
  merge (merge.py) feeds fresh ones every shard's rows in input order, so it decides as one unsharded run does.
`FILTERS` holds the kinds in that order, so a shard's reasons are the unsharded run's.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from stage1.data.errors import DataError
from stage1.data.prompts import load_styles

if TYPE_CHECKING:
    from stage1.data.settings import GenerationConfig

# Qwen's control-token strings; the regex also catches the rest of its <|...|> family (fim, vision, tool tokens).
CONTROL_TOKEN_TEXTS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
_CONTROL_TOKEN_RE = re.compile(r"<\|[A-Za-z0-9_]+\|>")

# Repetition, after Gopher (Rae et al. 2021, table A1). Word n-grams of lower-cased \w+ words; character fractions are
# over the characters of all words.
MAX_DUP_LINE_FRAC = 0.30  # lines that repeat an earlier line / lines
MAX_DUP_LINE_CHAR_FRAC = 0.20  # characters in those lines / characters
MAX_TOP_NGRAM_CHAR_FRAC = {2: 0.20, 3: 0.18, 4: 0.16}  # characters in the most frequent n-gram (seen twice or more)
MAX_DUP_NGRAM_CHAR_FRAC = {5: 0.15, 6: 0.14, 7: 0.13, 8: 0.12, 9: 0.11, 10: 0.10}  # characters in repeated n-grams
# Gopher applies the n-gram rules to documents of 50+ words; on a short answer one natural repeat ("a lake is a body of
# water, while a sea is a body of water ...") would trip them. Below that length only a loop counts: more than half of
# the characters inside repeated word 3-grams ("I like it. I like it. I like it.").
REPETITION_MIN_WORDS = 50
SHORT_LOOP_NGRAM = 3
SHORT_LOOP_MAX_CHAR_FRAC = 0.5

# A response that mostly repeats one of its own few-shot completions (ROUGE-L F over words).
COPY_THRESHOLD = 0.7
COPY_MIN_WORDS = 4  # short answers ("4", "Tokyo") may legitimately equal an example's

# A response that only repeats part of its instruction ("Rewrite in the passive voice: X" -> "X"; a "summary" that is
# the input). Shorter answers may well be words of the question ("Is a penguin a bird or a mammal?" -> "A bird.").
ECHO_MIN_WORDS = 4

# Near-duplicates across the dataset: MinHash LSH over word 3-gram shingles of the response.
NEAR_DUP_THRESHOLD = 0.8  # estimated Jaccard similarity
NEAR_DUP_NUM_PERM = 128
NEAR_DUP_SHINGLE = 3
NEAR_DUP_MIN_WORDS = 8  # short answers to different questions may well coincide

# Eval overlap (--decontaminate): a shared word 13-gram, as GPT-3 (Brown et al. 2020, appendix C) and the Tulu
# decontamination measure it; texts too short to hold one must equal the eval text (stage1/data/decontaminate.py).
DECONTAMINATION_NGRAM = 13

Rejection = tuple[str, str | None]  # (reason, detail)


def words(text: str) -> list[str]:
    return re.findall(r"\w+", text.lower())


def post_process(raw: str, stops: tuple[str, ...] | list[str]) -> str:
    """Cuts at the first stop marker (the engine has usually cut already; this also covers a run-on text) and strips."""
    cut = min((i for i in (raw.find(s) for s in stops) if i >= 0), default=len(raw))
    return raw[:cut].strip()


def dedup_key(row_id: str, index: int | None) -> str:
    """How a duplicate names the row it repeats."""
    return f"{row_id}#{index}"


@dataclass(frozen=True)
class Candidate:
    """What the filters see of one row: a planned prompt (response None) or a completion."""
    instruction: str
    response: str | None  # post-processed; None for a prompt not generated from yet
    finish_reason: str | None
    # what it must not copy, by example id: the completions of its few-shot examples (responses); the pool's prompts
    # (instructions)
    example_completions: dict[str, str]
    key: str = ""  # dedup_key: how a later duplicate names this row
    prompt_tokens: int = 0
    index: int | None = None  # the completion's index among the instruction's --n
    mean_logprob: float | None = None  # the row's `mean_logprob` (rows.logprob_signals)
    judge_score: float | None = None  # the row's `judge_score` (judge.py); None: not rated, or no rating digit


# -- the kinds --------------------------------------------------------------------------------------------------------
class Filter:
    """One filter. Subclasses set `name` (the reject reason) and `description`, and implement `check`."""
    name: ClassVar[str]
    description: ClassVar[str]

    @classmethod
    def build(cls, config: GenerationConfig, max_model_len: int | None) -> Filter:
        """This filter with the run's thresholds (one the run turned off passes every row)."""
        return cls()

    def check(self, row: Candidate) -> Rejection | None:
        """None if `row` passes, else `self.reject(detail)`."""
        raise NotImplementedError

    def reject(self, detail: str | None = None) -> Rejection:
        return self.name, detail


class PromptFilter(Filter):
    """Looks at the planned prompt (`row.prompt_tokens`, `row.instruction`) before it is sent."""


class RowFilter(Filter):
    """Looks at one completion alone."""


class Selection(Filter):
    """Looks at the completions of one instruction that passed the row filters, together; never at one alone."""

    def check(self, row: Candidate) -> Rejection | None:
        return None  # a selection judges an instruction's completions together: `select`

    def select(self, rows: list[Candidate]) -> list[Rejection | None]:
        """A verdict for each of `rows` (one instruction's completions that passed the row filters, by index)."""
        raise NotImplementedError


class JudgeFilter(Filter):
    """Looks at one completion the selection kept, with the judge's score of it (`row.judge_score`): only those are
    rated, so it runs after the selections."""


class DatasetFilter(Filter):
    """Looks at one completion against the rows kept before it, fed in input order: the first of equals is kept."""

    def reset(self) -> None:
        """Forgets every row fed so far. Subclasses set up their state here (their `__init__` calls it)."""
        raise NotImplementedError

    def add(self, row: Candidate) -> None:
        """Takes in a kept row: later rows are checked against it."""
        raise NotImplementedError


# -- the filters, in the order they run -------------------------------------------------------------------------------
class PromptTooLong(PromptFilter):
    name = "prompt_too_long"
    description = "the prompt plus --max-tokens exceeds the model's context (never sent, never truncated)"

    def __init__(self, max_tokens: int, max_model_len: int):
        self.max_tokens = max_tokens
        self.max_model_len = max_model_len

    @classmethod
    def build(cls, config: GenerationConfig, max_model_len: int | None) -> PromptTooLong:
        return cls(config.max_tokens, max_model_len)

    def check(self, row: Candidate) -> Rejection | None:
        if row.prompt_tokens + self.max_tokens <= self.max_model_len:
            return None
        return self.reject(f"{row.prompt_tokens} prompt tokens + max_tokens {self.max_tokens} > max_model_len "
                           f"{self.max_model_len}")


class Empty(RowFilter):
    name = "empty"
    description = "nothing left once cut at the stop marker and stripped"

    def check(self, row: Candidate) -> Rejection | None:
        return None if row.response else self.reject()


class RunOn(RowFilter):
    name = "run_on"
    description = "hit --max-tokens before the stop marker (--allow-run-on keeps them)"

    def __init__(self, allow: bool = False):
        self.allow = allow

    @classmethod
    def build(cls, config: GenerationConfig, max_model_len: int | None) -> RunOn:
        return cls(config.allow_run_on)

    def check(self, row: Candidate) -> Rejection | None:
        if row.finish_reason != "length" or self.allow:
            return None
        return self.reject("hit max_tokens before the stop marker (pass --allow-run-on to keep such rows)")


class ControlToken(RowFilter):
    name = "control_token"
    description = "holds a control token's text (<|endoftext|>, <|im_start|>, <|im_end|>, any <|...|>)"

    def check(self, row: Candidate) -> Rejection | None:
        m = _CONTROL_TOKEN_RE.search(row.response)
        return self.reject(f"contains {m.group(0)}") if m else None


class Scaffolding(RowFilter):
    name = "scaffolding"
    description = "starts the next few-shot example (the prompt style's scaffold patterns)"

    def __init__(self, patterns: Iterable[str]):
        self.patterns = tuple(patterns)

    @classmethod
    def build(cls, config: GenerationConfig, max_model_len: int | None) -> Scaffolding:
        return cls(load_styles()[config.style].scaffold_patterns)

    def check(self, row: Candidate) -> Rejection | None:
        for pattern in self.patterns:
            m = re.search(pattern, row.response, re.MULTILINE)
            if m:
                return self.reject(f"matches {pattern!r}: {m.group(0).strip()!r}")
        return None


@dataclass
class Repetition(RowFilter):
    """Gopher's repetition rules; the thresholds are its fields (constructor arguments)."""
    name: ClassVar[str] = "repetition"
    description: ClassVar[str] = (f"repeated lines and n-grams, Gopher's rules (from {REPETITION_MIN_WORDS} words; "
                                  f"below, a loop of {SHORT_LOOP_NGRAM}-grams)")
    max_dup_line_frac: float = MAX_DUP_LINE_FRAC
    max_dup_line_char_frac: float = MAX_DUP_LINE_CHAR_FRAC
    max_top_ngram_char_frac: dict[int, float] = field(default_factory=lambda: dict(MAX_TOP_NGRAM_CHAR_FRAC))
    max_dup_ngram_char_frac: dict[int, float] = field(default_factory=lambda: dict(MAX_DUP_NGRAM_CHAR_FRAC))
    min_words: int = REPETITION_MIN_WORDS
    short_loop_ngram: int = SHORT_LOOP_NGRAM
    short_loop_max_char_frac: float = SHORT_LOOP_MAX_CHAR_FRAC

    def check(self, row: Candidate) -> Rejection | None:
        rule = self.broken_rule(row.response)
        return self.reject(rule) if rule else None

    def broken_rule(self, text: str) -> str | None:
        """Which repetition rule the text breaks, or None."""
        line_frac, line_char_frac = duplicate_line_fractions(text)
        if line_frac > self.max_dup_line_frac:
            return f"duplicate line fraction {line_frac:.2f} > {self.max_dup_line_frac}"
        if line_char_frac > self.max_dup_line_char_frac:
            return f"duplicate line character fraction {line_char_frac:.2f} > {self.max_dup_line_char_frac}"
        ws = words(text)
        if len(ws) < self.min_words:
            n, limit = self.short_loop_ngram, self.short_loop_max_char_frac
            frac = duplicate_ngram_char_fraction(ws, n)
            return f"duplicate {n}-gram character fraction {frac:.2f} > {limit}" if frac > limit else None
        for n, limit in self.max_top_ngram_char_frac.items():
            frac, gram = top_ngram_char_fraction(ws, n)
            if frac > limit:
                return f"top {n}-gram {gram!r} character fraction {frac:.2f} > {limit}"
        for n, limit in self.max_dup_ngram_char_frac.items():
            frac = duplicate_ngram_char_fraction(ws, n)
            if frac > limit:
                return f"duplicate {n}-gram character fraction {frac:.2f} > {limit}"
        return None


class ExampleCopy(RowFilter):
    """The response is (nearly) one of its own few-shot completions: the model copied instead of answering."""
    name = "example_copy"
    description = "copies one of its own few-shot completions (ROUGE-L F above --copy-threshold)"

    def __init__(self, threshold: float = COPY_THRESHOLD, min_words: int = COPY_MIN_WORDS):
        self.threshold = threshold
        self.min_words = min_words

    @classmethod
    def build(cls, config: GenerationConfig, max_model_len: int | None) -> ExampleCopy:
        return cls(config.copy_threshold)

    def check(self, row: Candidate) -> Rejection | None:
        if len(words(row.response)) < self.min_words:
            return None
        for example_id, completion in row.example_completions.items():
            score = rouge_l_f(row.response, completion)
            if score > self.threshold:
                return self.reject(f"ROUGE-L F {score:.2f} > {self.threshold} with example {example_id}")
        return None


class InstructionEcho(RowFilter):
    name = "instruction_echo"
    description = f"is only a passage of its own instruction ({ECHO_MIN_WORDS} words or more)"

    def __init__(self, min_words: int = ECHO_MIN_WORDS):
        self.min_words = min_words

    def check(self, row: Candidate) -> Rejection | None:
        said = words(row.response)
        if len(said) < self.min_words or f" {' '.join(said)} " not in f" {' '.join(words(row.instruction))} ":
            return None
        return self.reject(f"the response ({len(said)} words) is a passage of the instruction")


class Decontaminated(RowFilter):
    """A row that overlaps an eval text of --decontaminate (decontaminate.py). Last of the row filters: its count is
    of the rows the eval overlap alone removes."""
    name = "contaminated"
    description = (f"the instruction or the response shares a word {DECONTAMINATION_NGRAM}-gram with an eval text of "
                   f"--decontaminate, or equals one (under {DECONTAMINATION_NGRAM} words), once NFKC-normalized and "
                   "lower-cased")
    sides = (("instruction", "instruction"), ("response", "response"))  # (Candidate field, what the detail calls it)

    def __init__(self, index=None):
        self.index = index  # decontaminate.EvalIndex; None: passes every row

    @classmethod
    def build(cls, config: GenerationConfig, max_model_len: int | None) -> Decontaminated:
        if not config.decontaminate:
            return cls()
        from stage1.data.decontaminate import eval_index  # numpy, and the eval files: only when asked for
        return cls(eval_index(config.decontaminate, config.decontaminate_fields))

    def check(self, row: Candidate) -> Rejection | None:
        if self.index is None:
            return None
        for attr, side in self.sides:
            match = self.index.match(getattr(row, attr) or "")
            if match:
                return self.reject(match.describe(side))
        return None


# --select: which of an instruction's completions best-of-n keeps ("all": every one, no selection)
SELECT_ALL = "all"
SELECT_BEST_LOGPROB = "best-logprob"
SELECT_CHOICES = (SELECT_ALL, SELECT_BEST_LOGPROB)


def best_logprob_choice(scored: Sequence[tuple[int, float | None]]) -> int:
    """The completion index best-of-n keeps among `scored` ((index, mean logprob) of the completions that passed the
    row filters, not empty): the highest mean logprob, the lowest index on ties; one without a logprob ranks last."""
    return max(scored, key=lambda s: (-math.inf if s[1] is None else s[1], -s[0]))[0]


class BestLogprob(Selection):
    name = "not_selected"
    description = ("--select best-logprob: not its instruction's completion with the highest mean token logprob among "
                   "those that passed the row filters (ties: the lowest index)")

    def __init__(self, enabled: bool = False):
        self.enabled = enabled

    @classmethod
    def build(cls, config: GenerationConfig, max_model_len: int | None) -> BestLogprob:
        return cls(config.select == SELECT_BEST_LOGPROB)

    def select(self, rows: list[Candidate]) -> list[Rejection | None]:
        if not self.enabled or not rows:
            return [None] * len(rows)
        winner = best_logprob_choice([(row.index, row.mean_logprob) for row in rows])
        best = next(row for row in rows if row.index == winner)
        return [None if row.index == winner else self.reject(
            f"index {winner} selected (mean logprob {_logprob(best.mean_logprob)} "
            f"{'=' if best.mean_logprob == row.mean_logprob else '>'} {_logprob(row.mean_logprob)})")
            for row in rows]


def _logprob(value: float | None) -> str:
    return "none" if value is None else f"{value:.3f}"


class LowJudgeScore(JudgeFilter):
    name = "low_judge_score"
    description = ("--min-judge-score X: the judge's expected score (--judge) is below X, or there is none (no rating "
                   "digit among the top 20 next tokens)")

    def __init__(self, min_score: float | None = None):
        self.min_score = min_score  # None: keeps every row

    @classmethod
    def build(cls, config: GenerationConfig, max_model_len: int | None) -> LowJudgeScore:
        return cls(config.min_judge_score)

    def check(self, row: Candidate) -> Rejection | None:
        if self.min_score is None:
            return None
        if row.judge_score is None:
            return self.reject(f"no judge score (no rating digit among the top 20 next tokens) < {self.min_score}")
        if row.judge_score < self.min_score:
            return self.reject(f"judge score {row.judge_score} < {self.min_score}")
        return None


class ExactDuplicate(DatasetFilter):
    name = "exact_duplicate"
    description = "the same instruction and response as a row kept before it (case and spacing aside)"

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self._first: dict[tuple[str, str], str] = {}  # normalized (instruction, response) -> the first row's key

    @staticmethod
    def _normalized(row: Candidate) -> tuple[str, str]:
        return " ".join(row.instruction.casefold().split()), " ".join(row.response.casefold().split())

    def check(self, row: Candidate) -> Rejection | None:
        first = self._first.get(self._normalized(row))
        return None if first is None else self.reject(f"same instruction and response as {first}")

    def add(self, row: Candidate) -> None:
        self._first.setdefault(self._normalized(row), row.key)


class NearDuplicate(DatasetFilter):
    name = "near_duplicate"
    description = (f"a response near one kept before it (MinHash LSH over word {NEAR_DUP_SHINGLE}-grams, estimated "
                   f"Jaccard at least --near-dup-threshold, {NEAR_DUP_MIN_WORDS}+ words; --no-near-dedup turns it off)")

    def __init__(self, threshold: float = NEAR_DUP_THRESHOLD, num_perm: int = NEAR_DUP_NUM_PERM,
                 shingle: int = NEAR_DUP_SHINGLE, min_words: int = NEAR_DUP_MIN_WORDS, enabled: bool = True):
        self.threshold = threshold
        self.num_perm = num_perm
        self.shingle = shingle
        self.min_words = min_words
        self.enabled = enabled
        self.reset()

    @classmethod
    def build(cls, config: GenerationConfig, max_model_len: int | None) -> NearDuplicate:
        return cls(config.near_dup_threshold, enabled=config.near_dedup)

    def reset(self) -> None:
        self._lsh = None  # off: passes every row, and needs no datasketch
        if self.enabled:
            try:
                from datasketch import MinHashLSH
            except ImportError:
                raise DataError("near-duplicate filtering needs the datasketch package: pip install datasketch "
                                "(or pass --no-near-dedup)") from None
            self._lsh = MinHashLSH(threshold=self.threshold, num_perm=self.num_perm)
        self._minhashes: dict[str, Any] = {}  # key -> datasketch.MinHash
        self._order: dict[str, int] = {}  # key -> when it was kept: a duplicate names the earliest match

    def _minhash(self, response: str):
        if self._lsh is None:
            return None
        return word_minhash(response, self.shingle, self.num_perm, self.min_words)

    def check(self, row: Candidate) -> Rejection | None:
        mh = self._minhash(row.response)
        if mh is None:
            return None
        # LSH gives candidates; the MinHash estimate confirms them (fewer false positives).
        scores = {k: self._minhashes[k].jaccard(mh) for k in self._lsh.query(mh)}
        matches = [k for k, score in scores.items() if score >= self.threshold]
        if not matches:
            return None
        first = min(matches, key=self._order.__getitem__)
        return self.reject(f"estimated Jaccard {scores[first]:.2f} >= {self.threshold} with {first}")

    def add(self, row: Candidate) -> None:
        mh = self._minhash(row.response)
        if mh is not None:
            self._order[row.key] = len(self._order)
            self._minhashes[row.key] = mh
            self._lsh.insert(row.key, mh)


# The filters, in the order they run: prompt filters, row filters, selections, judge filters, dataset filters (the
# module doc).
FILTERS: tuple[type[Filter], ...] = (
    PromptTooLong, Empty, RunOn, ControlToken, Scaffolding, Repetition, ExampleCopy, InstructionEcho, Decontaminated,
    BestLogprob, LowJudgeScore, ExactDuplicate, NearDuplicate,
)


# -- the instruction job's filters (python -m stage1.instructions): its rows' text is a generated instruction ----------
# Thresholds, chosen on a real run of the default model (README, "Instructions from the base model").
INSTRUCTION_MIN_WORDS = 3  # "Write a poem." is a request; "Sort." or "Hello" is not
INSTRUCTION_MAX_WORDS = 120  # past this a "request" is a passage (a story, an essay) the model wrote instead
INSTRUCTION_SHINGLE = 2  # instructions are short: word 2-grams (a 6-word instruction has 5, 3-grams only 4)
INSTRUCTION_MIN_SHINGLE_WORDS = 4  # below, one changed word moves the Jaccard by a third or more
POOL_COPY_THRESHOLD = 0.5  # estimated Jaccard with a pool example's prompt: "What is 15% of 90?" vs "... of 80?" is 0.6
INSTRUCTION_NEAR_DUP_THRESHOLD = 0.6  # between generated instructions
# A request starts as one; an answer as these (the model answering the pool's requests, or a chat reply).
ANSWER_OPENERS = ("sure", "certainly", "of course", "here is", "here are", "here's", "the answer", "answer:",
                  "yes,", "no,", "as an ai", "i'm sorry", "i am sorry", "i cannot", "i can't", "absolutely")
# A line that opens a list item: two or more of them, not introduced by a line ending in ':', are a list of requests.
_LIST_ITEM_RE = re.compile(r"^\s*(?:\d+[.)]|[-*\u2022])\s+\S")


class InstructionLength(RowFilter):
    name = "length"
    description = (f"fewer than {INSTRUCTION_MIN_WORDS} or more than {INSTRUCTION_MAX_WORDS} words (not empty: "
                   "that is `empty`)")

    def __init__(self, min_words: int = INSTRUCTION_MIN_WORDS, max_words: int = INSTRUCTION_MAX_WORDS):
        self.min_words = min_words
        self.max_words = max_words

    def check(self, row: Candidate) -> Rejection | None:
        n = len(words(row.response))
        if n < self.min_words:
            return self.reject(f"{n} words < {self.min_words}")
        return self.reject(f"{n} words > {self.max_words}") if n > self.max_words else None


class InstructionScaffolding(Scaffolding):
    """The instruction styles' own scaffold patterns (the entry labels, the header)."""

    @classmethod
    def build(cls, config: GenerationConfig, max_model_len: int | None) -> InstructionScaffolding:
        from stage1.data.instruction_prompts import load_instruction_styles
        return cls(load_instruction_styles()[config.style].scaffold_patterns)


class MultipleInstructions(RowFilter):
    """The engine already cuts at the next entry's label (the style's stops); what is left may still hold several
    requests: several questions, or a list of tasks."""
    name = "multiple_instructions"
    description = ("holds more than one request (2+ lines ending in '?', or 2+ list items not introduced by a line "
                   "ending in ':'); the entry boundary itself is cut by the style's stops")

    def check(self, row: Candidate) -> Rejection | None:
        lines = [line.strip() for line in row.response.splitlines() if line.strip()]
        questions = sum(line.endswith("?") for line in lines)
        if questions >= 2:
            return self.reject(f"{questions} lines ending in '?'")
        items = [i for i, line in enumerate(lines) if _LIST_ITEM_RE.match(line)]
        if len(items) >= 2 and not (items[0] > 0 and lines[items[0] - 1].endswith(":")):
            return self.reject(f"{len(items)} list items with no introducing line")
        return None


class AnswerNotRequest(RowFilter):
    name = "answer_not_request"
    description = f"opens as an answer does, not a request ({', '.join(repr(o) for o in ANSWER_OPENERS[:6])}, ...)"

    def __init__(self, openers: tuple[str, ...] = ANSWER_OPENERS):
        self.openers = openers

    def check(self, row: Candidate) -> Rejection | None:
        text = row.response.casefold().lstrip()
        opener = next((o for o in self.openers if text.startswith(o)
                       and (o[-1] in ",:" or not text[len(o):len(o) + 1].isalnum())), None)  # "no," not "north"
        return self.reject(f"opens with {opener!r}") if opener else None


class PoolCopy(RowFilter):
    """A copy or near-copy of an example of the pool (any of them, shown in its prompt or not): `example_completions`
    holds the pool's texts for this job."""
    name = "pool_copy"
    description = (f"near an example of the pool (MinHash over word {INSTRUCTION_SHINGLE}-grams, estimated Jaccard at "
                   f"least --copy-threshold; exact copies of any length)")

    def __init__(self, threshold: float = POOL_COPY_THRESHOLD, shingle: int = INSTRUCTION_SHINGLE,
                 num_perm: int = NEAR_DUP_NUM_PERM, min_words: int = INSTRUCTION_MIN_SHINGLE_WORDS):
        self.threshold = threshold
        self.shingle = shingle
        self.num_perm = num_perm
        self.min_words = min_words
        self._pool: dict[str, Any] = {}  # example text -> its MinHash (None: too short), computed once

    @classmethod
    def build(cls, config: GenerationConfig, max_model_len: int | None) -> PoolCopy:
        return cls(config.copy_threshold)

    def check(self, row: Candidate) -> Rejection | None:
        own = " ".join(words(row.response))
        mh = word_minhash(row.response, self.shingle, self.num_perm, self.min_words)
        for example_id, text in row.example_completions.items():
            if own == " ".join(words(text)):
                return self.reject(f"the text of example {example_id}")
            if text not in self._pool:
                self._pool[text] = word_minhash(text, self.shingle, self.num_perm, self.min_words)
            theirs = self._pool[text]
            if mh is not None and theirs is not None and mh.jaccard(theirs) >= self.threshold:
                return self.reject(f"estimated Jaccard {mh.jaccard(theirs):.2f} >= {self.threshold} with example "
                                   f"{example_id}")
        return None


class InstructionExactDuplicate(ExactDuplicate):
    description = "the same instruction as one kept before it (case and spacing aside)"


class InstructionNearDuplicate(NearDuplicate):
    description = (f"an instruction near one kept before it (MinHash LSH over word {INSTRUCTION_SHINGLE}-grams, "
                   f"estimated Jaccard at least --near-dup-threshold, {INSTRUCTION_MIN_SHINGLE_WORDS}+ words; "
                   "--no-near-dedup turns it off)")

    def __init__(self, threshold: float = INSTRUCTION_NEAR_DUP_THRESHOLD, enabled: bool = True):
        super().__init__(threshold, shingle=INSTRUCTION_SHINGLE, min_words=INSTRUCTION_MIN_SHINGLE_WORDS,
                         enabled=enabled)


class InstructionDecontaminated(Decontaminated):
    """The generated instruction (the Candidate's `response`) against the eval texts."""
    description = (f"the instruction shares a word {DECONTAMINATION_NGRAM}-gram with an eval text of --decontaminate, "
                   f"or equals one (under {DECONTAMINATION_NGRAM} words), once NFKC-normalized and lower-cased")
    sides = (("response", "instruction"),)


INSTRUCTION_FILTERS: tuple[type[Filter], ...] = (
    PromptTooLong, Empty, RunOn, ControlToken, InstructionScaffolding, InstructionLength, MultipleInstructions,
    AnswerNotRequest, Repetition, PoolCopy, InstructionDecontaminated, InstructionExactDuplicate,
    InstructionNearDuplicate,
)


def reject_reasons(filters: tuple[type[Filter], ...] | None = None) -> dict[str, str]:
    """Every reason a row of rejects.jsonl may give, in the order the filters run (a job's list; None: `FILTERS`),
    with what it means (--help and the README list them)."""
    return {f.name: f.description for f in (FILTERS if filters is None else filters)}


def build_filters(config: GenerationConfig, *kinds: type[Filter], max_model_len: int | None = None,
                  filters: tuple[type[Filter], ...] | None = None) -> list[Filter]:
    """The run's filters of these kinds, in `filters` order (a job's list; None: `FILTERS`), with its thresholds.
    `max_model_len` (the engine's context) is needed for the prompt filters only."""
    return [f.build(config, max_model_len) for f in (FILTERS if filters is None else filters) if issubclass(f, kinds)]


def first_rejection(filters: Iterable[Filter], row: Candidate) -> Rejection | None:
    """The rejection of the first filter that rejects `row`, or None: it passes them all."""
    for f in filters:
        verdict = f.check(row)
        if verdict:
            return verdict
    return None


def selected(selections: Iterable[Filter], rows: list[Candidate]) -> list[Rejection | None]:
    """A verdict for each of `rows` (one instruction's completions that passed the row filters): each selection
    among `selections` in turn, over the rows the ones before it kept."""
    verdicts: list[Rejection | None] = [None] * len(rows)
    for f in selections:
        if isinstance(f, Selection):
            still_kept = [i for i, v in enumerate(verdicts) if v is None]
            for i, verdict in zip(still_kept, f.select([rows[i] for i in still_kept])):
                verdicts[i] = verdict
    return verdicts


def add_kept(filters: Iterable[Filter], row: Candidate) -> None:
    """Feeds a kept row to the dataset-level filters among `filters`."""
    for f in filters:
        if isinstance(f, DatasetFilter):
            f.add(row)


# -- measures the row filters use -------------------------------------------------------------------------------------
def word_minhash(text: str, shingle: int, num_perm: int, min_words: int):
    """The datasketch MinHash of the text's word `shingle`-grams, or None below `min_words` words."""
    ws = words(text)
    if len(ws) < min_words:
        return None
    from datasketch import MinHash
    mh = MinHash(num_perm=num_perm, seed=1)
    mh.update_batch([" ".join(ws[i:i + shingle]).encode("utf-8") for i in range(len(ws) - shingle + 1)])
    return mh


def duplicate_line_fractions(text: str) -> tuple[float, float]:
    """(lines repeating an earlier line / lines, their characters / all characters); lines without a word character
    (a lone brace, a rule) don't count."""
    lines = [line.strip() for line in text.splitlines() if re.search(r"\w", line)]
    if len(lines) < 2:
        return 0.0, 0.0
    seen: set[str] = set()
    dup_lines = dup_chars = 0
    for line in lines:
        if line in seen:
            dup_lines, dup_chars = dup_lines + 1, dup_chars + len(line)
        seen.add(line)
    return dup_lines / len(lines), dup_chars / sum(len(line) for line in lines)


def top_ngram_char_fraction(ws: list[str], n: int) -> tuple[float, str]:
    """Characters covered by the most frequent word n-gram, if it occurs at least twice, over all characters."""
    if len(ws) < n:
        return 0.0, ""
    gram, count = Counter(tuple(ws[i:i + n]) for i in range(len(ws) - n + 1)).most_common(1)[0]
    if count < 2:
        return 0.0, ""
    return sum(len(w) for w in gram) * count / sum(len(w) for w in ws), " ".join(gram)


def duplicate_ngram_char_fraction(ws: list[str], n: int) -> float:
    """Characters of the words inside any repeat of an earlier word n-gram, over all characters."""
    covered = [False] * len(ws)
    seen: set[tuple[str, ...]] = set()
    for i in range(len(ws) - n + 1):
        gram = tuple(ws[i:i + n])
        if gram in seen:
            covered[i:i + n] = [True] * n
        seen.add(gram)
    total = sum(len(w) for w in ws)
    return sum(len(w) for w, c in zip(ws, covered) if c) / total if total else 0.0


def rouge_l_f(a: str, b: str) -> float:
    """ROUGE-L F1 of two texts over lower-cased words (longest common subsequence)."""
    x, y = words(a), words(b)
    if not x or not y:
        return 0.0
    prev = [0] * (len(y) + 1)
    for xi in x:
        cur = [0]
        for j, yj in enumerate(y):
            cur.append(prev[j] + 1 if xi == yj else max(prev[j + 1], cur[j]))
        prev = cur
    lcs = prev[-1]
    if lcs == 0:
        return 0.0
    p, r = lcs / len(x), lcs / len(y)
    return 2 * p * r / (p + r)
