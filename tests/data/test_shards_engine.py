"""Shards and the merge with the real engine (fp32 on the CPU, whose tokens do not depend on batching): three shards
merged equal the unsharded run (byte for byte but the logprob signals' last digits: dataset_files.SIGNALS), on the tiny random checkpoint (also after a shard is killed with
SIGKILL mid-run and resumed) and on a checkpoint that answers every prompt alike, whose duplicates fall in
different shards."""

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
from stage1.data.shards import shard_dir, shard_of
from stage1.generate import main
from tiny_models import CHAIN_TEXT, make_chain_checkpoint

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
ARGS = ("--limit", 12, "--n", 2, "--max-tokens", 24, "--max-num-seqs", 4, "--batch-size", 1, "--dtype", "float32",
        "--device", "cpu", "--no-progress")
FILES = ("data.jsonl", "rejects.jsonl")


def argv(model_dir: Path, out: Path, *extra) -> list[str]:
    return ["--model", str(model_dir), "--out", str(out), *map(str, ARGS), *map(str, extra)]


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_bytes().splitlines()]


def sharded_then_merged(model_dir: Path, out: Path, *extra) -> Path:
    for index in range(3):
        assert main(argv(model_dir, out, *extra, "--num-shards", 3, "--shard-index", index, "--resume")) == 0
    assert main(argv(model_dir, out, *extra, "--merge")) == 0
    return out


def test_three_shards_of_the_random_model_merge_to_the_unsharded_run(tiny_model_dir, tmp_path):
    assert main(argv(tiny_model_dir, tmp_path / "whole", "--allow-run-on")) == 0
    assert_same_engine_files(sharded_then_merged(tiny_model_dir, tmp_path / "sharded", "--allow-run-on"),
                             tmp_path / "whole")


def test_a_shard_killed_mid_run_resumes_to_the_same_merge(tiny_model_dir, tmp_path):
    more = ("--limit", 24)  # shard 1 gets 8 instructions; one sequence at a time, so the kill lands mid-shard
    assert main(argv(tiny_model_dir, tmp_path / "whole", *more)) == 0
    out = tmp_path / "sharded"
    shard = shard_dir(out, 1, 3)
    proc = subprocess.Popen([sys.executable, "-m", "stage1.generate", *argv(tiny_model_dir, out, *more,
                             "--max-num-seqs", 1, "--num-shards", 3, "--shard-index", 1)], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while not any((shard / f).exists() and (shard / f).stat().st_size for f in FILES):  # its first rows
            assert proc.poll() is None and time.monotonic() < deadline, "the shard ended before any row"
            time.sleep(0.002)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert json.loads((shard / "manifest.json").read_text())["status"] == "running"  # killed before its end
    assert_same_engine_files(sharded_then_merged(tiny_model_dir, out, *more), tmp_path / "whole")


def test_duplicates_in_different_shards_are_found_at_the_merge(tmp_path):
    model = make_chain_checkpoint(tmp_path / "chain")
    same = ("--temperature", 0, "--allow-run-on")  # greedy: every completion of every prompt is CHAIN_TEXT
    assert main(argv(model, tmp_path / "whole", *same)) == 0
    assert_same_engine_files(sharded_then_merged(model, tmp_path / "sharded", *same), tmp_path / "whole")

    kept = rows(tmp_path / "sharded" / "data.jsonl")
    assert [r["response"] for r in kept] == [CHAIN_TEXT.strip()]  # one row kept of the dataset: the first
    rejected = rows(tmp_path / "sharded" / "rejects.jsonl")
    assert {r["reason"] for r in rejected} == {"exact_duplicate", "near_duplicate"}
    first = kept[0]["id"]
    assert any(r["reason"] == "near_duplicate" and shard_of(r["id"], 3) != shard_of(first, 3) for r in rejected)
    for index in range(3):  # each shard kept its own first rows: only the merge saw the other shards
        assert rows(shard_dir(tmp_path / "sharded", index, 3) / "data.jsonl")
