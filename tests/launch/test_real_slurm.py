"""The launcher and the sbatch examples on a real single-node SLURM without accounting (slurmctld + slurmd + munged,
started by slurm_cluster.py; `sacct` says "Slurm accounting storage is disabled", as on many small clusters): the
merged files of a 2-shard array are the unsharded run's; a cancelled task is named and `--resubmit` reruns it alone;
submitit's preemption signal requeues a shard that resumes; the sbatch scripts' time-limit signal requeues a task
whose first attempt's log is kept; sbatch's refusals are one line (exit 2); a job that can never start ends --wait.
Each job is the real generate on the tiny random checkpoint, fp32 on the CPU."""

from __future__ import annotations

import json
import re
import shlex
import sys
from pathlib import Path

import pytest

pytest.importorskip("submitit")

from real_slurm import (EXAMPLES, RUN_ARGS, Launcher, assert_refused_in_one_line, jobs, launch,  # noqa: E402
                        printed_log_paths, restarts, same_files, wait_for)
from stage1.data.shards import shard_dir, shard_states  # noqa: E402

pytestmark = [pytest.mark.slurm, pytest.mark.slow]


def generate_args(model: Path, instructions: Path, out: Path) -> list[str]:
    return ["--model", str(model), "--instructions", str(instructions), "--out", str(out), *RUN_ARGS]


def launcher_args(name: str, *more: str) -> list[str]:
    return ["slurm", "--array", "2", "--time", "10", "--wait", "--poll", "1", "--job-name", name, *more]


def resubmit_line(stderr: str) -> list[str]:
    line = next(line.strip() for line in stderr.splitlines() if line.strip().startswith("python -m stage1.launch"))
    argv = shlex.split(line)
    assert argv[:3] == ["python", "-m", "stage1.launch"] and "--resubmit" in argv
    return argv[3:]


def assert_log_paths_exist(*texts: str) -> None:
    for path in printed_log_paths(*texts):
        assert path.exists(), f"printed log path does not exist: {path}"


def test_array_and_merge_equal_the_unsharded_run(queue, tiny_model_dir, instructions, plain_run, tmp_path):
    """Two shards as one array, the merge after it: the unsharded run's bytes. No --gpus-per-task on a CPU
    partition: with --device cpu it is 0 (it was 1, which sbatch refused with a submitit traceback)."""
    out = tmp_path / "out"
    done = launch([*launcher_args("t-happy"), "--", *generate_args(tiny_model_dir, instructions, out)], queue.env,
                  tmp_path / "launcher", timeout=300)
    assert done.returncode == 0, done
    assert "Traceback" not in done.stderr
    same_files(out, plain_run)
    states = {**jobs(queue, "t-happy"), **jobs(queue, "t-happy-merge")}
    assert len(states) == 3 and {s for s, _ in states.values()} == {"COMPLETED"}, states
    # sacct is off here: said once at most, not once a poll
    assert done.stderr.count("sacct") <= 1, done
    assert_log_paths_exist(done.stdout, done.stderr)


@pytest.mark.parametrize("more, option, fix", [
    (["--gpus-per-task", "1"], "--gpus-per-task 1", "--gpus-per-task 0"),
    (["--partition", "gpu"], "--partition gpu", "sinfo"),
    (["--merge-partition", "gpu"], "--merge-partition gpu", "sinfo"),
], ids=["gres", "partition", "merge-partition"])
def test_sbatch_refusals_are_one_line(queue, tiny_model_dir, instructions, tmp_path, more, option, fix):
    out = tmp_path / "out"
    name = f"t-refused-{option.split()[0].strip('-')}"
    done = launch([*launcher_args(name, *more), "--", *generate_args(tiny_model_dir, instructions, out)],
                  queue.env, tmp_path / "launcher", timeout=60)
    lines = assert_refused_in_one_line(done, queue, name, option, fix)
    if option.startswith("--merge"):
        assert "cancelled" in lines[0]


def test_a_job_that_cannot_start_ends_the_wait(queue, tiny_model_dir, instructions, tmp_path):
    """--cpus-per-task 8 on a node of fewer CPUs: SLURM accepts the array (EnforcePartLimits=NO) but it pends with
    reason PartitionConfig for ever; --wait ends with that reason and what to change."""
    out = tmp_path / "out"
    done = launch([*launcher_args("t-never", "--cpus-per-task", "8"), "--",
                   *generate_args(tiny_model_dir, instructions, out)], queue.env, tmp_path / "launcher", timeout=90)
    assert done.returncode == 1, done
    assert "PartitionConfig" in done.stderr and "--cpus-per-task 8" in done.stderr, done
    assert "scancel" in done.stderr and "Traceback" not in done.stderr, done


def test_cancelled_task_is_named_and_resubmitted_alone(queue, tiny_model_dir, instructions, plain_run, tmp_path):
    """Task 1 cancelled while it waits for task 0 (--max-parallel 1): SLURM then cancels the merge
    (DependencyNeverSatisfied). --wait ends (it polled for ever: without sacct, submitit never saw the end), names
    the shard, and its --resubmit command runs shard 1 alone, as a plain job, then the merge."""
    out = tmp_path / "out"
    run = Launcher([*launcher_args("t-cancel", "--max-parallel", "1"), "--",
                    *generate_args(tiny_model_dir, instructions, out)], queue.env, tmp_path / "launcher")
    task = wait_for("array task 1 queued", lambda: [i for i, (s, _) in jobs(queue, "t-cancel").items()
                                                    if i.endswith("_1") and s == "PENDING"], 60, launcher=run)[0]
    queue.run("scancel", task)
    done = run.finish(timeout=120)
    assert done.returncode == 1, done
    assert re.search(rf"shard 1 \(00001-of-00002, job {task}\) was CANCELLED", done.stderr), done
    assert "the merge" in done.stderr and "DependencyNeverSatisfied" in done.stderr, done
    assert done.stderr.count("sacct") <= 1, done
    assert_log_paths_exist(done.stdout, done.stderr)
    assert shard_states(out, 2) == {0: "complete", 1: "missing"}
    kept = (shard_dir(out, 0, 2) / "manifest.json").read_bytes()

    again = launch(resubmit_line(done.stderr), queue.env, tmp_path / "launcher", timeout=300)
    assert again.returncode == 0, again
    assert "1 of 2 shards complete; submitting shard 1 and the merge" in again.stdout, again
    # one shard is one plain job: named so, with its real log
    job = re.search(r"submitted shard 1 of 2 as job (\d+)\b", again.stdout)
    assert job and "array job" not in again.stdout and "array task" not in again.stdout, again
    assert f"{job.group(1)}_0_log.err" in again.stdout, again
    assert_log_paths_exist(again.stdout, again.stderr)
    assert (shard_dir(out, 0, 2) / "manifest.json").read_bytes() == kept  # not rerun
    same_files(out, plain_run)


def test_preempted_shard_is_requeued_and_resumes(queue, tiny_model_dir, instructions, plain_run, tmp_path):
    """submitit's preemption signal (USR2, to the task's step) while shard 0 runs: submitit requeues the task
    (scontrol requeue), SLURM starts it again, it resumes its shard, and the merge is the unsharded run."""
    out = tmp_path / "out"
    run = Launcher([*launcher_args("t-preempt"), "--", *generate_args(tiny_model_dir, instructions, out)],
                   queue.env, tmp_path / "launcher")
    manifest = shard_dir(out, 0, 2) / "manifest.json"

    def running():
        state = {i: s for i, (s, _) in jobs(queue, "t-preempt").items() if i.endswith("_0")}
        return manifest.exists() and list(state.values()) == ["RUNNING"] and list(state)[0]

    task = wait_for("shard 0 running", running, 120, every=0.05, launcher=run)
    assert shard_states(out, 2)[0] == "running", "shard 0 ended before it could be preempted"
    queue.run("scancel", "--signal=USR2", task)
    done = run.finish(timeout=300)
    assert done.returncode == 0, done
    assert restarts(queue, task) == 1
    log = next((out / "slurm-logs").glob(f"{task}_0_log.out")).read_text()
    assert "Requeued job" in log or "requeue" in log.lower(), log
    sessions = json.loads(manifest.read_text())["sessions"]
    assert sessions[-1]["resumed"] is True  # the preempted session never finished: only the resumed one is listed
    same_files(out, plain_run)


def test_sbatch_examples_requeue_at_the_time_limit_signal(queue, tiny_model_dir, instructions, plain_run,
                                                          tmp_path):
    """examples/slurm/*.sbatch as a user submits them, resources and generate flags on the command line: the
    time-limit signal (B:USR1, which SLURM sends to the batch shell before --time; here sent with scancel
    --batch) makes the script requeue its task, which resumes; the log keeps the first attempt's lines
    (--open-mode=append); the merge after the array is the unsharded run."""
    out = tmp_path / "out"
    (tmp_path / "slurm-logs").mkdir()
    env = {**queue.env, "MODEL": str(tiny_model_dir), "INSTRUCTIONS": str(instructions), "OUT": str(out),
           "NUM_SHARDS": "2", "MAX_REQUEUES": "1", "GENERATE_ARGS": shlex.join(RUN_ARGS),
           "PATH": f"{Path(sys.executable).parent}:{queue.env['PATH']}"}

    def sbatch(*argv: str) -> str:
        import subprocess

        proc = subprocess.run(["sbatch", "--parsable", *argv], env=env, cwd=tmp_path, capture_output=True,
                              text=True, timeout=30)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout.strip().split(";")[0]

    array = sbatch("--array=0-1", "--cpus-per-task=1", "--time=10", "--job-name=t-sbatch",
                   str(EXAMPLES / "generate_array.sbatch"))
    merge = sbatch(f"--dependency=afterok:{array}", "--kill-on-invalid-dep=yes", "--cpus-per-task=1",
                   "--job-name=t-sbatch-merge", str(EXAMPLES / "merge.sbatch"))
    manifest = shard_dir(out, 0, 2) / "manifest.json"
    wait_for("shard 0 running", lambda: manifest.exists() and jobs(queue, "t-sbatch").get(f"{array}_0", ("",))[0]
             == "RUNNING", 120, every=0.05)
    assert shard_states(out, 2)[0] == "running", "shard 0 ended before its time-limit signal"
    queue.run("scancel", "--batch", "--signal=USR1", f"{array}_0")
    ended = wait_for("the merge ended", lambda: [s for s, _ in jobs(queue, "t-sbatch-merge").values()
                                                 if s in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT")], 300)
    assert ended == ["COMPLETED"], (ended, jobs(queue, "t-sbatch"))
    assert restarts(queue, f"{array}_0") == 1
    log = (tmp_path / "slurm-logs" / f"{array}_0.err").read_text()
    assert "attempt 1" in log and "time limit near: requeueing" in log and "attempt 2" in log, log
    assert log.index("attempt 1") < log.index("time limit near") < log.index("attempt 2")
    assert (tmp_path / "slurm-logs" / f"{merge}-merge.err").exists()
    sessions = json.loads(manifest.read_text())["sessions"]
    assert sessions[-1]["resumed"] is True  # the preempted session never finished: only the resumed one is listed
    same_files(out, plain_run)
