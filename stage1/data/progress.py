"""What a user sees of a running job: rows done of the total (kept / rejected), prompt and generated tokens/s from
the engine's running totals, and an ETA from rows done against the total.

On a terminal it is one bar, redrawn at most every `refresh_s` (the loop calls `update` after every engine step, so
it moves during prefill too; a single step longer than that shows when it ends). Anywhere else (a SLURM log) it is
one line every `log_every_s`, and a last one at the end, so a long job leaves a readable trace.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import TextIO

from stage1.data.engine import EngineStats
from stage1.data.pipeline import SessionStats


class RunProgress:
    def __init__(self, total_rows: int, engine_stats: EngineStats, *, tty: bool, stream: TextIO | None = None,
                 refresh_s: float = 1.0, log_every_s: float = 60.0, clock: Callable[[], float] = time.monotonic):
        """`stream`: default sys.stderr; `clock`: seconds, monotonic."""
        self.total = total_rows
        self.engine = engine_stats
        self.stream = stream if stream is not None else sys.stderr
        self.refresh_s = refresh_s if tty else log_every_s
        self.clock = clock
        self.start = self._last = clock()
        self._tokens_before = self._tokens()
        self.bar = None
        if tty:
            from tqdm import tqdm
            self.bar = tqdm(total=total_rows, unit="row", desc="rows", file=stream, dynamic_ncols=True,
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
        """rows 120/512 (23.4%): kept 100, rejected 20 | prompt 1834 tok/s, generated 56.1 tok/s | 5:01 elapsed, ETA
        16:22."""
        done = stats.kept + stats.rejected
        elapsed = max(now - self.start, 1e-9)
        prompt, generated = (now_t - before_t for now_t, before_t in zip(self._tokens(), self._tokens_before))
        eta = _clock_time(elapsed * (self.total - done) / done) if done else "?"
        share = f" ({100 * done / self.total:.1f}%)" if self.total else ""
        return (f"rows {done}/{self.total}{share}: kept {stats.kept}, rejected {stats.rejected} | prompt "
                f"{prompt / elapsed:.0f} tok/s, generated {generated / elapsed:.1f} tok/s | {_clock_time(elapsed)} "
                f"elapsed, ETA {eta}")

    def _draw(self, stats: SessionStats, now: float) -> None:
        if self.bar is None:
            print(f"[{time.strftime('%H:%M:%S')}] {self.line(stats, now)}", file=self.stream, flush=True)
            return
        self.bar.n = stats.kept + stats.rejected
        self.bar.set_postfix_str(self.line(stats, now).split(": ", 1)[1], refresh=False)  # all but "rows N/M"
        self.bar.refresh()

    def _tokens(self) -> tuple[int, int]:
        """(prompt tokens, computed or from the prefix cache; tokens generated) so far."""
        return self.engine.prefill_tokens + self.engine.prefix_cached_tokens, self.engine.generated_tokens


def _clock_time(seconds: float) -> str:
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"
