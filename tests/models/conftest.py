"""Fixtures for stage1.models: tiny Qwen2 GGUF files (see tiny_ggufs.py). The real model's are in
tests/real_model/conftest.py."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from tiny_ggufs import write_tiny_gguf


@pytest.fixture(scope="session")
def tiny_gguf(tmp_path_factory) -> tuple[Path, dict[str, np.ndarray]]:
    """A valid tiny qwen2 GGUF (untied, Q8_0/F32/F16/BF16 tensors) and its original weights; do not modify it."""
    path = tmp_path_factory.mktemp("tiny_gguf") / "tiny-qwen2.gguf"
    return path, write_tiny_gguf(path)


@pytest.fixture(scope="session")
def tiny_imported(tiny_gguf, tmp_path_factory) -> Path:
    """tiny_gguf imported in fp32; do not modify it."""
    from stage1.models.gguf_import import import_gguf

    out = tmp_path_factory.mktemp("tiny_imported") / "model"
    return import_gguf(tiny_gguf[0], out, dtype="fp32", log=lambda msg: None)
