"""The data tests' fixtures: the fake engine (fake_engine.py) and the CLIs run with it, their output directory and
its rows."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fake_engine import FakeLLM, mixed_respond


@pytest.fixture
def make_llm():
    """FakeLLM itself, to build one with options: make_llm(respond=..., fail_at_step=20)."""
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


def _cli(main, fake_model_dir, default_out):
    def run(*argv, llm, out=default_out):
        return main(["--model", str(fake_model_dir), "--out", str(out), "--no-progress", *map(str, argv)],
                    llm_factory=lambda model_dir, args: llm)
    return run


@pytest.fixture
def gen(fake_model_dir, out):
    """gen(*args, llm=FakeLLM, out=dir) -> exit code of `python -m stage1.generate args` with that engine."""
    from stage1.generate import main

    return _cli(main, fake_model_dir, out)


@pytest.fixture
def instr(fake_model_dir, out):
    """instr(*args, llm=..., out=dir) -> exit code of `python -m stage1.instructions args` with that engine."""
    from stage1.instructions import main

    return _cli(main, fake_model_dir, out)


def _read_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_bytes().splitlines()] if path.exists() else []


@pytest.fixture
def read_rows():
    """read_rows(path) -> the JSON rows of a JSONL file ([] if absent)."""
    return _read_rows
