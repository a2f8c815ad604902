"""Why `python -m stage1.export --to trl` ends the prompt with the newline (stage1/data/export.py), on the default
model's tokenizer (marker real_model): TRL trains on the ids of prompt + completion past those of the prompt alone,
which is right only where the prompt's ids start the pair's. Over the example pool's 60 instruction/response pairs
they always do with the newline in the prompt; with it at the completion's start they do not for most (56 of 60),
each ending in punctuation ("?\\n", ".\\n", ":\\n" are single tokens in Qwen's vocabulary)."""

from __future__ import annotations

import pytest
from tokenizers import Tokenizer

from stage1.data.export import trl_row
from stage1.data.prompts import load_examples

pytestmark = pytest.mark.real_model


def starts_pair(tok: Tokenizer, prompt: str, completion: str) -> bool:
    ids = tok.encode(prompt, add_special_tokens=False).ids
    return tok.encode(prompt + completion, add_special_tokens=False).ids[:len(ids)] == ids


def test_the_trl_prompt_is_a_token_boundary(real_model_dir):
    tok = Tokenizer.from_file(str(real_model_dir / "tokenizer.json"))
    pairs = [trl_row({"instruction": ex.prompt, "response": ex.completion}) for ex in load_examples()]
    assert len(pairs) == 60 and all(starts_pair(tok, p["prompt"], p["completion"]) for p in pairs)
    moved = [(p["prompt"][:-1], "\n" + p["completion"]) for p in pairs]  # the newline opening the completion
    broken = [prompt for prompt, completion in moved if not starts_pair(tok, prompt, completion)]
    assert len(broken) > len(pairs) / 2 and all(not prompt[-1].isalnum() for prompt in broken), broken
