"""The tokenizer.json rebuilt from a GGUF: same ids as transformers' tokenizer loaded straight from the GGUF,
lossless decode(encode(text)), and control-token strings in text encoded as plain text by the engine's wrapper.

These use the tiny GGUF; the same checks on the real Qwen2.5-Coder GGUF are
tests/real_model/test_real_model_tokenizer.py (the texts and checks: tests/tokenizer_checks.py).
"""

from __future__ import annotations

import json

import pytest
from tiny_ggufs import CONTROL_TOKENS, USER_DEFINED_TOKENS, tiny_tokenizer_vocab
from tokenizer_checks import CORPUS, SPECIAL_TEXTS, check_against_transformers, check_lossless, check_no_control_tokens

from stage1.engine.tokenizer import Tokenizer


def test_corpus_is_not_trivially_split(tiny_imported):
    ours = Tokenizer(tiny_imported)
    # BPE merges are applied (fewer ids than bytes), so equality tests below compare real merge results
    text = "def fibonacci(n):\n    if n < 2:\n        return n\n"
    assert len(ours.encode(text)) < len(text.encode("utf-8")) / 2


@pytest.fixture(scope="module")
def tiny_transformers_tokenizer(tiny_gguf):
    from transformers import AutoTokenizer

    path, _ = tiny_gguf
    return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


def test_tiny_same_ids_as_transformers(tiny_imported, tiny_transformers_tokenizer):
    check_against_transformers(Tokenizer(tiny_imported), tiny_transformers_tokenizer, CORPUS)


def test_tiny_lossless(tiny_imported):
    check_lossless(Tokenizer(tiny_imported), CORPUS + SPECIAL_TEXTS)


def test_tiny_no_control_token_injection(tiny_imported, tiny_transformers_tokenizer):
    ours = Tokenizer(tiny_imported)
    tokens, _, _ = tiny_tokenizer_vocab()
    control = {tokens.index(t) for t in CONTROL_TOKENS}
    check_no_control_tokens(ours, control)
    # and it is exactly transformers' text-only encoding of those strings
    for text in SPECIAL_TEXTS:
        assert ours.encode(text) == tiny_transformers_tokenizer.encode(text, add_special_tokens=False,
                                                                      split_special_tokens=True)


def test_tiny_added_tokens_are_marked(tiny_imported):
    """Control tokens are special added tokens, user-defined ones added but not special, [PADn] fillers neither;
    all keep their GGUF ids, so the vocabulary size equals the GGUF's."""
    tokens, _, _ = tiny_tokenizer_vocab()
    data = json.loads((tiny_imported / "tokenizer.json").read_text())
    added = {t["content"]: t for t in data["added_tokens"]}
    assert set(added) == set(CONTROL_TOKENS + USER_DEFINED_TOKENS)
    for text, token in added.items():
        assert token["id"] == tokens.index(text)
        assert token["special"] is (text in CONTROL_TOKENS)
        assert token["normalized"] is False
    assert data["normalizer"] is None
    assert data["decoder"]["type"] == "ByteLevel"
    assert Tokenizer(tiny_imported).vocab_size == len(tokens)
