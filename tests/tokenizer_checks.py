"""What the tokenizer tests share (the tiny GGUF's in tests/models/test_gguf_tokenizer.py, the real model's in
tests/real_model/test_real_model_tokenizer.py): texts that stress a byte-level BPE, strings of Qwen's control
tokens, and the checks run on them.
"""

from __future__ import annotations

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
