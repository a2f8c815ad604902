"""kill -9 at random moments during a streaming `python -m stage1.generate` run (a subprocess on the tiny random
checkpoint), then `--resume`: every trial ends with the byte-identical dataset of an uninterrupted run, and the files
never hold a corrupt line (only the last line may be cut short by the kill, and resume drops it).

The moments are set by the run's progress, not by the clock: each trial kills once a chosen number of rows is on
disk (none: right after the manifest; all: during the final manifest write and the exit; some in between), a
jitter of a few milliseconds later, so a slow or loaded machine moves every kill along with the run instead of past
its end or before its start.

The same for `python -m stage1.instructions` on the fake engine (tests/data/fake_instructions_cli.py, a step slowed
to a few ms), whose resume must also rebuild its dedup state and its count of kept instructions."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dataset_files import assert_same_engine_files
from stage1.generate import main
from stage1.instructions import main as instructions_main

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
# Small enough for 6 runs in well under a minute; one write per instruction and 3 requests in flight, so a kill
# can land before, between or inside writes, with requests finishing out of order.
ARGS = ("--limit", 6, "--n", 2, "--max-tokens", 10, "--max-num-seqs", 3, "--batch-size", 1, "--allow-run-on",
        "--no-progress")  # 12 rows: 6 instructions x 2 completions
TRIALS = 5
FILES = ("data.jsonl", "rejects.jsonl")
# Less than a step (a decode step of the tiny checkpoint takes several ms), so a kill lands just before, between or
# inside writes, never past the rows still to come.
JITTER_S = 0.002
# Generous: they only stop a run that hangs (a subprocess loading torch and the model on a loaded machine can take
# long), they are no deadline the run is meant to meet.
STARTUP_TIMEOUT_S = 300
RUN_TIMEOUT_S = 300


def argv(model_dir: Path, out: Path, *extra) -> list[str]:
    return ["--model", str(model_dir), "--out", str(out), *map(str, ARGS), *map(str, extra)]


def complete_lines(path: Path) -> int:
    """The number of whole lines; each must be a JSON row. Only the last line may be partial (no newline)."""
    if not path.exists():
        return 0
    lines = path.read_bytes().split(b"\n")
    for line in lines[:-1]:
        json.loads(line)  # a corrupt line raises
    return len(lines) - 1


def rows_on_disk(out: Path) -> int:
    return sum((out / name).read_bytes().count(b"\n") for name in FILES if (out / name).exists())


def run_and_kill(command: list[str], out: Path, rows: int, jitter: float) -> tuple[bool, int]:
    """Starts `python <command>` (its run writing to `out`) and SIGKILLs it `jitter` s after `rows` rows are on disk (counted from its manifest on);
    returns whether the kill landed (False: the run had finished) and the rows seen when it was decided."""
    log = out.with_name(f"{out.name}.stderr")  # a file, not a pipe: a full pipe would stall the run
    with open(log, "wb") as stderr:
        proc = subprocess.Popen([sys.executable, *command], cwd=REPO,
                                stdout=subprocess.DEVNULL, stderr=stderr)
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while not (out / "manifest.json").exists():  # the model loaded: the run proper starts
            assert proc.poll() is None, f"the run ended before its manifest: {log.read_text()[-2000:]}"
            assert time.monotonic() < deadline, f"no manifest after {STARTUP_TIMEOUT_S} s"
            time.sleep(0.005)
        deadline = time.monotonic() + RUN_TIMEOUT_S
        seen = rows_on_disk(out)
        while seen < rows and proc.poll() is None:
            assert time.monotonic() < deadline, f"{seen} rows after {RUN_TIMEOUT_S} s"
            time.sleep(0.0005)
            seen = rows_on_disk(out)
        time.sleep(jitter)
        if proc.poll() is not None:
            assert proc.returncode == 0, log.read_text()[-2000:]
            return False, seen
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
        return True, seen
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def check_kill_then_resume(tmp_path, run, resume, command) -> None:
    """run(out) and resume(out) -> exit code, in this process; command(out): the same run as a subprocess."""
    whole = tmp_path / "whole"
    assert run(whole) == 0
    total = sum(complete_lines(whole / name) for name in FILES)
    assert total >= 4
    seed = random.randrange(2**32)
    rng = random.Random(seed)
    # before any row, in the first half (several writes still to come), in the second, anywhere, after the last row
    targets = [0, rng.randint(1, total // 2), rng.randint(total // 2, total - 1), rng.randint(1, total - 1), total]
    assert len(targets) == TRIALS
    trials = []
    for trial, rows in enumerate(targets):
        out = tmp_path / f"trial{trial}"
        jitter = rng.uniform(0, JITTER_S)
        killed, seen = run_and_kill(command(out), out, rows, jitter)
        lines_before = sum(complete_lines(out / name) for name in FILES)  # raises on a corrupt line
        where = f"seed {seed}, trial {trial}: killed at {rows} rows + {jitter * 1e3:.1f} ms"
        assert resume(out) == 0, where
        assert_same_engine_files(out, whole), where
        assert sum(complete_lines(out / name) for name in FILES) == total
        trials.append((rows, seen, killed, lines_before))
    print(f"seed {seed}; (target rows, rows seen, killed, rows on disk after the kill): {trials}")
    # The kills landed during the runs: each one decided with rows still to come found the run going (it cannot
    # write them, its manifest and exit within the jitter), and at least one left a part of the rows on disk (the
    # first-half target: several writes were still to come, far longer than the jitter).
    assert all(killed for _, seen, killed, _ in trials if seen < total), f"seed {seed}: {trials}"
    assert any(0 < lines_before < total for *_, lines_before in trials), f"seed {seed}: {trials}"


def test_kill_9_at_random_moments_then_resume_gives_the_same_files(tiny_model_dir, tmp_path):
    check_kill_then_resume(
        tmp_path,
        run=lambda out: main(argv(tiny_model_dir, out)),
        resume=lambda out: main(argv(tiny_model_dir, out, "--resume")),
        command=lambda out: ["-m", "stage1.generate", *argv(tiny_model_dir, out)])


# 12 kept instructions, a few duplicates and run-ons rejected among them; 3 in flight, a write per attempt judged
INSTRUCTION_ARGS = ("--count", 12, "--max-num-seqs", 3, "--batch-size", 1, "--no-progress")


def test_instruction_job_kill_9_then_resume_gives_the_same_files(fake_model_dir, make_llm, tmp_path):
    # in this process the fake comes from the fixture; the killed subprocess builds the same one, slowed, in
    # fake_instructions_cli.py
    from test_instructions_job import instruction_respond

    def args(out, *extra):
        return ["--model", str(fake_model_dir), "--out", str(out), *map(str, INSTRUCTION_ARGS), *extra]

    def fake(model_dir, engine):
        return make_llm(respond=instruction_respond, max_num_seqs=engine.max_num_seqs)

    check_kill_then_resume(
        tmp_path,
        run=lambda out: instructions_main(args(out), llm_factory=fake),
        resume=lambda out: instructions_main(args(out, "--resume"), llm_factory=fake),
        command=lambda out: [str(Path(__file__).with_name("fake_instructions_cli.py")), *args(out)])
