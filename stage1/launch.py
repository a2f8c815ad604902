"""python -m stage1.launch slurm [options] -- <generate args>: one run of `python -m stage1.generate` as a SLURM job
array of shards, then a merge job, through submitit (`pip install "stage1[slurm]"`).

Shard I of N is one array task running `stage1.generate.main(<generate args> --num-shards N --shard-index I --resume)`
in the task's process. Tasks always pass --resume: it starts a shard that was never started and finishes one that
was cut short, so a task that is requeued (preempted, or at its time limit) ends with the bytes of an uninterrupted
run. The merge (`--merge --num-shards N`, no GPU) runs once every task has succeeded: on SLURM it is submitted at
once with `--dependency=afterok:<array id>`; with `--cluster local` (submitit's LocalExecutor, for one machine and
for tests) the launcher waits for the shards and runs the merge only if they all succeeded. A shard that failed is
named with its log; `--resubmit` submits only the shards of --out that are not complete, and a new merge.
"""

from __future__ import annotations

import argparse
import importlib
import re
import shlex
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stage1.data.jobs import INSTRUCTIONS, RESPONSES
from stage1.data.manifest import read_manifest
from stage1.data.shards import SHARDS_DIR, incomplete_shards, shard_counts_in, shard_name, shard_states

try:  # submitit is an optional extra: without it this module still imports, and main() says how to install it
    from submitit.helpers import Checkpointable, DelayedSubmission
except ImportError:
    Checkpointable, DelayedSubmission = object, None

INSTALL_HINT = 'the SLURM launcher needs submitit: pip install "stage1[slurm]"'
# Generate flags the launcher refuses in the generate args (by argparse dest), and why.
RESERVED = {
    "num_shards": "--num-shards/--shard-index (each task gets its shard from the launcher's --array)",
    "shard_index": "--num-shards/--shard-index (each task gets its shard from the launcher's --array)",
    "merge": "--merge (the launcher submits the merge job itself)",
    "data_parallel_size": "--data-parallel-size (one engine per array task: for more shards, raise --array)",
    "overwrite": "--overwrite (a requeued task would wipe its own shard; to start over, use a new --out)",
}
POLL_S = {"local": 0.5, "slurm": 30.0}

USAGE = ("python -m stage1.launch slurm [launcher options] -- <the job's arguments: python -m stage1.generate's, or "
         "with --job instructions python -m stage1.instructions'>")
JOB_CLIS = {job.name: job.cli for job in (RESPONSES, INSTRUCTIONS)}  # --job -> the module each task runs
EPILOG = """\
examples:
  # 16 shards of Qwen2.5-7B on 2 nodes of 8 GPUs (1 GPU a shard), then the merge
  python -m stage1.launch slurm --array 16 --gpus-per-task 1 --time 4:00:00 --partition gpu -- \\
      --model /models/Qwen2.5-7B --instructions my.jsonl --out out/run1
  # after a failure: only the shards of out/run1 that are not complete, and a new merge
  python -m stage1.launch slurm --array 16 --gpus-per-task 1 --time 4:00:00 --partition gpu --resubmit -- \\
      --model /models/Qwen2.5-7B --instructions my.jsonl --out out/run1

exit codes: 0 submitted (with --wait or --cluster local: every job succeeded), 1 a job failed or can never start
(with --wait), 2 bad input, an sbatch refusal or submitit missing, 130 interrupted while waiting
"""


class LaunchError(Exception):
    """Bad launcher input: one line for the user, exit 2."""


class ShardFailed(RuntimeError):
    """A generate run in a job returned nonzero; raised so that submitit and SLURM record the job as failed."""


# ---------------------------------------------------------------------------------------------------------------
# What the jobs run (pickled by submitit, unpickled in the job's process)


def run_generate(argv: list[str], what: str, cli: str = "stage1.generate") -> dict[str, Any]:
    # Imported in the job's process; a SystemExit must pass through: submitit's requeue handler exits that way.
    main = importlib.import_module(cli).main
    code = main(argv)
    if code != 0:
        raise ShardFailed(f"{what}: python -m {cli} exited {code} (its error is in this job's log)")
    return {"what": what, "exit": 0}


@dataclass
class ShardTask(Checkpointable):
    """Array task: shard `index` of `count` of the run that `generate_args` describe, of the job `cli` runs."""
    generate_args: list[str]
    index: int
    count: int
    cli: str = "stage1.generate"

    def argv(self) -> list[str]:
        return [*self.generate_args, "--num-shards", str(self.count), "--shard-index", str(self.index), "--resume"]

    def __call__(self) -> dict[str, Any]:
        return run_generate(self.argv(), f"shard {self.index} of {self.count}", self.cli)

    def checkpoint(self, *args: Any, **kwargs: Any) -> DelayedSubmission:
        # Called by submitit on preemption or timeout: requeue this same shard. Nothing to save first: the rows on
        # disk are the checkpoint, and --resume continues from them.
        return DelayedSubmission(self, *args, **kwargs)


@dataclass
class MergeTask:
    generate_args: list[str]
    count: int
    cli: str = "stage1.generate"

    def argv(self) -> list[str]:
        return [*self.generate_args, "--merge", "--num-shards", str(self.count)]

    def __call__(self) -> dict[str, Any]:
        return run_generate(self.argv(), f"merge of {self.count} shards", self.cli)


# ---------------------------------------------------------------------------------------------------------------
# Launcher input


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m stage1.launch", usage=USAGE, epilog=EPILOG,
                                description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True, metavar="slurm")
    s = sub.add_parser("slurm", usage=USAGE, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
                       help="a job array of shards, then a merge job")
    jobs = s.add_argument_group("the shard jobs")
    jobs.add_argument("--array", type=int, required=True, metavar="N", help="number of shards (array tasks)")
    jobs.add_argument("--gpus-per-task", type=int, metavar="G",
                      help="GPUs per shard; the generate args' --tp must not exceed it (default: their --tp, or 0 "
                           "with --device cpu)")
    jobs.add_argument("--cpus-per-task", type=int, metavar="C", help="CPUs per shard (default: the cluster's)")
    jobs.add_argument("--mem-gb", type=float, metavar="GB", help="memory per shard (default: the cluster's)")
    jobs.add_argument("--time", default="4:00:00", metavar="T",
                      help="time limit per shard: minutes, HH:MM:SS or D-HH:MM:SS (default: %(default)s); at the "
                           "limit the task is requeued and resumes")
    jobs.add_argument("--max-parallel", type=int, metavar="K",
                      help="at most K shards at once (SLURM: --array=...%%K; local: default, the GPUs / G)")
    jobs.add_argument("--max-requeues", type=int, default=3, metavar="R",
                      help="requeues of a shard that hit its time limit (preemptions do not count; default: "
                           "%(default)s)")
    jobs.add_argument("--job", choices=tuple(JOB_CLIS), default="responses",
                      help="which job the arguments after -- are for: responses (python -m stage1.generate, the "
                           "default) or instructions (python -m stage1.instructions)")
    jobs.add_argument("--job-name", help="SLURM job name (default: the job's module, stage1-generate or "
                                          "stage1-instructions)")
    where = s.add_argument_group("where")
    where.add_argument("--cluster", choices=("slurm", "local"), default="slurm",
                       help="slurm, or local: submitit's LocalExecutor on this machine (implies --wait)")
    where.add_argument("--partition", help="SLURM partition of the shards")
    where.add_argument("--merge-partition", help="SLURM partition of the merge (default: --partition)")
    where.add_argument("--merge-time", default="1:00:00", metavar="T", help="merge time limit (default: %(default)s)")
    where.add_argument("--account", help="SLURM account")
    where.add_argument("--qos", help="SLURM quality of service")
    where.add_argument("--sbatch", action="append", default=[], metavar="KEY=VALUE",
                       help="any other sbatch option for the shard jobs, e.g. constraint=h100 (repeatable)")
    where.add_argument("--log-dir", metavar="DIR", help="submitit's pickles and the job logs (default: OUT/slurm-logs)")
    flow = s.add_argument_group("flow")
    flow.add_argument("--resubmit", action="store_true",
                      help="submit only the shards of --out that are not complete, and a new merge (once the "
                           "earlier jobs have ended)")
    flow.add_argument("--wait", action="store_true", help="wait for the jobs and report how they ended")
    flow.add_argument("--poll", type=float, metavar="S",
                      help="with --wait: ask SLURM for the jobs' states every S seconds (default: 30)")
    return p


def split_argv(argv: list[str]) -> tuple[list[str], list[str]]:
    """Launcher args before `--`, generate args after it."""
    if "--" not in argv:
        if any(a in ("-h", "--help") for a in argv):
            return argv, []
        raise LaunchError(f"no generate arguments: {USAGE} (at least `--` and the --out of the run)")
    cut = argv.index("--")
    return argv[:cut], argv[cut + 1:]


def parse_time(text: str, flag: str) -> int:
    """Minutes from `90`, `1:30:00` or `2-00:00:00` (SLURM's own `MM:SS` reading of `1:30` is refused as ambiguous)."""
    match = re.fullmatch(r"(?:(\d+)-)?(\d+):(\d{2}):(\d{2})", text)
    if text.isdigit():
        minutes = int(text)
    elif match:
        days, hours, mins, secs = (int(g or 0) for g in match.groups())
        minutes = days * 1440 + hours * 60 + mins + (secs > 0)
    else:
        raise LaunchError(f"{flag} {text!r}: give minutes (90), HH:MM:SS (1:30:00) or D-HH:MM:SS (2-00:00:00)")
    if minutes < 1:
        raise LaunchError(f"{flag} must be at least one minute")
    return minutes


def parse_sbatch(items: list[str]) -> dict[str, str]:
    extra = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise LaunchError(f"--sbatch {item!r}: give KEY=VALUE, e.g. --sbatch constraint=h100")
        extra[key.lstrip("-")] = value
    return extra


def check_launcher_args(opts: argparse.Namespace) -> None:
    checks = [
        (opts.array >= 1, f"--array must be at least 1, got {opts.array}"),
        (opts.gpus_per_task is None or opts.gpus_per_task >= 0, "--gpus-per-task must be 0 or more"),
        (opts.cpus_per_task is None or opts.cpus_per_task >= 1, "--cpus-per-task must be at least 1"),
        (opts.mem_gb is None or opts.mem_gb > 0, "--mem-gb must be positive"),
        (opts.max_parallel is None or opts.max_parallel >= 1, "--max-parallel must be at least 1"),
        (opts.max_requeues >= 0, "--max-requeues must be 0 or more"),
    ]
    for ok, message in checks:
        if not ok:
            raise LaunchError(message)
    opts.time_min = parse_time(opts.time, "--time")
    opts.merge_time_min = parse_time(opts.merge_time, "--merge-time")
    opts.sbatch_extra = parse_sbatch(opts.sbatch)


def job_name(opts) -> str:
    return opts.job_name or JOB_CLIS[getattr(opts, "job", "responses")].replace(".", "-")


def check_generate_args(generate_args: list[str], gpus_per_task: int = 0,
                        cli: str = "stage1.generate") -> argparse.Namespace:
    """Parses them with the job's own parser (so a typo fails here, not in N jobs) and refuses the flags the
    launcher sets itself (compared on the parsed values: argparse also takes a prefix such as --num-sh)."""
    parser = importlib.import_module(cli).build_parser()
    try:
        args = parser.parse_args(generate_args)
    except SystemExit as e:  # argparse printed the problem with the job's usage
        raise LaunchError(f"the {cli.removeprefix('stage1.')} arguments (after --) are not valid; see the message "
                          "above") from e
    refused = [why for dest, why in RESERVED.items() if getattr(args, dest, None) != parser.get_default(dest)]
    if refused:
        raise LaunchError("drop from the generate arguments: " + "; ".join(dict.fromkeys(refused)))
    if gpus_per_task and args.tensor_parallel_size > gpus_per_task:
        raise LaunchError(f"--tensor-parallel-size {args.tensor_parallel_size} needs that many GPUs per task, but "
                          f"--gpus-per-task is {gpus_per_task}; pass --gpus-per-task {args.tensor_parallel_size}")
    return args


def shards_to_run(out: Path, count: int, resubmit: bool) -> list[int]:
    """Which shards to submit: all on a first launch, the incomplete ones on --resubmit."""
    other_counts = [n for n in shard_counts_in(out) if n != count]
    if other_counts:
        raise LaunchError(f"{out / SHARDS_DIR} holds shards of a {other_counts[0]}-shard run; pass --array "
                          f"{other_counts[0]} to continue it, or use a new --out")
    states = shard_states(out, count)
    if resubmit:
        return incomplete_shards(out, count)
    started = [i for i, state in states.items() if state != "missing"]
    if started:
        done = sum(state == "complete" for state in states.values())
        raise LaunchError(f"{out} already holds {len(started)} of the {count} shards ({done} complete): pass "
                          "--resubmit (once its jobs have ended) to run the others, or use a new --out")
    return list(range(count))


# ---------------------------------------------------------------------------------------------------------------
# SLURM parameters (submitit's SlurmExecutor names, see submitit.slurm.slurm._make_sbatch_string)


def mem_string(gb: float) -> str:
    return f"{int(gb)}GB" if gb == int(gb) else f"{int(gb * 1024)}MB"


def slurm_parameters(opts: argparse.Namespace) -> dict[str, Any]:
    """The array's sbatch parameters from the launcher options (the array size itself comes from the submission)."""
    params: dict[str, Any] = {"job_name": job_name(opts), "time": opts.time_min, "nodes": 1, "ntasks_per_node": 1,
                              "stderr_to_stdout": False}
    if opts.gpus_per_task:
        params["gpus_per_task"] = opts.gpus_per_task  # one task a job: its GPUs, for its TP workers too
    optional = {"partition": opts.partition, "account": opts.account, "qos": opts.qos,
                "cpus_per_task": opts.cpus_per_task, "array_parallelism": opts.max_parallel,
                "mem": None if opts.mem_gb is None else mem_string(opts.mem_gb)}
    params.update({k: v for k, v in optional.items() if v is not None})
    # --requeue lets SLURM requeue a preempted task (submitit requeues the ones at their time limit)
    params["additional_parameters"] = {"requeue": True, **opts.sbatch_extra}
    return params


def merge_parameters(opts: argparse.Namespace, after: str | None) -> dict[str, Any]:
    """The merge job: no GPU, after every array task succeeded. kill-on-invalid-dep: if a shard fails, SLURM drops
    the merge instead of leaving it pending for ever."""
    params: dict[str, Any] = {"job_name": f"{job_name(opts)}-merge", "time": opts.merge_time_min, "nodes": 1,
                              "ntasks_per_node": 1, "cpus_per_task": 1}
    optional = {"partition": opts.merge_partition or opts.partition, "account": opts.account, "qos": opts.qos}
    params.update({k: v for k, v in optional.items() if v is not None})
    if after is not None:
        params["dependency"] = f"afterok:{after}"
        params["additional_parameters"] = {"kill-on-invalid-dep": "yes"}
    return params


# ---------------------------------------------------------------------------------------------------------------
# Submitting, waiting, reporting


def slurm_executor(folder: Path, max_requeues: int, params: dict[str, Any]):
    import submitit

    executor = submitit.SlurmExecutor(folder=folder, max_num_timeout=max_requeues)
    executor.update_parameters(**params)
    return executor


def array_id(job) -> str:
    """`1234` of the array task `1234_5`."""
    return str(job.job_id).split("_")[0]


def wait_all(jobs: list, poll_s: float) -> None:
    """Local jobs only: submitit's LocalJob knows its process. (On SLURM, submitit's done() asks sacct, and without
    accounting never learns that a job was cancelled: SlurmStates instead.)"""
    while not all(job.done() for job in jobs):
        time.sleep(poll_s)


def failure(job) -> str | None:
    """None if the (local) job succeeded, else one line on why: generate's own `error:` line where its log has
    one."""
    try:
        error = job.exception()
    except Exception as e:  # noqa: BLE001 - the job left no result (killed, node failure): say what submitit says
        error = e
    if error is None:
        return None
    return error_line(job) or (str(error).strip().splitlines() or ["failed"])[-1]


def error_line(job) -> str | None:
    """generate's last `error:` line in the job's log, if any."""
    log = Path(job.paths.stderr)
    lines = log.read_text(errors="replace").splitlines() if log.exists() else []
    said = [line for line in lines if line.startswith("error:")]
    return said[-1] if said else None


def log_hint(job) -> str:
    """`    log: PATH` where the job wrote one, else what there is instead (a printed log path always exists)."""
    log = Path(job.paths.stderr)
    return f"\n    log: {log}" if log.exists() else "\n    no log: the job never started"


def report(shard_jobs: dict[int, Any], out: Path, count: int, resubmit: str) -> list[int]:
    """Local jobs: prints each failed shard with its log, and the command that resubmits them; returns them."""
    incomplete = set(incomplete_shards(out, count))
    failed = []
    for index, job in shard_jobs.items():
        why = failure(job)
        if why is None and index not in incomplete:
            continue
        failed.append(index)
        print(f"shard {index} ({shard_name(index, count)}, job {job.job_id}) failed: {why or 'not complete'}"
              f"{log_hint(job)}", file=sys.stderr)
    if failed:
        print(f"{len(failed)} of {count} shards failed; the merge did not run. Once fixed, rerun them (and the "
              f"merge) with:\n    {resubmit}", file=sys.stderr)
    return failed


def resubmit_command(launcher_args: list[str], generate_args: list[str]) -> str:
    args = launcher_args if "--resubmit" in launcher_args else [*launcher_args, "--resubmit"]
    return f"python -m stage1.launch {shlex.join(args)} -- {shlex.join(generate_args)}"


# ---------------------------------------------------------------------------------------------------------------
# SLURM's answers: sbatch's refusals, the jobs' states


def slurm_command(argv: list[str], timeout: float = 60):
    """A SLURM client command: (exit code, stdout, stderr); exit code None if it could not run or did not answer."""
    import subprocess

    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired) as e:
        return None, "", str(e)
    return proc.returncode, proc.stdout, proc.stderr


def resources_asked(opts, merge: bool = False) -> str:
    if merge:
        return "--cpus-per-task 1 (the merge's)"
    asked = [f"--cpus-per-task {opts.cpus_per_task}" if opts.cpus_per_task else "",
             f"--mem-gb {opts.mem_gb:g}" if opts.mem_gb else "",
             f"--gpus-per-task {opts.gpus_per_task}" if opts.gpus_per_task else "",
             " ".join(f"--sbatch {k}={v}" for k, v in opts.sbatch_extra.items())]
    return ", ".join(a for a in asked if a) or "the cluster's defaults"


def where(opts, merge: bool) -> tuple[str, str, str, str]:
    """(partition flag, partition, time flag, time) of the shards or of the merge."""
    if merge:  # the merge runs on --merge-partition, or else --partition
        partition_flag, partition = "--merge-partition", opts.merge_partition or opts.partition
    else:
        partition_flag, partition = "--partition", opts.partition
    time_flag, limit = ("--merge-time", opts.merge_time) if merge else ("--time", opts.time)
    return partition_flag, partition, time_flag, limit


def refusal(error: str, opts, merge: bool) -> str:
    """sbatch's refusal (its stderr) as one line: the launcher option to change, and how."""
    said = " ".join(line.split("error:", 1)[1].strip() for line in error.splitlines() if "error:" in line)
    said = said or " ".join(error.split()) or "no message"
    partition_flag, partition, time_flag, limit = where(opts, merge)
    on = f"partition {partition}" if partition else "the default partition"
    checks = [
        (r"generic resource|gres", (
            f"--gpus-per-task {opts.gpus_per_task}: {on} has no GPUs (GRES) to give; for a CPU run pass "
            "--gpus-per-task 0 (the default with --device cpu), else a GPU partition with --partition "
            "(`sinfo -o '%P %G'` lists them)") if opts.gpus_per_task else (
            f"{resources_asked(opts)}: {on} has no such GRES (`sinfo -o '%P %G'` lists them)")),
        (r"invalid partition|partition name", f"{partition_flag} {partition}: no such partition here "
                                              "(`sinfo -s` lists them)"),
        (r"invalid account", (f"--account {opts.account}: not an account of yours here, or not allowed on {on}"
                              if opts.account else f"no --account given and no default account of yours allows "
                                                   f"{on}: pass --account") +
         " (`sacctmgr show assoc user=$USER format=account,partition,qos` lists yours)"),
        (r"invalid qos", (f"--qos {opts.qos}: not a QOS you may use here" if opts.qos else
                          "your default QOS is refused here: pass --qos") +
         " (`sacctmgr show assoc user=$USER format=account,qos` lists yours)"),
        (r"time limit", f"{time_flag} {limit}: above what {on} (or your QOS) allows: a shorter {time_flag}, or "
                        f"another {partition_flag} (`sinfo -o '%P %l'` lists each partition's limit)"),
        (r"more processors|node configuration|memory|cpu count", f"{resources_asked(opts, merge)}: more than a "
         f"node of {on} has or allows: ask less, or another {partition_flag} (`sinfo -o '%P %c %m %G'` lists what "
         "each partition's nodes have)"),
        (r"feature|constraint", f"{resources_asked(opts)}: no node of {on} has that feature "
                                "(`sinfo -o '%P %f'` lists them)"),
        (r"contact slurm controller|timed out|connection refused", "SLURM's controller did not answer; try again "
                                                                   "(`scontrol ping` says whether it is up)"),
    ]
    for pattern, fix in checks:
        if re.search(pattern, said, re.IGNORECASE):
            return f"{fix} (sbatch: {said})"
    return f"sbatch: {said}"


def submit(what: str, opts, merge: bool, call):
    """call() submits through submitit; sbatch's refusal becomes a LaunchError of one line (submitit's own copy of
    sbatch's stderr is swallowed)."""
    import contextlib
    import io

    from submitit.core.utils import FailedJobError

    try:
        with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
            return call()
    except FailedJobError as e:
        raise LaunchError(f"sbatch refused {what}: {refusal(str(e), opts, merge)}") from None


# SLURM job states after which a job does nothing more (a requeued job goes back to PENDING, not one of these)
ENDED = {"COMPLETED", "CANCELLED", "FAILED", "TIMEOUT", "NODE_FAIL", "PREEMPTED", "OUT_OF_MEMORY", "BOOT_FAIL",
         "DEADLINE", "REVOKED", "SPECIAL_EXIT"}


def never_starts(reason: str, opts, merge: bool) -> str | None:
    """What to change for a job that SLURM keeps pending for `reason`, if waiting cannot resolve it; else None."""
    partition_flag, partition, time_flag, limit = where(opts, merge)
    on = f"partition {partition}" if partition else "the default partition"
    resources = resources_asked(opts, merge)
    fixes = {
        "PartitionConfig": f"{resources}: more than a node of {on} has or allows; ask less, or another "
                           f"{partition_flag} (`sinfo -o '%P %c %m %G %l'` lists what each partition has)",
        "PartitionNodeLimit": f"{resources}: more than {on} allows a job; ask less, or another {partition_flag}",
        "PartitionTimeLimit": f"{time_flag} {limit}: above {on}'s limit; a shorter {time_flag} (`sinfo -o '%P %l'`)",
        "BadConstraints": f"{resources}: no node of {on} can give it; ask less (`sinfo -o '%P %c %m %G %f'`)",
        "InvalidAccount": f"--account {opts.account}: not valid here (`sacctmgr show assoc user=$USER`)",
        "InvalidQOS": f"--qos {opts.qos}: not valid here (`sacctmgr show assoc user=$USER format=qos`)",
        "AccountNotAllowed": f"--account {opts.account}: not allowed on {on}",
        "QOSMaxWallDurationPerJobLimit": f"{time_flag} {limit}: above your QOS's limit; a shorter {time_flag}",
        "AssocMaxWallDurationPerJobLimit": f"{time_flag} {limit}: above your account's limit; a shorter {time_flag}",
        "DependencyNeverSatisfied": "a job it runs after did not succeed",
    }
    return fixes.get(reason)


@dataclass(frozen=True)
class JobState:
    """A SLURM job's state (squeue's or sacct's word) and, while pending, why; state GONE: SLURM no longer lists
    the job (it ended more than MinJobAge ago) and no accounting remembers it."""
    state: str
    reason: str = ""

    @property
    def ended(self) -> bool:
        return self.state in ENDED or self.state == "GONE"

    def __str__(self) -> str:
        return self.state + (f" ({self.reason})" if self.reason and self.reason != "None" else "")


class SlurmStates:
    """Job states from SLURM itself: squeue while the controller lists the job (pending, running, and ended ones
    for MinJobAge), then sacct where accounting is on. Never submitit's watcher, which asks sacct only and, where
    accounting is off, warns on every poll and never learns that a job was cancelled."""

    def __init__(self) -> None:
        self._accounting: bool | None = None
        self._said: set[str] = set()
        self._seen: dict[str, JobState] = {}  # each job's last state squeue gave

    def note(self, key: str, text: str) -> None:
        if key not in self._said:
            self._said.add(key)
            print(f"note: {text}", file=sys.stderr, flush=True)

    def accounting(self) -> bool | None:
        """Whether this cluster keeps accounting (sacct works); None while unknown."""
        if self._accounting is None:
            code, out, _ = slurm_command(["scontrol", "show", "config"], timeout=30)
            found = re.search(r"^AccountingStorageType\s*=\s*(\S+)", out, re.MULTILINE) if code == 0 else None
            if found:
                self._accounting = found.group(1) != "accounting_storage/none"
        return self._accounting

    def query(self, job_ids: list[str]) -> dict[str, JobState] | None:
        """{job id (`12_3` for an array task): state}, or None if SLURM did not answer (ask again later)."""
        bases = sorted({i.split("_")[0] for i in job_ids})
        code, out, err = slurm_command(["squeue", "--noheader", "--array", "--states=all", f"--jobs={','.join(bases)}",
                                        "--format=%i|%T|%r"])
        if code is None or (code != 0 and "invalid job id" not in err.lower()):
            self.note("squeue", f"squeue did not answer ({' '.join(err.split()) or code}); asking again each poll")
            return None
        found = {}
        for line in out.splitlines():
            parts = line.strip().split("|")
            if len(parts) == 3:
                found[parts[0]] = JobState(parts[1], parts[2])
        missing = [i for i in job_ids if i not in found]
        if missing and self.accounting() is not False:
            accounted = self._sacct(missing)
            if accounted is None:
                return None
            found.update(accounted)
        self._seen.update(found)
        for i in [i for i in job_ids if i not in found]:
            # a pending array task that is cancelled leaves the array's record at once, and where there is no
            # accounting no other record stays: what SLURM says is that the job left the queue while pending
            pending = self._seen.get(i, JobState("")).state == "PENDING"
            if not pending:
                self.note("gone", f"SLURM no longer lists job {i} and keeps no accounting here (sacct is off): how "
                                  "it ended comes from its own result file and the shards' files")
            found[i] = JobState("GONE", "was pending" if pending else "")
        return {i: found[i] for i in job_ids}

    def submitted(self, job_ids: list[str]) -> None:
        """Jobs sbatch just accepted: in the queue, pending."""
        self._seen.update({i: JobState("PENDING") for i in job_ids})

    def _sacct(self, job_ids: list[str]) -> dict[str, JobState] | None:
        code, out, err = slurm_command(["sacct", "--noheader", "--parsable2", "--allocations",
                                        f"--jobs={','.join(job_ids)}", "--format=JobID,State"])
        if code != 0:
            if "disabled" in err.lower():
                self._accounting = False
                return {}
            self.note("sacct", f"sacct did not answer ({' '.join(err.split()) or code}); asking again each poll")
            return None
        found = {}
        for line in out.splitlines():
            parts = line.strip().split("|")
            if len(parts) == 2 and parts[1]:
                found[parts[0]] = JobState(parts[1].split()[0])  # "CANCELLED by 0"
        return found


def job_result(job) -> tuple[str, Any] | None:
    """What submitit's process in the job wrote at its end: ("success", value) or ("error", traceback); None if it
    wrote nothing (it was killed, cancelled or never started)."""
    from submitit.core.utils import pickle_load

    path = Path(job.paths.result_pickle)
    try:
        return pickle_load(path) if path.exists() else None
    except Exception:  # noqa: BLE001 - a result cut short by a kill reads as none
        return None


def how_it_ended(job, state: JobState) -> str | None:
    """None if the job succeeded; else what SLURM says of it (and the job's own error line where it has one)."""
    result = job_result(job)
    ok = result is not None and result[0] == "success"
    if state.state == "COMPLETED" and ok:
        return None
    started = Path(job.paths.stderr).exists()
    if state.state == "GONE":
        if ok:
            return None
        if result is None and not started and state.reason == "was pending":
            return ("was CANCELLED before it started (it left SLURM's queue while pending, as a cancelled array "
                    "task does; with no accounting here, SLURM keeps no record of it)")
        if result is None:
            return "ended without a result (SLURM no longer lists it; with no accounting here, how is unknown)"
    why = error_line(job)
    if why is None and result is not None and result[0] == "error":
        why = (str(result[1]).strip().splitlines() or [""])[-1] or None
    if state.state == "CANCELLED":
        return "was CANCELLED" + ("" if started else " before it started")
    return f"failed ({state})" + (f": {why}" if why else "")


def report_slurm(shard_jobs: dict[int, Any], states: dict[str, JobState], merge, out: Path, count: int,
                 resubmit: str) -> list[int]:
    """Prints each shard whose job did not succeed or whose files are not complete, then what becomes of the merge
    and the command to go on; returns those shards."""
    complete = shard_states(out, count)
    failed = []
    for index, job in shard_jobs.items():
        why = how_it_ended(job, states[job.job_id])
        done = complete[index] == "complete"
        if why is None and done:
            continue
        failed.append(index)
        files = "its files are complete" if done else f"its files are {complete[index]}"
        print(f"shard {index} ({shard_name(index, count)}, job {job.job_id}) {why or 'ended, not complete'}; "
              f"{files}{log_hint(job)}", file=sys.stderr)
    if failed:
        print(f"the merge (job {merge.job_id}) will not run: a shard's job did not succeed, so its afterok "
              "dependency can never be satisfied (DependencyNeverSatisfied; SLURM cancels it)", file=sys.stderr)
        if all(complete[i] == "complete" for i in failed):
            print(f"Every shard's files are complete: run the merge with:\n    {resubmit}", file=sys.stderr)
        else:
            print(f"{sum(complete[i] != 'complete' for i in failed)} of {count} shards are not complete. Once fixed, "
                  f"rerun them (and the merge) with:\n    {resubmit}", file=sys.stderr)
    return failed


def wait_slurm(opts, shard_jobs: dict[int, Any], merge, out: Path, resubmit: str) -> int:
    """Polls SLURM until the shards have ended (then reports them), and the merge; ends early, with the reason, when
    a job is pending for a reason that waiting does not resolve."""
    watcher = SlurmStates()
    poll = opts.poll or POLL_S["slurm"]
    labels = {job.job_id: (f"shard {i} ({shard_name(i, opts.array)}, job {job.job_id})", False)
              for i, job in shard_jobs.items()}
    labels[merge.job_id] = (f"the merge (job {merge.job_id})", True)
    watcher.submitted(list(labels))
    if watcher.accounting() is False:
        watcher.note("accounting", "this cluster keeps no accounting (sacct is off): job states come from squeue, "
                                   "and from the jobs' own files once SLURM forgets them")
    while True:
        states = watcher.query(list(labels))
        if states is not None:
            shards_ended = all(states[job.job_id].ended for job in shard_jobs.values())
            stuck = []
            for job_id, state in states.items():
                label, is_merge = labels[job_id]
                fix = never_starts(state.reason, opts, is_merge) if state.state == "PENDING" else None
                if fix and (not is_merge or shards_ended):
                    stuck.append(f"{label} cannot start: SLURM holds it pending with reason {state.reason}: {fix}")
            if stuck:
                queued = ",".join(sorted({i.split("_")[0] for i, s in states.items() if not s.ended}))
                print("\n".join(stuck) + f"\nThe jobs stay queued: `scancel {queued}` removes them. Then, with "
                      f"that fixed:\n    {resubmit}", file=sys.stderr)
                return 1
            if shards_ended:
                if report_slurm(shard_jobs, states, merge, out, opts.array, resubmit):
                    return 1
                if states[merge.job_id].ended:
                    return finish_slurm_merge(merge, states[merge.job_id], out, resubmit)
        time.sleep(poll)


def finish_slurm_merge(merge, state: JobState, out: Path, resubmit: str) -> int:
    why = how_it_ended(merge, state)
    manifest = read_manifest(out)
    if why is None and manifest is not None and manifest.get("status") == "complete":
        print(f"done: {out}/data.jsonl, rejects.jsonl, manifest.json")
        return 0
    print(f"the merge (job {merge.job_id}) {why or 'ended, but ' + str(out / 'manifest.json') + ' is not complete'}"
          f"{log_hint(merge)}\nOnce fixed: {resubmit}", file=sys.stderr)
    return 1


def launch_slurm(opts, generate_args: list[str], todo: list[int], out: Path, log_dir: Path, resubmit: str) -> int:
    tasks = [ShardTask(generate_args, index, opts.array, JOB_CLIS[opts.job]) for index in todo]
    after = None
    shard_jobs: dict[int, Any] = {}
    if tasks:
        executor = slurm_executor(log_dir, opts.max_requeues, slurm_parameters(opts))
        what = f"shard {todo[0]}'s job" if len(tasks) == 1 else "the shards' array"
        jobs = submit(what, opts, False, lambda: executor.submit_array(tasks))
        shard_jobs = dict(zip(todo, jobs))
        after = array_id(jobs[0])
        if len(jobs) == 1:  # submitit submits one task as a plain job, not an array
            print(f"submitted shard {todo[0]} of {opts.array} as job {after} (its log, once it starts: "
                  f"{jobs[0].paths.stderr})")
        else:
            mapping = "" if todo == list(range(opts.array)) else \
                f"; tasks 0..{len(todo) - 1} run shards {compact(todo)}"
            print(f"submitted shards {compact(todo)} of {opts.array} as array job {after}{mapping}")
    merge_executor = slurm_executor(log_dir, 0, merge_parameters(opts, after))
    try:
        merge = submit("the merge job", opts, True, lambda: merge_executor.submit(MergeTask(
            generate_args, opts.array, JOB_CLIS[opts.job])))
    except LaunchError as e:
        if after is None:
            raise
        code, _, _ = slurm_command(["scancel", after], timeout=60)
        fate = "cancelled, nothing runs" if code == 0 else f"submitted: cancel it with scancel {after}"
        raise LaunchError(f"{e}; the shards' {'array ' if len(shard_jobs) > 1 else ''}job {after} was {fate}") \
            from None
    print(f"submitted the merge as job {merge.job_id}" + (f", to start once job {after} succeeded" if after else ""))
    ids = ",".join(x for x in (after, merge.job_id) if x)
    accounting = SlurmStates().accounting()
    logs = f"{log_dir}/{after}_<k>_0_log.out|err for array task k, " if len(shard_jobs) > 1 else ""
    print(f"watch: squeue -j {ids}" + (f"    sacct -j {ids}" if accounting else "") +
          f"\nlogs (once the jobs start): {logs}{log_dir}/<job id>_0_log.out|err for a job"
          f"\nafter a failure: {resubmit}", flush=True)
    if not opts.wait:
        return 0
    return wait_slurm(opts, shard_jobs, merge, out, resubmit)


def local_slots(opts, n_tasks: int) -> int:
    if opts.max_parallel:
        return opts.max_parallel
    if opts.gpus_per_task == 0:
        return n_tasks
    import torch

    return max(1, torch.cuda.device_count() // opts.gpus_per_task)


def run_local_shards(executor, tasks: list[ShardTask], slots: int, gpus: int) -> dict[int, Any]:
    """At most `slots` shards at once; slot s gets GPUs s*G .. s*G+G-1 (LocalExecutor gives every job the same
    GPUs otherwise)."""
    pending, running, jobs = list(tasks), {}, {}
    try:
        while pending or running:
            for slot in range(slots):
                if slot not in running and pending:
                    task = pending.pop(0)
                    executor.update_parameters(gpus_per_node=gpus, visible_gpus=tuple(range(slot * gpus,
                                                                                            (slot + 1) * gpus)))
                    running[slot] = jobs[task.index] = executor.submit(task)
                    print(f"shard {task.index} of {task.count}: local job {running[slot].job_id}, log "
                          f"{running[slot].paths.stderr}", flush=True)
            for slot, job in list(running.items()):
                if job.done():
                    del running[slot]
            time.sleep(POLL_S["local"])
    except KeyboardInterrupt:
        for job in running.values():
            job.cancel()
        raise
    return jobs


def launch_local(opts, generate_args: list[str], todo: list[int], out: Path, log_dir: Path, resubmit: str) -> int:
    import submitit

    executor = submitit.LocalExecutor(folder=log_dir, max_num_timeout=opts.max_requeues)
    executor.update_parameters(timeout_min=opts.time_min)
    tasks = [ShardTask(generate_args, index, opts.array, JOB_CLIS[opts.job]) for index in todo]
    shard_jobs = run_local_shards(executor, tasks, local_slots(opts, len(tasks)), opts.gpus_per_task)
    if report(shard_jobs, out, opts.array, resubmit):
        return 1
    executor.update_parameters(timeout_min=opts.merge_time_min, gpus_per_node=0, visible_gpus=())
    merge = executor.submit(MergeTask(generate_args, opts.array, JOB_CLIS[opts.job]))
    print(f"merge: local job {merge.job_id}, log {merge.paths.stderr}", flush=True)
    wait_all([merge], POLL_S["local"])
    return finish_merge(merge, out)


def finish_merge(merge, out: Path) -> int:
    why = failure(merge)
    if why is not None:
        print(f"the merge (job {merge.job_id}) failed: {why}{log_hint(merge)}", file=sys.stderr)
        return 1
    print(f"done: {out}/data.jsonl, rejects.jsonl, manifest.json")
    return 0


def compact(indices: list[int]) -> str:
    """`0-3,5,7-8`: SLURM's way of writing a set of array indices."""
    parts, start = [], None
    for i, index in enumerate(indices):
        if start is None:
            start = index
        if i + 1 == len(indices) or indices[i + 1] != index + 1:
            parts.append(str(start) if start == index else f"{start}-{index}")
            start = None
    return ",".join(parts)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        launcher_args, generate_args = split_argv(argv)
        opts = build_parser().parse_args(launcher_args)
        check_launcher_args(opts)
        try:
            import submitit  # noqa: F401 - only to know it is there
        except ImportError:
            print(f"error: {INSTALL_HINT}", file=sys.stderr)
            return 2
        gen = check_generate_args(generate_args, opts.gpus_per_task, JOB_CLIS[opts.job])
        if opts.gpus_per_task is None:  # what the run needs: its --tp GPUs, none on a CPU
            opts.gpus_per_task = 0 if gen.device == "cpu" else gen.tensor_parallel_size
        if opts.cluster == "slurm" and not (shutil.which("sbatch") and shutil.which("srun")):
            raise LaunchError("no sbatch/srun on PATH: run this on a SLURM login node (or --cluster local to run "
                              "the shards on this machine)")
        out = Path(gen.out).resolve()
        todo = shards_to_run(out, opts.array, opts.resubmit)
    except LaunchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except SystemExit as e:  # argparse: usage error (2) or --help (0), already printed
        return int(e.code or 0)
    merged = read_manifest(out)
    if not todo and merged is not None and merged.get("status") == "complete":
        print(f"{out}: all {opts.array} shards and the merge are complete; nothing to submit")
        return 0
    if opts.resubmit:
        print(f"{out}: {opts.array - len(todo)} of {opts.array} shards complete; submitting "
              + (f"shard{'s' * (len(todo) > 1)} {compact(todo)} and the merge" if todo else "the merge only"))
    log_dir = Path(opts.log_dir).resolve() if opts.log_dir else out / "slurm-logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    resubmit = resubmit_command(launcher_args, generate_args)
    launch = launch_local if opts.cluster == "local" else launch_slurm
    try:
        return launch(opts, generate_args, todo, out, log_dir, resubmit)
    except LaunchError as e:  # sbatch refused a job
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\ninterrupted: submitted SLURM jobs keep running (scancel them to stop); local jobs were stopped. "
              f"Later: {resubmit}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
