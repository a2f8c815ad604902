"""Shards of a run: which instructions a shard holds, where it writes, and how far each shard of an output got.

A shard is one process's part of a run (`--num-shards N --shard-index I`, a data-parallel worker, a SLURM array
task). An instruction belongs to shard `shard_of(id, N)`, a hash of its id, so the split does not depend on the order
or the length of the input file. Shard I of N writes `OUT/shards/<I>-of-<N>/` (data.jsonl, rejects.jsonl,
manifest.json, the layout of a whole run) and resumes on its own; its manifest's `status: complete` is its
completion marker. The dataset-wide filters (exact and near duplicates) do not run in a shard: the merge (merge.py)
runs them over all shards, in input order.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TypeVar

from stage1.data.errors import DataError
from stage1.data.manifest import read_manifest

SHARDS_DIR = "shards"

T = TypeVar("T")


def shard_name(index: int, count: int) -> str:
    """`00002-of-00008`: zero-padded, so a listing sorts in shard order."""
    return f"{index:05d}-of-{count:05d}"


def shard_dir(out: str | Path, index: int, count: int) -> Path:
    return Path(out) / SHARDS_DIR / shard_name(index, count)


def shard_of(row_id: str, count: int) -> int:
    """The shard an instruction id belongs to: stable across machines, Python versions and file orders."""
    digest = hashlib.sha256(f"stage1-shard:{row_id}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % count


def select(instructions: list[T], index: int, count: int) -> list[T]:
    """The instructions of shard `index` of `count`, in input order."""
    return [inst for inst in instructions if shard_of(inst.id, count) == index]


def resolve_shard(num_shards: int | None, shard_index: int | None,
                  env: Mapping[str, str] = os.environ) -> tuple[int, int] | None:
    """(index, count) from the flags, each defaulting to the SLURM array's (SLURM_ARRAY_TASK_ID,
    SLURM_ARRAY_TASK_COUNT) where they are set; None for an unsharded run."""
    def from_env(name: str) -> int | None:
        value = env.get(name)
        if value is None:
            return None
        try:
            return int(value)
        except ValueError:
            raise DataError(f"{name}={value!r} is not an integer; pass --num-shards and --shard-index instead") \
                from None

    count = num_shards if num_shards is not None else from_env("SLURM_ARRAY_TASK_COUNT")
    index = shard_index if shard_index is not None else from_env("SLURM_ARRAY_TASK_ID")
    if count is None and index is None:
        return None
    if count is None or index is None:
        given = "--shard-index" if index is not None else "--num-shards"
        raise DataError(f"{given} is set but not {'--num-shards' if index is not None else '--shard-index'}; pass "
                        "both (a SLURM array task gets both from SLURM_ARRAY_TASK_COUNT and SLURM_ARRAY_TASK_ID)")
    if count < 1:
        raise DataError(f"--num-shards must be at least 1, got {count}")
    if not 0 <= index < count:
        raise DataError(f"--shard-index {index} is outside 0..{count - 1} for --num-shards {count} (a SLURM array "
                        f"for {count} shards is --array=0-{count - 1}; resubmitting some of them, pass --num-shards "
                        "explicitly)")
    return index, count


def shard_counts_in(out: str | Path) -> list[int]:
    """The shard counts the directories under OUT/shards name (`<i>-of-<n>`): one, unless runs were mixed."""
    root = Path(out) / SHARDS_DIR
    counts = set()
    if root.is_dir():
        for p in root.iterdir():
            _, sep, n = p.name.partition("-of-")
            if sep and n.isdigit():
                counts.add(int(n))
    return sorted(counts)


def shard_states(out: str | Path, count: int) -> dict[int, str]:
    """Each shard's state in `out`, from its manifest: "complete", "running" (started, not finished: a crash, a kill,
    a preemption, or still running) or "missing"."""
    states = {}
    for index in range(count):
        manifest = read_manifest(shard_dir(out, index, count))
        states[index] = "missing" if manifest is None else (
            "complete" if manifest.get("status") == "complete" else "running")
    return states


def incomplete_shards(out: str | Path, count: int) -> list[int]:
    """The shards of `out` still to run (or resume): what a resubmission must cover."""
    return [index for index, state in shard_states(out, count).items() if state != "complete"]
