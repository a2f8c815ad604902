"""`python -m stage1.generate` turns the engine's start-up errors (engine_config.StartupError, a ValueError) into one
line on stderr and exit code 2 (bad input), not a traceback; tests/engine/test_startup_errors.py checks the errors."""

from __future__ import annotations

import subprocess
import sys

from stage1.engine import engine_config
from stage1.generate import main


def test_a_max_model_len_past_the_models_context_is_one_line_and_exit_2(tiny_model_dir, tmp_path):
    result = subprocess.run([sys.executable, "-m", "stage1.generate", "--model", str(tiny_model_dir), "--out",
                             str(tmp_path / "out"), "--max-model-len", "4096", "--limit", "1", "--no-progress"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    [line] = result.stderr.strip().splitlines()
    assert line.startswith("error: ") and "max_model_len=4096" in line and "max_position_embeddings=1024" in line
    assert "--max-model-len" in line


def test_weights_too_large_for_the_memory_are_one_line_and_exit_2(tiny_model_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(engine_config, "device_memory", lambda device: 1000)
    assert main(["--model", str(tiny_model_dir), "--out", str(tmp_path / "out"), "--limit", "1",
                 "--no-progress"]) == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("error: ") and "model too large" in line and "1000 bytes" in line, line
