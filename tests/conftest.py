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


@pytest.fixture
def decode_graphs_on_cpu(monkeypatch):
    """Turns decode graphs on whatever the device (EngineConfig turns them on only on a GPU with the Triton
    kernels). Off a GPU nothing can be captured, so DecodeGraphs runs its padded step eagerly: how the CPU tests
    check the padding. `enforce_eager=True` still turns them off."""
    import dataclasses

    from stage1.engine.engine_config import EngineConfig

    build = EngineConfig.build.__func__

    def forced(cls, *args, **kwargs):
        config = build(cls, *args, **kwargs)
        return dataclasses.replace(config, decode_graphs=not kwargs.get("enforce_eager", False))

    monkeypatch.setattr(EngineConfig, "build", classmethod(forced))
