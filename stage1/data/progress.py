"""What a user sees of a job: while it runs, the instructions generated of the total, the rows judged (kept /
rejected), prompt and generated tokens/s from the engine's running totals, and an ETA; when it ends, its summary.

Progress and ETA count the instructions the engine has finished, in whatever order they finish, not the rows judged:
rows are released in input order, so one long completion at the head holds back many finished ones, and an ETA over
rows would then say "35 minutes" until they all come out at once.

On a terminal it is one bar, redrawn at most every `refresh_s` (the loop calls `update` after every engine step, so
it moves during prefill too; a single step longer than that shows when it ends). Anywhere else (a SLURM log) it is
one line every `log_every_s`, and a last one at the end, so a long job leaves a readable trace.

A job with a keep goal (the instruction job: until --count are kept) counts what the user asked for instead: rows
kept toward the goal (with those already on disk), its ETA from the rows this session kept, and the attempts finished
beside them; how many attempts that takes is not known in advance.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

from stage1.data.engine import EngineStats
from stage1.data.manifest import MANIFEST_FILE
from stage1.data.pipeline import SessionStats
from stage1.data.report import REPORT_FILE
from stage1.data.writer import DATA_FILE, REJECTS_FILE


class RunProgress:
    def __init__(self, total_instructions: int, engine_stats: EngineStats, *, tty: bool, stream: TextIO | None = None,
                 refresh_s: float = 1.0, log_every_s: float = 60.0, clock: Callable[[], float] = time.monotonic,
                 goal: int | None = None, kept_before: int = 0):
        """`total_instructions`: those this session generates; `stream`: default sys.stderr; `clock`: seconds,
        monotonic. `goal`: rows to keep (the bar counts kept rows toward it), `kept_before` of them on disk."""
        self.goal = goal
        self.kept_before = kept_before
        self.total = total_instructions if goal is None else goal
        self.engine = engine_stats
        self.stream = stream if stream is not None else sys.stderr
        self.refresh_s = refresh_s if tty else log_every_s
        self.clock = clock
        self.start = self._last = clock()
        self._tokens_before = self._tokens()
        self.bar = None
        if tty:
            from tqdm import tqdm
            self.bar = tqdm(total=self.total, initial=kept_before if goal is not None else 0, unit="instruction",
                            desc="instructions generated" if goal is None else "instructions kept", file=stream,
                            dynamic_ncols=True,
                            bar_format="{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt}{postfix}")

    def update(self, stats: SessionStats) -> None:
        """Called after every engine step; draws when `refresh_s` has passed since the last draw."""
        now = self.clock()
        if now - self._last >= self.refresh_s:
            self._last = now
            self._draw(stats, now)

    def close(self, stats: SessionStats | None = None) -> None:
        """The final state (when the run got that far), then the bar goes."""
        if stats is not None:
            self._draw(stats, self.clock())
        if self.bar is not None:
            self.bar.close()

    def line(self, stats: SessionStats, now: float) -> str:
        """instructions generated 120/512 (23.4%): rows kept 100, rejected 20 | prompt 1834 tok/s, generated 56.1
        tok/s | 5:01 elapsed, ETA 16:22.
        With a goal: instructions kept 12/30 (40.0%): attempts finished 20, judged 15, rejected 3 | ..."""
        elapsed = max(now - self.start, 1e-9)
        prompt, generated = (now_t - before_t for now_t, before_t in zip(self._tokens(), self._tokens_before))
        if self.goal is None:
            done, rate_done, rate_total = stats.instructions_finished, stats.instructions_finished, self.total
            head, rows = "instructions generated", f"rows kept {stats.kept}, rejected {stats.rejected}"
        else:
            done, rate_done, rate_total = self.kept_before + stats.kept, stats.kept, self.goal - self.kept_before
            head = "instructions kept"
            rows = (f"attempts finished {stats.instructions_finished}, judged {stats.instructions_done}, rejected "
                    f"{stats.rejected}")
        eta = _clock_time(elapsed * max(rate_total - rate_done, 0) / rate_done) if rate_done else "?"
        share = f" ({100 * done / self.total:.1f}%)" if self.total else ""
        return (f"{head} {done}/{self.total}{share}: {rows} | prompt {prompt / elapsed:.0f} tok/s, generated "
                f"{generated / elapsed:.1f} tok/s | {_clock_time(elapsed)} elapsed, ETA {eta}")

    def _draw(self, stats: SessionStats, now: float) -> None:
        if self.bar is None:
            print(f"[{time.strftime('%H:%M:%S')}] {self.line(stats, now)}", file=self.stream, flush=True)
            return
        self.bar.n = stats.instructions_finished if self.goal is None else self.kept_before + stats.kept
        # all but "instructions generated N/M" ("instructions kept N/M"), which the bar shows
        self.bar.set_postfix_str(self.line(stats, now).split(": ", 1)[1], refresh=False)
        self.bar.refresh()

    def _tokens(self) -> tuple[int, int]:
        """(prompt tokens, computed or from the prefix cache; tokens generated) so far."""
        return self.engine.prefill_tokens + self.engine.prefix_cached_tokens, self.engine.generated_tokens


def _clock_time(seconds: float) -> str:
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


def print_summary(out: Path, summary: dict[str, Any], *, session: dict[str, Any] | None = None,
                  merged: tuple[int, int] | None = None) -> None:
    """The end of a run, on stdout: the dataset's counts (manifest.dataset_summary) and files; for a generating
    session (manifest.session_record) its speed and tail; for a merge, `merged` = (shards, rows its dataset-wide
    filters rejected)."""
    c = summary["counts"]
    reasons = ", ".join(f"{k} {v}" for k, v in summary["rejected_by_reason"].items()) or "none"
    if merged:
        reasons += f"; {merged[1]} of them by the dataset-wide filters at the merge"
    print(f"{f'merged {merged[0]} shards: ' if merged else ''}{c['instructions']} instructions, {c['completions']} "
          f"completions: {c['kept']} kept, {c['rejected']} rejected ({reasons})")
    print(f"  data:     {out / DATA_FILE}\n  rejects:  {out / REJECTS_FILE}\n  manifest: {out / MANIFEST_FILE}\n"
          f"  report:   {out / REPORT_FILE}")
    if session is None:
        return
    print(f"  this session: {session['generated_tokens']} tokens generated in {session['generate_seconds']:.1f} s "
          f"({session['tokens_per_s']:.1f} tokens/s), wall {session['wall_s']:.1f} s")
    after = session["low_occupancy_decode_steps"] - session["underfilled_decode_steps"]
    print(f"  tail: {session['underfilled_decode_steps']} of {session['decode_steps']} decode steps ran below half of "
          f"--max-num-seqs while more instructions waited than slots were free "
          f"({session['underfilled_decode_seconds']:.1f} s, {100 * session['underfilled_share']:.1f}% of the "
          f"generation time)\n        {after} others ran below half " + (
              "while the keep goal held back the attempts not yet needed, or at the end of the input"
              if "goal" in summary else
              "at the end of the input, with too few instructions left to fill the engine"))
