"""The dataset row: one per completion, in data.jsonl (kept) or rejects.jsonl (with `reason`).

Its `prompt` is `RequestOutput.prompt`, the exact string the engine tokenized, never a re-rendered one.
"""

from __future__ import annotations

import math
from typing import Any

# Fields the pipeline writes; an input row may carry any other field through.
ROW_FIELDS = (
    "id", "index", "instruction", "type", "source", "prompt", "response", "raw_response", "finish_reason",
    "stop_reason", "prompt_tokens", "response_tokens", "mean_logprob", "min_logprob", "example_ids", "style", "seed",
    "sampling", "reason", "detail",
)


def make_row(instruction, *, prompt: str, prompt_tokens: int, example_ids, style: str, seed: int,
             sampling: dict[str, Any], completion=None, response: str | None = None) -> dict[str, Any]:
    """`completion` is the engine's CompletionOutput, or None for a prompt that was never generated from."""
    return {
        "id": instruction.id,
        "index": None if completion is None else completion.index,
        "instruction": instruction.instruction,
        "type": instruction.type,
        "source": instruction.source,
        **instruction.extra,
        "prompt": prompt,
        "response": response,
        **generation_fields("response", completion, prompt_tokens, example_ids, style, seed, sampling),
    }


def generation_fields(generated: str, completion, prompt_tokens: int, example_ids, style: str, seed: int,
                      sampling: dict[str, Any]) -> dict[str, Any]:
    """What every job's row records of how its text was made, in this order: the engine's raw `generated` text
    (`raw_<generated>`), why it ended, the token counts, the quality signals (`logprob_signals`), the few-shot
    examples, the style, seed and sampling. `completion` is the engine's CompletionOutput, or None for a prompt that
    was never generated from."""
    mean_logprob, min_logprob = logprob_signals(completion)
    return {
        f"raw_{generated}": None if completion is None else completion.text,
        "finish_reason": None if completion is None else completion.finish_reason,
        "stop_reason": None if completion is None else completion.stop_reason,
        "prompt_tokens": prompt_tokens,
        f"{generated}_tokens": None if completion is None else len(completion.token_ids),
        "mean_logprob": mean_logprob,
        "min_logprob": min_logprob,
        "example_ids": list(example_ids),
        "style": style,
        "seed": seed,
        "sampling": sampling,
    }


def generated_field(row: dict[str, Any]) -> str | None:
    """The name of the field holding a row's generated text ("response", "instruction"), read off the
    `raw_<generated>` and `<generated>_tokens` pair generation_fields writes; None for a row without one."""
    return next((k[4:] for k in row if k.startswith("raw_") and f"{k[4:]}_tokens" in row), None)


def logprob_signals(completion) -> tuple[float | None, float | None]:
    """(mean, min) of the logprobs of the completion's generated tokens (every one, the stop token included) under
    the model's raw distribution, before temperature and top-p (the engine reports them for SamplingParams(logprobs=0):
    one {token_id: Logprob} per token). None where there is no completion, no token, or no logprobs. fsum is exactly
    rounded, so the mean depends on the values only, not on how they are summed."""
    if completion is None or not completion.logprobs:
        return None, None
    chosen = [entry[token].logprob for token, entry in zip(completion.token_ids, completion.logprobs)]
    return math.fsum(chosen) / len(chosen), min(chosen)


def with_reason(row: dict[str, Any], reason: str, detail: str | None = None) -> dict[str, Any]:
    return {**row, "reason": reason, "detail": detail}


def row_key(row: dict[str, Any]) -> tuple[str, int | None]:
    """(id, completion index); index None is a whole instruction rejected before generation."""
    return row["id"], row["index"]
