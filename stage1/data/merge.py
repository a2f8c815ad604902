"""The merge: every shard of a run (shards.py) into one dataset, equal to what one unsharded run writes.

Each shard ran the per-row filters only. The merge checks that the shards are this run's and complete (refusing,
with nothing written, a missing, incomplete, duplicated or foreign shard), puts their rows back in input order, and
runs the dataset-wide filters (exact and near duplicates) over them in that order, as an unsharded run does while it
generates. So duplicates that fell in different shards are found, and the first in input order is the one kept.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stage1.data.errors import DataError
from stage1.data.filters import Candidate, Deduplicator, dataset_checks, dedup_key, first_rejection
from stage1.data.hashing import sha256_file
from stage1.data.manifest import MANIFEST_FILE, identity_diff, read_manifest, write_manifest
from stage1.data.readers import Instruction
from stage1.data.rows import row_key, with_reason
from stage1.data.settings import GenerationConfig
from stage1.data.shards import SHARDS_DIR, shard_dir, shard_name, shard_of
from stage1.data.writer import DATA_FILE, REJECTS_FILE, dumps_line, read_jsonl

Row = dict[str, Any]
RUN_SHARDS_HINT = "run it with --num-shards {count} --shard-index {index} --resume (and the run's other arguments)"


@dataclass
class Shard:
    index: int
    name: str
    path: Path
    manifest: dict[str, Any]
    kept: list[Row]  # rows that passed the per-row filters
    rejected: list[Row]


@dataclass
class Merged:
    kept: list[Row]
    rejected: list[Row]
    dedup_rejected: int  # of `rejected`, the rows the merge's dataset-wide filters rejected
    shards: list[Shard]


def load_shards(out: str | Path, count: int, identity: dict[str, Any], implicit: dict[str, Any],
                instructions: list[Instruction], n: int) -> list[Shard]:
    """Every shard of the run in OUT, checked: this run's (identity), complete, and holding exactly its rows."""
    out = Path(out)
    root = out / SHARDS_DIR
    if not root.is_dir():
        raise DataError(f"{out}: no {SHARDS_DIR}/ directory, so there is nothing to merge; run the shards first "
                        "(--num-shards N --shard-index I, --data-parallel-size D, or python -m stage1.launch slurm)")
    expected = {shard_name(i, count) for i in range(count)}
    strangers = sorted(p.name for p in root.iterdir() if p.name not in expected)
    if strangers:
        raise DataError(f"{root}: {', '.join(strangers)} {'is not a shard' if len(strangers) == 1 else 'are not shards'}"
                        f" of this {count}-shard run (another run's, or another --num-shards); move "
                        f"{'it' if len(strangers) == 1 else 'them'} out of {root}")
    by_id = {inst.id: inst for inst in instructions}
    return [_load_shard(out, index, count, identity, implicit, by_id, n) for index in range(count)]


def _load_shard(out: Path, index: int, count: int, identity: dict[str, Any], implicit: dict[str, Any],
                by_id: dict[str, Instruction], n: int) -> Shard:
    path = shard_dir(out, index, count)
    name = f"shard {shard_name(index, count)} ({path})"
    hint = RUN_SHARDS_HINT.format(count=count, index=index)
    if not path.is_dir():
        raise DataError(f"{name} is missing; {hint}")
    manifest = read_manifest(path)
    if manifest is None:
        raise DataError(f"{name} has no {MANIFEST_FILE}, so it never started; {hint}")
    claims = manifest.get("shard") or {}
    if (claims.get("index"), claims.get("count")) != (index, count):
        raise DataError(f"{name}: its manifest says it is shard {claims.get('index')} of {claims.get('count')}, so "
                        "it is a duplicate of another shard's directory (copied or renamed); remove it and " + hint)
    diff = identity_diff(manifest.get("identity", {}), identity, implicit)
    if diff:
        raise DataError(f"{name} belongs to another run ({diff}); merge with that run's arguments, or remove it and "
                        + hint)
    if manifest.get("status") != "complete":
        raise DataError(f"{name} is incomplete (status {manifest.get('status')!r}); {hint}")
    kept, rejected = read_jsonl(path / DATA_FILE), read_jsonl(path / REJECTS_FILE)
    _check_rows(name, hint, index, count, kept + rejected, by_id, n)
    return Shard(index, shard_name(index, count), path, manifest, kept, rejected)


def _check_rows(name: str, hint: str, index: int, count: int, rows: list[Row], by_id: dict[str, Instruction],
                n: int) -> None:
    """Every row is of one of this shard's instructions, once; every instruction of the shard has all its rows."""
    seen: set[tuple[str, int | None]] = set()
    for row in rows:
        key = row_key(row)
        if row["id"] not in by_id:
            raise DataError(f"{name} holds rows of instruction {row['id']!r}, which is not in this run's input "
                            "(the shard ran with other --instructions or a larger --limit); merge with its arguments")
        if shard_of(row["id"], count) != index:
            raise DataError(f"{name} holds instruction {row['id']!r}, which belongs to shard "
                            f"{shard_name(shard_of(row['id'], count), count)}: it is not a shard of this run")
        if key in seen:
            raise DataError(f"{name} holds row {key} twice; it was not written by a clean run")
        seen.add(key)
    ids = {row_id for row_id, _ in seen}
    for inst in by_id.values():
        if shard_of(inst.id, count) != index or (inst.id, None) in seen:
            continue
        missing = [k for k in range(n) if (inst.id, k) not in seen]
        if missing:
            what = "has no rows" if inst.id not in ids else f"lacks completion {missing[0]}"
            raise DataError(f"{name} is incomplete: instruction {inst.id!r} {what} (it ran with a smaller --limit, "
                            f"or another --n); {hint}")


def merge(shards: list[Shard], instructions: list[Instruction], config: GenerationConfig) -> Merged:
    """The shards' rows in input order, with the dataset-wide filters run over the kept ones in that order."""
    position = {inst.id: p for p, inst in enumerate(instructions)}

    def input_order(row: Row) -> tuple[int, int]:
        return position[row["id"]], -1 if row["index"] is None else row["index"]

    candidates = sorted((row for s in shards for row in s.kept), key=input_order)
    dedup = Deduplicator(config.near_dedup, config.near_dup_threshold)
    checks = dataset_checks(dedup)
    kept, dedup_rejected = [], []
    for row in candidates:
        verdict = first_rejection(checks, Candidate(row["instruction"], row["response"], row["finish_reason"], {}))
        if verdict:
            dedup_rejected.append(with_reason(row, *verdict))
        else:
            dedup.add(dedup_key(row["id"], row["index"]), row["instruction"], row["response"])
            kept.append(row)
    rejected = sorted([row for s in shards for row in s.rejected] + dedup_rejected, key=input_order)
    return Merged(kept, rejected, len(dedup_rejected), shards)


def check_merge_target(out: str | Path, identity: dict[str, Any], implicit: dict[str, Any], *,
                       replace: bool = False) -> None:
    """OUT's own files may only be an earlier merge of this run (a merge is redone whole), never a run's; `replace`
    (--overwrite) allows any."""
    out = Path(out)
    if replace:
        return
    manifest = read_manifest(out)
    if manifest is None:
        if (out / DATA_FILE).exists() or (out / REJECTS_FILE).exists():
            raise DataError(f"{out} holds {DATA_FILE}/{REJECTS_FILE} but no {MANIFEST_FILE}; the merge would replace "
                            "them: move them away, or choose another --out")
        return
    if "merged_shards" not in manifest:
        raise DataError(f"{out} holds an unsharded run ({MANIFEST_FILE} without merged shards); the merge would "
                        "replace it: move it away, or merge into another --out")
    diff = identity_diff(manifest.get("identity", {}), identity, implicit)
    if diff:
        raise DataError(f"{out} holds the merge of another run ({diff}); move it away, or choose another --out")


def write_merged(out: str | Path, merged: Merged, manifest: dict[str, Any]) -> None:
    """data.jsonl and rejects.jsonl each written whole to a temporary file and renamed into place, then the
    manifest: a kill leaves the old files or the new ones, never a mix within a file."""
    out = Path(out)
    for name, rows in ((DATA_FILE, merged.kept), (REJECTS_FILE, merged.rejected)):
        tmp = out / f".{name}.merging"
        with open(tmp, "wb") as f:
            for row in rows:
                f.write(dumps_line(row))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, out / name)
    write_manifest(out, manifest)


def shard_report(shard: Shard) -> dict[str, Any]:
    """What the merged manifest says of one shard: its rows, its files' hashes, where and how fast it ran."""
    sessions = shard.manifest.get("sessions", [])
    generated = sum(s.get("generated_tokens", 0) for s in sessions)
    seconds = sum(s.get("generate_seconds", 0.0) for s in sessions)
    return {
        "name": shard.name, "index": shard.index, "kept": len(shard.kept), "rejected": len(shard.rejected),
        "data_sha256": sha256_file(shard.path / DATA_FILE), "rejects_sha256": sha256_file(shard.path / REJECTS_FILE),
        "hosts": sorted({s["host"] for s in sessions if s.get("host")}), "sessions": len(sessions),
        "wall_s": round(sum(s.get("wall_s", 0.0) for s in sessions), 2), "generated_tokens": generated,
        "tokens_per_s": round(generated / seconds, 2) if seconds else 0.0,
    }
