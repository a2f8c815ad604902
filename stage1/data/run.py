"""The run description: what one command asks for (the job kind, its settings, input and output, the engine's options,
the mode), built once from the command line and checked there; the modes (modes.py) carry it out and the manifest
(manifest.py) records it.

The flags every job kind shares (input and output, engine, many processes) are declared here, next to the code that
reads them; a job's CLI adds its own (prompt style, sampling, filters: settings.py) between them.
"""

from __future__ import annotations

import argparse
import enum
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from stage1.data.decontaminate import eval_identity
from stage1.data.judge import judge_styles_fingerprint
from stage1.data.errors import DataError
from stage1.data.jobs import RESPONSES, JobKind
from stage1.data.readers import DEFAULT_FIELD, FORMATS
from stage1.data.settings import GenerationConfig, from_args
from stage1.data.shards import resolve_shard, shard_dir
from stage1.engine.kernel_choices import CHOICES as KERNEL_CHOICES


@dataclass(frozen=True)
class EngineOptions:
    """How to start the engine (stage1.LLM's arguments); the defaults are the CLI's."""
    dtype: str = "auto"
    device: str = "auto"
    kernels: str = "auto"
    max_model_len: int | None = None  # None: the model's
    max_num_seqs: int = 256
    tensor_parallel_size: int = 1
    prefix_caching: bool = True

    def identity(self) -> dict[str, Any]:
        """What of the engine decides the rows: the context limit and the arithmetic (rows can differ with the dtype,
        the kernels and, in bf16, the all-reduce's summation order)."""
        return {"max_model_len": self.max_model_len, "dtype": self.dtype, "kernels": self.kernels,
                "tensor_parallel_size": self.tensor_parallel_size}

    def llm_kwargs(self) -> dict[str, Any]:
        return {**{k: v for k, v in asdict(self).items() if k != "prefix_caching"},
                "enable_prefix_caching": self.prefix_caching}


class Mode(enum.Enum):
    SINGLE = "single"  # the whole run in this process, into OUT
    SHARD = "shard"  # one shard of N in this process, into OUT/shards/I-of-N
    DATA_PARALLEL = "data-parallel"  # D shard processes on this node, then their merge
    MERGE = "merge"  # the complete shards of OUT into OUT


@dataclass(frozen=True)
class Run:
    job: JobKind
    mode: Mode
    settings: GenerationConfig  # validated
    engine: EngineOptions
    out: Path  # --out: the run's directory (a shard writes under it: `where`)
    model: str | None  # --model as given (None: the default model); modes.py resolves it
    instructions: str | None  # None: the job's built-in input
    input_format: str
    instruction_field: str  # the input's column (JSON field) holding the instructions
    instruction_split: str | None  # which split of a saved DatasetDict (None: its only one)
    limit: int | None
    resume: bool
    overwrite: bool
    progress: bool
    shard: tuple[int, int] | None = None  # SHARD: (index, count)
    # DATA_PARALLEL: D; MERGE: --num-shards, None to read it from OUT/shards
    shard_count: int | None = None
    argv: tuple[str, ...] = ()  # the command line as given (the manifest's command; what shard processes rerun)
    flags: dict[str, Any] = field(default_factory=dict)  # every flag's parsed value, as the manifest records them
    job_options: Any = None  # the job's own flags, read and checked (JobKind.options_from_args)

    @property
    def where(self) -> Path:
        """The directory this process writes its rows to."""
        return self.out if self.shard is None else shard_dir(self.out, *self.shard)

    def identity(self, model: dict[str, Any], input_sha256: str, num_shards: int) -> dict[str, Any]:
        """What decides the rows: two runs with equal identities write the same files. `model`: its fingerprint
        (manifest.model_fingerprint); `input_sha256`: the whole input's, before --limit."""
        return {
            "job": self.job.name, "model_path": model["path"], "model_config_sha256": model["config_sha256"],
            "model_tokenizer_sha256": model["tokenizer_sha256"], "instructions_sha256": input_sha256,
            "prompt_data_sha256": self.job.prompt_data_fingerprint(), **self.settings.identity(),
            "decontaminate": eval_identity(self.settings.decontaminate, self.settings.decontaminate_fields),
            "judge_styles_sha256": judge_styles_fingerprint() if self.settings.judge else None,
            **self.engine.identity(),
            "num_shards": num_shards,  # a shard's rows skip the dataset-wide filters (its merge runs them)
        }


def implicit_identity() -> dict[str, Any]:
    """What an identity entry stands for in a manifest written before that entry existed: the behaviour runs had
    then (the main job, each setting's default, one shard)."""
    return {"job": RESPONSES.name, **GenerationConfig.identity_defaults(), **EngineOptions().identity(),
            "num_shards": 1, "decontaminate": None, "judge_styles_sha256": None}


def add_input_output_flags(p: argparse.ArgumentParser, *, input_help: str | None, default_out: str) -> None:
    """`input_help` None: the job reads no input file (--instructions, --format and --limit are left out)."""
    io = p.add_argument_group("input and output")
    io.add_argument("--model", metavar="DIR",
                    help="model directory (config.json, tokenizer.json, *.safetensors); default: the stage1 default "
                         "model (see python -m stage1.models)")
    if input_help is not None:
        io.add_argument("--instructions", metavar="FILE", help=input_help)
        io.add_argument("--format", choices=FORMATS, default="auto",
                        help="how to read --instructions (default: auto: a directory is a `datasets` one saved with "
                             "save_to_disk, else by file suffix: .jsonl/.ndjson, .parquet/.pq, anything else text)")
        io.add_argument("--instruction-field", default=DEFAULT_FIELD, metavar="NAME",
                        help="the column (JSONL field) of --instructions that holds the instructions (default: "
                             "%(default)s)")
        io.add_argument("--instruction-split", metavar="NAME",
                        help="the split to read when --instructions is a saved DatasetDict of several")
    io.add_argument("--out", metavar="DIR", default=default_out, help="output directory (default: %(default)s)")
    if input_help is not None:
        io.add_argument("--limit", type=int, metavar="N", help="use only the first N instructions")
    io.add_argument("--resume", action="store_true",
                    help="continue the run in --out: skip completions already written, generate the rest")
    io.add_argument("--overwrite", action="store_true", help="delete the run in --out and start again")


def add_engine_and_parallel_flags(p: argparse.ArgumentParser) -> None:
    d = EngineOptions()
    eng = p.add_argument_group("engine")
    eng.add_argument("--dtype", default=d.dtype, metavar="DTYPE",
                     help="model dtype: auto, bfloat16, float16, float32")
    eng.add_argument("--device", default=d.device, help="auto, cpu, cuda, cuda:N")
    eng.add_argument("--kernels", default=d.kernels, choices=KERNEL_CHOICES,
                     help="the engine's kernels: auto (Triton on a GPU, stage1._C's native ops on a CPU where built), "
                          "torch (the plain-PyTorch reference), triton, native (default: %(default)s)")
    eng.add_argument("--max-model-len", type=int, metavar="N", help="context limit in tokens (default: the model's)")
    eng.add_argument("--max-num-seqs", type=int, default=d.max_num_seqs, metavar="N",
                     help="most sequences generating at once (--n samples of an instruction are n); new instructions "
                          "enter as others finish (default: %(default)s)")
    eng.add_argument("--tensor-parallel-size", "--tp", type=int, default=d.tensor_parallel_size, metavar="N",
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


def build_run(job: JobKind, args: argparse.Namespace, argv: list[str]) -> Run:
    """The run a parsed command line describes, checked (DataError naming the flag)."""
    settings = from_args(args)  # sampling values are checked by SamplingParams itself
    _check(args)
    engine = EngineOptions(dtype=args.dtype, device=args.device, kernels=args.kernels, max_model_len=args.max_model_len,
                           max_num_seqs=args.max_num_seqs, tensor_parallel_size=args.tensor_parallel_size,
                           prefix_caching=not args.no_prefix_caching)
    shard = None if args.merge else resolve_shard(args.num_shards, args.shard_index)
    if args.merge:
        mode, count = Mode.MERGE, args.num_shards
    elif args.data_parallel_size > 1:
        if shard is not None:
            raise DataError(f"--data-parallel-size {args.data_parallel_size} runs its own shards, so it can't also "
                            "run one shard of another split (--num-shards/--shard-index, or a SLURM array task); "
                            "on many nodes, run an array of N x D shards with one engine each "
                            "(python -m stage1.launch slurm)")
        mode, count = Mode.DATA_PARALLEL, args.data_parallel_size
    else:
        mode, count = (Mode.SINGLE, None) if shard is None else (Mode.SHARD, shard[1])
    given = vars(args)  # a job without an input file has no --instructions, --format, --limit
    return Run(job=job, mode=mode, settings=settings, engine=engine, out=Path(args.out), model=args.model,
               instructions=given.get("instructions"), input_format=given.get("format", "auto"),
               instruction_field=given.get("instruction_field", DEFAULT_FIELD),
               instruction_split=given.get("instruction_split"),
               limit=given.get("limit"), resume=args.resume,
               overwrite=args.overwrite, progress=not args.no_progress, shard=shard, shard_count=count,
               argv=tuple(argv), flags={k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
               job_options=job.options_from_args(args))


def _check(args: argparse.Namespace) -> None:
    """What is not sampling (SamplingParams checks that, through GenerationConfig.validated)."""
    checks = [
        (args.batch_size >= 1, "--batch-size must be at least 1"),
        (args.max_num_seqs >= 1, "--max-num-seqs must be at least 1"),
        (vars(args).get("limit") is None or args.limit >= 1, "--limit must be at least 1"),
        (0 < args.near_dup_threshold <= 1, "--near-dup-threshold must be in (0, 1]"),
        (0 < args.copy_threshold <= 1, "--copy-threshold must be in (0, 1]"),
        (not args.decontaminate_field or args.decontaminate,
         "--decontaminate-field names fields of the --decontaminate files; pass those files too"),
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

