"""The launcher on a real single-node SLURM with accounting: slurmdbd over a MariaDB server (both started by
slurm_cluster.py), associations and QOS enforced (account stage1, QOS normal/high), partition limits enforced at
submission (EnforcePartLimits=ALL, MaxTime 2 hours). sbatch's refusals (account, QOS, time, CPUs) are one line with
exit 2; a task cancelled so late that its shard finished inside KillWait is reported as the cancelled shard (not as
a merge that failed with no output), and --resubmit then runs the merge alone."""

from __future__ import annotations

import re
import shlex

import pytest

pytest.importorskip("submitit")

from real_slurm import (RUN_ARGS, Launcher, assert_refused_in_one_line, jobs, launch, printed_log_paths,  # noqa: E402
                        same_files, wait_for)
from stage1.data.shards import shard_dir, shard_states  # noqa: E402

pytestmark = [pytest.mark.slurm, pytest.mark.slow]


@pytest.fixture(scope="module")
def slurm_settings():
    # KillWait 30 s: a cancelled task's shard (which ignores SIGTERM under submitit) has the time to finish
    return {"accounting": True, "kill_wait": 30, "partition_max_time": "2:00:00"}


def generate_args(model, instructions, out) -> list[str]:
    return ["--model", str(model), "--instructions", str(instructions), "--out", str(out), *RUN_ARGS]


def launcher_args(name: str, *more: str) -> list[str]:
    return ["slurm", "--array", "2", "--time", "10", "--wait", "--poll", "1", "--job-name", name, *more]


@pytest.mark.parametrize("more, option, fix", [
    (["--account", "nope"], "--account nope", "sacctmgr"),
    (["--qos", "nope"], "--qos nope", "sacctmgr"),
    (["--time", "4:00:00"], "--time 4:00:00", "sinfo"),
    (["--cpus-per-task", "8"], "--cpus-per-task 8", "sinfo"),
    (["--merge-time", "3:00:00"], "--merge-time 3:00:00", "sinfo"),
], ids=["account", "qos", "time", "cpus", "merge-time"])
def test_sbatch_refusals_are_one_line(queue, tiny_model_dir, instructions, tmp_path, more, option, fix):
    name = f"t-refused-{option.split()[0].strip('-')}"
    done = launch([*launcher_args(name, *more), "--", *generate_args(tiny_model_dir, instructions, tmp_path / "o")],
                  queue.env, tmp_path / "launcher", timeout=60)
    assert_refused_in_one_line(done, queue, name, option, fix)


def test_late_cancel_names_the_shard_and_resubmit_runs_the_merge(queue, tiny_model_dir, instructions, plain_run,
                                                                 tmp_path):
    """scancel of task 1 while its shard runs: submitit's task ignores SIGTERM and its shard finishes inside
    KillWait, so its files are complete but SLURM records it CANCELLED and cancels the merge. The report names
    shard 1 as cancelled (it said "the merge failed: No output/error stream produced!") and prints the --resubmit
    command, which submits the merge alone."""
    out = tmp_path / "out"
    run = Launcher([*launcher_args("t-late"), "--", *generate_args(tiny_model_dir, instructions, out)], queue.env,
                   tmp_path / "launcher")
    manifest = shard_dir(out, 1, 2) / "manifest.json"

    def running():
        state = {i: s for i, (s, _) in jobs(queue, "t-late").items() if i.endswith("_1")}
        return manifest.exists() and list(state.values()) == ["RUNNING"] and list(state)[0]

    task = wait_for("shard 1 running", running, 120, every=0.05, launcher=run)
    queue.run("scancel", task)
    done = run.finish(timeout=180)
    assert done.returncode == 1, done
    assert shard_states(out, 2) == {0: "complete", 1: "complete"}, "shard 1 did not finish inside KillWait"
    assert re.search(rf"shard 1 \(00001-of-00002, job {task}\) was CANCELLED", done.stderr), done
    assert "No output/error stream" not in done.stderr, done
    accounted = queue.run("sacct", "-n", "-X", "-P", "-j", task, "-o", "State").stdout
    assert accounted.startswith("CANCELLED"), accounted
    for path in printed_log_paths(done.stdout, done.stderr):
        assert path.exists(), path
    command = next(line.strip() for line in done.stderr.splitlines() if line.strip().startswith("python -m"))

    again = launch(shlex.split(command)[3:], queue.env, tmp_path / "launcher", timeout=240)
    assert again.returncode == 0, again
    assert "2 of 2 shards complete; submitting the merge only" in again.stdout, again
    same_files(out, plain_run)
