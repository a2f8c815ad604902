"""The progress display: a bar redrawn at most once a second on a terminal, one line a minute elsewhere (a SLURM
log), both with rows (kept / rejected), prompt and generated tokens/s from the engine's totals, and an ETA."""

from __future__ import annotations

import io
import re

from stage1.data.pipeline import SessionStats
from stage1.data.progress import RunProgress
from stage1.generate import main


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


class Totals:
    prefill_tokens = 0
    prefix_cached_tokens = 0
    generated_tokens = 0


def test_off_a_terminal_one_line_a_minute_with_rates_and_eta():
    clock, engine, log = Clock(), Totals(), io.StringIO()
    progress = RunProgress(10, engine, tty=False, stream=log, clock=clock)
    stats = SessionStats()
    for second in range(1, 130):  # an engine step a second
        clock.t += 1
        engine.prefill_tokens += 90
        engine.prefix_cached_tokens += 10
        engine.generated_tokens += 5
        if second == 60:
            stats.kept, stats.rejected = 2, 1
        progress.update(stats)
    lines = log.getvalue().splitlines()
    assert len(lines) == 2  # at 60 s and at 120 s
    assert re.fullmatch(r"\[\d\d:\d\d:\d\d\] rows 3/10 \(30\.0%\): kept 2, rejected 1 \| prompt 100 tok/s, "
                        r"generated 5\.0 tok/s \| 1:00 elapsed, ETA 2:20", lines[0]), lines[0]
    assert lines[1].endswith("2:00 elapsed, ETA 4:40")
    progress.close(stats)
    assert len(log.getvalue().splitlines()) == 3  # and the final state


def test_on_a_terminal_the_bar_is_redrawn_at_most_once_a_second():
    clock, engine, term = Clock(), Totals(), io.StringIO()
    progress = RunProgress(10, engine, tty=True, stream=term, clock=clock)
    stats = SessionStats()
    drawn = term.getvalue().count("generated")
    for _ in range(40):  # 40 steps of 0.25 s: during a prefill, before any row is done
        clock.t += 0.25
        engine.prefill_tokens += 1000
        progress.update(stats)
    assert term.getvalue().count("generated") - drawn == 10
    assert "rows:   0%" in term.getvalue() and "prompt 4000 tok/s" in term.getvalue()
    progress.close(stats)


def test_the_cli_prints_progress_lines_off_a_terminal(make_llm, fake_model_dir, tmp_path, capsys):
    assert main(["--model", str(fake_model_dir), "--out", str(tmp_path / "o"), "--limit", "12"],
                llm_factory=lambda d, a: make_llm()) == 0
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith("12 instructions, 0 already done, 12 completions to generate")
    assert re.search(r"rows 12/12 \(100\.0%\): kept 12, rejected 0 \| prompt \d+ tok/s", err[-1])  # the final line
