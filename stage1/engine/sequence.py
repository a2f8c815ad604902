"""One sequence being generated: its tokens, its blocks, and how far its KV cache has been computed."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from .outputs import Logprob
from .params import SamplingParams
from .tokenizer import IncrementalDetokenizer


# A token sampled on the device whose value the host has not read yet (async scheduling, engine_core.py): it holds
# its place at the end of `token_ids`, so every length below counts it, and the next step reads it on the device.
PENDING = -1


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    seq_id: int
    request_id: str
    sample_index: int  # which of the request's n samples
    token_ids: list[int]  # prompt, then generated tokens
    num_prompt_tokens: int
    params: SamplingParams
    seed: int = 0  # the request's seed (mixed with the sample index), or a random one when it set none
    detokenizer: IncrementalDetokenizer | None = None
    status: Status = Status.WAITING
    block_table: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0  # tokens whose K/V are in the cache; 0 again after a preemption
    num_cached_tokens: int = 0  # of its prompt (or recomputed) tokens, those taken from the prefix cache on admission
    prefix_ids: list[int] = field(default_factory=list)  # one per full block registered for prefix caching
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    text: str = ""
    logprobs: list[dict[int, Logprob]] | None = None
    cumulative_logprob: float = 0.0
    num_pending: int = 0  # PENDING tokens at the end of token_ids

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def num_uncomputed_tokens(self) -> int:
        return len(self.token_ids) - self.num_computed_tokens

    @property
    def is_prefilling(self) -> bool:
        """More than one token still to compute: the prompt (or a preempted sequence's recompute) is not done."""
        return self.num_uncomputed_tokens > 1 or self.num_computed_tokens == 0
