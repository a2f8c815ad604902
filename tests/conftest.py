"""Shared fixtures: tiny random Qwen2 checkpoints (see tiny_models.py), made once per test session."""

from __future__ import annotations

import pytest

from tiny_models import make_tiny_checkpoint

# name -> shape; covers query/KV head ratios 1, 2 and 7, head_dim 64 and 128, tied and untied, one file or sharded
SHAPES = {
    "gqa1-d64-tied": dict(heads=4, kv_heads=4, head_dim=64, tied=True),
    "gqa2-d128-untied": dict(heads=4, kv_heads=2, head_dim=128, tied=False),
    "gqa7-d64-sharded": dict(heads=7, kv_heads=1, head_dim=64, tied=False, shard=True),
}


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
