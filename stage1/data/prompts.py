"""Few-shot, completion-style prompts for a base model: no Instruction:/Response: scaffolding, no chat template, no
special tokens.

A style is data (styles.json: header, example and query templates, stops, scaffolding patterns) and `PromptStyle.render`
is its one render function, so a new style is a new entry in styles.json. Examples come from a tagged pool
(examples.jsonl); which ones a row gets depends only on the row's seed.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import cache
from importlib import resources

from stage1.data.hashing import derive_seed, sha256_text

DEFAULT_STYLE = "completion"


@dataclass(frozen=True)
class Example:
    id: str
    type: str
    prompt: str
    completion: str


@dataclass(frozen=True)
class PromptStyle:
    name: str
    description: str
    header: str | None  # a line before the examples, or None
    example: str  # template with {prompt} and {completion}
    query: str  # template with {prompt}: what the model continues
    separator: str  # between header, examples and query
    num_examples: tuple[int, int]  # inclusive range, picked per row
    stop: tuple[str, ...]  # where the answer ends: the blank line that would start the next example
    scaffold_patterns: tuple[str, ...]  # regexes (multiline) that mean the model started writing prompt structure

    def render(self, instruction: str, examples: list[Example]) -> str:
        parts = [self.header] if self.header else []
        parts += [self.example.format(prompt=ex.prompt, completion=ex.completion) for ex in examples]
        parts.append(self.query.format(prompt=instruction))
        return self.separator.join(parts)


@dataclass(frozen=True)
class Prompt:
    text: str  # exactly what goes to the engine
    example_ids: tuple[str, ...]
    style: str


def _read_package_text(name: str) -> str:
    return resources.files("stage1.data").joinpath(name).read_text(encoding="utf-8")


@cache
def load_styles() -> dict[str, PromptStyle]:
    raw = json.loads(_read_package_text("styles.json"))
    return {
        name: PromptStyle(
            name=name, description=s["description"], header=s.get("header"), example=s["example"], query=s["query"],
            separator=s["separator"], num_examples=tuple(s["num_examples"]), stop=tuple(s["stop"]),
            scaffold_patterns=tuple(s.get("scaffold_patterns", [])),
        )
        for name, s in raw.items()
    }


@cache
def load_examples() -> tuple[Example, ...]:
    lines = _read_package_text("examples.jsonl").split("\n")
    return tuple(Example(**json.loads(line)) for line in lines if line.strip())


def pool_fingerprint() -> str:
    """A hash of the styles and the example pool: a run resumed with other data would not be the same run."""
    return sha256_text(_read_package_text("styles.json") + _read_package_text("examples.jsonl"))


def normalize(text: str) -> str:
    """Case, punctuation and spacing folded away: 'Explain what X is:' and 'explain what x is' are the same text."""
    return " ".join(re.findall(r"\w+", text.casefold()))


class CompletionStylePrompts:
    """Builds a row's prompt: `build(instruction, seed, type)` -> Prompt(text, example_ids, style).

    The examples (`choose_examples`): one of the instruction's own type when the pool has one, then examples of other
    types. An example whose prompt is the instruction's own text is never used.
    """

    def __init__(self, style: str = DEFAULT_STYLE, examples: tuple[Example, ...] | None = None):
        styles = load_styles()
        if style not in styles:
            raise ValueError(f"unknown prompt style {style!r}; known: {', '.join(sorted(styles))}")
        self.style = styles[style]
        self.examples = load_examples() if examples is None else tuple(examples)
        self._by_id = {ex.id: ex for ex in self.examples}
        self._normalized = {ex.id: normalize(ex.prompt) for ex in self.examples}

    def example(self, example_id: str) -> Example:
        return self._by_id[example_id]

    def choose_examples(self, instruction: str, seed: int, type: str | None = None) -> list[Example]:
        own = normalize(instruction)
        candidates = [ex for ex in self.examples if self._normalized[ex.id] != own]
        return choose_examples(candidates, self.style.num_examples, seed, type)

    def build(self, instruction: str, seed: int, type: str | None = None) -> Prompt:
        examples = self.choose_examples(instruction, seed, type)
        return Prompt(self.style.render(instruction, examples), tuple(ex.id for ex in examples), self.style.name)

    def prompt_for(self, inst, seed: int) -> Prompt:
        """The pipeline's call: the prompt of one input row (readers.Instruction)."""
        return self.build(inst.instruction, seed, inst.type)

    def copy_sources(self, prompt: Prompt) -> dict[str, str]:
        """What a completion of `prompt` must not copy (ExampleCopy): its examples' completions."""
        return {ex_id: self._by_id[ex_id].completion for ex_id in prompt.example_ids}


def choose_examples(candidates: list[Example] | tuple[Example, ...], num_examples: tuple[int, int], seed: int,
                    type: str | None) -> list[Example]:
    """k examples (k in the inclusive range, by the seed): one of `type` when there is one (it shows the expected form),
    then one per other type (diversity), then any; all ranked by sha256(seed, example id) and shown in rank order."""
    lo, hi = num_examples
    k = min(lo + derive_seed(seed, "num_examples") % (hi - lo + 1), len(candidates))
    rank = {ex.id: derive_seed(seed, ex.id) for ex in candidates}
    ranked = sorted(candidates, key=lambda ex: rank[ex.id])
    chosen: list[Example] = []
    same_type = [ex for ex in ranked if ex.type == type]
    if same_type and k:
        chosen.append(same_type[0])
    for ex in ranked:  # one per type first, then any (a pool with few types still fills k)
        if len(chosen) < k and ex not in chosen and ex.type not in {c.type for c in chosen}:
            chosen.append(ex)
    for ex in ranked:
        if len(chosen) < k and ex not in chosen:
            chosen.append(ex)
    return sorted(chosen, key=lambda ex: rank[ex.id])
