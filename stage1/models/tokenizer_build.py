"""A `tokenizer.json` rebuilt from the vocabulary and merges a GGUF stores as metadata.

Qwen2 uses GPT-2 style byte-level BPE: text is split by a regex, each piece's UTF-8 bytes are spelled with the
GPT-2 byte alphabet, then merged. We build the same pipeline transformers builds for a qwen2 GGUF
(transformers/integrations/gguf/gguf_tokenizer_mapping.py), so both give the same ids.

Deliberately no NFC normalizer, although Qwen's own tokenizer.json has one: llama.cpp does not normalize, and
without it decode(encode(text)) == text for every string (a decomposed "e" + U+0301 stays two code points).
"""

from __future__ import annotations

from collections.abc import Sequence

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

from .errors import GGUFImportError

# Qwen2's pre-tokenizer split, as in its tokenizer.json: contractions, letter runs with one leading non-letter,
# single digits, punctuation runs, newline runs, and whitespace (a trailing space stays with the next word).
QWEN2_SPLIT_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# `tokenizer.ggml.pre` values whose merges were learned with that split (llama.cpp names).
QWEN2_PRE_TOKENIZERS = ("qwen2", "deepseek-r1-qwen")

# llama.cpp's token types (gguf.TokenType)
NORMAL, CONTROL, USER_DEFINED, UNUSED = 1, 3, 4, 5


def _byte_alphabet() -> dict[int, str]:
    """GPT-2's byte -> printable character table (printable bytes map to themselves, the rest to U+0100...)."""
    keep = {*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)}
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def build_tokenizer(tokens: Sequence[str], token_types: Sequence[int], merges: Sequence[str], pre: str,
                    source: str = "GGUF") -> Tokenizer:
    if pre not in QWEN2_PRE_TOKENIZERS:
        raise GGUFImportError(
            f"{source}: tokenizer.ggml.pre is {pre!r}; only the Qwen2 pre-tokenizer "
            f"({', '.join(QWEN2_PRE_TOKENIZERS)}) is supported, so this is probably not a Qwen2/Qwen2.5 checkpoint. "
            "Convert the original Hugging Face checkpoint instead, or use a Qwen2.5 GGUF.")
    if len(token_types) != len(tokens):
        raise GGUFImportError(f"{source}: {len(tokens)} tokens but {len(token_types)} token types; the tokenizer "
                              "metadata is corrupt. Re-download or re-convert the GGUF.")

    alphabet = _byte_alphabet()
    spelled = set(alphabet.values())
    vocab: dict[str, int] = {}
    for index, token in enumerate(tokens):
        # Tokens are stored already in the byte alphabet; re-spell any that are not (as transformers does).
        if not set(token) <= spelled:
            token = "".join(alphabet[b] for b in token.encode("utf-8"))
        vocab.setdefault(token, index)
    if len(vocab) != len(tokens):
        raise GGUFImportError(f"{source}: the vocabulary has {len(tokens) - len(vocab)} duplicate token(s); "
                              "the tokenizer metadata is corrupt. Re-download or re-convert the GGUF.")

    pairs = []
    for merge in merges:
        parts = merge.split(" ")
        if len(parts) != 2:
            raise GGUFImportError(f"{source}: merge {merge!r} is not two tokens separated by one space; the "
                                  "tokenizer metadata is corrupt. Re-download or re-convert the GGUF.")
        pairs.append((parts[0], parts[1]))

    tok = Tokenizer(models.BPE(vocab=vocab, merges=pairs, dropout=None, unk_token=None, continuing_subword_prefix="",
                               end_of_word_suffix="", fuse_unk=False, byte_fallback=False, ignore_merges=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)

    # Control tokens (<|endoftext|>, <|im_start|>, ...) are special; user-defined ones (<tool_call>) are added but
    # not special, as in Qwen's tokenizer.json. Both keep their ids: they are already in the vocabulary. A control
    # token spelled outside the byte alphabet is a llama.cpp mislabel, skipped like transformers does.
    special = [AddedToken(t, special=True, normalized=False) for t, k in zip(tokens, token_types, strict=True)
               if k == CONTROL and set(t) <= spelled]
    added = [AddedToken(t, special=False, normalized=False) for t, k in zip(tokens, token_types, strict=True)
             if k == USER_DEFINED and t in vocab]
    tok.add_special_tokens(special)
    tok.add_tokens(added)
    if tok.get_vocab_size(with_added_tokens=True) != len(tokens):
        raise GGUFImportError(f"{source}: building the tokenizer changed the vocabulary size ({len(tokens)} -> "
                              f"{tok.get_vocab_size(with_added_tokens=True)}); please report this file.")
    return tok
