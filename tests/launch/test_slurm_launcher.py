"""The SLURM launcher (`python -m stage1.launch slurm`): its task and merge callables, the sbatch parameters it builds,
its input checks, the hand-written sbatch examples, and (slow) whole runs on submitit's LocalExecutor: 3 shards of
the real generate on the tiny random checkpoint, one made to fail, then --resubmit of that one alone and the merge,
whose files are the bytes of an unsharded run."""

from __future__ import annotations

import json
import os
import pickle
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

submitit = pytest.importorskip("submitit")

from dataset_files import FILES, assert_same_engine_files  # noqa: E402
from stage1 import launch  # noqa: E402
from stage1.data.manifest import write_manifest  # noqa: E402
from stage1.data.shards import shard_dir, shard_name  # noqa: E402
from stage1.generate import build_parser as generate_parser  # noqa: E402
from stage1.generate import main as generate_main  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "examples" / "slurm"
RUN_ARGS = ["--limit", "6", "--n", "2", "--max-tokens", "10", "--max-num-seqs", "3", "--no-progress",
            "--dtype", "float32", "--device", "cpu"]  # no --allow-run-on: rejects.jsonl gets rows too


def launcher_opts(*args: str):
    opts = launch.build_parser().parse_args(["slurm", "--array", "8", *args])
    launch.check_launcher_args(opts)
    return opts


# --- the task callables ------------------------------------------------------------------------------------------

def test_checkpoint_requeues_the_same_shard():
    task = launch.ShardTask(["--out", "o", "--seed", "3"], index=1, count=3)
    assert isinstance(task, submitit.helpers.Checkpointable)
    resubmission = submitit.helpers.DelayedSubmission(task)._checkpoint_function()  # what submitit calls
    assert isinstance(resubmission, submitit.helpers.DelayedSubmission)
    assert resubmission.function == task and resubmission.args == () and resubmission.kwargs == {}
    assert pickle.loads(pickle.dumps(resubmission.function)) == task
    assert task.argv() == ["--out", "o", "--seed", "3", "--num-shards", "3", "--shard-index", "1", "--resume"]
    assert launch.MergeTask(["--out", "o"], 3).argv() == ["--out", "o", "--merge", "--num-shards", "3"]


def test_a_nonzero_generate_exit_fails_the_job(monkeypatch):
    seen = []
    monkeypatch.setattr("stage1.generate.main", lambda argv: seen.append(argv) or 2)
    with pytest.raises(launch.ShardFailed, match="shard 2 of 4: python -m stage1.generate exited 2"):
        launch.ShardTask(["--out", "o"], 2, 4)()
    monkeypatch.setattr("stage1.generate.main", lambda argv: 0)
    assert launch.MergeTask(["--out", "o"], 4)() == {"what": "merge of 4 shards", "exit": 0}
    assert seen == [["--out", "o", "--num-shards", "4", "--shard-index", "2", "--resume"]]


# --- sbatch parameters -------------------------------------------------------------------------------------------

def sbatch_lines(params: dict, tmp_path: Path, **extra) -> set[str]:
    """The #SBATCH lines submitit would write for these parameters (its own renderer, nothing submitted)."""
    from submitit.slurm import slurm

    assert set(params) <= set(slurm._get_default_parameters())  # names SlurmExecutor.update_parameters accepts
    text = slurm._make_sbatch_string(command="python -m submitit.core._submit x", folder=tmp_path, **params, **extra)
    return {line for line in text.splitlines() if line.startswith("#SBATCH")}


def test_array_parameters_from_launcher_options(tmp_path):
    opts = launcher_opts("--gpus-per-task", "2", "--cpus-per-task", "16", "--mem-gb", "64", "--time", "1:30:00",
                         "--partition", "gpu", "--account", "acc", "--qos", "high", "--max-parallel", "4",
                         "--sbatch", "constraint=h100", "--job-name", "gen")
    lines = sbatch_lines(launch.slurm_parameters(opts), tmp_path, map_count=8)
    for expected in ("--gpus-per-task=2", "--cpus-per-task=16", "--mem=64GB", "--time=90", "--partition=gpu",
                     "--account=acc", "--qos=high", "--array=0-7%4", "--constraint=h100", "--job-name=gen",
                     "--requeue", "--ntasks-per-node=1", "--nodes=1"):
        assert f"#SBATCH {expected}" in lines, expected
    assert any(line.startswith("#SBATCH --signal=USR2@") for line in lines)  # submitit's requeue signal


def test_cpu_only_shards_and_defaults(tmp_path):
    lines = sbatch_lines(launch.slurm_parameters(launcher_opts("--gpus-per-task", "0")), tmp_path, map_count=8)
    assert not any("gpu" in line for line in lines)
    assert "#SBATCH --time=240" in lines and "#SBATCH --array=0-7%8" in lines
    assert not any(line.startswith(("#SBATCH --partition", "#SBATCH --mem")) for line in lines)


def test_merge_parameters(tmp_path):
    opts = launcher_opts("--partition", "gpu", "--merge-partition", "cpu", "--merge-time", "30", "--account", "acc")
    lines = sbatch_lines(launch.merge_parameters(opts, after="1234"), tmp_path)
    for expected in ("--dependency=afterok:1234", "--kill-on-invalid-dep=yes", "--partition=cpu", "--time=30",
                     "--account=acc", "--cpus-per-task=1", "--job-name=stage1-generate-merge"):
        assert f"#SBATCH {expected}" in lines, expected
    assert not any("gpu" in line for line in lines)
    assert "#SBATCH --partition=gpu" in sbatch_lines(launch.merge_parameters(launcher_opts("--partition", "gpu"),
                                                                             after=None), tmp_path)


@pytest.mark.parametrize("text, minutes", [("90", 90), ("1:30:00", 90), ("0:00:30", 1), ("2-01:00:00", 2940)])
def test_time_limits(text, minutes):
    assert launch.parse_time(text, "--time") == minutes


# --- input checks ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("argv, message", [
    (["slurm", "--array", "2"], "no generate arguments"),
    (["slurm", "--array", "0", "--", "--out", "o"], "--array must be at least 1"),
    (["slurm", "--array", "2", "--time", "1:30", "--", "--out", "o"], "--time '1:30': give minutes"),
    (["slurm", "--array", "2", "--sbatch", "constraint", "--", "--out", "o"], "--sbatch 'constraint': give KEY=VALUE"),
    (["slurm", "--array", "2", "--", "--out", "o", "--num-sh", "3"], "drop from the generate arguments: --num-shards"),
    (["slurm", "--array", "2", "--", "--out", "o", "--shard-index", "0"], "--num-shards/--shard-index"),
    (["slurm", "--array", "2", "--", "--out", "o", "--merge"], "--merge (the launcher submits the merge job"),
    (["slurm", "--array", "2", "--", "--out", "o", "--dp", "2"], "--data-parallel-size (one engine per array task"),
    (["slurm", "--array", "2", "--", "--out", "o", "--overwrite"], "--overwrite (a requeued task would wipe"),
    (["slurm", "--array", "2", "--", "--out", "o", "--bogus"], "the generate arguments (after --) are not valid"),
    (["slurm", "--array", "2", "--gpus-per-task", "1", "--", "--out", "o", "--tp", "2"],
     "--tensor-parallel-size 2 needs that many GPUs per task, but --gpus-per-task is 1"),
])
def test_bad_launcher_input(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert launch.main(argv) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()  # nothing written


def test_slurm_needs_sbatch(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch/srun there
    assert launch.main(["slurm", "--array", "2", "--", "--out", str(tmp_path / "o")]) == 2
    assert "no sbatch/srun on PATH" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_without_submitit_one_line_says_how_to_install(capsys, monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "submitit", None)  # `import submitit` raises ImportError
    assert launch.main(["slurm", "--array", "2", "--", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.strip() == 'error: the SLURM launcher needs submitit: pip install "stage1[slurm]"'


def fake_shard(out: Path, index: int, count: int, status: str) -> None:
    shard_dir(out, index, count).mkdir(parents=True)
    write_manifest(shard_dir(out, index, count), {"status": status})


def test_which_shards_a_launch_submits(tmp_path):
    out = tmp_path / "out"
    assert launch.shards_to_run(out, 4, resubmit=False) == [0, 1, 2, 3]
    fake_shard(out, 0, 4, "complete")
    fake_shard(out, 2, 4, "running")
    assert launch.shards_to_run(out, 4, resubmit=True) == [1, 2, 3]
    with pytest.raises(launch.LaunchError, match=r"already holds 2 of the 4 shards \(1 complete\): pass --resubmit"):
        launch.shards_to_run(out, 4, resubmit=False)
    with pytest.raises(launch.LaunchError, match="holds shards of a 4-shard run; pass --array 4"):
        launch.shards_to_run(out, 8, resubmit=True)


def test_resubmit_command_and_index_sets():
    cmd = launch.resubmit_command(["slurm", "--array", "3", "--cluster", "local"], ["--out", "my out"])
    assert cmd == "python -m stage1.launch slurm --array 3 --cluster local --resubmit -- --out 'my out'"
    assert launch.resubmit_command(["slurm", "--resubmit"], ["--out", "o"]).count("--resubmit") == 1
    assert launch.compact([0, 1, 2, 5, 7, 8]) == "0-2,5,7-8"


def test_slurm_submission_one_array_then_the_merge(tmp_path, monkeypatch, capsys):
    """Against a stand-in sbatch (records each submission file, answers like SLURM): one array of the 3 shards,
    then the merge, after it."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text('#!/bin/sh\nn=$(ls "$SUBMISSIONS" | wc -l)\ncp "$1" "$SUBMISSIONS/$n.sh"\n'
                                    'echo "Submitted batch job $((1000 + n))"\n')
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 1\n")
    for tool in ("sbatch", "srun"):
        (bin_dir / tool).chmod(0o755)
    (tmp_path / "submissions").mkdir()
    monkeypatch.setenv("SUBMISSIONS", str(tmp_path / "submissions"))
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    out = tmp_path / "out"
    argv = ["slurm", "--array", "3", "--gpus-per-task", "2", "--partition", "gpu", "--", "--out", str(out), "--tp", "2"]
    assert launch.main(argv) == 0
    printed = capsys.readouterr().out
    assert "submitted shards 0-2 of 3 as array job 1000" in printed and "submitted the merge as job 1001" in printed
    assert "squeue -j 1000,1001" in printed
    array, merge = ((tmp_path / "submissions" / f"{n}.sh").read_text() for n in (0, 1))
    assert "#SBATCH --array=0-2%3" in array and "#SBATCH --gpus-per-task=2" in array
    assert "#SBATCH --dependency=afterok:1000" in merge and "gpus" not in merge
    pickles = sorted((out / "slurm-logs").glob("1000_*_submitted.pkl"))
    tasks = [submitit.helpers.DelayedSubmission.load(p).function for p in pickles]
    assert [t.argv()[-4:] for t in tasks] == [["3", "--shard-index", str(i), "--resume"] for i in range(3)]
    assert all(t.generate_args == ["--out", str(out), "--tp", "2"] for t in tasks)


def stand_ins(tmp_path: Path, monkeypatch, **scripts: str) -> Path:
    """SLURM commands that answer as the given shell scripts do (srun, which only has to exist, fails)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for tool, body in {"srun": "exit 1", **scripts}.items():
        (bin_dir / tool).write_text(f"#!/bin/sh\n{body}\n")
        (bin_dir / tool).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    return bin_dir


@pytest.mark.parametrize("generate, expected", [
    (["--tp", "2"], "#SBATCH --gpus-per-task=2"),  # a GPU run: its --tp GPUs a task
    ([], "#SBATCH --gpus-per-task=1"),
    (["--device", "cpu"], None),  # a CPU run asks no GPU (it asked 1, which a CPU partition refuses)
])
def test_gpus_per_task_default_fits_the_run(tmp_path, monkeypatch, capsys, generate, expected):
    array = tmp_path / "array.sh"  # the first submission: the shards' array (then the merge's)
    stand_ins(tmp_path, monkeypatch, sbatch=f'[ -e {array} ] || cp "$1" {array}; echo "Submitted batch job 7"',
              scontrol='echo "AccountingStorageType = accounting_storage/none"')
    assert launch.main(["slurm", "--array", "2", "--", "--out", str(tmp_path / "o"), *generate]) == 0
    capsys.readouterr()
    lines = [line for line in array.read_text().splitlines() if line.startswith("#SBATCH --gpus")]
    assert lines == ([expected] if expected else [])


def test_sbatch_refusal_is_one_line_exit_2(tmp_path, monkeypatch, capsys):
    """sbatch's refusal (here a GPU asked of a partition without any) is one line naming the option and the fix,
    exit 2; it was submitit's FailedJobError traceback, exit 1."""
    stand_ins(tmp_path, monkeypatch, sbatch='echo "sbatch: error: Invalid generic resource (gres) specification" >&2; '
                                            'exit 1')
    assert launch.main(["slurm", "--array", "2", "--", "--out", str(tmp_path / "o"), "--device", "cuda"]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: sbatch refused the shards' array: --gpus-per-task 1: "), \
        captured.err
    assert "pass --gpus-per-task 0" in lines[0] and "Invalid generic resource" in lines[0]
    assert "Traceback" not in captured.err + captured.out


@pytest.mark.parametrize("said, flags, expected", [
    ("sbatch: error: invalid partition specified: gpu", ["--partition", "gpu"], "--partition gpu: no such partition"),
    ("sbatch: error: Batch job submission failed: Invalid account or account/partition combination specified",
     ["--account", "x"], "--account x: not an account of yours"),
    ("sbatch: error: Batch job submission failed: Invalid qos specification", ["--qos", "q"], "--qos q: not a QOS"),
    ("sbatch: error: Batch job submission failed: Requested time limit is invalid (missing or exceeds some limit)",
     ["--time", "9:00:00"], "--time 9:00:00: above what"),
    ("sbatch: error: Batch job submission failed: More processors requested than permitted",
     ["--cpus-per-task", "64"], "--cpus-per-task 64: more than a node"),
    ("sbatch: error: Batch job submission failed: Invalid feature specification", ["--sbatch", "constraint=h100"],
     "--sbatch constraint=h100: no node"),
    ("sbatch: error: Batch job submission failed: Something new", [], "sbatch: Batch job submission failed: Something"),
])
def test_sbatch_refusals_name_the_option(said, flags, expected):
    opts = launcher_opts(*flags)
    opts.gpus_per_task = 0
    assert expected in launch.refusal(said, opts, merge=False)


def test_merge_refusal_cancels_the_array(tmp_path, monkeypatch, capsys):
    """The array is accepted, the merge refused (here its partition): the array is cancelled (nothing half-run),
    one line says so."""
    stand_ins(tmp_path, monkeypatch,
              sbatch='if grep -q "partition=nope" "$1"; then echo "sbatch: error: invalid partition specified: nope" '
                     '>&2; exit 1; fi; echo "Submitted batch job 1000"',
              scancel=f'echo "$@" > {tmp_path}/cancelled')
    argv = ["slurm", "--array", "2", "--merge-partition", "nope", "--", "--out", str(tmp_path / "o"), "--device", "cpu"]
    assert launch.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert "sbatch refused the merge job: --merge-partition nope" in err and "array job 1000 was cancelled" in err
    assert (tmp_path / "cancelled").read_text().strip() == "1000"


def test_one_shard_resubmit_is_a_plain_job_with_its_real_log(tmp_path, monkeypatch, capsys):
    """submitit submits one task as a plain job: it is named so, with its log's real name (it was announced as an
    array job with the log hint 19_k_0_log.err, the file being 19_0_log.err)."""
    stand_ins(tmp_path, monkeypatch, sbatch='n=$(cat "$COUNTER" 2>/dev/null || echo 0); echo $((n + 1)) > "$COUNTER"; '
                                            'echo "Submitted batch job $((19 + n))"',
              scontrol='echo "AccountingStorageType   = accounting_storage/none"')
    monkeypatch.setenv("COUNTER", str(tmp_path / "counter"))
    out = tmp_path / "out"
    fake_shard(out, 0, 2, "complete")
    assert launch.main(["slurm", "--array", "2", "--resubmit", "--", "--out", str(out), "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert "submitting shard 1 and the merge" in printed
    assert f"submitted shard 1 of 2 as job 19 (its log, once it starts: {out}/slurm-logs/19_0_log.err)" in printed
    assert "array job" not in printed and "array task" not in printed and "_k_" not in printed
    assert "sacct" not in printed  # no accounting on this cluster: no sacct to suggest


def test_job_states_from_squeue_then_sacct(tmp_path, monkeypatch, capsys):
    """SlurmStates: squeue's answer; a job it no longer lists is GONE where accounting is off (said once, not
    each poll), sacct's state where it is on; a squeue that does not answer is no state at all (ask again)."""
    answers = tmp_path / "squeue.txt"
    stand_ins(tmp_path, monkeypatch, squeue=f'cat {answers}',
              scontrol=f'cat {tmp_path}/config', sacct=f'cat {tmp_path}/sacct.txt')
    (tmp_path / "config").write_text("AccountingStorageType   = accounting_storage/none\n")
    answers.write_text("12_0|COMPLETED|None\n13|PENDING|DependencyNeverSatisfied\n")
    states = launch.SlurmStates()
    for _ in range(3):
        got = states.query(["12_0", "12_1", "13"])
        assert got == {"12_0": launch.JobState("COMPLETED", "None"), "12_1": launch.JobState("GONE"),
                       "13": launch.JobState("PENDING", "DependencyNeverSatisfied")}
    assert capsys.readouterr().err.count("no longer lists job 12_1") == 1
    assert got["12_1"].ended and got["12_0"].ended and not got["13"].ended

    # a pending array task that is cancelled leaves no record at all without accounting: dropped while pending
    answers.write_text("12_0|RUNNING|None\n12_1|PENDING|JobArrayTaskLimit\n")
    assert states.query(["12_0", "12_1"])["12_1"] == launch.JobState("PENDING", "JobArrayTaskLimit")
    answers.write_text("12_0|RUNNING|None\n")
    assert states.query(["12_0", "12_1"])["12_1"] == launch.JobState("GONE", "was pending")
    never_started = SimpleNamespace(paths=SimpleNamespace(stderr=tmp_path / "none.err",
                                                          result_pickle=tmp_path / "none.pkl"))
    assert launch.how_it_ended(never_started, launch.JobState("GONE", "was pending")).startswith(
        "was CANCELLED before it started")
    assert launch.how_it_ended(never_started, launch.JobState("GONE")).startswith("ended without a result")
    launch.SlurmStates.submitted(states, ["14"])  # accepted by sbatch: pending, even if never seen by squeue
    assert states.query(["14"])["14"] == launch.JobState("GONE", "was pending")

    (tmp_path / "config").write_text("AccountingStorageType   = accounting_storage/slurmdbd\n")
    (tmp_path / "sacct.txt").write_text("12_1|CANCELLED by 0\n")
    assert launch.SlurmStates().query(["12_0", "12_1"])["12_1"] == launch.JobState("CANCELLED")

    stand_ins(tmp_path, monkeypatch, squeue='echo "squeue: error: Unable to contact slurm controller" >&2; exit 1')
    states = launch.SlurmStates()
    assert states.query(["12_0"]) is None and states.query(["12_0"]) is None
    assert capsys.readouterr().err.count("squeue did not answer") == 1


# --- the hand-written sbatch scripts -----------------------------------------------------------------------------

def run_script(script: Path, tmp_path: Path, **env: str) -> list[str]:
    """Runs the script with stand-ins for srun (runs its command) and python (records its arguments): the generate
    arguments exactly as bash expanded them."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "srun").write_text('#!/bin/sh\nexec "$@"\n')
    (bin_dir / "python").write_text('#!/bin/sh\nprintf "%s\\n" "$@" > "$ARGS_FILE"\n')
    for tool in ("srun", "python"):
        (bin_dir / tool).chmod(0o755)
    args_file = tmp_path / f"{script.stem}.args"
    subprocess.run(["bash", str(script)], check=True, timeout=30, cwd=tmp_path,
                   env={"PATH": f"{bin_dir}:/usr/bin:/bin", "ARGS_FILE": str(args_file), **env})
    argv = args_file.read_text().splitlines()
    assert argv[:2] == ["-m", "stage1.generate"]
    return argv[2:]


@pytest.mark.parametrize("name", ["generate_array.sbatch", "merge.sbatch"])
def test_sbatch_scripts_are_valid_bash(name):
    subprocess.run(["bash", "-n", str(EXAMPLES / name)], check=True, timeout=30)


def test_sbatch_scripts_pass_generate_flags(tmp_path):
    extra = "--max-tokens 77 --dtype bfloat16 --top-p 0.5 --style qa"  # GENERATE_ARGS, in shell quoting
    task = generate_parser().parse_args(run_script(EXAMPLES / "generate_array.sbatch", tmp_path,
                                                   SLURM_ARRAY_TASK_ID="3", SLURM_ARRAY_TASK_COUNT="8",
                                                   SLURM_ARRAY_JOB_ID="77", GENERATE_ARGS=extra))
    assert (task.num_shards, task.shard_index, task.resume, task.out) == (8, 3, True, "out/run1")
    assert (task.max_tokens, task.dtype, task.top_p, task.style) == (77, "bfloat16", 0.5, "qa")
    # resubmitting shards 3 and 5 of 8: the array has 2 tasks, NUM_SHARDS says 8
    task = generate_parser().parse_args(run_script(EXAMPLES / "generate_array.sbatch", tmp_path, NUM_SHARDS="8",
                                                   SLURM_ARRAY_TASK_ID="5", SLURM_ARRAY_TASK_COUNT="2"))
    assert (task.num_shards, task.shard_index, task.max_tokens) == (8, 5, generate_parser().get_default("max_tokens"))
    merge = generate_parser().parse_args(run_script(EXAMPLES / "merge.sbatch", tmp_path, OUT="out/x", NUM_SHARDS="8",
                                                    GENERATE_ARGS=extra))
    assert (merge.merge, merge.num_shards, merge.out, merge.shard_index) == (True, 8, "out/x", None)
    assert (merge.model, merge.instructions, merge.max_tokens, merge.dtype) == (task.model, task.instructions, 77,
                                                                              "bfloat16")
    # without NUM_SHARDS the merge counts the shards from their directories
    (tmp_path / "out" / "y" / "shards" / shard_name(2, 6)).mkdir(parents=True)
    merge = generate_parser().parse_args(run_script(EXAMPLES / "merge.sbatch", tmp_path, OUT="out/y"))
    assert merge.num_shards == 6
    text = (EXAMPLES / "generate_array.sbatch").read_text()
    for line in ("#SBATCH --requeue", "#SBATCH --open-mode=append", "#SBATCH --signal=B:USR1@120", "--array=3,5",
                 "--dependency=afterok:$ARRAY"):
        assert line in text, line
    assert "#SBATCH --open-mode=append" in (EXAMPLES / "merge.sbatch").read_text()
    # resources come from sbatch's command line: none fixed in the scripts
    for script in ("generate_array.sbatch", "merge.sbatch"):
        lines = (EXAMPLES / script).read_text().splitlines()
        assert not [line for line in lines if line.startswith(("#SBATCH --array", "#SBATCH --gpus", "#SBATCH --cpus",
                                                               "#SBATCH --mem", "#SBATCH --partition"))], script


def test_sbatch_scripts_refuse_what_they_cannot_run(tmp_path):
    """Not an array task; a merge with no shard count and no shards: exit 2 with one line, generate never run."""
    for script, env in (("generate_array.sbatch", {}), ("merge.sbatch", {"OUT": "out/none"})):
        proc = subprocess.run(["bash", str(EXAMPLES / script)], cwd=tmp_path, capture_output=True, text=True,
                              timeout=30, env={"PATH": "/usr/bin:/bin", **env})
        assert proc.returncode == 2 and proc.stderr.startswith("error: "), (script, proc.stderr)


# --- whole runs on submitit's LocalExecutor ----------------------------------------------------------------------

def launcher(argv: list[str], timeout: float = 150) -> subprocess.CompletedProcess:
    """`python -m stage1.launch` in its own session, so that every process it starts (submitit's job controllers,
    the jobs) is in one process group, killed by its id if anything outlives the launcher or the timeout."""
    proc = subprocess.Popen([sys.executable, "-m", "stage1.launch", *argv], cwd=REPO, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=30)
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


@pytest.mark.slow
def test_local_array_fail_resubmit_merge(tiny_model_dir, tmp_path, capsys):
    plain, out = tmp_path / "plain", tmp_path / "out"
    assert generate_main(["--model", str(tiny_model_dir), "--out", str(plain), *RUN_ARGS]) == 0
    gen_args = ["--model", str(tiny_model_dir), "--out", str(out), *RUN_ARGS]
    argv = ["slurm", "--cluster", "local", "--array", "3", "--gpus-per-task", "0", "--time", "10", "--", *gen_args]

    # shard 1's directory is blocked by a regular file: generate refuses it (exit 2), the others complete
    blocker = shard_dir(out, 1, 3)
    blocker.parent.mkdir(parents=True)
    blocker.write_text("in the way")
    first = launcher(argv)
    assert first.returncode == 1, first.stderr
    assert f"shard 1 ({shard_name(1, 3)}, job " in first.stderr and "is not a directory" in first.stderr
    assert "1 of 3 shards failed; the merge did not run" in first.stderr
    assert not any((out / name).exists() for name in (*FILES, "manifest.json"))
    logs = out / "slurm-logs"
    assert len(list(logs.glob("*_submitted.pkl"))) == 3  # the shards; no merge job
    done = {i: (shard_dir(out, i, 3) / "manifest.json").read_bytes() for i in (0, 2)}
    assert all(json.loads(m)["status"] == "complete" for m in done.values())

    # the printed --resubmit command reruns shard 1 alone, then the merge
    blocker.unlink()
    command = next(line.strip() for line in first.stderr.splitlines() if "--resubmit" in line)
    resubmit = shlex.split(command)
    assert resubmit[:3] == ["python", "-m", "stage1.launch"]
    second = launcher(resubmit[3:])
    assert second.returncode == 0, second.stderr
    assert "2 of 3 shards complete; submitting shard 1 and the merge" in second.stdout
    assert len(list(logs.glob("*_submitted.pkl"))) == 5  # + shard 1 + the merge
    for index, manifest in done.items():  # not rerun: not even a resumed session
        assert (shard_dir(out, index, 3) / "manifest.json").read_bytes() == manifest
    assert json.loads((out / "manifest.json").read_text())["status"] == "complete"
    assert_same_engine_files(out, plain)
    assert (plain / "rejects.jsonl").read_bytes() and (plain / "data.jsonl").read_bytes()

    # nothing left to do: no job at all
    assert launch.main(resubmit[3:]) == 0
    assert "all 3 shards and the merge are complete; nothing to submit" in capsys.readouterr().out
    assert len(list(logs.glob("*_submitted.pkl"))) == 5


@pytest.mark.slow
def test_a_preempted_shard_is_requeued_and_resumes(tiny_model_dir, tmp_path):
    """submitit's preemption signal (USR2) mid-run: the task's checkpoint() requeues it, the requeued task resumes
    its shard, and the shard's files are those of an uninterrupted run."""
    plain, out = tmp_path / "plain", tmp_path / "out"
    shard = ["--num-shards", "2", "--shard-index", "0"]
    assert generate_main(["--model", str(tiny_model_dir), "--out", str(plain), *RUN_ARGS, *shard]) == 0
    executor = submitit.LocalExecutor(folder=tmp_path / "logs", max_num_timeout=1)
    executor.update_parameters(timeout_min=5, gpus_per_node=0)
    job = executor.submit(launch.ShardTask(["--model", str(tiny_model_dir), "--out", str(out), *RUN_ARGS], 0, 2))
    try:
        manifest = shard_dir(out, 0, 2) / "manifest.json"
        deadline = time.monotonic() + 60
        while not manifest.exists() and not job.done() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert manifest.exists() and not job.done(), "the shard ended before it could be preempted"
        # the preemption signal to the running task: a child of the job's controller (which would forward only
        # its time-out signal)
        controller = job._process.pid
        (task,) = map(int, Path(f"/proc/{controller}/task/{controller}/children").read_text().split())
        os.kill(task, submitit.JobEnvironment._usr_sig())
        deadline = time.monotonic() + 90
        while not job.done() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert job.result() == {"what": "shard 0 of 2", "exit": 0}
    finally:
        if not job.done():
            job.cancel()  # SIGINT to the job's controller, which stops its task
        job._process.wait(timeout=30)
    assert "Requeued job" in job.stdout()
    sessions = json.loads(manifest.read_text())["sessions"]
    assert sessions[-1]["resumed"] is True
    assert_same_engine_files(shard_dir(out, 0, 2), shard_dir(plain, 0, 2))


def test_job_instructions_runs_the_instruction_cli_in_every_task(monkeypatch):
    """--job instructions: the arguments after -- are checked by python -m stage1.instructions' own parser, and the
    shard and merge tasks run its main (the default job stays stage1.generate)."""
    import stage1.instructions

    opts = launch.build_parser().parse_args(["slurm", "--array", "2", "--job", "instructions"])
    assert launch.JOB_CLIS[opts.job] == "stage1.instructions"
    args = launch.check_generate_args(["--count", "40", "--out", "x", "--device", "cpu"], 0, "stage1.instructions")
    assert args.count == 40
    with pytest.raises(launch.LaunchError, match="the instructions arguments"):
        launch.check_generate_args(["--limit", "3", "--out", "x"], 0, "stage1.instructions")  # a generate flag
    ran = []
    monkeypatch.setattr(stage1.instructions, "main", lambda argv: ran.append(argv) or 0)
    launch.ShardTask(["--count", "40", "--out", "x"], 1, 2, "stage1.instructions")()
    launch.MergeTask(["--count", "40", "--out", "x"], 2, "stage1.instructions")()
    assert ran == [["--count", "40", "--out", "x", "--num-shards", "2", "--shard-index", "1", "--resume"],
                   ["--count", "40", "--out", "x", "--merge", "--num-shards", "2"]]
    assert launch.ShardTask(["--out", "x"], 0, 1).cli == "stage1.generate"
