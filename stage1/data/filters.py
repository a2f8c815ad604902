"""The filters: each one object that passes a row or rejects it with a reason, after datatrove's pipeline steps.

A filter is one class: its `name` is the reason written into rejects.jsonl, its `description` what --help and the
README say of it, its thresholds are its constructor's arguments (defaults: the named constants below; `build` takes
them from the run's settings), and `check(row)` returns None (pass) or `self.reject(detail)`. `FILTERS` lists the
classes in the order they run: the first that rejects a row gives its reason. The reasons the CLI lists
(`reject_reasons()`) are that list's names. Adding a filter is one class and one entry in `FILTERS`.

There are three kinds, by what a check compares a row with:
- `PromptFilter`: the planned prompt, before it is sent (a rejected one is never generated from);
- `RowFilter`: one completion alone (each shard runs them);
- `DatasetFilter`: one completion against the rows kept before it in input order (exact and near duplicates). It
  keeps state: `add(row)` feeds it each kept row, in input order, and `reset()` forgets them. A shard runs none; the
  merge (merge.py) feeds fresh ones every shard's rows in input order, so it decides as one unsharded run does.
`FILTERS` holds the kinds in that order, so a shard's reasons are the unsharded run's.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from stage1.data.errors import DataError
from stage1.data.prompts import load_styles

if TYPE_CHECKING:
    from stage1.data.prompts import PromptStyle
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
    example_completions: dict[str, str]  # the completions of its few-shot examples, by example id
    key: str = ""  # dedup_key: how a later duplicate names this row
    prompt_tokens: int = 0

    @classmethod
    def of_written(cls, row: dict[str, Any]) -> Candidate:
        """A row already in data.jsonl, as the dataset-level filters see it (resume, merge)."""
        return cls(row["instruction"], row["response"], row["finish_reason"], {}, dedup_key(row["id"], row["index"]),
                   row["prompt_tokens"])


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


class Repetition(RowFilter):
    name = "repetition"
    description = (f"repeated lines and n-grams, Gopher's rules (from {REPETITION_MIN_WORDS} words; below, a loop of "
                   f"{SHORT_LOOP_NGRAM}-grams)")

    def __init__(self, max_dup_line_frac: float = MAX_DUP_LINE_FRAC,
                 max_dup_line_char_frac: float = MAX_DUP_LINE_CHAR_FRAC,
                 max_top_ngram_char_frac: dict[int, float] = MAX_TOP_NGRAM_CHAR_FRAC,
                 max_dup_ngram_char_frac: dict[int, float] = MAX_DUP_NGRAM_CHAR_FRAC,
                 min_words: int = REPETITION_MIN_WORDS, short_loop_ngram: int = SHORT_LOOP_NGRAM,
                 short_loop_max_char_frac: float = SHORT_LOOP_MAX_CHAR_FRAC):
        self.max_dup_line_frac = max_dup_line_frac
        self.max_dup_line_char_frac = max_dup_line_char_frac
        self.max_top_ngram_char_frac = max_top_ngram_char_frac
        self.max_dup_ngram_char_frac = max_dup_ngram_char_frac
        self.min_words = min_words
        self.short_loop_ngram = short_loop_ngram
        self.short_loop_max_char_frac = short_loop_max_char_frac

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
        ws = words(response)
        if self._lsh is None or len(ws) < self.min_words:
            return None
        from datasketch import MinHash
        mh = MinHash(num_perm=self.num_perm, seed=1)
        mh.update_batch([" ".join(ws[i:i + self.shingle]).encode("utf-8") for i in range(len(ws) - self.shingle + 1)])
        return mh

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


# The filters, in the order they run: prompt filters, then row filters, then dataset filters (see the module doc).
FILTERS: tuple[type[Filter], ...] = (
    PromptTooLong, Empty, RunOn, ControlToken, Scaffolding, Repetition, ExampleCopy, InstructionEcho,
    ExactDuplicate, NearDuplicate,
)


def reject_reasons() -> dict[str, str]:
    """Every reason a row of rejects.jsonl may give, in the order the filters run, with what it means (--help and the
    README list them)."""
    return {f.name: f.description for f in FILTERS}


def build_filters(config: GenerationConfig, *kinds: type[Filter], max_model_len: int | None = None) -> list[Filter]:
    """The run's filters of these kinds, in `FILTERS` order, with its thresholds. `max_model_len` (the engine's
    context) is needed for the prompt filters only."""
    return [f.build(config, max_model_len) for f in FILTERS if issubclass(f, kinds)]


def first_rejection(filters: Iterable[Filter], row: Candidate) -> Rejection | None:
    """The rejection of the first filter that rejects `row`, or None: it passes them all."""
    for f in filters:
        verdict = f.check(row)
        if verdict:
            return verdict
    return None


def add_kept(filters: Iterable[Filter], row: Candidate) -> None:
    """Feeds a kept row to the dataset-level filters among `filters`."""
    for f in filters:
        if isinstance(f, DatasetFilter):
            f.add(row)


# -- measures the row filters use -------------------------------------------------------------------------------------
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
