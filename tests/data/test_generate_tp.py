"""`python -m stage1.generate --tp N` with the real engine on the tiny random checkpoint (2 gloo ranks on the CPU):
the same rows as one rank, the TP size in the run's identity, and a worker killed mid-run ends the run with its
name, leaves the rows written intact, and `--resume` finishes the same dataset."""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import threading
import time

import pytest

from dataset_files import assert_same_engine_files
from stage1.generate import main

pytestmark = pytest.mark.slow

ARGS = ("--limit", 8, "--n", 1, "--max-tokens", 24, "--allow-run-on", "--no-progress")


def run(model_dir, out, *argv) -> int:
    return main(["--model", str(model_dir), "--out", str(out), *map(str, ARGS), *map(str, argv)])


def test_two_ranks_write_the_rows_of_one(tiny_model_dir, tmp_path):
    assert run(tiny_model_dir, tmp_path / "tp1") == 0
    assert run(tiny_model_dir, tmp_path / "tp2", "--tp", 2) == 0
    assert_same_engine_files(tmp_path / "tp2", tmp_path / "tp1")
    assert json.loads((tmp_path / "tp2" / "manifest.json").read_text())["identity"]["tensor_parallel_size"] == 2


def test_resume_with_another_tp_size_is_refused(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert run(tiny_model_dir, out, "--limit", 2) == 0
    assert run(tiny_model_dir, out, "--limit", 2, "--resume", "--tp", 2) == 2
    assert "tensor_parallel_size: 1 there, 2 now" in capsys.readouterr().err
    # a manifest from before the TP size was recorded stands for one rank
    manifest = json.loads((out / "manifest.json").read_text())
    del manifest["identity"]["tensor_parallel_size"]
    (out / "manifest.json").write_text(json.dumps(manifest))
    assert run(tiny_model_dir, out, "--limit", 2, "--resume") == 0


def test_a_killed_worker_ends_the_run_and_resume_finishes_it(tiny_model_dir, tmp_path, capsys):
    assert run(tiny_model_dir, tmp_path / "whole", "--batch-size", 1, "--max-num-seqs", 1) == 0
    out = tmp_path / "killed"

    def kill_after_the_first_rows():
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if (out / "data.jsonl").is_file() and (out / "data.jsonl").stat().st_size > 0:
                for child in multiprocessing.active_children():
                    if child.name == "stage1-tp-rank1":
                        os.kill(child.pid, signal.SIGKILL)
                        return
            time.sleep(0.005)

    killer = threading.Thread(target=kill_after_the_first_rows, daemon=True)
    killer.start()
    assert run(tiny_model_dir, out, "--batch-size", 1, "--max-num-seqs", 1, "--tp", 2) == 1
    killer.join()
    err = capsys.readouterr().err
    assert "tensor-parallel worker rank 1" in err and "killed by SIGKILL" in err and "--resume" in err
    written = [json.loads(line) for line in (out / "data.jsonl").read_bytes().splitlines()]
    assert 1 <= len(written) < 8  # some rows landed before the kill, not all
    assert run(tiny_model_dir, out, "--batch-size", 1, "--max-num-seqs", 1, "--tp", 2, "--resume") == 0
    assert_same_engine_files(out, tmp_path / "whole")
    assert not [c for c in multiprocessing.active_children() if c.name.startswith("stage1-tp-rank")]
