"""Stable ids and seeds from sha256: the same on every machine, Python version and batch order."""

from __future__ import annotations

import hashlib
from pathlib import Path


def derive_seed(*parts: object) -> int:
    """A 63-bit seed from its parts, e.g. derive_seed(run_seed, row_id): a row's seed depends on nothing else."""
    digest = hashlib.sha256(":".join(str(p) for p in parts).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") >> 1  # fits a signed int64 (torch.Generator.manual_seed)


def text_id(text: str) -> str:
    """The id of an instruction given without one: a hash of its text, so it survives reordering the file."""
    return "sha256-" + hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def sha256_file(path: str | Path) -> str | None:
    path = Path(path)
    if not path.is_file():
        return None
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()
