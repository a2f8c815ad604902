"""The progress display: a bar redrawn at most once a second on a terminal, one line a minute elsewhere (a SLURM
log), both with the instructions the engine has finished, rows (kept / rejected), prompt and generated tokens/s from
the engine's totals, and an ETA from the instructions finished, not the rows released in input order."""

from __future__ import annotations

import io
import re

from stage1.data.pipeline import Pipeline, SessionStats
from stage1.data.progress import RunProgress
from stage1.data.readers import read_instructions
from stage1.data.settings import GenerationConfig
from stage1.data.writer import DatasetWriter
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
            stats.instructions_finished, stats.kept, stats.rejected = 3, 1, 1
        progress.update(stats)
    lines = log.getvalue().splitlines()
    assert len(lines) == 2  # at 60 s and at 120 s
    assert re.fullmatch(r"\[\d\d:\d\d:\d\d\] instructions generated 3/10 \(30\.0%\): rows kept 1, rejected 1 \| "
                        r"prompt 100 tok/s, generated 5\.0 tok/s \| 1:00 elapsed, ETA 2:20", lines[0]), lines[0]
    assert lines[1].endswith("2:00 elapsed, ETA 4:40")
    progress.close(stats)
    assert len(log.getvalue().splitlines()) == 3  # and the final state


def test_on_a_terminal_the_bar_is_redrawn_at_most_once_a_second():
    clock, engine, term = Clock(), Totals(), io.StringIO()
    progress = RunProgress(10, engine, tty=True, stream=term, clock=clock)
    stats = SessionStats()
    drawn = term.getvalue().count("elapsed")
    for _ in range(40):  # 40 steps of 0.25 s: during a prefill, before any row is done
        clock.t += 0.25
        engine.prefill_tokens += 1000
        progress.update(stats)
    assert term.getvalue().count("elapsed") - drawn == 10
    assert "instructions generated:   0%" in term.getvalue() and "prompt 4000 tok/s" in term.getvalue()
    progress.close(stats)


def test_the_cli_prints_progress_lines_off_a_terminal(make_llm, fake_model_dir, tmp_path, capsys):
    assert main(["--model", str(fake_model_dir), "--out", str(tmp_path / "o"), "--limit", "12"],
                llm_factory=lambda d, a: make_llm()) == 0
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith("12 instructions, 0 already done, 12 completions to generate")
    assert re.search(r"instructions generated 12/12 \(100\.0%\): rows kept 12, rejected 0 \| prompt \d+ tok/s",
                     err[-1])  # the final line


def test_progress_and_eta_follow_the_instructions_the_engine_finishes(make_llm, tmp_path):
    """A run-on at the head holds every later row back (rows come out in input order), while the engine finishes the
    instructions behind it: progress and ETA count those, so they move on while no row is judged, instead of
    jumping from a long ETA to done when the head is released."""
    def respond(prompt, seed, index):
        return "x" * 400 if prompt.endswith("Describe item 0.\n") else "done\n\nmore"

    path = tmp_path / "in.txt"
    path.write_text("".join(f"Describe item {i}.\n" for i in range(40)))
    llm = make_llm(respond=respond, max_num_seqs=8)
    clock, log = Clock(), io.StringIO()
    pipeline = Pipeline(llm, GenerationConfig(), DatasetWriter(tmp_path / "out"))
    progress = RunProgress(40, llm.stats, tty=False, stream=log, clock=clock, log_every_s=1)
    seen = []

    def on_step(stats):  # an engine step a second
        clock.t += 1
        progress.update(stats)
        seen.append((stats.instructions_finished, stats.kept + stats.rejected))

    pipeline.on_step = on_step
    with pipeline.writer:
        pipeline.run(read_instructions(str(path)))
    held = [finished for finished, judged in seen if judged == 0]
    assert max(held) == 39  # all but the run-on finished while no row was judged
    assert seen[-1] == (40, 40)
    lines = log.getvalue().splitlines()
    while_held = [line for line in lines if "rows kept 0, rejected 0" in line and "generated 39/40" in line]
    assert while_held and all("ETA ?" not in line for line in while_held)  # an ETA from the 39, not from no rows


def test_a_job_with_a_keep_goal_counts_kept_rows_toward_it():
    """The instruction job: the bar's total is --count and its position the rows kept (with those on disk); the ETA
    follows this session's kept rows, the attempts are shown beside them."""
    clock, engine, log = Clock(), Totals(), io.StringIO()
    progress = RunProgress(150, engine, tty=False, stream=log, clock=clock, log_every_s=1, goal=30, kept_before=10)
    stats = SessionStats()
    clock.t += 60
    stats.instructions_finished, stats.instructions_done, stats.kept, stats.rejected = 14, 12, 5, 7
    progress.update(stats)
    assert re.search(r"instructions kept 15/30 \(50\.0%\): attempts finished 14, judged 12, rejected 7 \| .* "
                     r"1:00 elapsed, ETA 3:00$", log.getvalue().splitlines()[0])  # 15 more at 5 a minute
    term = io.StringIO()
    bar = RunProgress(150, engine, tty=True, stream=term, clock=clock, goal=30, kept_before=10)
    bar.close(stats)
    assert "instructions kept:  50%" in term.getvalue() and "15/30" in term.getvalue()
