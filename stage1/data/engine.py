"""`Engine`: what the data pipeline and the CLI use of an inference engine, and nothing more; and how a run gets one
(its model directory, `stage1.LLM` started with the run's engine options, shut down after it).

`stage1.LLM` implements it; so does the tests' fake engine (tests/data/fake_engine.py). The pipeline uses these members
directly: an engine without one of them is not an engine for it. Generation goes through the step API
(`add_request`, `step`, `has_unfinished_requests`, `abort`): requests enter while others run (stream.py).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from stage1.data.errors import DataError

if TYPE_CHECKING:
    from stage1.data.run import EngineOptions
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


EngineFactory = Callable[[Path, "EngineOptions"], Engine]  # (model directory, options) -> a started engine


def resolve_model_dir(model: str | None) -> Path:
    """--model's directory, checked; None: the default model (stage1.models), fetched before."""
    if model:
        path = Path(model).expanduser()
        if path.is_file() and path.suffix.lower() == ".gguf":
            raise DataError(f"--model {model}: a GGUF file; convert it once with python -m stage1.models import-gguf "
                            f"{model} OUT_DIR and pass --model OUT_DIR")
        if not path.is_dir() or not (path / "config.json").is_file():
            raise DataError(f"--model {model}: not a model directory (it needs config.json, tokenizer.json and "
                            "*.safetensors); pass the directory of a Hugging Face checkpoint")
        return path
    try:
        from stage1.models import resolve_model
    except ImportError:
        raise DataError("no --model given and this install has no default model (stage1.models); pass --model DIR, "
                        "the directory of a Qwen2.5 base checkpoint (config.json, tokenizer.json, *.safetensors)"
                        ) from None
    try:
        return Path(resolve_model(None))
    except Exception as e:  # noqa: BLE001 - any failure to get the default model becomes one clear line
        raise DataError(f"no --model given and the default model is not available ({e}); fetch it with "
                        "python -m stage1.models fetch, or pass --model DIR") from None


def load_llm(model_dir: Path, options: EngineOptions) -> Engine:
    """stage1.LLM: the first use of the engine, so torch loads here (a merge never gets here)."""
    try:
        from stage1 import LLM
    except ImportError as e:  # torch (or another engine dependency) is missing where this run generates
        raise DataError(f"the stage1 engine can't be imported ({e}); generating needs torch and the engine's "
                        "dependencies (pip install torch, then pip install --no-build-isolation -e .); only --merge "
                        "and the SLURM launcher run without them") from None
    try:
        return LLM(str(model_dir), **options.llm_kwargs())
    except (OSError, ValueError) as e:
        raise DataError(f"could not load the model in {model_dir}: {e}") from None


@contextlib.contextmanager
def started_engine(factory: EngineFactory, model_dir: Path, options: EngineOptions) -> Iterator[Engine]:
    """The engine for the run, shut down after it (its tensor-parallel workers end with it)."""
    llm = factory(model_dir, options)
    try:
        yield llm
    finally:
        llm.shutdown()
