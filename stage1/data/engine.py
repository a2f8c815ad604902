"""`Engine`: what the data pipeline and the CLI use of an inference engine, and nothing more.

`stage1.LLM` implements it; so does the tests' fake engine (tests/data/conftest.py). The pipeline uses these members
directly: an engine without one of them is not an engine for it.
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
    @property
    def prefix_cached_tokens(self) -> int:
        """Prompt tokens taken from the prefix cache so far (a running total)."""


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
    def stats(self) -> EngineStats: ...

    def generate(self, prompts: list[str], sampling_params: list[SamplingParams],
                 use_tqdm: bool = True) -> list[RequestOutput]:
        """One RequestOutput per prompt, in order."""

    def shutdown(self) -> None:
        """Frees what the engine holds beyond this process's memory (its tensor-parallel workers)."""
