"""The tokenizer.json rebuilt from a GGUF: same ids as transformers' tokenizer loaded straight from the GGUF,
lossless decode(encode(text)), and control-token strings in text encoded as plain text by the engine's wrapper.

Fast tests use the tiny GGUF; the same checks on the real Qwen2.5-Coder GGUF are marked real_model.
"""

from __future__ import annotations

import json

import pytest
from tiny_ggufs import CONTROL_TOKENS, USER_DEFINED_TOKENS, tiny_tokenizer_vocab

from stage1.engine.tokenizer import Tokenizer

CORPUS = [
    # empty and whitespace-only
    "", " ", "  ", "   ", "\t", "\t\t", "\n", "\n\n", "\r\n", "\r\n\r\n", " \n ", "\t \n\t", "\u00a0", "\u3000",
    # English prose, contractions, punctuation
    "The quick brown fox jumps over the lazy dog.",
    "It's what we'd do; THEY'RE here, we've seen it and you'll LOVE it... won't you?!",
    "Hello,   world!!!  --- (really?) [yes] {no} <maybe> \"quoted\" 'single' `back`",
    # code: tabs, runs of spaces, newlines, CRLF, trailing spaces
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n",
    "for (int i = 0; i < 100; i++) {\n\tsum += values[i];\t// tab-indented\n}\r\n",
    "if x:\n\t\tpass    \n\n\n        # eight spaces\n                y = {'a': [1, 2, 3]}   ",
    "SELECT  *\r\nFROM\tusers\r\nWHERE id=42;\r\n",
    '{"key": "value", "list": [1, 2.5, -3e10], "nested": {"a": null}}',
    "https://example.com/path?query=1&b=2#frag  user@example.org  C:\\Windows\\System32",
    # numbers
    "3.14159 2,718,281 1000000 -42 0x1F 1e-6 ١٢٣ ½ ² 2024-01-01T12:34:56Z",
    "1234567890123456789012345678901234567890",
    # CJK, other scripts
    "日本語のテキストと中文文本，还有한국어 텍스트。",
    "Привет, мир! Γειά σου Κόσμε! مرحبا بالعالم שלום עולם नमस्ते दुनिया สวัสดีชาวโลก",
    # emoji: plain, skin tone, ZWJ family, flags, keycap, variation selector
    "😀🎉 👍🏽 👨‍👩‍👧‍👦 🇯🇵🇺🇸 1️⃣ ❤️ ☺︎",
    # combining marks, decomposed vs precomposed, zero-width characters
    "e\u0301 vs \u00e9; n\u0303 vs \u00f1; a\u0308\u0304; Z\u0351\u0356\u0310a\u0362lgo",
    "\u1100\u1161\u11a8 (Hangul jamo) \u0915\u094d\u0937 (Devanagari conjunct)",
    "zero\u200bwidth\u200cjoiner\u200d\ufeffBOM and soft\u00adhyphen",
    # mixed long run of one character
    "a" * 300 + " " * 50 + "!" * 40,
    "Ünïcödé ßtraße café naïve résumé coöperate",
]
SPECIAL_TEXTS = [
    "<|endoftext|>",
    "<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n",
    "text before <|endoftext|>text after<|im_end|>",
    "<|im_start|><|im_start|><|endoftext|><|endoftext|>",
    "  <|im_end|>  \n",
    "<|endoftext",  # partial
]


def check_against_transformers(ours: Tokenizer, theirs, texts):
    for text in texts:
        expected = theirs.encode(text, add_special_tokens=False)
        assert ours.encode(text) == expected, repr(text)


def check_lossless(ours: Tokenizer, texts):
    for text in texts:
        assert ours.decode(ours.encode(text)) == text, repr(text)


def check_no_control_tokens(ours: Tokenizer, control_ids: set[int]):
    for text in SPECIAL_TEXTS:
        ids = ours.encode(text)
        assert not control_ids & set(ids), (text, ids)
        assert ours.decode(ids) == text
    for i in control_ids:  # the ids themselves still decode to their text (as when the model emits them)
        assert ours.decode([i]) == ours.id_to_token(i)


def test_corpus_is_not_trivially_split(tiny_imported):
    ours = Tokenizer(tiny_imported)
    # BPE merges are applied (fewer ids than bytes), so equality tests below compare real merge results
    text = "def fibonacci(n):\n    if n < 2:\n        return n\n"
    assert len(ours.encode(text)) < len(text.encode("utf-8")) / 2


# -- tiny GGUF ---------------------------------------------------------------------------------------------------

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


# -- the real model ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def real_transformers_tokenizer(real_gguf_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(real_gguf_path.parent, gguf_file=real_gguf_path.name)


@pytest.mark.real_model
def test_real_same_ids_as_transformers(real_model_dir, real_transformers_tokenizer):
    ours = Tokenizer(real_model_dir)
    check_against_transformers(ours, real_transformers_tokenizer, CORPUS)
    assert ours.encode("hello world") == [14990, 1879]  # Qwen2.5's ids


@pytest.mark.real_model
def test_real_lossless(real_model_dir):
    check_lossless(Tokenizer(real_model_dir), CORPUS + SPECIAL_TEXTS)


@pytest.mark.real_model
def test_real_no_control_token_injection(real_model_dir, real_transformers_tokenizer):
    ours = Tokenizer(real_model_dir)
    assert [ours.token_to_id(t) for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>")] == [151643, 151644, 151645]
    check_no_control_tokens(ours, {151643, 151644, 151645})
    for text in SPECIAL_TEXTS:
        assert ours.encode(text) == real_transformers_tokenizer.encode(text, add_special_tokens=False,
                                                                      split_special_tokens=True)
    assert ours.vocab_size == 151936
