"""The merge: every shard of a run (shards.py) into one dataset, equal to what one unsharded run writes.

Each shard ran the per-row filters only. The merge checks that the shards are this run's and complete (refusing,
with nothing written, a missing, incomplete, duplicated or foreign shard), puts their rows back in input order, and
runs the dataset-wide filters (exact and near duplicates) over them in that order, as an unsharded run does while it
generates. So duplicates that fell in different shards are found, and the first in input order is the one kept.

It streams, for datasets of any size: the checks (`load_shards`) read each shard's files once, keeping only that
shard's row keys; the merge (`merge`) reads them again, each file lazily. A shard's files are in input order (the
pipeline writes its rows so, and the checks refuse a file that is not), so a k-way merge over all the files gives
the rows in input order holding one row per file; memory holds that and the dedup state, never the dataset.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from stage1.data.errors import DataError
from stage1.data.filters import DatasetFilter, add_kept, build_filters, first_rejection
from stage1.data.hashing import sha256_file
from stage1.data.jobs import RESPONSES, JobKind
from stage1.data.judge import judge_cost
from stage1.data.manifest import MANIFEST_FILE, DatasetSummary, identity_diff, read_manifest
from stage1.data.readers import Instruction
from stage1.data.rows import row_key, with_reason
from stage1.data.settings import GenerationConfig
from stage1.data.shards import SHARDS_DIR, shard_dir, shard_name, shard_of
from stage1.data.writer import DATA_FILE, REJECTS_FILE, dumps_line, iter_jsonl, replaced_whole

Row = dict[str, Any]
RUN_SHARDS_HINT = "run it with --num-shards {count} --shard-index {index} --resume (and the run's other arguments)"


@dataclass
class Shard:
    index: int
    name: str
    path: Path
    manifest: dict[str, Any]
    kept: int  # rows that passed the per-row filters (data.jsonl)
    rejected: int  # rejects.jsonl


@dataclass
class Merged:
    summary: dict[str, Any]  # dataset_summary of the merged files
    dedup_rejected: int  # of the rejected rows, those the merge's dataset-wide filters rejected


def input_order(instructions: list[Instruction]) -> Callable[[Row], tuple[int, int]]:
    """A row's place in the run's input: its instruction's position, then its completion index (None first)."""
    position = {inst.id: p for p, inst in enumerate(instructions)}

    def key(row: Row) -> tuple[int, int]:
        return position[row["id"]], -1 if row["index"] is None else row["index"]
    return key


def load_shards(out: str | Path, count: int, identity: dict[str, Any], implicit: dict[str, Any],
                instructions: list[Instruction], n: int, *, until_kept: bool = False) -> list[Shard]:
    """Every shard of the run in OUT, checked: this run's (identity), complete, and holding exactly its rows, each
    file in input order. `until_kept`: the job stops once its goal is kept, so a complete shard holds a prefix of
    its input (no gaps) rather than all of it."""
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
    order = input_order(instructions)
    return [_load_shard(out, index, count, identity, implicit, by_id, order, n, until_kept) for index in range(count)]


def _load_shard(out: Path, index: int, count: int, identity: dict[str, Any], implicit: dict[str, Any],
                by_id: dict[str, Instruction], order: Callable[[Row], tuple[int, int]], n: int,
                until_kept: bool) -> Shard:
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
    seen: set[tuple[str, int | None]] = set()
    kept = _check_rows(name, index, count, path / DATA_FILE, seen, by_id, order)
    rejected = _check_rows(name, index, count, path / REJECTS_FILE, seen, by_id, order)
    _check_complete(name, hint, index, count, seen, by_id, n, until_kept)
    return Shard(index, shard_name(index, count), path, manifest, kept, rejected)


def _check_rows(name: str, index: int, count: int, file: Path, seen: set[tuple[str, int | None]],
                by_id: dict[str, Instruction], order: Callable[[Row], tuple[int, int]]) -> int:
    """Every row of `file` is of one of this shard's instructions, once in the shard (`seen`: the keys so far), and
    after the row before it in input order (what the merge relies on). Returns how many rows it holds."""
    rows = 0
    previous: tuple[str, int | None] | None = None  # the row before, and its place
    previous_place: tuple[int, int] | None = None
    for row in iter_jsonl(file):
        key = row_key(row)
        if row["id"] not in by_id:
            raise DataError(f"{name} holds rows of instruction {row['id']!r}, which is not in this run's input "
                            "(the shard ran with other --instructions or a larger --limit); merge with its arguments")
        if shard_of(row["id"], count) != index:
            raise DataError(f"{name} holds instruction {row['id']!r}, which belongs to shard "
                            f"{shard_name(shard_of(row['id'], count), count)}: it is not a shard of this run")
        if key in seen:
            raise DataError(f"{name} holds row {key} twice; it was not written by a clean run")
        place = order(row)
        if previous_place is not None and place < previous_place:
            raise DataError(f"{name}: {file.name} holds row {key} after row {previous}, out of input order; it was "
                            "not written by a clean run")
        seen.add(key)
        previous, previous_place = key, place
        rows += 1
    return rows


def _check_complete(name: str, hint: str, index: int, count: int, seen: set[tuple[str, int | None]],
                    by_id: dict[str, Instruction], n: int, until_kept: bool) -> None:
    """Every instruction of the shard has all its rows (`seen`: the shard's row keys); with `until_kept`, every one
    up to its last with rows."""
    ids = {row_id for row_id, _ in seen}
    insts = list(by_id.values())
    if until_kept:
        last = max((p for p, inst in enumerate(insts) if inst.id in ids), default=-1)
        insts = insts[:last + 1]
    for inst in insts:
        if shard_of(inst.id, count) != index or (inst.id, None) in seen:
            continue
        missing = [k for k in range(n) if (inst.id, k) not in seen]
        if missing:
            what = "has no rows" if inst.id not in ids else f"lacks completion {missing[0]}"
            raise DataError(f"{name} is incomplete: instruction {inst.id!r} {what} (it ran with a smaller --limit, "
                            f"or another --n); {hint}")


def merge(shards: list[Shard], instructions: list[Instruction], config: GenerationConfig, data: BinaryIO,
          rejects: BinaryIO, job: JobKind = RESPONSES) -> Merged:
    """The shards' rows in input order into `data` (kept) and `rejects`, with the dataset-wide filters run over the
    kept ones in that order. The shards must have passed `load_shards`: each file in input order, no row twice."""
    order = input_order(instructions)

    def tagged(file: Path, candidate: bool) -> Iterator[tuple[bool, Row]]:
        return ((candidate, row) for row in iter_jsonl(file))

    files = [tagged(s.path / DATA_FILE, True) for s in shards] + [tagged(s.path / REJECTS_FILE, False) for s in shards]
    # fresh: fed every shard's kept rows below, in input order
    checks = build_filters(config, DatasetFilter, filters=job.filters())
    summary = DatasetSummary(config.decontaminate)
    dedup_rejected = 0
    # One row per file in memory. Places are unique across files (load_shards): this is the order a sort of all the
    # rows gives.
    for candidate, row in heapq.merge(*files, key=lambda item: order(item[1])):
        kept = False
        if candidate:  # passed its shard's per-row filters: the dataset-wide ones decide
            view = job.candidate_of_written(row)
            verdict = first_rejection(checks, view)
            if verdict:
                row = with_reason(row, *verdict)
                dedup_rejected += 1
            else:
                add_kept(checks, view)
                kept = True
        (data if kept else rejects).write(dumps_line(row))
        summary.add(row, kept=kept)
    return Merged(summary.as_dict(), dedup_rejected)


def write_merged(out: str | Path, shards: list[Shard], instructions: list[Instruction],
                 config: GenerationConfig, job: JobKind = RESPONSES) -> Merged:
    """The merge streamed into data.jsonl and rejects.jsonl beside OUT's, renamed into place once both are whole: an
    error leaves OUT's old files, a kill the old file or the new one, never a part of one. The manifest comes after
    (write_manifest), so a merge whose manifest is missing or older is redone."""
    out = Path(out)
    with replaced_whole(out / DATA_FILE) as data, replaced_whole(out / REJECTS_FILE) as rejects:
        return merge(shards, instructions, config, data, rejects, job)


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


def shard_report(shard: Shard) -> dict[str, Any]:
    """What the merged manifest says of one shard: its rows, its files' hashes, where and how fast it ran."""
    sessions = shard.manifest.get("sessions", [])
    generated = sum(s.get("generated_tokens", 0) for s in sessions)
    seconds = sum(s.get("generate_seconds", 0.0) for s in sessions)
    return {
        "name": shard.name, "index": shard.index, "kept": shard.kept, "rejected": shard.rejected,
        "data_sha256": sha256_file(shard.path / DATA_FILE), "rejects_sha256": sha256_file(shard.path / REJECTS_FILE),
        "hosts": sorted({s["host"] for s in sessions if s.get("host")}), "sessions": len(sessions),
        "wall_s": round(sum(s.get("wall_s", 0.0) for s in sessions), 2), "generated_tokens": generated,
        "tokens_per_s": round(generated / seconds, 2) if seconds else 0.0,
        **({"judge": judge_cost(sessions)} if "judge" in shard.manifest else {}),
    }
