"""The raw tokenizer wrapper and the incremental detokenizer."""

from __future__ import annotations

from stage1.engine.tokenizer import IncrementalDetokenizer, Tokenizer

TEXTS = ["Über café naïve 日本語 中文 😀 ✓ done", "plain ascii text", "😀😀 emoji, 中文", "tabs\tand  spaces\r\n"]


def test_special_token_text_is_plain_text(tiny_model_dir):
    tok = Tokenizer(tiny_model_dir)
    control = {tok.token_to_id(t) for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>")}
    text = "say <|im_start|>user hi<|im_end|> then <|endoftext|>"
    ids = tok.encode(text)
    assert control.isdisjoint(ids)
    assert tok.decode(ids) == text


def test_no_special_tokens_added(tiny_model_dir):
    tok = Tokenizer(tiny_model_dir)
    assert tok.decode(tok.encode("hello")) == "hello"
    assert tok.encode("") == []


def test_incremental_detokenizer_never_emits_broken_characters(tiny_model_dir):
    tok = Tokenizer(tiny_model_dir)
    for text in TEXTS:
        ids = tok.encode(text)
        detok, seen = IncrementalDetokenizer(tok), []
        pieces = [detok.new_text(seen) for t in ids if not seen.append(t)]
        assert all("\ufffd" not in p for p in pieces), pieces
        assert "".join(pieces) + detok.flush(seen) == text
        # at least one multi-byte character spans several tokens, so something was held back
    emoji_ids = tok.encode("😀")
    assert len(emoji_ids) > 1, "the test tokenizer should split the emoji into byte tokens"
    detok, seen = IncrementalDetokenizer(tok, start=2), [7, 8]  # after two prompt tokens
    assert [detok.new_text(seen) for t in emoji_ids if not seen.append(t)] == [""] * (len(emoji_ids) - 1) + ["😀"]
