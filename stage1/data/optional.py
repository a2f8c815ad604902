"""Optional dependencies (setup.py's extras): imported where a feature needs them, never when a module loads, so
the data layer runs without them (and without torch); a missing one is one DataError naming the extra."""

from __future__ import annotations

import importlib
from types import ModuleType

from stage1.data.errors import DataError

HF_EXTRA = "hf"  # pyarrow + datasets: parquet and `datasets` input, the parquet export


def require(module: str, extra: str, needed_for: str) -> ModuleType:
    """`module`, imported; `needed_for` says what wanted it ("reading parquet")."""
    try:
        return importlib.import_module(module)
    except ImportError:
        package = module.split(".")[0]
        raise DataError(f"{needed_for} needs {package}, which is not installed: pip install 'stage1[{extra}]'"
                        ) from None
