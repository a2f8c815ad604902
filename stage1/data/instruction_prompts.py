"""The instruction job's input and prompts (python -m stage1.instructions): what each attempt asks the base model for,
and the few-shot prompt that asks it.

An attempt is the i-th request of a run: its id derives from (seed, i), its type from an even draw over --types (each
cycle of len(types) attempts holds every type once, in a seeded order), its topic likewise over --topics. So attempt
i is the same whatever --count, shard or resume: a larger --count only adds attempts after the others. The prompt
style is data (instruction_styles.json, beside the response styles); its examples come from the pool (the built-in
60 typed examples' prompts, or --examples FILE in the pool's format).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from stage1.data.errors import DataError
from stage1.data.hashing import derive_seed, sha256_text
from stage1.data.prompts import Example, Prompt, _read_package_text, choose_examples, load_examples
from stage1.data.readers import Instruction
from stage1.data.rows import generation_fields

DEFAULT_INSTRUCTION_STYLE = "labeled"
# The default cap on attempts: this many per instruction to keep, plus 100 (a first real run kept about 1 in 2).
DEFAULT_ATTEMPTS_PER_KEPT = 5
SOURCE = "stage1.instructions"  # each attempt's source, and the response rows' of instructions read from its output


@dataclass(frozen=True)
class InstructionStyle:
    name: str
    description: str
    header: str | None
    example: str  # template with {type} and {prompt}
    query: str  # template with {type}: the start of the new entry
    query_with_topic: str  # the same with {topic}
    separator: str
    num_examples: tuple[int, int]
    stop: tuple[str, ...]  # the next entry's start: the engine cuts a second instruction off there
    scaffold_patterns: tuple[str, ...]

    def render(self, type: str, topic: str | None, examples: list[Example]) -> str:
        parts = [self.header] if self.header else []
        parts += [self.example.format(type=ex.type, prompt=ex.prompt) for ex in examples]
        parts.append(self.query.format(type=type) if topic is None else self.query_with_topic.format(type=type,
                                                                                                     topic=topic))
        return self.separator.join(parts)


@cache
def load_instruction_styles() -> dict[str, InstructionStyle]:
    raw = json.loads(_read_package_text("instruction_styles.json"))
    return {name: InstructionStyle(name=name, description=s["description"], header=s.get("header"),
                                   example=s["example"], query=s["query"], query_with_topic=s["query_with_topic"],
                                   separator=s["separator"], num_examples=tuple(s["num_examples"]),
                                   stop=tuple(s["stop"]), scaffold_patterns=tuple(s["scaffold_patterns"]))
            for name, s in raw.items()}


def instruction_prompt_data_fingerprint() -> str:
    """The styles the prompts are made from (the pool, which --examples may replace, is in the input's hash)."""
    return sha256_text(_read_package_text("instruction_styles.json"))


@dataclass(frozen=True)
class InstructionSpec:
    """What the instruction job's own flags ask for, read and checked."""
    count: int  # instructions to keep (one process: all; shard I of N: its share)
    max_attempts: int  # the cap on attempts (requests) over the whole run
    pool: tuple[Example, ...]
    types: tuple[str, ...]  # drawn evenly
    topics: tuple[str, ...] | None

    @classmethod
    def from_args(cls, args) -> InstructionSpec:
        """From the instruction CLI's flags, checked (DataError naming the flag)."""
        if args.count < 1:
            raise DataError("--count must be at least 1")
        if args.n != 1:
            raise DataError("--n must be 1 here: each attempt is one request; ask for more with --count")
        max_attempts = args.max_attempts if args.max_attempts is not None else DEFAULT_ATTEMPTS_PER_KEPT * args.count + 100
        if max_attempts < args.count:
            raise DataError(f"--max-attempts {max_attempts} is below --count {args.count}: each attempt keeps one "
                            "instruction at most")
        pool = read_pool(args.examples)
        known = sorted({ex.type for ex in pool})
        types = tuple(known) if args.types is None else tuple(dict.fromkeys(t.strip() for t in args.types.split(",")
                                                                              if t.strip()))
        unknown = [t for t in types if t not in known]
        if not types or unknown:
            raise DataError(f"--types {args.types!r}: {'no types' if not types else 'unknown ' + ', '.join(unknown)}; "
                            f"the pool's types are {', '.join(known)}")
        return cls(args.count, max_attempts, pool, types, read_topics(args.topics))

    def share(self, shard: tuple[int, int] | None) -> int:
        """How many instructions this process keeps: all, or shard I's even share of N."""
        if shard is None:
            return self.count
        index, n = shard
        return self.count // n + (index < self.count % n)

    def fingerprint(self) -> str:
        """What decides the attempts and prompts (not --count or --max-attempts: a larger one tops a run up)."""
        return sha256_text(json.dumps({"pool": [[e.id, e.type, e.prompt, e.completion] for e in self.pool],
                                       "types": self.types, "topics": self.topics}, ensure_ascii=False))


def read_pool(path: str | None) -> tuple[Example, ...]:
    """The built-in pool, or a JSONL file in its format: {"id", "type", "prompt"} per line ("completion" optional)."""
    if path is None:
        return load_examples()
    file = Path(path)
    if not file.is_file():
        raise DataError(f"--examples {path}: no such file; pass a JSONL file of {{\"id\", \"type\", \"prompt\"}} "
                        "objects, or leave it out to use the built-in pool")
    pool, seen = [], set()
    for n, line in enumerate(file.read_text(encoding="utf-8").split("\n"), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{n}: not valid JSON ({e.msg})") from None
        if not isinstance(obj, dict) or not all(isinstance(obj.get(k), str) and obj[k].strip()
                                                for k in ("id", "type", "prompt")):
            raise DataError(f'{path}:{n}: each line needs non-empty string "id", "type" and "prompt"')
        if obj["id"] in seen:
            raise DataError(f"{path}:{n}: duplicate example id {obj['id']!r}")
        seen.add(obj["id"])
        pool.append(Example(obj["id"], obj["type"], obj["prompt"].strip(), str(obj.get("completion", ""))))
    if not pool:
        raise DataError(f"--examples {path}: no examples in the file")
    return tuple(pool)


def read_topics(path: str | None) -> tuple[str, ...] | None:
    """--topics FILE: one topic per line (blank lines and repeats dropped)."""
    if path is None:
        return None
    file = Path(path)
    if not file.is_file():
        raise DataError(f"--topics {path}: no such file; pass a text file with one topic per line")
    topics = tuple(dict.fromkeys(t.strip() for t in file.read_text(encoding="utf-8").split("\n") if t.strip()))
    if not topics:
        raise DataError(f"--topics {path}: no topics in the file (one per line)")
    return topics


def attempt_id(seed: int, index: int) -> str:
    return f"gen-s{seed}-{index:08d}"


def _even_draws(choices: tuple[str, ...], seed: int, what: str, count: int) -> list[str]:
    """The choice of attempts 0 .. count - 1: each cycle of len(choices) attempts holds every choice once, in the
    order of derive_seed(seed, what, cycle, choice). One hash per choice and cycle (a cycle's order is sorted once,
    not once per attempt: with 1,000 topics that was 1,000 hashes an attempt)."""
    draws: list[str] = []
    for cycle in range(-(-count // len(choices))):
        draws += sorted(choices, key=lambda c: derive_seed(seed, what, cycle, c))
    return draws[:count]


def attempts(spec: InstructionSpec, seed: int) -> list[Instruction]:
    """Attempts 0 .. max_attempts - 1, in order: the job's input. `instruction` is empty: the model writes it."""
    types = _even_draws(spec.types, seed, "type", spec.max_attempts)
    topics = [None] * spec.max_attempts if spec.topics is None else _even_draws(spec.topics, seed, "topic",
                                                                                 spec.max_attempts)
    return [Instruction(attempt_id(seed, i), "", types[i], SOURCE, {"topic": topics[i]})
            for i in range(spec.max_attempts)]


class InstructionPrompts:
    """An attempt's prompt: the style's header, k pool examples (one of the attempt's type first, then other types:
    prompts.choose_examples, by the row seed), then the start of a new entry of the attempt's type (and topic)."""

    def __init__(self, style: str, spec: InstructionSpec):
        styles = load_instruction_styles()
        if style not in styles:
            raise ValueError(f"unknown instruction style {style!r}; known: {', '.join(sorted(styles))}")
        self.style = styles[style]
        self.pool = spec.pool
        self._pool_texts = {ex.id: ex.prompt for ex in self.pool}

    def prompt_for(self, attempt: Instruction, seed: int) -> Prompt:
        examples = choose_examples(self.pool, self.style.num_examples, seed, attempt.type)
        text = self.style.render(attempt.type, attempt.extra.get("topic"), examples)
        return Prompt(text, tuple(ex.id for ex in examples), self.style.name)

    def copy_sources(self, prompt: Prompt) -> dict[str, str]:
        """Every pool example's text, shown in this prompt or not (PoolCopy)."""
        return self._pool_texts


def instruction_row(attempt: Instruction, *, prompt: str, prompt_tokens: int, example_ids, style: str, seed: int,
                    sampling: dict[str, Any], completion=None, response: str | None = None) -> dict[str, Any]:
    """One row of the instruction job: the generated instruction (post-processed) and what made it. The fields the
    response job reads (`id`, `instruction`, `type`, `topic`) come first."""
    return {
        "id": attempt.id,
        "index": None if completion is None else completion.index,
        "instruction": response,
        "type": attempt.type,
        "topic": attempt.extra.get("topic"),
        "source": attempt.source,
        "prompt": prompt,
        **generation_fields("instruction", completion, prompt_tokens, example_ids, style, seed, sampling),
    }
