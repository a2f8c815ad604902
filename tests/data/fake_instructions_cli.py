"""`python -m stage1.instructions` on the fake engine of fake_engine.py (answering as test_instructions_job.py's
instruction_respond), each step slowed by a few ms so that a kill can land between writes: the subprocess that
test_kill_resume.py kills. Usage: python tests/data/fake_instructions_cli.py <instruction arguments>."""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from fake_engine import FakeLLM  # noqa: E402
from test_instructions_job import instruction_respond  # noqa: E402

from stage1.instructions import main  # noqa: E402

STEP_S = 0.003  # more than test_kill_resume.JITTER_S: a kill decided after a write lands before the next one


class SlowFakeLLM(FakeLLM):
    def step(self):
        time.sleep(STEP_S)
        return super().step()


def factory(model_dir, engine):
    return SlowFakeLLM(respond=instruction_respond, max_num_seqs=engine.max_num_seqs)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:], llm_factory=factory))
