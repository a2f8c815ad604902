"""`--data-parallel-size D`: D shard processes on this node, then the merge. On the tiny random checkpoint (fp32, so
tokens do not depend on how requests were batched): D=2 writes the files of one process (all but the logprob signals'
last digits: dataset_files.SIGNALS); a shard process killed
mid-run ends the run naming its shard, and --resume finishes it to the same files."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dataset_files import assert_same_engine_files
from stage1.data.data_parallel import cpu_threads_each, gpu_slices
from stage1.data.errors import DataError
from stage1.data.shards import shard_dir
from stage1.generate import main

REPO = Path(__file__).resolve().parents[2]
ARGS = ("--limit", 12, "--n", 2, "--max-tokens", 10, "--max-num-seqs", 3, "--batch-size", 1, "--allow-run-on",
        "--dtype", "float32", "--device", "cpu", "--no-progress")


def argv(model_dir: Path, out: Path, *extra) -> list[str]:
    return ["--model", str(model_dir), "--out", str(out), *map(str, ARGS), *map(str, extra)]


@pytest.fixture(scope="module")
def one_process(tiny_model_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dp") / "one"
    assert main(argv(tiny_model_dir, out)) == 0
    return out


def test_gpu_slices_give_each_process_its_own_devices():
    env = {"CUDA_VISIBLE_DEVICES": "4,5,6,7"}
    assert gpu_slices(2, 2, "auto", env) == ["4,5", "6,7"]
    assert gpu_slices(4, 1, "cuda", env) == ["4", "5", "6", "7"]
    assert gpu_slices(2, 1, "cpu", env) == [None, None]
    assert gpu_slices(2, 1, "auto", {"CUDA_VISIBLE_DEVICES": ""}) == [None, None]  # no GPU: a CPU run
    with pytest.raises(DataError, match="needs 6 GPUs, this node shows 4"):
        gpu_slices(3, 2, "cuda", env)
    with pytest.raises(DataError, match="pass --device cuda"):
        gpu_slices(2, 1, "cuda:1", env)
    assert cpu_threads_each(2, {"OMP_NUM_THREADS": "16"}) == 8
    assert cpu_threads_each(4, {"OMP_NUM_THREADS": "2"}) == 1


@pytest.mark.slow
def test_two_processes_write_the_files_of_one(tiny_model_dir, one_process, tmp_path, capsys):
    out = tmp_path / "dp2"
    assert main(argv(tiny_model_dir, out, "--data-parallel-size", 2)) == 0
    assert_same_engine_files(out, one_process)
    for index in range(2):
        manifest = json.loads((shard_dir(out, index, 2) / "manifest.json").read_text())
        assert manifest["status"] == "complete" and manifest["shard"]["index"] == index
    err = capsys.readouterr().err
    assert "[00000-of-00002]" in err and "[00001-of-00002]" in err  # each process's lines, named

    assert main(argv(tiny_model_dir, out, "--data-parallel-size", 2, "--resume")) == 0  # nothing left: no rerun
    assert "[00001-of-00002] complete, not rerun" in capsys.readouterr().err
    assert_same_engine_files(out, one_process)


def wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def running_pid(out: Path, index: int) -> int | None:
    """The shard process's pid, from its manifest once it is written (its engine loaded)."""
    try:
        manifest = json.loads((shard_dir(out, index, 2) / "manifest.json").read_text())
    except (OSError, ValueError):
        return None
    return manifest["running_on"]["pid"] if manifest.get("status") == "running" else None


@pytest.mark.slow
def test_a_killed_shard_process_ends_the_run_naming_it_and_resume_finishes(tiny_model_dir, one_process, tmp_path):
    out = tmp_path / "dp2-killed"
    parent = subprocess.Popen([sys.executable, "-m", "stage1.generate", *argv(tiny_model_dir, out,
                               "--data-parallel-size", 2)], cwd=REPO, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    try:
        pid = wait_for(lambda: running_pid(out, 1), 60, "shard 1's manifest")
        os.kill(pid, signal.SIGKILL)
        t_kill = time.monotonic()
        _, err = parent.communicate(timeout=60)
        ended_after = time.monotonic() - t_kill
    finally:
        if parent.poll() is None:  # its shard processes die with it (PR_SET_PDEATHSIG)
            parent.kill()
            parent.wait()
    assert parent.returncode == 1, err
    assert f"shard 00001-of-00002 (process {pid}) was killed by SIGKILL" in err and "--resume" in err
    assert ended_after < 40  # the other shard is interrupted, not waited for
    assert not (out / "data.jsonl").exists()  # no merge of an incomplete run
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)

    assert main(argv(tiny_model_dir, out, "--data-parallel-size", 2, "--resume")) == 0
    assert_same_engine_files(out, one_process)


@pytest.mark.slow
def test_two_tensor_parallel_engines_side_by_side(tiny_model_dir, one_process, tmp_path):
    """D=2 x T=2: four ranks, two process groups, each on the port its rank 0 holds; the rows of one process."""
    out = tmp_path / "dp2-tp2"
    assert main(argv(tiny_model_dir, out, "--data-parallel-size", 2, "--tensor-parallel-size", 2)) == 0
    assert_same_engine_files(out, one_process)
