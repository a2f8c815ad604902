"""`Engine`: what the data pipeline and the CLI use of an inference engine, and nothing more.

`stage1.LLM` implements it; so does the tests' fake engine (tests/data/conftest.py). The pipeline uses these members
directly: an engine without one of them is not an engine for it. Generation goes through the step API
(`add_request`, `step`, `has_unfinished_requests`, `abort`): requests enter while others run (stream.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:
    from stage1.engine.outputs import RequestOutput
    from stage1.engine.params import SamplingParams


@runtime_checkable
class EngineTokenizer(Protocol):
    def encode(self, text: str) -> list[int]:
        """The ids of `text` as the engine would tokenize the prompt (no special tokens added)."""

    def token_to_id(self, token: str) -> int | None:
        """The id of a token given by its text (a control token such as <|im_end|>), None if there is none."""


@runtime_checkable
class EngineStats(Protocol):
    """Running totals since the engine started, updated after every step."""

    @property
    def prefill_tokens(self) -> int:
        """Prompt tokens computed (not those taken from the prefix cache)."""

    @property
    def prefix_cached_tokens(self) -> int:
        """Prompt tokens taken from the prefix cache."""

    @property
    def generated_tokens(self) -> int:
        """Tokens sampled."""

    @property
    def decode_steps(self) -> int: ...

    @property
    def low_occupancy_decode_steps(self) -> int:
        """Decode steps that ran fewer than max_num_seqs / 2 sequences."""

    @property
    def low_occupancy_decode_seconds(self) -> float:
        """Their time."""


@runtime_checkable
class Engine(Protocol):
    @property
    def tokenizer(self) -> EngineTokenizer: ...

    @property
    def eos_token_ids(self) -> Sequence[int]: ...

    @property
    def max_model_len(self) -> int:
        """Context limit: prompt plus new tokens."""

    @property
    def vocab_size(self) -> int:
        """Token ids are below it."""

    @property
    def max_num_seqs(self) -> int:
        """Most sequences that run in one step (a request's n samples are n sequences)."""

    @property
    def stats(self) -> EngineStats: ...

    @property
    def engine_info(self) -> dict:
        """How the engine runs (device, kernels, dtype, ...), as JSON values: each session of the manifest records
        it."""

    def add_request(self, prompt: str, sampling_params: SamplingParams) -> str:
        """Queues one request (checked first: ValueError for a bad one); returns its id."""

    def step(self) -> list[RequestOutput]:
        """Runs one engine step; returns the requests that finished in it, in any order, each with all its samples."""

    def has_unfinished_requests(self) -> bool: ...

    def abort(self, request_ids: list[str]) -> None:
        """Drops these requests (finished or unknown ids are ignored)."""

    def shutdown(self) -> None:
        """Frees what the engine holds beyond this process's memory (its tensor-parallel workers)."""
