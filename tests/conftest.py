"""Shared fixtures: tiny random Qwen2 checkpoints (see tiny_models.py), made once per test session."""

from __future__ import annotations

import pytest

from tiny_models import SHAPES, make_tiny_checkpoint


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory):
    """checkpoint(name) -> directory of the tiny checkpoint of that shape (see SHAPES), written once."""
    made = {}

    def get(name: str = "gqa2-d128-untied", **overrides):
        key = (name, tuple(sorted(overrides.items())))
        if key not in made:
            out = tmp_path_factory.mktemp(name)
            made[key] = make_tiny_checkpoint(out, **{**SHAPES[name], **overrides})
        return made[key]

    return get


@pytest.fixture(scope="session")
def tiny_model_dir(checkpoint):
    """The default tiny checkpoint: 2 layers, 4 query / 2 KV heads, head_dim 128, byte-level BPE tokenizer."""
    return checkpoint("gqa2-d128-untied")
