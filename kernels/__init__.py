"""Triton kernels, importable as stage1.kernels (this folder is mapped into the package by setup.py)."""

from __future__ import annotations

import importlib
import importlib.util

# Attention (kernels/attention.py) loads on first use: importing stage1.kernels needs no triton, and triton reads
# TRITON_INTERPRET when a kernel is defined, so tests can set it after this package is imported.
_ATTENTION = ("TritonAttentionBackend", "paged_decode_attention", "paged_prefill_attention", "write_kv")


def triton_available() -> bool:
    """Whether triton is installed (the kernels still need a GPU, or TRITON_INTERPRET=1 to run on the CPU)."""
    try:
        return importlib.util.find_spec("triton") is not None
    except (ImportError, ValueError):  # ValueError: a None entry in sys.modules (blocked import)
        return False


def __getattr__(name: str):
    if name in _ATTENTION:
        return getattr(importlib.import_module(".attention", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
