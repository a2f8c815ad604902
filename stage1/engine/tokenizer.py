"""The raw tokenizer: `tokenizer.json` through the `tokenizers` library, and nothing else.

No chat template, no added BOS/EOS, and special-token strings inside text are encoded as plain text, never as
control tokens: a base-model prompt is exactly the characters the user wrote.
"""

from __future__ import annotations

import codecs
import functools
from pathlib import Path

from tokenizers import Tokenizer as _HFTokenizer
from tokenizers import decoders


class Tokenizer:
    def __init__(self, path: str | Path):
        path = Path(path)
        file = path / "tokenizer.json" if path.is_dir() else path
        if not file.is_file():
            raise FileNotFoundError(
                f"no tokenizer.json at {file}: the model directory needs the tokenizer.json of its checkpoint "
                "(or pass prompts as {'prompt_token_ids': [...]} with skip_tokenizer_init=True)"
            )
        self._tok = _HFTokenizer.from_file(str(file))
        self._tok.no_padding()
        self._tok.no_truncation()
        # `tokenizers` matches added tokens such as <|endoftext|> inside ordinary text by default: turn that off.
        self._tok.encode_special_tokens = True
        self._token_bytes_cache: dict[bool, list[bytes] | None] = {}

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self._tok.id_to_token(token_id)

    def token_bytes(self, skip_special_tokens: bool = False) -> list[bytes] | None:
        """The bytes each token id contributes to a decoded text, when decoding is just concatenating them and
        reading the result as UTF-8 (a byte-level BPE decoder, as Qwen's): then text can be decoded a token at a
        time without calling the tokenizer. None for other decoders."""
        if skip_special_tokens not in self._token_bytes_cache:
            self._token_bytes_cache[skip_special_tokens] = self._build_token_bytes(skip_special_tokens)
        return self._token_bytes_cache[skip_special_tokens]

    def _build_token_bytes(self, skip_special_tokens: bool) -> list[bytes] | None:
        if not isinstance(self._tok.decoder, decoders.ByteLevel):
            return None
        byte_of = _byte_level_alphabet()
        added = self._tok.get_added_tokens_decoder()
        table = []
        for token_id in range(self.vocab_size):
            token = self._tok.id_to_token(token_id)
            if token_id in added:  # added tokens are emitted as their text, special ones dropped on request
                skip = skip_special_tokens and added[token_id].special
                table.append(b"" if skip else added[token_id].content.encode())
            elif token is None:
                table.append(b"")
            else:
                table.append(bytes(byte_of[c] for c in token) if all(c in byte_of for c in token) else token.encode())
        # the added tokens' handling is the tokenizers library's: check it rather than trust it
        if any(table[i].decode("utf-8", "replace") != self.decode([i], skip_special_tokens) for i in added):
            return None
        return table


class IncrementalDetokenizer:
    """Turns a sequence's growing token ids into text without ever emitting half a UTF-8 character.

    Byte-level BPE splits multi-byte characters across tokens; decoding such a prefix yields U+FFFD. With a
    byte-level tokenizer each token's bytes go through an incremental UTF-8 decode, which holds back an incomplete
    character until its bytes arrive (no tokenizer call per token). Otherwise we decode a short window of recent
    tokens per token (vLLM's prefix/read offsets) and hold the text back while it ends in U+FFFD. Either way the
    text is the tokenizer's decode of all the tokens, and the same whether `new_text` is called after every token
    or once after many. Only offsets live here: the tokens and the text are the sequence's, passed in and appended
    to by the caller.
    """

    def __init__(self, tokenizer: Tokenizer, start: int = 0, skip_special_tokens: bool = False):
        """`start`: where the text to decode begins in the token list (a sequence's first output token)."""
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self._seen = start  # tokens handled so far
        self._bytes = tokenizer.token_bytes(skip_special_tokens)
        self._held = b""  # byte path: the start of a character whose other bytes have not come yet
        self._prefix_offset = start  # windowed path: start of the window whose decoded text is already out
        self._read_offset = start  # windowed path: end of that window

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def new_text(self, token_ids: list[int]) -> str:
        """After tokens were appended to `token_ids`: the newly completed text (possibly empty)."""
        new, self._seen = token_ids[self._seen:], len(token_ids)
        if self._bytes is None:
            return "".join(self._window_text(token_ids, end) for end in range(len(token_ids) - len(new) + 1,
                                                                                len(token_ids) + 1))
        table = self._bytes
        try:
            data = table[new[0]] if len(new) == 1 else b"".join(table[t] for t in new)
        except IndexError:  # an id past the tokenizer's vocabulary (a model may have more rows) decodes to ""
            data = b"".join(table[t] if t < len(table) else b"" for t in new)
        text, used = codecs.utf_8_decode(self._held + data if self._held else data, "replace", False)
        self._held = (self._held + data)[used:] if self._held else data[used:]
        return text

    def _window_text(self, token_ids: list[int], end: int) -> str:
        """The windowed decode's new text once token_ids[:end] are in."""
        prefix_text = self._decode(token_ids[self._prefix_offset:self._read_offset])
        full_text = self._decode(token_ids[self._prefix_offset:end])
        if len(full_text) > len(prefix_text) and not full_text.endswith("\ufffd"):
            self._prefix_offset, self._read_offset = self._read_offset, end
            return full_text[len(prefix_text):]
        return ""

    def flush(self, token_ids: list[int]) -> str:
        """At the end of generation: whatever is still held back (an incomplete character stays U+FFFD)."""
        text = self.new_text(token_ids)
        if self._bytes is not None:
            held, self._held = self._held, b""
            return text + held.decode("utf-8", "replace")
        full_text = self._decode(token_ids[self._prefix_offset:])
        prefix_text = self._decode(token_ids[self._prefix_offset:self._read_offset])
        self._prefix_offset = self._read_offset = len(token_ids)
        return text + full_text[len(prefix_text):]


@functools.cache
def _byte_level_alphabet() -> dict[str, int]:
    """Byte-level BPE's printable stand-in for each byte (GPT-2's bytes_to_unicode), inverted: char -> byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {**{chr(b): b for b in printable}, **{chr(256 + i): b for i, b in enumerate(others)}}
