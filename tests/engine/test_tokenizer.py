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


class _WindowedOnly(Tokenizer):
    """The same tokenizer, but as if its decoder were not byte-level: the detokenizer's windowed path."""

    def token_bytes(self, skip_special_tokens: bool = False):
        return None


def _detokenize(tok, ids, skip_special_tokens, every=1, flush=True):
    """The text through new_text after every `every` tokens (the engine asks once per token where a stop string
    needs it, else once at the end), then flush."""
    detok, seen, text = IncrementalDetokenizer(tok, skip_special_tokens=skip_special_tokens), [], ""
    for i, t in enumerate(ids):
        seen.append(t)
        if (i + 1) % every == 0:
            text += detok.new_text(seen)
    return text + detok.flush(seen) if flush else text + detok.new_text(seen)


def test_byte_level_fast_path_gives_the_tokenizers_text(tiny_model_dir):
    """Token by token through the byte table (no tokenizer call per token) and through the windowed decode, the
    text equals one decode of all the ids: random ids, many of them pieces of multi-byte characters (broken and
    completed), special tokens kept or skipped."""
    import random

    tok, windowed = Tokenizer(tiny_model_dir), _WindowedOnly(tiny_model_dir)
    table = tok.token_bytes()
    assert table is not None and len(table) == tok.vocab_size
    assert tok.token_bytes(skip_special_tokens=True)[tok.token_to_id("<|endoftext|>")] == b""
    multibyte = [i for i, b in enumerate(table) if any(c >= 0x80 for c in b)]
    assert multibyte
    rng = random.Random(0)
    for _ in range(400):
        # ids past the tokenizer's vocabulary too: a model may have more rows than its tokenizer has tokens
        ids = [rng.choice(multibyte) if rng.random() < 0.6 else rng.randrange(tok.vocab_size + 20)
               for _ in range(rng.randint(1, 16))]
        for skip in (False, True):
            expected = tok.decode(ids, skip_special_tokens=skip)
            for every in (1, 3, len(ids) + 1):
                assert _detokenize(tok, ids, skip, every) == expected, ids
                assert _detokenize(windowed, ids, skip, every) == expected, ids
            # what an EOS leaves (no flush: a character still incomplete is dropped) does not depend on how often
            # the text was asked for either (the byte path may have replaced invalid bytes that the windowed one
            # still holds back: the two agree once flushed)
            for t in (tok, windowed):
                held_back = _detokenize(t, ids, skip, 1, flush=False)
                assert _detokenize(t, ids, skip, len(ids) + 1, flush=False) == held_back, ids
                assert expected.startswith(held_back.rstrip("\ufffd")), ids
