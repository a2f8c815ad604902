"""Post-processing and filters: each turns a completion into a kept response or a reject with a reason.

Each check takes a `Candidate` and returns a rejection (reason, detail) or None. `checks_in_order` lists them in the
order they run (the first that fires is the row's reason): empty, run_on, control_token, scaffolding, repetition,
example_copy, instruction_echo, then across the dataset exact_duplicate and near_duplicate. Thresholds are the named
constants below.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

from stage1.data.errors import DataError
from stage1.data.prompts import PromptStyle

# Reasons, as written into rejects.jsonl.
EMPTY = "empty"
RUN_ON = "run_on"
CONTROL_TOKEN = "control_token"
SCAFFOLDING = "scaffolding"
REPETITION = "repetition"
EXAMPLE_COPY = "example_copy"
INSTRUCTION_ECHO = "instruction_echo"
EXACT_DUPLICATE = "exact_duplicate"
NEAR_DUPLICATE = "near_duplicate"

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


def control_token_detail(text: str) -> str | None:
    m = _CONTROL_TOKEN_RE.search(text)
    return f"contains {m.group(0)}" if m else None


def scaffolding_detail(text: str, patterns: tuple[str, ...]) -> str | None:
    for pattern in patterns:
        m = re.search(pattern, text, re.MULTILINE)
        if m:
            return f"matches {pattern!r}: {m.group(0).strip()!r}"
    return None


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


def repetition_detail(text: str) -> str | None:
    """Which Gopher-style repetition rule the text breaks, or None."""
    line_frac, line_char_frac = duplicate_line_fractions(text)
    if line_frac > MAX_DUP_LINE_FRAC:
        return f"duplicate line fraction {line_frac:.2f} > {MAX_DUP_LINE_FRAC}"
    if line_char_frac > MAX_DUP_LINE_CHAR_FRAC:
        return f"duplicate line character fraction {line_char_frac:.2f} > {MAX_DUP_LINE_CHAR_FRAC}"
    ws = words(text)
    if len(ws) < REPETITION_MIN_WORDS:
        frac = duplicate_ngram_char_fraction(ws, SHORT_LOOP_NGRAM)
        if frac > SHORT_LOOP_MAX_CHAR_FRAC:
            return f"duplicate {SHORT_LOOP_NGRAM}-gram character fraction {frac:.2f} > {SHORT_LOOP_MAX_CHAR_FRAC}"
        return None
    for n, limit in MAX_TOP_NGRAM_CHAR_FRAC.items():
        frac, gram = top_ngram_char_fraction(ws, n)
        if frac > limit:
            return f"top {n}-gram {gram!r} character fraction {frac:.2f} > {limit}"
    for n, limit in MAX_DUP_NGRAM_CHAR_FRAC.items():
        frac = duplicate_ngram_char_fraction(ws, n)
        if frac > limit:
            return f"duplicate {n}-gram character fraction {frac:.2f} > {limit}"
    return None


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


def example_copy_detail(response: str, completions: dict[str, str], threshold: float = COPY_THRESHOLD) -> str | None:
    """Whether the response is (nearly) one of its own few-shot completions: the model copied instead of answering."""
    if len(words(response)) < COPY_MIN_WORDS:
        return None
    for example_id, completion in completions.items():
        score = rouge_l_f(response, completion)
        if score > threshold:
            return f"ROUGE-L F {score:.2f} > {threshold} with example {example_id}"
    return None


def instruction_echo_detail(response: str, instruction: str) -> str | None:
    said = words(response)
    if len(said) < ECHO_MIN_WORDS or f" {' '.join(said)} " not in f" {' '.join(words(instruction))} ":
        return None
    return f"the response ({len(said)} words) is a passage of the instruction"


@dataclass(frozen=True)
class Candidate:
    """What the checks see of one completion."""
    instruction: str
    response: str  # post-processed
    finish_reason: str | None
    example_completions: dict[str, str]  # the completions of its few-shot examples, by example id


Check = Callable[[Candidate], Rejection | None]  # each named after the reason it gives


def checks_in_order(quality: QualityFilter, dedup: Deduplicator | None) -> list[Check]:
    """Every check a completion goes through, in the order they run: the first that fires is its reason. Each is
    named after the reason it gives. Without `dedup` (a shard), only the per-row checks: the merge runs the rest."""
    return row_checks(quality) + (dataset_checks(dedup) if dedup is not None else [])


def row_checks(quality: QualityFilter) -> list[Check]:
    """The checks that look at the row alone."""
    return [quality.empty, quality.run_on, quality.control_token, quality.scaffolding, quality.repetition,
            quality.example_copy, quality.instruction_echo]


def dataset_checks(dedup: Deduplicator) -> list[Check]:
    """The checks against the rows kept before it in input order (they run last)."""
    return [dedup.exact_duplicate, dedup.near_duplicate]


def dedup_key(row_id: str, index: int | None) -> str:
    """How a duplicate names the row it repeats."""
    return f"{row_id}#{index}"


def first_rejection(checks: list[Check], candidate: Candidate) -> Rejection | None:
    for check in checks:
        verdict = check(candidate)
        if verdict:
            return verdict
    return None


def _fires(reason: str, detail: str | None) -> Rejection | None:
    return (reason, detail) if detail else None


@dataclass
class QualityFilter:
    """The per-row checks: they depend on the row alone, never on the rest of the dataset."""
    style: PromptStyle
    allow_run_on: bool = False
    copy_threshold: float = COPY_THRESHOLD

    def post_process(self, raw: str) -> str:
        return post_process(raw, self.style.stop)

    def empty(self, c: Candidate) -> Rejection | None:
        return None if c.response else (EMPTY, None)

    def run_on(self, c: Candidate) -> Rejection | None:
        if c.finish_reason == "length" and not self.allow_run_on:
            return RUN_ON, "hit max_tokens before the stop marker (pass --allow-run-on to keep such rows)"
        return None

    def control_token(self, c: Candidate) -> Rejection | None:
        return _fires(CONTROL_TOKEN, control_token_detail(c.response))

    def scaffolding(self, c: Candidate) -> Rejection | None:
        return _fires(SCAFFOLDING, scaffolding_detail(c.response, self.style.scaffold_patterns))

    def repetition(self, c: Candidate) -> Rejection | None:
        return _fires(REPETITION, repetition_detail(c.response))

    def example_copy(self, c: Candidate) -> Rejection | None:
        return _fires(EXAMPLE_COPY, example_copy_detail(c.response, c.example_completions, self.copy_threshold))

    def instruction_echo(self, c: Candidate) -> Rejection | None:
        return _fires(INSTRUCTION_ECHO, instruction_echo_detail(c.response, c.instruction))


class Deduplicator:
    """Exact duplicates of (instruction, response) and near-duplicate responses across the dataset.

    Holds only kept rows, in the order they were kept; on resume it is rebuilt from data.jsonl in file order, so a
    resumed run makes the same decisions as an uninterrupted one. A duplicate names the earliest row it repeats.
    """

    def __init__(self, near: bool = True, threshold: float = NEAR_DUP_THRESHOLD, num_perm: int = NEAR_DUP_NUM_PERM):
        self._exact: dict[tuple[str, str], str] = {}
        self._order: dict[str, int] = {}
        self._minhashes: dict[str, object] = {}  # key -> datasketch.MinHash
        self.threshold = threshold
        self.num_perm = num_perm
        self._lsh = None
        if near:
            try:
                from datasketch import MinHashLSH
            except ImportError:
                raise DataError("near-duplicate filtering needs the datasketch package: pip install datasketch "
                                "(or pass --no-near-dedup)") from None
            self._lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)

    @staticmethod
    def _exact_key(instruction: str, response: str) -> tuple[str, str]:
        return " ".join(instruction.casefold().split()), " ".join(response.casefold().split())

    def _minhash(self, response: str):
        ws = words(response)
        if self._lsh is None or len(ws) < NEAR_DUP_MIN_WORDS:
            return None
        from datasketch import MinHash
        mh = MinHash(num_perm=self.num_perm, seed=1)
        mh.update_batch([" ".join(ws[i:i + NEAR_DUP_SHINGLE]).encode("utf-8")
                         for i in range(len(ws) - NEAR_DUP_SHINGLE + 1)])
        return mh

    def exact_duplicate(self, c: Candidate) -> Rejection | None:
        first = self._exact.get(self._exact_key(c.instruction, c.response))
        return None if first is None else (EXACT_DUPLICATE, f"same instruction and response as {first}")

    def near_duplicate(self, c: Candidate) -> Rejection | None:
        mh = self._minhash(c.response)
        if mh is None:
            return None
        # LSH gives candidates; the MinHash estimate confirms them (fewer false positives).
        scores = {k: self._minhashes[k].jaccard(mh) for k in self._lsh.query(mh)}
        matches = [k for k, score in scores.items() if score >= self.threshold]
        if not matches:
            return None
        first = min(matches, key=self._order.__getitem__)
        return NEAR_DUPLICATE, f"estimated Jaccard {scores[first]:.2f} >= {self.threshold} with {first}"

    def add(self, key: str, instruction: str, response: str) -> None:
        self._order[key] = len(self._order)
        self._exact.setdefault(self._exact_key(instruction, response), key)
        mh = self._minhash(response)
        if mh is not None:
            self._minhashes[key] = mh
            self._lsh.insert(key, mh)
