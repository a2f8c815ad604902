"""Helpers of the tests against a real SLURM (test_real_slurm*.py): the launcher run as a process with a deadline,
waits with deadlines, SLURM's view of a job, and the run every sharded run is compared with."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from dataset_files import assert_same_engine_files

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "examples" / "slurm"
# 4 instructions of each shard of 2 (by shard_of of their ids), 2 samples each, fp32 on the CPU: small jobs whose
# merged files must be the unsharded run's (the logprob signals' last digits aside); no --allow-run-on, so
# rejects.jsonl gets rows too
INSTRUCTION_LINES = (0, 1, 3, 4, 2, 9, 12, 13)
RUN_ARGS = ["--n", "2", "--max-tokens", "10", "--max-num-seqs", "3", "--no-progress", "--dtype", "float32",
            "--device", "cpu"]
# a printed log path (not a pattern such as 12_<k>_0_log.err): submitit's job logs, the sbatch examples' logs
LOG_PATH = re.compile(r"(/[^\s:'\"<>|]+_log\.(?:err|out)|/[^\s:'\"<>|]+/slurm-logs/[^\s:'\"<>|]+\.(?:err|out))")


def write_instructions(path: Path) -> Path:
    lines = (REPO / "stage1" / "data" / "instructions.jsonl").read_text().splitlines()
    path.write_text("".join(lines[i] + "\n" for i in INSTRUCTION_LINES))
    return path


@dataclass
class Finished:
    returncode: int | None  # None: killed at its deadline
    stdout: str
    stderr: str

    def __repr__(self) -> str:  # what a failed assert shows
        return f"exit {self.returncode}\n--- stdout\n{self.stdout}\n--- stderr\n{self.stderr}"


class Launcher:
    """`python -m stage1.launch ARGV` against the cluster, in its own session (so that anything it starts is one
    process group, killed by its id at the deadline or the end), output to files (no pipe to fill)."""

    def __init__(self, argv: list[str], env: dict[str, str], logs: Path):
        logs.mkdir(parents=True, exist_ok=True)
        n = len(list(logs.glob("*.stdout")))
        self.out, self.err = logs / f"{n}.stdout", logs / f"{n}.stderr"
        with open(self.out, "w") as out, open(self.err, "w") as err:
            self.proc = subprocess.Popen([sys.executable, "-m", "stage1.launch", *argv], cwd=REPO, env=env,
                                         stdout=out, stderr=err, stdin=subprocess.DEVNULL, start_new_session=True)

    def output(self) -> tuple[str, str]:
        return self.out.read_text(), self.err.read_text()

    def finish(self, timeout: float) -> Finished:
        try:
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            code = None
        finally:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait(timeout=30)
        return Finished(code, *self.output())


def launch(argv: list[str], env: dict[str, str], logs: Path, timeout: float) -> Finished:
    return Launcher(argv, env, logs).finish(timeout)


def wait_for(what: str, check, timeout: float, every: float = 0.2, launcher: Launcher | None = None):
    """check()'s first true value within `timeout` seconds; fails at once if `launcher` ends first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if launcher is not None and launcher.proc.poll() is not None:
            raise AssertionError(f"the launcher ended before {what}: {launcher.finish(1)!r}")
        value = check()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"not within {timeout:.0f} s: {what}")


def jobs(cluster, name: str) -> dict[str, tuple[str, str]]:
    """SLURM's view of the jobs named `name`: {job id (12_0 for array tasks): (state, reason)}."""
    text = cluster.run("squeue", "-h", "-r", "-t", "all", "-n", name, "-o", "%i|%T|%r").stdout
    return {i: (state, reason) for i, state, reason in (line.split("|") for line in text.splitlines())}


def restarts(cluster, job_id: str) -> int:
    text = cluster.run("scontrol", "show", "job", job_id).stdout
    return int(re.search(r"Restarts=(\d+)", text).group(1))


def printed_log_paths(*texts: str) -> list[Path]:
    return [Path(p) for text in texts for p in LOG_PATH.findall(text)]


def same_files(out: Path, plain: Path) -> None:
    """The unsharded run's rows, the logprob signals' last digits aside (dataset_files.assert_same_engine_files)."""
    assert json.loads((out / "manifest.json").read_text())["status"] == "complete"
    assert_same_engine_files(out, plain)
    assert (plain / "data.jsonl").read_bytes() or (plain / "rejects.jsonl").read_bytes()


def assert_refused_in_one_line(done, cluster, name: str, option: str, fix: str) -> list[str]:
    """sbatch refused the submission: one line naming the option and the fix, exit code 2, and nothing of this
    launch left queued (a refused merge cancels the array submitted before it). Returns the stderr lines."""
    assert done.returncode == 2, done
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: sbatch refused"), done
    assert option in lines[0] and fix in lines[0], done
    left = {i: s for i, (s, _) in jobs(cluster, name).items() if s != "CANCELLED"}
    assert not left, left
    return lines
