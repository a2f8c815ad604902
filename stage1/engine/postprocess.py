"""After a step: each sampled token joins its sequence, with its text and logprobs, and the stop rules decide
whether the sequence is done (EOS, stop token ids, stop strings, `min_tokens`, `max_tokens`, the context limit).

A sequence's tokens and text live on the `Sequence` only; the detokenizer keeps its window offsets.
"""

from __future__ import annotations

from .engine_config import EngineConfig
from .outputs import Logprob
from .sequence import Sequence
from .tokenizer import Tokenizer


class Postprocessor:
    def __init__(self, config: EngineConfig, tokenizer: Tokenizer | None):
        self.config = config
        self.tokenizer = tokenizer
        self._token_texts: dict[int, str] = {}  # each token's text, decoded once: logprobs name every generated token

    def append(self, seq: Sequence, token: int, logprobs: tuple[float, int, list[int], list[float]] | None) -> None:
        """Appends `token` (and, if the request asked, its logprobs: chosen, rank, top ids, top values) to `seq`;
        sets `seq.finish_reason` when a stop rule fires."""
        seq.token_ids.append(token)
        if seq.logprobs is not None:
            self._append_logprobs(seq, token, logprobs)
        sp = seq.params
        num_output_tokens = len(seq.token_ids) - seq.num_prompt_tokens
        may_stop = num_output_tokens >= sp.min_tokens
        if may_stop and not sp.ignore_eos and token in self.config.eos_token_ids:
            return _finish_with_text(seq, "stop", None, last_token_is_text=False)
        if may_stop and token in sp.stop_token_ids:
            return _finish_with_text(seq, "stop", token, last_token_is_text=False)
        # Only stop strings need the text at every step; without them it is decoded once, when the sequence ends
        # (the same text: the detokenizer does not depend on how often it is asked).
        if sp.stop_strings and seq.detokenizer is not None:
            before = len(seq.text)
            seq.text += seq.detokenizer.new_text(seq.token_ids)
            if may_stop and _cut_at_stop_string(seq, before):
                return
        if (sp.max_tokens is not None and num_output_tokens >= sp.max_tokens) or \
                len(seq.token_ids) >= self.config.max_model_len:
            return _finish_with_text(seq, "length", None, last_token_is_text=True)

    def _append_logprobs(self, seq: Sequence, token: int, logprobs) -> None:
        chosen, rank, top_ids, top_values = logprobs
        entry = {token: Logprob(chosen, rank, self._decode_one(token))}
        for position, (tid, value) in enumerate(list(zip(top_ids, top_values))[:seq.params.logprobs]):
            entry.setdefault(tid, Logprob(value, position + 1, self._decode_one(tid)))
        seq.logprobs.append(entry)
        seq.cumulative_logprob += chosen

    def _decode_one(self, token: int) -> str | None:
        if self.tokenizer is None:
            return None
        text = self._token_texts.get(token)
        if text is None:
            text = self._token_texts[token] = self.tokenizer.decode([token])
        return text


def _cut_at_stop_string(seq: Sequence, before: int) -> bool:
    """Finds the earliest stop string that ends in the new text (it may have started in earlier tokens)."""
    longest = max(len(s) for s in seq.params.stop_strings)
    search_from = max(0, before - longest + 1)
    hits = [(seq.text.find(s, search_from), s) for s in seq.params.stop_strings]
    hits = [(at, s) for at, s in hits if at != -1]
    if not hits:
        return False
    at, stop = min(hits)
    seq.text = seq.text[:at + len(stop)] if seq.params.include_stop_str_in_output else seq.text[:at]
    _finish(seq, "stop", stop)
    return True


def _finish_with_text(seq: Sequence, reason: str, stop_reason: str | int | None, last_token_is_text: bool) -> None:
    """Ends the sequence with the text of the tokens not decoded yet: an EOS or stop token adds no text (and a
    character it cut short stays out), a length limit flushes what is held back."""
    if seq.detokenizer is not None:
        if last_token_is_text:
            seq.text += seq.detokenizer.flush(seq.token_ids)
        else:
            seq.text += seq.detokenizer.new_text(seq.token_ids[:-1])
    _finish(seq, reason, stop_reason)


def _finish(seq: Sequence, reason: str, stop_reason: str | int | None) -> None:
    seq.finish_reason, seq.stop_reason = reason, stop_reason
