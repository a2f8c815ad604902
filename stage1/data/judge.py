"""The judge (--judge): the run's own base model rates each completion, with no sampling.

A rating style is data (judge_styles.json: a header with the scale, rated examples, the example template ending in
`{score}`), so the rating prompt is a few-shot completion prompt like the generation's: the examples, then the new
instruction and response and the template up to `{score}` ("Rating: "), whose next token the engine scores. The
engine returns that token's top `TOP_LOGPROBS` log-probabilities under the raw distribution (max_tokens 1, greedy);
the score is the expectation over the scale's digits among them, sum d * p(d) / sum p(d) (a digit outside the top
counts as 0; none inside: no score). Everything before the instruction is the same for every row, so the engine's
prefix cache computes it once.

The digits must be what the model would write after the label: a single token each, and the label's tokens must not
change when a digit follows it (Qwen writes "Rating: 5" as 'Rating' ':' ' ' '5', so the label keeps its trailing
space). `Judge` checks both with the run's tokenizer before anything is sent.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache
from typing import TYPE_CHECKING, Any

from stage1.data.errors import DataError
from stage1.data.hashing import sha256_text
from stage1.data.prompts import _read_package_text
from stage1.engine.params import SamplingParams

if TYPE_CHECKING:
    from stage1.data.engine import EngineTokenizer
    from stage1.engine.outputs import Logprob, RequestOutput

JUDGE_STYLES_FILE = "judge_styles.json"
DEFAULT_JUDGE_STYLE = "rating"
TOP_LOGPROBS = 20  # the engine's top-k at the rating position: the digits are read among them
SCORE_DECIMALS = 4  # rows store the expected score rounded so (the same float on every machine)
SCORE = "sum(d * p(d)) / sum(p(d)) over the scale's digits d among the top 20 next-token logprobs"


@dataclass(frozen=True)
class RatedExample:
    instruction: str
    response: str
    score: int


@dataclass(frozen=True)
class JudgeStyle:
    name: str
    description: str
    header: str | None
    example: str  # template with {instruction}, {response} and, at its end, {score}
    separator: str
    scores: tuple[int, int]  # the scale, inclusive: single digits
    examples: tuple[RatedExample, ...]

    @property
    def label(self) -> str:
        """What the model continues: the example template up to the score."""
        return self.example[:-len("{score}")]

    @property
    def digits(self) -> tuple[int, ...]:
        return tuple(range(self.scores[0], self.scores[1] + 1))

    def render(self, instruction: str, response: str) -> str:
        """The rating prompt of one (instruction, response): exactly what the engine gets."""
        parts = [self.header] if self.header else []
        parts += [self.example.format(instruction=ex.instruction, response=ex.response, score=ex.score)
                  for ex in self.examples]
        parts.append(self.label.format(instruction=instruction, response=response))
        return self.separator.join(parts)


@cache
def load_judge_styles() -> dict[str, JudgeStyle]:
    raw = json.loads(_read_package_text(JUDGE_STYLES_FILE))
    styles = {}
    for name, s in raw.items():
        style = JudgeStyle(name=name, description=s["description"], header=s.get("header"), example=s["example"],
                           separator=s["separator"], scores=tuple(s["scores"]),
                           examples=tuple(RatedExample(**ex) for ex in s["examples"]))
        lo, hi = style.scores
        if not style.example.endswith("{score}") or not 0 <= lo < hi <= 9:
            raise ValueError(f"{JUDGE_STYLES_FILE}: style {name!r} needs an example template ending in {{score}} and "
                             "a scale of single digits")
        styles[name] = style
    return styles


def judge_styles_fingerprint() -> str:
    """The sha256 of the rating styles file: the manifest records it, and it is part of the run identity."""
    return sha256_text(_read_package_text(JUDGE_STYLES_FILE))


def expected_score(top: Mapping[int, Logprob], digit_ids: Mapping[int, int]) -> float | None:
    """sum d * p(d) / sum p(d) over the digits d whose token is in `top` (token id -> Logprob: the engine's chosen
    token plus its top-k); None when none is. Rounded to SCORE_DECIMALS."""
    probs = {d: math.exp(top[i].logprob) for d, i in digit_ids.items() if i in top}
    total = sum(probs.values())
    if not probs or total == 0:
        return None
    return round(sum(d * p for d, p in probs.items()) / total, SCORE_DECIMALS)


class Judge:
    """Rating prompts and scores for one style, checked against the run's tokenizer."""

    def __init__(self, style: str, tokenizer: EngineTokenizer):
        styles = load_judge_styles()
        if style not in styles:
            raise DataError(f"--judge-style {style}: unknown; known: {', '.join(sorted(styles))}")
        self.style = styles[style]
        self.params = SamplingParams(max_tokens=1, temperature=0, logprobs=TOP_LOGPROBS, seed=0)
        self.digit_ids = self._digit_ids(tokenizer)

    def _digit_ids(self, tokenizer: EngineTokenizer) -> dict[int, int]:
        """Each digit's token id, as the model would write it after the label (see the module docstring)."""
        sample = self.prompt("Say hello.", "Hello.")
        before = tokenizer.encode(sample)
        ids = {}
        for d in self.style.digits:
            alone, after = tokenizer.encode(str(d)), tokenizer.encode(sample + str(d))
            if len(alone) != 1 or after != before + alone:
                raise DataError(f"rating style {self.style.name!r}: with this model's tokenizer the digit {d} after "
                                f"the label {self.style.label.rsplit(chr(10), 1)[-1]!r} is not one token of its own "
                                f"({after[len(before) - 1:]} after {before[-1:]}), so its probability can't be read "
                                f"from the next token; change the label in {JUDGE_STYLES_FILE}")
            ids[d] = alone[0]
        return ids

    def prompt(self, instruction: str, response: str) -> str:
        return self.style.render(instruction, response)

    def score(self, out: RequestOutput) -> float | None:
        """The expected score from a rating request's output (its one token's logprobs)."""
        [completion] = out.outputs
        if not completion.logprobs:
            return None
        return expected_score(completion.logprobs[0], self.digit_ids)

    def manifest_entry(self, min_score: float | None) -> dict[str, Any]:
        """What the manifest records of the judge (its cost is added per session: judge_cost)."""
        return {"style": self.style.name, "styles_file": JUDGE_STYLES_FILE,
                "styles_sha256": judge_styles_fingerprint(), "scale": list(self.style.scores),
                "top_logprobs": TOP_LOGPROBS, "score": SCORE, "min_score": min_score,
                "digit_token_ids": {str(d): i for d, i in self.digit_ids.items()}}


JUDGE_COST_FIELDS = ("judge_requests", "judge_prompt_tokens", "judge_prompt_tokens_cached")


def judge_cost(sessions: list[dict[str, Any]]) -> dict[str, int]:
    """The judge's extra prefill over sessions (each a manifest session record, SessionStats.as_dict)."""
    return {name.removeprefix("judge_"): sum(s.get(name, 0) for s in sessions) for name in JUDGE_COST_FIELDS}
