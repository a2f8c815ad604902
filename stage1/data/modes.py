"""The modes of a run (run.py's `Mode`), each a function of its description: `generate` (the whole run, or one shard
of it, in this process), `data_parallel` (D shard processes on this node, then their merge) and `merge` (the complete
shards of OUT into one dataset). `execute` reads what every mode needs first (the input, whole and validated, and the
model's fingerprint) and runs the one the description names.

Nothing here imports torch: the engine loads only when `generate` starts it, so a merge runs on a SLURM login node.
"""

from __future__ import annotations

import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stage1.data.card import write_card
from stage1.data.data_parallel import run_shard_processes
from stage1.data.engine import EngineFactory, load_llm, resolve_model_dir, started_engine
from stage1.data.errors import DataError
from stage1.data.manifest import (Started, completed_manifest, dataset_summary, merged_manifest, model_fingerprint,
                                  prepare_out_dir, running_manifest, session_record, write_manifest)
from stage1.data.merge import check_merge_target, load_shards, shard_report, write_merged
from stage1.data.pipeline import Pipeline, SessionStats
from stage1.data.progress import RunProgress, print_summary
from stage1.data.readers import Instruction
from stage1.data.report import write_report
from stage1.data.run import Mode, Run, implicit_identity
from stage1.data.shards import SHARDS_DIR, select, shard_counts_in
from stage1.data.writer import DatasetWriter, iter_jsonl


@dataclass(frozen=True)
class Inputs:
    """What every mode reads before it does anything."""
    instructions: list[Instruction]  # the run's, in input order (--limit applied)
    input_sha256: str  # of the whole input, before --limit: --limit may grow on --resume
    model_dir: Path
    model: dict[str, Any]  # manifest.model_fingerprint


def execute(run: Run, engine_factory: EngineFactory = load_llm) -> int:
    """Carries out `run`; returns the exit code (errors are raised: the CLI turns them into one line)."""
    started = Started()
    inputs = read_inputs(run)
    if run.mode is Mode.DATA_PARALLEL:
        data_parallel(run, inputs)
        return merge(run, inputs, run.shard_count, started)
    if run.mode is Mode.MERGE:
        return merge(run, inputs, merge_shard_count(run), started)
    return generate(run, inputs, engine_factory, started)


def read_inputs(run: Run) -> Inputs:
    instructions = run.job.read_input(run)  # all of it, validated, before anything
    input_sha256 = run.job.input_fingerprint(run, instructions)
    if run.limit:
        instructions = instructions[:run.limit]
    model_dir = resolve_model_dir(run.model)
    return Inputs(instructions, input_sha256, model_dir, model_fingerprint(model_dir))


def generate(run: Run, inputs: Inputs, engine_factory: EngineFactory, started: Started) -> int:
    """The run, or its shard (`run.shard`), in this process: into `run.where`, resumable, with its manifest."""
    out = run.where
    instructions = inputs.instructions if run.shard is None else select(inputs.instructions, *run.shard)
    identity = run.identity(inputs.model, inputs.input_sha256, 1 if run.shard is None else run.shard[1])
    previous = prepare_out_dir(out, identity, resume=run.resume, overwrite=run.overwrite, implicit=implicit_identity())
    out.mkdir(parents=True, exist_ok=True)
    with started_engine(engine_factory, inputs.model_dir, run.engine) as llm:
        writer = DatasetWriter(out)  # its files are opened (created) below, after the manifest
        goal = run.job.keep_goal(run)
        # A shard of a job with a goal dedups its own rows, so its goal counts distinct ones; the merge then finds
        # the duplicates across shards.
        pipeline = Pipeline(llm, run.settings, writer, job=run.job, job_options=run.job_options, keep_goal=goal,
                            dedup_at_merge=run.shard is not None and goal is None)
        manifest = running_manifest(run, identity, inputs.model, llm, pipeline, previous, started)
        write_manifest(out, manifest)  # before the data files exist: a crashed run is always recognised, resumable
        with writer:
            stats = _stream(run, pipeline, instructions)
        engine_info = llm.engine_info
    summary = dataset_summary(iter_jsonl(writer.data_path), iter_jsonl(writer.rejects_path),
                              eval_files=run.settings.decontaminate)
    summary.update(_goal_report(run, summary, len(instructions)))
    session = session_record(run, bool(run.resume and previous), engine_info, stats, started)
    completed = completed_manifest(manifest, summary, session)
    write_manifest(out, completed)
    if run.shard is None:  # a shard is no dataset of its own: its merge writes the card
        write_card(out, completed)
    write_report(out)  # from the files just completed: `python -m stage1.report OUT` rebuilds the same page
    print_summary(out, summary, session=session)
    _say_goal(run, summary)
    return 0


def _goal_report(run: Run, summary: dict[str, Any], attempts: int) -> dict[str, Any]:
    """For a job that generates until --count rows are kept: the goal, what was kept, and whether the cap on
    attempts stopped it first (`attempts`: how many this process could make)."""
    goal = run.job.keep_goal(run)
    if goal is None:
        return {}
    kept = summary["counts"]["kept"]
    return {"goal": {"count": run.flags.get("count"), "this_process": goal, "kept": kept,
                     "attempts": summary["counts"]["instructions"], "attempt_cap": attempts,
                     "cap_reached": kept < goal}}


def _say_goal(run: Run, summary: dict[str, Any]) -> None:
    goal = summary.get("goal")
    if goal is None:
        return
    if goal["cap_reached"]:
        where = "a shard" if "merged" in goal else f"kept {goal['kept']} of {goal['this_process']} after " \
            f"{goal['attempts']} attempts"
        print(f"  stopped at the cap on attempts ({where}); to go on, rerun with --resume and a larger --max-attempts")
    if "merged" in goal and goal["kept"] < goal["count"]:
        missing = goal["count"] - goal["kept"]
        print(f"  {goal['kept']} of --count {goal['count']} remain after the cross-shard dedup; to top up, rerun the "
              f"same command with --resume --count {goal['count'] + missing} (the rows there stay as they are)")


def _stream(run: Run, pipeline: Pipeline, instructions: list[Instruction]) -> SessionStats:
    """The rows already on disk taken in (a resumed run), then the streaming loop with its progress display."""
    writer = pipeline.writer
    if writer.repaired_bytes:
        print(f"repaired {writer.out_dir}: dropped a partial last line ({writer.repaired_bytes} bytes) left by a "
              "crash", file=sys.stderr)
        pipeline.stats.repaired_bytes = writer.repaired_bytes
    if run.resume:
        pipeline.load_existing()
    todo, total = pipeline.todo(instructions)
    if pipeline.keep_goal is None:
        _say(run, f"{len(instructions)} instructions, {len(instructions) - len(todo)} already done, {total} "
                  f"completions to generate -> {writer.out_dir}")
    else:  # its input is the cap on attempts, not what it will make
        _say(run, f"keeping {pipeline.keep_goal} ({pipeline.kept_on_disk} kept already), at most {len(todo)} more "
                  f"attempts -> {writer.out_dir}")
    progress = None
    if run.progress and total:
        # a job with a keep goal counts kept rows toward it (--count), not attempts
        progress = RunProgress(len(todo), pipeline.llm.stats, tty=sys.stderr.isatty(), goal=pipeline.keep_goal,
                               kept_before=pipeline.kept_on_disk)
        pipeline.on_step = progress.update
    stats = None
    try:
        stats = pipeline.run(instructions)
    finally:
        if progress is not None:
            progress.close(stats)
    return stats


def data_parallel(run: Run, inputs: Inputs) -> None:
    """The run's D shards, one process each (data_parallel.py); refused before any starts if their merge could not be
    written. The caller merges them."""
    identity = run.identity(inputs.model, inputs.input_sha256, run.shard_count)
    if run.overwrite:
        shutil.rmtree(run.out / SHARDS_DIR, ignore_errors=True)
    check_merge_target(run.out, identity, implicit_identity(), replace=run.overwrite)
    ran = run_shard_processes(run.job.cli, list(run.argv), run.out, run.shard_count, run.engine.tensor_parallel_size,
                              run.engine.device, run.resume)
    _say(run, f"{len(ran)} shard processes done; merging {run.shard_count} shards into {run.out}")


def merge(run: Run, inputs: Inputs, count: int, started: Started) -> int:
    """The `count` shards of OUT into one dataset (merge.py); every check passes before anything is written."""
    identity = run.identity(inputs.model, inputs.input_sha256, count)
    implicit = implicit_identity()
    until_kept = run.job.keep_goal(run) is not None
    shards = load_shards(run.out, count, identity, implicit, inputs.instructions, run.settings.n, until_kept=until_kept)
    check_merge_target(run.out, identity, implicit, replace=run.overwrite)
    merged = write_merged(run.out, shards, inputs.instructions, run.settings, run.job)
    if until_kept:
        reached = all(not s.manifest.get("goal", {}).get("cap_reached") for s in shards)
        merged.summary["goal"] = {"count": run.flags.get("count"), "kept": merged.summary["counts"]["kept"],
                                  "merged": count, "cap_reached": not reached}
    manifest = merged_manifest(run, identity, shards[0].manifest, merged.summary, [shard_report(s) for s in shards],
                               merged.dedup_rejected, started)
    write_manifest(run.out, manifest)
    write_card(run.out, manifest)
    write_report(run.out)
    print_summary(run.out, merged.summary, merged=(count, merged.dedup_rejected))
    _say_goal(run, merged.summary)
    return 0


def merge_shard_count(run: Run) -> int:
    """--num-shards, or the one shard count OUT/shards holds."""
    counts = shard_counts_in(run.out)
    if run.shard_count is not None:
        return run.shard_count
    if len(counts) == 1:
        return counts[0]
    if not counts:
        raise DataError(f"{run.out}: no shards to merge (no {run.out / SHARDS_DIR}/I-of-N directories); run the shards "
                        "first")
    raise DataError(f"{run.out / SHARDS_DIR} holds shards of {' and '.join(map(str, counts))}-shard runs; pass "
                    "--num-shards to say which to merge (and move the others away)")


def _say(run: Run, message: str) -> None:
    if run.progress:
        print(message, file=sys.stderr)
