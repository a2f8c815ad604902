"""Bad GGUF input: a clear GGUFImportError (what, where, how to fix), exit status 2 from the CLI without a
traceback, and never a half-written model directory."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from gguf import GGMLQuantizationType as Q
from tiny_ggufs import write_tiny_gguf

from stage1.models import GGUFImportError, gguf_import
from stage1.models.__main__ import main
from stage1.models.gguf_import import import_gguf

QUIET = {"log": lambda msg: None}


def assert_fails_cleanly(gguf_path: Path, tmp_path: Path, capsys, *needles: str) -> str:
    """Import fails with every needle in the message, leaves nothing behind, and the CLI says the same."""
    out = tmp_path / "out"
    with pytest.raises(GGUFImportError) as info:
        import_gguf(gguf_path, out, **QUIET)
    message = str(info.value)
    for needle in needles:
        assert needle in message, message
    assert not out.exists()
    assert not list(tmp_path.glob(".out.*")), "staging directory left behind"

    capsys.readouterr()
    assert main(["import-gguf", str(gguf_path), str(out)]) == 2
    err = capsys.readouterr().err
    assert err.rstrip().endswith(f"error: {message}") and "Traceback" not in err
    assert not out.exists()
    return message


@pytest.fixture
def tiny_bytes(tiny_gguf) -> bytes:
    return tiny_gguf[0].read_bytes()


def test_missing_file(tmp_path, capsys):
    assert_fails_cleanly(tmp_path / "nope.gguf", tmp_path, capsys, "nope.gguf", "no such file")


def test_bad_magic(tmp_path, capsys, tiny_bytes):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGML" + tiny_bytes[4:])
    assert_fails_cleanly(bad, tmp_path, capsys, str(bad), "not a GGUF file", "b'GGML'")


def test_empty_file(tmp_path, capsys):
    bad = tmp_path / "empty.gguf"
    bad.write_bytes(b"")
    assert_fails_cleanly(bad, tmp_path, capsys, "not a GGUF file")


def test_truncated_in_tensor_data(tmp_path, capsys, tiny_bytes):
    bad = tmp_path / "cut.gguf"
    bad.write_bytes(tiny_bytes[:-1000])
    assert_fails_cleanly(bad, tmp_path, capsys, str(bad), "truncated", "Download it again")


def test_truncated_in_metadata(tmp_path, capsys, tiny_bytes):
    bad = tmp_path / "cut.gguf"
    bad.write_bytes(tiny_bytes[:3000])  # inside the token list
    assert_fails_cleanly(bad, tmp_path, capsys, str(bad), "truncated or corrupt")


def test_unsupported_architecture(tmp_path, capsys):
    path = tmp_path / "llama.gguf"
    write_tiny_gguf(path, arch="llama")
    assert_fails_cleanly(path, tmp_path, capsys, "'llama'", "only 'qwen2'")


def test_unsupported_quant_type(tmp_path, capsys):
    path = tmp_path / "q8k.gguf"
    write_tiny_gguf(path, intermediate=256, types={"ffn_down.weight": Q.Q8_K})  # Q8_K: llama.cpp's internal type
    assert_fails_cleanly(path, tmp_path, capsys, "Q8_K", "blk.0.ffn_down.weight", "cannot be dequantized")


def test_missing_tensor(tmp_path, capsys):
    path = tmp_path / "missing.gguf"
    write_tiny_gguf(path, drop=("blk.1.ffn_up.weight",))
    assert_fails_cleanly(path, tmp_path, capsys, "missing tensor",
                         "blk.1.ffn_up.weight (model.layers.1.mlp.up_proj.weight)")


def test_rope_scaling_is_refused(tmp_path, capsys):
    path = tmp_path / "yarn.gguf"
    write_tiny_gguf(path, rope_scaling="yarn")
    assert_fails_cleanly(path, tmp_path, capsys, "rope scaling 'yarn'")


def test_existing_output_is_left_alone(tiny_gguf, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(GGUFImportError, match="already exists"):
        import_gguf(tiny_gguf[0], out, **QUIET)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


@pytest.mark.parametrize("error", [OSError(28, "No space left on device"), KeyboardInterrupt()])
def test_failure_while_writing_leaves_nothing(tiny_gguf, tmp_path, monkeypatch, error):
    def fail(*args, **kwargs):
        raise error

    monkeypatch.setattr(gguf_import, "save_file", fail)
    with pytest.raises(GGUFImportError if isinstance(error, OSError) else KeyboardInterrupt) as info:
        import_gguf(tiny_gguf[0], tmp_path / "out", **QUIET)
    if isinstance(error, OSError):
        assert "No space left on device" in str(info.value)
    assert list(tmp_path.iterdir()) == []


def test_cli_process_exits_2_without_traceback(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf at all")
    run = subprocess.run([sys.executable, "-m", "stage1.models", "import-gguf", str(bad), str(tmp_path / "out")],
                         check=False, capture_output=True, text=True)
    assert run.returncode == 2
    assert "error:" in run.stderr and "not a GGUF file" in run.stderr and "Traceback" not in run.stderr
    assert run.stdout == ""
    assert not (tmp_path / "out").exists()
