"""kill -9 at random moments during a streaming `python -m stage1.generate` run (a subprocess on the tiny random
checkpoint), then `--resume`: every trial ends with the byte-identical dataset of an uninterrupted run, and the files
never hold a corrupt line (only the last line may be cut short by the kill, and resume drops it)."""

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

from stage1.generate import main

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
# Small enough for 11 runs in well under a minute; one write per instruction and 3 requests in flight, so a kill
# can land before, between or inside writes, with requests finishing out of order.
ARGS = ("--limit", 6, "--n", 2, "--max-tokens", 10, "--max-num-seqs", 3, "--batch-size", 1, "--allow-run-on",
        "--no-progress")
TRIALS = 5
FILES = ("data.jsonl", "rejects.jsonl")


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


def start(model_dir: Path, out: Path) -> tuple[subprocess.Popen, float]:
    """The run as a subprocess, once its manifest is written (the model loaded); and when that was."""
    proc = subprocess.Popen([sys.executable, "-m", "stage1.generate", *argv(model_dir, out)], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while not (out / "manifest.json").exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    return proc, time.monotonic()


def seconds_to_last_row(model_dir: Path, out: Path) -> float:
    """An uninterrupted run: the time from its manifest to its last row on disk (the span the kills aim at)."""
    proc, t0 = start(model_dir, out)
    size, last_change = 0, t0
    while proc.poll() is None:
        now = sum((out / name).stat().st_size for name in FILES if (out / name).exists())
        if now != size:
            size, last_change = now, time.monotonic()
        time.sleep(0.002)
    assert proc.returncode == 0
    return last_change - t0


def run_and_kill(model_dir: Path, out: Path, delay: float) -> bool:
    """Starts the run, SIGKILLs it `delay` s after its manifest appears; False if it finished first."""
    proc, _ = start(model_dir, out)
    try:
        time.sleep(delay)
        if proc.poll() is not None:
            return False
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        return True
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_kill_9_at_random_moments_then_resume_gives_the_same_files(tiny_model_dir, tmp_path):
    whole = tmp_path / "whole"
    window = seconds_to_last_row(tiny_model_dir, whole)
    expected = {name: (whole / name).read_bytes() for name in FILES}
    seed = random.randrange(2**32)
    rng = random.Random(seed)
    trials = []
    for trial in range(TRIALS):
        out = tmp_path / f"trial{trial}"
        delay = rng.uniform(0, 1.2 * window)  # a few land after the last row: the manifest's last write
        killed = run_and_kill(tiny_model_dir, out, delay)
        lines_before = sum(complete_lines(out / name) for name in FILES)  # raises on a corrupt line
        assert main(argv(tiny_model_dir, out, "--resume")) == 0, f"seed {seed}, trial {trial}, delay {delay:.2f}"
        assert {name: (out / name).read_bytes() for name in FILES} == expected, f"seed {seed}, trial {trial}"
        assert sum(complete_lines(out / name) for name in FILES) == 12
        trials.append((round(delay, 2), killed, lines_before))
    print(f"seed {seed}, {window:.2f} s from manifest to last row; (delay s, killed, rows on disk at the kill): {trials}")
    assert sum(killed for _, killed, _ in trials) >= TRIALS - 1  # the kills did land during the runs
