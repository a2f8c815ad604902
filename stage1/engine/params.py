"""`SamplingParams`: what one request asks of the sampler and of the stop logic.

Shaped like vLLM's so its users need no docs, with one deliberate difference: `max_tokens` has no silent
default of 16. It must be given (or set to None to mean "until the context is full").
"""

from __future__ import annotations

from dataclasses import dataclass, field

_UNSET = object()


@dataclass
class SamplingParams:
    max_tokens: int | None = _UNSET  # type: ignore[assignment]
    temperature: float = 1.0
    top_k: int = 0  # 0 or -1: off
    top_p: float = 1.0
    min_p: float = 0.0
    seed: int | None = None
    stop: list[str] | str | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    n: int = 1
    logprobs: int | None = None  # None: none; k >= 0: the chosen token's logprob plus the top k
    # Stop-string text is cut from the output unless asked for (vLLM's default).
    include_stop_str_in_output: bool = False
    min_tokens: int = 0
    _stop_list: list[str] = field(init=False, repr=False, default_factory=list)

    def __post_init__(self) -> None:
        if self.max_tokens is _UNSET:
            raise ValueError(
                "SamplingParams: max_tokens is required (there is no silent default of 16); "
                "pass e.g. SamplingParams(max_tokens=256), or max_tokens=None to generate until the context is full"
            )
        _check(self.max_tokens is None or (isinstance(self.max_tokens, int) and self.max_tokens >= 1),
               f"max_tokens must be an int >= 1 or None, got {self.max_tokens!r}")
        _check(self.temperature >= 0, f"temperature must be >= 0 (0 means greedy), got {self.temperature}")
        _check(isinstance(self.top_k, int) and (self.top_k >= 0 or self.top_k == -1),
               f"top_k must be an int >= 0 (0 or -1 disables it), got {self.top_k!r}")
        _check(0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}")
        _check(0 <= self.min_p <= 1, f"min_p must be in [0, 1], got {self.min_p}")
        _check(isinstance(self.n, int) and self.n >= 1, f"n must be an int >= 1, got {self.n!r}")
        _check(self.logprobs is None or (isinstance(self.logprobs, int) and self.logprobs >= 0),
               f"logprobs must be None or an int >= 0, got {self.logprobs!r}")
        _check(isinstance(self.min_tokens, int) and self.min_tokens >= 0,
               f"min_tokens must be an int >= 0, got {self.min_tokens!r}")
        _check(self.seed is None or isinstance(self.seed, int), f"seed must be an int or None, got {self.seed!r}")
        if self.top_k == -1:
            self.top_k = 0
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        _check(all(isinstance(s, str) and s for s in stops), f"stop must be non-empty strings, got {self.stop!r}")
        self._stop_list = stops
        self.stop_token_ids = [int(t) for t in (self.stop_token_ids or [])]

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def stop_strings(self) -> list[str]:
        return self._stop_list


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(f"SamplingParams: {message}")
