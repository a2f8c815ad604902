"""What `LLM.generate` returns: one `RequestOutput` per prompt, each with `n` `CompletionOutput`s."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Logprob:
    logprob: float
    rank: int  # 1 = the most likely token
    decoded_token: str | None = None


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None  # "stop" | "length"
    stop_reason: str | int | None = None  # matched stop string or stop token id; None for EOS
    # One dict per generated token: token id -> Logprob (the chosen token plus the top-k asked for).
    logprobs: list[dict[int, Logprob]] | None = None
    cumulative_logprob: float | None = None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None  # the exact text the engine tokenized (None when ids were given)
    prompt_token_ids: list[int]  # the ids actually fed to the model
    outputs: list[CompletionOutput] = field(default_factory=list)
    finished: bool = True
    # prompt tokens taken from the prefix cache instead of computed, over its n sequences (as vLLM's; a preempted
    # sequence's recompute counts again): what StepStats.prefix_cached_tokens sums over all requests
    num_cached_tokens: int = 0
