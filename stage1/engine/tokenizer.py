"""The raw tokenizer: `tokenizer.json` through the `tokenizers` library, and nothing else.

No chat template, no added BOS/EOS, and special-token strings inside text are encoded as plain text, never as
control tokens: a base-model prompt is exactly the characters the user wrote.
"""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer as _HFTokenizer


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


class IncrementalDetokenizer:
    """Turns a sequence's growing token ids into text without ever emitting half a UTF-8 character.

    Byte-level BPE splits multi-byte characters across tokens; decoding such a prefix yields U+FFFD. We hold the
    text back until the bytes complete, decoding only a short window of recent tokens each step (vLLM's
    prefix/read offsets) so the cost per token stays constant. It keeps only those offsets: the tokens and the
    text are the sequence's, passed in and appended to by the caller.
    """

    def __init__(self, tokenizer: Tokenizer, start: int = 0, skip_special_tokens: bool = False):
        """`start`: where the text to decode begins in the token list (a sequence's first output token)."""
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self._prefix_offset = start  # start of the window whose decoded text is already out
        self._read_offset = start  # end of that window

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def new_text(self, token_ids: list[int]) -> str:
        """After a token was appended to `token_ids`: the newly completed text (possibly empty)."""
        prefix_text = self._decode(token_ids[self._prefix_offset:self._read_offset])
        full_text = self._decode(token_ids[self._prefix_offset:])
        if len(full_text) > len(prefix_text) and not full_text.endswith("\ufffd"):
            self._prefix_offset, self._read_offset = self._read_offset, len(token_ids)
            return full_text[len(prefix_text):]
        return ""

    def flush(self, token_ids: list[int]) -> str:
        """At the end of generation: whatever is still held back (an incomplete character stays U+FFFD)."""
        full_text = self._decode(token_ids[self._prefix_offset:])
        prefix_text = self._decode(token_ids[self._prefix_offset:self._read_offset])
        self._prefix_offset = self._read_offset = len(token_ids)
        return full_text[len(prefix_text):]
