"""The progress bar of `LLM.generate`: requests done, with output tokens/s."""

from __future__ import annotations

import time

from .engine_core import StepStats


class RequestProgress:
    """A tqdm bar over requests with output tokens/s, or nothing."""

    def __init__(self, total: int, stats: StepStats, enabled: bool):
        self.bar, self.stats = None, stats
        self.start, self.tokens_before = time.perf_counter(), stats.generated_tokens
        if enabled:
            from tqdm.auto import tqdm
            self.bar = tqdm(total=total, desc="generate", unit="req", dynamic_ncols=True)

    def request_done(self) -> None:
        if self.bar is not None:
            rate = (self.stats.generated_tokens - self.tokens_before) / max(time.perf_counter() - self.start, 1e-9)
            self.bar.set_postfix_str(f"{rate:.1f} tok/s out", refresh=False)
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
