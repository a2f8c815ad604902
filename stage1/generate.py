"""python -m stage1.generate: turn instructions into an SFT dataset by prompting a BASE model with few-shot,
completion-style prompts, storing exactly the prompt the model saw.

Writes <out>/data.jsonl (kept rows), <out>/rejects.jsonl (filtered rows, each with its reason) and <out>/manifest.json
(model, code version, arguments, counts). See --help.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shlex
import shutil
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from stage1.data.engine import Engine
from stage1.data.errors import DataError, PromptMismatchError, ShardFailedError
from stage1.data.filters import COPY_THRESHOLD, NEAR_DUP_THRESHOLD
from stage1.data.data_parallel import run_shard_processes
from stage1.data.manifest import (
    FORMAT,
    code_version,
    dataset_summary,
    model_fingerprint,
    now,
    prepare_out_dir,
    write_manifest,
)
from stage1.data.merge import check_merge_target, load_shards, shard_report, write_merged
from stage1.data.pipeline import Pipeline, SessionStats
from stage1.data.progress import RunProgress
from stage1.data.prompts import load_styles, pool_fingerprint
from stage1.data.readers import instructions_fingerprint, read_instructions
from stage1.data.settings import GenerationConfig, add_sampling_flags, from_args
from stage1.data.shards import SHARDS_DIR, resolve_shard, select, shard_counts_in, shard_dir, shard_name
from stage1.data.writer import DATA_FILE, REJECTS_FILE, DatasetWriter, iter_jsonl

DEFAULT_OUT = "out/stage1-sft"

DESCRIPTION = """\
Generate a supervised fine-tuning (SFT) dataset from a list of instructions with a BASE model.

Each instruction becomes a few-shot, completion-style prompt (a header line and 3-4 example prompt/completion pairs
drawn from a built-in pool, then the instruction), with no chat template and no special tokens. The model's
continuation up to the next blank line is the response. Every row stores the exact prompt the engine tokenized.

Output (in --out): data.jsonl (one row per kept completion), rejects.jsonl (every filtered completion with its
reason: empty, run_on, control_token, scaffolding, repetition, example_copy, instruction_echo, exact_duplicate,
near_duplicate, prompt_too_long), manifest.json (model, code version, arguments, counts, tokens/s).

Instructions stream through the engine: new ones enter as others finish (up to --max-num-seqs sequences at once),
and rows are written in input order, every --batch-size instructions. A run is reproducible: each row's seed is
derived from --seed and the row's id, so the same arguments give the same data file whatever --batch-size and
--max-num-seqs, and --resume after a crash, a kill or Ctrl-C finishes it exactly as an uninterrupted run (the rows on
disk say what is done; a line cut short by a kill is dropped).

Progress goes to stderr: a bar on a terminal, one line a minute otherwise (a SLURM log). The manifest's sessions
report the tail: decode steps that ran below half of --max-num-seqs and their share of the time."""

EPILOG = """\
examples:
  python -m stage1.generate                                   # built-in instructions, default model
  python -m stage1.generate --model ~/models/Qwen2.5-0.5B --limit 20 --out /tmp/try
  python -m stage1.generate --instructions mine.jsonl --n 4 --style qa --out out/mine
  python -m stage1.generate --instructions mine.jsonl --n 4 --style qa --out out/mine --resume

many processes (README: "Many GPUs and nodes"):
  python -m stage1.generate --instructions mine.jsonl --out out/mine --dp 8     # 8 engines on this node, merged
  python -m stage1.generate --instructions mine.jsonl --out out/mine --tp 2 --dp 4 --resume
  python -m stage1.generate --instructions mine.jsonl --out out/mine --num-shards 16 --shard-index 3
  python -m stage1.generate --instructions mine.jsonl --out out/mine --merge   # once all 16 are complete
  python -m stage1.launch slurm --array 16 --gpus-per-task 1 -- --instructions mine.jsonl --out out/mine

instruction files:
  .jsonl / .ndjson: one JSON object per line with "instruction" (required), "id", "type", "source" (optional);
                    other fields are copied into every output row.
  anything else:    plain text, one instruction per line (blank lines ignored); ids are hashes of the text.

exit codes: 0 done, 1 the run stopped (engine/prompt mismatch, disk error), 2 bad input or usage, 130 interrupted."""


def _builtin_summary() -> str:
    builtin = read_instructions()
    return f"{len(builtin)} instructions of {len({i.type for i in builtin})} types"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m stage1.generate", description=DESCRIPTION, epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    io = p.add_argument_group("input and output")
    io.add_argument("--model", metavar="DIR",
                    help="model directory (config.json, tokenizer.json, *.safetensors); default: the stage1 default "
                         "model (see python -m stage1.models)")
    io.add_argument("--instructions", metavar="FILE",
                    help=f"instructions, JSONL or plain text (default: the built-in set, {_builtin_summary()})")
    io.add_argument("--format", choices=("auto", "jsonl", "text"), default="auto",
                    help="how to read --instructions (default: auto, by file suffix)")
    io.add_argument("--out", metavar="DIR", default=DEFAULT_OUT, help="output directory (default: %(default)s)")
    io.add_argument("--limit", type=int, metavar="N", help="use only the first N instructions")
    io.add_argument("--resume", action="store_true",
                    help="continue the run in --out: skip completions already written, generate the rest")
    io.add_argument("--overwrite", action="store_true", help="delete the run in --out and start again")

    gen = p.add_argument_group("generation")
    gen.add_argument("--style", choices=sorted(load_styles()), default="completion",
                     help="prompt style: completion (header + prompt/completion examples, the default) or qa "
                          "(Q: ... / A: ... pairs)")
    add_sampling_flags(gen)  # --temperature, --top-p, ...: one per sampling field of GenerationConfig
    gen.add_argument("--seed", type=int, default=0, metavar="S",
                     help="run seed; row seeds derive from it (default: %(default)s)")
    gen.add_argument("--batch-size", type=int, default=64, metavar="N",
                     help="rows are saved (appended and fsynced, in input order) each time N more instructions are "
                          "done; a kill loses at most those in memory (default: %(default)s)")

    flt = p.add_argument_group("filters")
    flt.add_argument("--allow-run-on", action="store_true",
                     help="keep completions that hit --max-tokens instead of rejecting them")
    flt.add_argument("--no-near-dedup", action="store_true", help="turn off the MinHash near-duplicate filter")
    flt.add_argument("--near-dup-threshold", type=float, default=NEAR_DUP_THRESHOLD, metavar="J",
                     help="estimated Jaccard similarity above which a response is a near-duplicate (default: "
                          "%(default)s)")
    flt.add_argument("--copy-threshold", type=float, default=COPY_THRESHOLD, metavar="F",
                     help="ROUGE-L F above which a response copies one of its few-shot examples (default: "
                          "%(default)s)")

    eng = p.add_argument_group("engine")
    eng.add_argument("--dtype", default="auto", metavar="DTYPE", help="model dtype: auto, bfloat16, float16, float32")
    eng.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    eng.add_argument("--kernels", default="auto", choices=["auto", "torch", "triton", "native"],
                     help="the engine's kernels: auto (Triton on a GPU, stage1._C's native ops on a CPU where built), "
                          "torch (the plain-PyTorch reference), triton, native (default: %(default)s)")
    eng.add_argument("--max-model-len", type=int, metavar="N", help="context limit in tokens (default: the model's)")
    eng.add_argument("--max-num-seqs", type=int, default=256, metavar="N",
                     help="most sequences generating at once (--n samples of an instruction are n); new instructions "
                          "enter as others finish (default: %(default)s)")
    eng.add_argument("--tensor-parallel-size", "--tp", type=int, default=1, metavar="N",
                     help="split the model over N GPUs of this node (N processes, started by the engine; on a CPU, N "
                          "ranks sharing its cores); N must divide the attention heads (Qwen2.5-32B: 1, 2, 4, 8) "
                          "(default: %(default)s)")
    eng.add_argument("--no-prefix-caching", action="store_true",
                     help="compute every prompt in full (by default prompts that share a few-shot prefix compute it "
                          "once)")
    eng.add_argument("--no-progress", action="store_true", help="no progress bars")

    par = p.add_argument_group("many processes (see the README: one node, many nodes with SLURM)")
    par.add_argument("--data-parallel-size", "--dp", type=int, default=1, metavar="D",
                     help="run D engine processes on this node, one shard each, each on its own "
                          "--tensor-parallel-size GPUs (D x T in all; on a CPU, each with its share of the cores), "
                          "then merge them into --out (default: %(default)s)")
    par.add_argument("--num-shards", type=int, metavar="N",
                     help="run one shard of N: the instructions whose id hashes to --shard-index, written to "
                          "OUT/shards/I-of-N/ (default: $SLURM_ARRAY_TASK_COUNT in a SLURM array task, else unsharded)")
    par.add_argument("--shard-index", type=int, metavar="I",
                     help="which shard, 0..N-1 (default: $SLURM_ARRAY_TASK_ID in a SLURM array task)")
    par.add_argument("--merge", action="store_true",
                     help="merge the complete shards of --out (pass the run's arguments) into OUT/data.jsonl, "
                          "rejects.jsonl and manifest.json, with the exact and near-duplicate filters over all of them "
                          "in input order; N is read from OUT/shards unless --num-shards is given")
    return p


def main(argv: list[str] | None = None, llm_factory: Callable[[Path, argparse.Namespace], Engine] | None = None) -> int:
    """`llm_factory(model_dir, args)` makes the engine (tests pass a fake one); default: stage1.LLM."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    try:
        return _run(args, argv, llm_factory or _load_llm)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except PromptMismatchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except OSError as e:  # disk full, permissions: the run stops where it was, its rows intact
        if args.merge:  # the merge writes beside OUT's files and renames them in only once whole (merge.py)
            print(f"error: {e}; the merge left OUT's files and the shards as they were: fix this and rerun the "
                  "same --merge command", file=sys.stderr)
        else:
            print(f"error: {e}; rows written so far are intact, fix this and rerun with --resume", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted: the rows written so far are intact; rerun with --resume to continue", file=sys.stderr)
        return 130
    except ShardFailedError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except RuntimeError as e:
        from stage1.engine.tp_workers import WorkerDiedError
        if not isinstance(e, WorkerDiedError):
            raise
        print(f"error: {e}; rows written so far are intact, rerun with --resume", file=sys.stderr)
        return 1


def _check_args(args: argparse.Namespace) -> None:
    """What is not sampling (SamplingParams checks that, through GenerationConfig.validated)."""
    checks = [
        (args.batch_size >= 1, "--batch-size must be at least 1"),
        (args.max_num_seqs >= 1, "--max-num-seqs must be at least 1"),
        (args.limit is None or args.limit >= 1, "--limit must be at least 1"),
        (0 < args.near_dup_threshold <= 1, "--near-dup-threshold must be in (0, 1]"),
        (0 < args.copy_threshold <= 1, "--copy-threshold must be in (0, 1]"),
        (args.max_model_len is None or args.max_model_len >= 1, "--max-model-len must be at least 1"),
        (args.tensor_parallel_size >= 1, "--tensor-parallel-size must be at least 1"),
        (args.data_parallel_size >= 1, "--data-parallel-size must be at least 1"),
        (not (args.merge and args.shard_index is not None),
         "--merge merges every shard; drop --shard-index (and run each shard without --merge)"),
        (not (args.merge and args.data_parallel_size > 1),
         "--data-parallel-size merges by itself when its shards are done; drop --merge"),
    ]
    for ok, message in checks:
        if not ok:
            raise DataError(message)


def resolve_model_dir(model: str | None) -> Path:
    if model:
        path = Path(model).expanduser()
        if path.is_file() and path.suffix.lower() == ".gguf":
            raise DataError(f"--model {model}: a GGUF file; convert it once with python -m stage1.models import-gguf "
                            f"{model} OUT_DIR and pass --model OUT_DIR")
        if not path.is_dir() or not (path / "config.json").is_file():
            raise DataError(f"--model {model}: not a model directory (it needs config.json, tokenizer.json and "
                            "*.safetensors); pass the directory of a Hugging Face checkpoint")
        return path
    try:
        from stage1.models import resolve_model
    except ImportError:
        raise DataError("no --model given and this install has no default model (stage1.models); pass --model DIR, "
                        "the directory of a Qwen2.5 base checkpoint (config.json, tokenizer.json, *.safetensors)"
                        ) from None
    try:
        return Path(resolve_model(None))
    except Exception as e:  # noqa: BLE001 - any failure to get the default model becomes one clear line
        raise DataError(f"no --model given and the default model is not available ({e}); fetch it with "
                        "python -m stage1.models fetch, or pass --model DIR") from None


def _load_llm(model_dir: Path, args: argparse.Namespace) -> Engine:
    try:
        from stage1 import LLM
    except ImportError as e:
        raise DataError(f"the stage1 engine can't be imported ({e}); reinstall stage1 (pip install -e .)") from None
    try:
        return LLM(str(model_dir), dtype=args.dtype, device=args.device, kernels=args.kernels,
                   max_model_len=args.max_model_len,
                   max_num_seqs=args.max_num_seqs, enable_prefix_caching=not args.no_prefix_caching,
                   tensor_parallel_size=args.tensor_parallel_size)
    except (OSError, ValueError) as e:
        raise DataError(f"could not load the model in {model_dir}: {e}") from None


@contextlib.contextmanager
def _started_engine(llm_factory, model_dir: Path, args: argparse.Namespace):
    """The engine for the run, shut down after it (its tensor-parallel workers end with it)."""
    llm = llm_factory(model_dir, args)
    try:
        yield llm
    finally:
        llm.shutdown()


def _identity(config: GenerationConfig, args: argparse.Namespace, model: dict[str, Any], input_sha: str,
              num_shards: int) -> dict[str, Any]:
    """What decides the rows: two runs with equal identities write the same files."""
    return {
        "model_path": model["path"], "model_config_sha256": model["config_sha256"],
        "model_tokenizer_sha256": model["tokenizer_sha256"], "instructions_sha256": input_sha,
        "prompt_data_sha256": pool_fingerprint(), **config.identity(), "max_model_len": args.max_model_len,
        # the arithmetic: rows can differ with the dtype, the kernels and (in bf16) the all-reduce's summation order
        "dtype": args.dtype, "kernels": args.kernels, "tensor_parallel_size": args.tensor_parallel_size,
        "num_shards": num_shards,  # a shard's rows skip the dataset-wide filters (its merge runs them)
    }


def _implicit_identity() -> dict[str, Any]:
    """What an identity entry stands for in a manifest written before that entry existed."""
    return {**GenerationConfig.identity_defaults(), "dtype": "auto", "kernels": "auto", "tensor_parallel_size": 1,
            "num_shards": 1}


def _shard_of_run(args: argparse.Namespace) -> tuple[int, int] | None:
    """(index, count) of the shard this process runs; None for a whole run (unsharded, data parallel, a merge)."""
    if args.merge:
        return None
    shard = resolve_shard(args.num_shards, args.shard_index)
    if args.data_parallel_size > 1:
        if shard is not None:
            raise DataError(f"--data-parallel-size {args.data_parallel_size} runs its own shards, so it can't also "
                            "run one shard of another split (--num-shards/--shard-index, or a SLURM array task); "
                            "on many nodes, run an array of N x D shards with one engine each "
                            "(python -m stage1.launch slurm)")
    return shard


def _merge_shard_count(args: argparse.Namespace, out: Path) -> int:
    counts = shard_counts_in(out)
    if args.num_shards is not None:
        return args.num_shards
    if len(counts) == 1:
        return counts[0]
    if not counts:
        raise DataError(f"{out}: no shards to merge (no {out / 'shards'}/I-of-N directories); run the shards first")
    raise DataError(f"{out / 'shards'} holds shards of {' and '.join(map(str, counts))}-shard runs; pass "
                    "--num-shards to say which to merge (and move the others away)")


def _run(args: argparse.Namespace, argv: list[str], llm_factory) -> int:
    started, t_wall = now(), time.perf_counter()
    config = from_args(args)
    _check_args(args)
    shard = _shard_of_run(args)
    instructions = read_instructions(args.instructions, args.format)  # all of it, validated, before anything else
    input_sha = instructions_fingerprint(instructions)
    if args.limit:
        instructions = instructions[:args.limit]
    model_dir = resolve_model_dir(args.model)
    model = model_fingerprint(model_dir)
    if args.merge or args.data_parallel_size > 1:
        count = args.data_parallel_size if args.data_parallel_size > 1 else _merge_shard_count(args, Path(args.out))
        identity = _identity(config, args, model, input_sha, count)
        if args.data_parallel_size > 1:
            _run_data_parallel(args, argv, identity)
        return _merge(args, argv, config, identity, instructions, count, started, t_wall)

    out = Path(args.out)
    if shard is not None:
        instructions = select(instructions, *shard)
        out = shard_dir(out, *shard)
    identity = _identity(config, args, model, input_sha, 1 if shard is None else shard[1])
    previous = prepare_out_dir(out, identity, resume=args.resume, overwrite=args.overwrite,
                               implicit=_implicit_identity())

    out.mkdir(parents=True, exist_ok=True)
    with _started_engine(llm_factory, model_dir, args) as llm:
        writer = DatasetWriter(out)  # its files are opened (created) below, after the manifest
        pipeline = Pipeline(llm, config, writer, dedup_at_merge=shard is not None)
        manifest = _initial_manifest(args, argv, identity, model, llm, pipeline, previous, started, shard)
        write_manifest(out, manifest)  # before the data files exist: a crashed run is always recognised, resumable
        with writer:
            stats = _generate(args, out, pipeline, instructions)
        engine = llm.engine_info

    summary = dataset_summary(iter_jsonl(writer.data_path), iter_jsonl(writer.rejects_path))
    session = {"started_at": started, "finished_at": now(), "resumed": bool(args.resume and previous),
               **_this_process(), "engine": engine, "wall_s": round(time.perf_counter() - t_wall, 2),
               **stats.as_dict()}
    manifest.update(status="complete", updated_at=now(), **summary, sessions=manifest["sessions"] + [session])
    write_manifest(out, manifest)
    _print_summary(out, summary, session)
    return 0


def _this_process() -> dict[str, Any]:
    return {"host": socket.gethostname(), "pid": os.getpid()}


def _run_data_parallel(args: argparse.Namespace, argv: list[str], identity: dict[str, Any]) -> None:
    """The shards, one process each; refused before any starts if their merge could not be written."""
    out = Path(args.out)
    if args.overwrite:
        shutil.rmtree(out / SHARDS_DIR, ignore_errors=True)
    check_merge_target(out, identity, _implicit_identity(), replace=args.overwrite)
    ran = run_shard_processes(argv, out, args.data_parallel_size, args.tensor_parallel_size, args.device,
                              args.resume)
    _say(args, f"{len(ran)} shard processes done; merging {args.data_parallel_size} shards into {out}")


def _merge(args: argparse.Namespace, argv: list[str], config: GenerationConfig, identity: dict[str, Any],
           instructions: list, count: int, started: str, t_wall: float) -> int:
    """The shards of --out into one dataset (merge.py); every check passes before anything is written."""
    out = Path(args.out)
    implicit = _implicit_identity()
    shards = load_shards(out, count, identity, implicit, instructions, config.n)
    check_merge_target(out, identity, implicit, replace=args.overwrite)
    merged = write_merged(out, shards, instructions, config)
    summary = merged.summary
    first = shards[0].manifest
    manifest = {
        "format": FORMAT, "status": "complete", "created_at": started, "updated_at": now(),
        "command": shlex.join(["python", "-m", "stage1.generate", *argv]),
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "identity": identity, "model": first.get("model"), "code": code_version(),
        "generation": first.get("generation"), "files": {"data": DATA_FILE, "rejects": REJECTS_FILE}, **summary,
        "merge": {**_this_process(), "wall_s": round(time.perf_counter() - t_wall, 2),
                  "dataset_filter_rejected": merged.dedup_rejected},
        "merged_shards": [shard_report(s) for s in shards],
    }
    write_manifest(out, manifest)
    c = summary["counts"]
    reasons = ", ".join(f"{k} {v}" for k, v in summary["rejected_by_reason"].items()) or "none"
    print(f"merged {count} shards: {c['instructions']} instructions, {c['completions']} completions: {c['kept']} kept, "
          f"{c['rejected']} rejected ({reasons}; {merged.dedup_rejected} of them by the dataset-wide filters at the "
          f"merge)")
    print(f"  data:     {out / DATA_FILE}\n  rejects:  {out / REJECTS_FILE}\n  manifest: {out / 'manifest.json'}")
    return 0


def _generate(args: argparse.Namespace, out: Path, pipeline: Pipeline, instructions: list) -> SessionStats:
    """The rows already on disk taken in (a resumed run), then the streaming loop with its progress display."""
    writer = pipeline.writer
    if writer.repaired_bytes:
        print(f"repaired {out}: dropped a partial last line ({writer.repaired_bytes} bytes) left by a crash",
              file=sys.stderr)
        pipeline.stats.repaired_bytes = writer.repaired_bytes
    if args.resume:
        pipeline.load_existing()
    todo, total = pipeline.todo(instructions)
    _say(args, f"{len(instructions)} instructions, {len(instructions) - len(todo)} already done, "
               f"{total} completions to generate -> {out}")
    progress = None
    if not args.no_progress and total:
        progress = RunProgress(total, pipeline.llm.stats, tty=sys.stderr.isatty())
        pipeline.on_step = progress.update
    stats = None
    try:
        stats = pipeline.run(instructions)
    finally:
        if progress is not None:
            progress.close(stats)
    return stats


def _initial_manifest(args, argv, identity, model, llm, pipeline, previous, started, shard) -> dict[str, Any]:
    return {
        "format": FORMAT, "status": "running",
        **({} if shard is None else {"shard": {"index": shard[0], "count": shard[1], "name": shard_name(*shard)}}),
        "running_on": _this_process(),
        "created_at": previous["created_at"] if previous else started, "updated_at": started,
        "command": shlex.join(["python", "-m", "stage1.generate", *argv]),
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "identity": identity,
        "model": {**model, "max_model_len": llm.max_model_len, "eos_token_ids": list(llm.eos_token_ids),
                  "vocab_size": llm.vocab_size},
        "code": code_version(),
        "generation": {"style": args.style, "stop": list(pipeline.prompts.style.stop),
                       "stop_token_ids": pipeline.stop_token_ids, **pipeline.config.sampling_fields(),
                       "seed": args.seed, "row_seed": "int.from_bytes(sha256(f'{seed}:{id}')[:8], 'big') >> 1"},
        "files": {"data": pipeline.writer.data_path.name, "rejects": pipeline.writer.rejects_path.name},
        "sessions": list(previous.get("sessions", [])) if previous else [],
    }


def _say(args: argparse.Namespace, message: str) -> None:
    if not args.no_progress:
        print(message, file=sys.stderr)


def _print_summary(out: Path, summary: dict[str, Any], session: dict[str, Any]) -> None:
    c = summary["counts"]
    reasons = ", ".join(f"{k} {v}" for k, v in summary["rejected_by_reason"].items()) or "none"
    print(f"{c['instructions']} instructions, {c['completions']} completions: {c['kept']} kept, {c['rejected']} "
          f"rejected ({reasons})")
    print(f"  data:     {out / 'data.jsonl'}\n  rejects:  {out / 'rejects.jsonl'}\n  manifest: {out / 'manifest.json'}")
    print(f"  this session: {session['generated_tokens']} tokens generated in {session['generate_seconds']:.1f} s "
          f"({session['tokens_per_s']:.1f} tokens/s), wall {session['wall_s']:.1f} s")
    print(f"  tail: {session['low_occupancy_decode_steps']} of {session['decode_steps']} decode steps ran below half "
          f"of --max-num-seqs, {session['low_occupancy_decode_seconds']:.1f} s "
          f"({100 * session['low_occupancy_share']:.1f}% of the generation time)")


if __name__ == "__main__":
    sys.exit(main())
