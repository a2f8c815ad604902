"""A fake engine implementing `stage1.data.engine.Engine`, what the data pipeline uses of `LLM` (with stage1.engine's
RequestOutput/SamplingParams), so the pipeline's tests run in milliseconds and without a model.

Its completions depend only on (prompt, seed, completion index), like a batch-invariant engine's, and it can be told
what to answer (`respond`), to raise after some calls (a crash), or to feed the model other ids than the prompt's.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import pytest

from stage1.engine.outputs import CompletionOutput, RequestOutput

WORDS = ("river stone lantern quiet maple orbit velvet harbor signal meadow copper ember glacier willow cobalt "
         "thistle prairie beacon saffron canyon").split()


class FakeTokenizer:
    """Byte-level: one id per UTF-8 byte."""
    vocab_size = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        return bytes(ids).decode("utf-8", errors="replace")

    def token_to_id(self, token: str) -> int | None:
        return None  # no control tokens in a byte vocabulary


@dataclass
class FakeStats:
    prefix_cached_tokens: int = 0  # the fake has no prefix cache


def instruction_of(prompt: str) -> str:
    """The instruction at the end of a prompt of either style."""
    last = prompt.rsplit("\n\n", 1)[-1]
    return last.removeprefix("Q: ").removesuffix("\nA:").rstrip("\n")


def default_respond(prompt: str, seed: int, index: int) -> str:
    rng = random.Random(f"{seed}:{index}")
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(9, 16))).capitalize() + "."


PARAGRAPHS = (
    ("The committee reviewed every proposal carefully and decided that the new library should open next spring "
     "with longer hours and more study rooms for students"),
    ("Regular exercise improves sleep and mood and lowers the risk of heart disease so most adults should aim for "
     "thirty minutes of activity on most days"),
)


def mixed_respond(prompt: str, seed: int, index: int) -> str:
    """A mix of good answers and each kind of bad one, decided by (seed, index) alone: empty, run-on, near-duplicates
    of two stock paragraphs (dedup state matters), leaked control tokens, scaffolding."""
    rng = random.Random(f"mixed:{seed}:{index}")
    roll = rng.random()
    if roll < 0.08:
        return ""
    if roll < 0.16:
        return " ".join(rng.choice(WORDS) for _ in range(400))  # no stop: hits max_tokens
    if roll < 0.36:
        return rng.choice(PARAGRAPHS) + rng.choice([".", "!", " indeed.", " today."])
    if roll < 0.42:
        return "Sure thing.<|im_end|>"
    if roll < 0.46:
        return "Fine.\nHere are examples of prompts and their completions:"
    return default_respond(prompt, seed, index) + "\n\nNext prompt:\nmore"


class FakeLLM:
    def __init__(self, respond=default_respond, max_model_len: int = 8192, fail_after_calls: int | None = None,
                 corrupt_ids_from_call: int | None = None):
        """respond(prompt, seed, index) -> the completion text; fail_after_calls: raise on the call after that many;
        corrupt_ids_from_call: from that call on (0-based), report prompt ids that differ from the prompt's."""
        self.tokenizer = FakeTokenizer()
        self.vocab_size = FakeTokenizer.vocab_size
        self.max_model_len = max_model_len
        self.eos_token_ids = [0]
        self.stats = FakeStats()
        self.respond = respond
        self.fail_after_calls = fail_after_calls
        self.corrupt_ids_from_call = corrupt_ids_from_call
        self.calls: list[int] = []  # prompts per generate call
        self.seen_prompts: list[str] = []
        self.seen_params: list = []  # the SamplingParams of each prompt
        self.shut_down = False

    def shutdown(self):
        self.shut_down = True

    def generate(self, prompts, sampling_params, use_tqdm=True):
        if self.fail_after_calls is not None and len(self.calls) >= self.fail_after_calls:
            raise RuntimeError("injected crash")
        if not isinstance(sampling_params, list):
            sampling_params = [sampling_params] * len(prompts)
        self.calls.append(len(prompts))
        results = []
        for i, (prompt, sp) in enumerate(zip(prompts, sampling_params)):
            ids = self.tokenizer.encode(prompt)
            if len(ids) > self.max_model_len:
                raise ValueError(f"prompt of {len(ids)} tokens exceeds max_model_len {self.max_model_len}")
            if self.corrupt_ids_from_call is not None and len(self.calls) > self.corrupt_ids_from_call:
                ids = ids[:-1] + [1]
            self.seen_prompts.append(prompt)
            self.seen_params.append(sp)
            outs = [self._complete(self.respond(prompt, sp.seed, k), sp, k) for k in range(sp.n)]
            results.append(RequestOutput(request_id=str(i), prompt=prompt, prompt_token_ids=ids, outputs=outs))
        return results

    def _complete(self, text: str, sp, index: int) -> CompletionOutput:
        """Stop strings cut (and are left out, as the engine does); max_tokens truncates with finish 'length'."""
        hits = [(text.find(s), s) for s in sp.stop_strings if s in text]
        stop = min(hits) if hits else None
        body = text[:stop[0]] if stop else text
        ids = self.tokenizer.encode(body)
        if len(ids) > sp.max_tokens:
            ids = ids[:sp.max_tokens]
            return CompletionOutput(index, self.tokenizer.decode(ids), ids, "length", None)
        return CompletionOutput(index, body, ids, "stop", stop[1] if stop else None)


@pytest.fixture
def make_llm():
    """FakeLLM itself, to build one with options: make_llm(respond=..., fail_after_calls=2)."""
    return FakeLLM


@pytest.fixture
def respond_mixed():
    return mixed_respond


@pytest.fixture
def fake_model_dir(tmp_path: Path) -> Path:
    """Files the manifest fingerprints; the fake engine never reads them."""
    d = tmp_path / "fake-model"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "qwen2", "vocab_size": 256}))
    (d / "tokenizer.json").write_text("{}")
    return d


@pytest.fixture
def out(tmp_path):
    return tmp_path / "out"


@pytest.fixture
def gen(fake_model_dir, out):
    """gen(*args, llm=FakeLLM, out=dir) -> exit code of `python -m stage1.generate args` with that engine."""
    from stage1.generate import main

    def run(*argv, llm, out=out):
        return main(["--model", str(fake_model_dir), "--out", str(out), "--no-progress", *map(str, argv)],
                    llm_factory=lambda model_dir, args: llm)
    return run


def _read_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_bytes().splitlines()] if path.exists() else []


@pytest.fixture
def read_rows():
    """read_rows(path) -> the JSON rows of a JSONL file ([] if absent)."""
    return _read_rows
