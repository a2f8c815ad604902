"""What runs on a SLURM login node imports neither torch nor transformers: `python -m stage1.generate --merge`, the
launcher's --help and its submission (`python -m stage1.launch slurm`, against a stand-in sbatch). Each runs in a
fresh interpreter that reports `sys.modules` afterwards. And a run that generates where torch is missing says so in
one line (exit 2)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
HEAVY = ("torch", "transformers")

# Runs `main(argv)` of a module, then prints its exit code and which of the heavy modules got imported.
PROBE = """
import json, sys
from importlib import import_module
{setup}
module, argv = sys.argv[1], sys.argv[2:]
try:
    rc = import_module(module).main(argv)
except SystemExit as e:
    rc = e.code
print(json.dumps({{"rc": rc, "imported": [m for m in {heavy!r} if m in sys.modules]}}))
"""


def probe(module: str, argv: list[str], setup: str = "", env: dict[str, str] | None = None) -> tuple[dict, str]:
    """(its report, its stderr) of `module.main(argv)` in a fresh interpreter."""
    code = PROBE.format(setup=setup, heavy=HEAVY)
    proc = subprocess.run([sys.executable, "-c", code, module, *map(str, argv)], capture_output=True, text=True,
                          cwd=REPO, env={**os.environ, **(env or {})}, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.splitlines()[-1]), proc.stderr


def test_the_merge_imports_no_torch(gen, make_llm, respond_mixed, fake_model_dir, out):
    run = ("--limit", 30, "--n", 2)
    for index in range(3):
        assert gen(*run, "--num-shards", 3, "--shard-index", index, llm=make_llm(respond=respond_mixed)) == 0
    report, stderr = probe("stage1.generate", ["--model", fake_model_dir, "--out", out, *run, "--merge"])
    assert report == {"rc": 0, "imported": []}, stderr
    assert json.loads((out / "manifest.json").read_text())["code"]["torch"]  # its version, read without importing it
    assert (out / "data.jsonl").read_bytes()


def test_the_report_imports_no_torch(gen, make_llm, respond_mixed, out):
    """python -m stage1.report OUT rebuilds a run's page wherever its files are (a login node, a laptop)."""
    assert gen("--limit", 20, llm=make_llm(respond=respond_mixed)) == 0
    (out / "report.html").unlink()
    report, stderr = probe("stage1.report", [out])
    assert report == {"rc": 0, "imported": []}, stderr
    assert (out / "report.html").read_bytes()


def test_help_imports_no_torch_and_offers_the_engines_kernel_choices():
    from stage1.engine.backends import CHOICES

    report, stderr = probe("stage1.generate", ["--help"])
    assert report == {"rc": 0, "imported": []}, stderr
    from stage1.generate import build_parser
    [kernels] = [a for a in build_parser()._actions if a.dest == "kernels"]
    assert tuple(kernels.choices) == CHOICES


def test_the_launcher_imports_no_torch(fake_model_dir, tmp_path):
    """--help, then a submission of 2 shards and the merge to a stand-in sbatch (records nothing, answers like
    SLURM), as on a login node."""
    pytest.importorskip("submitit")
    report, stderr = probe("stage1.launch", ["slurm", "--help"])
    assert report == {"rc": 0, "imported": []}, stderr
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text('#!/bin/sh\necho "Submitted batch job $$"\n')
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 1\n")
    for tool in ("sbatch", "srun"):
        (bin_dir / tool).chmod(0o755)
    out = tmp_path / "out"
    argv = ["slurm", "--array", "2", "--gpus-per-task", "1", "--", "--model", fake_model_dir, "--out", out]
    report, stderr = probe("stage1.launch", argv, env={"PATH": f"{bin_dir}:{os.environ['PATH']}"})
    assert report == {"rc": 0, "imported": []}, stderr
    assert len(list((out / "slurm-logs").glob("*_submitted.pkl"))) == 3  # the 2 shards and the merge


def test_generating_without_torch_is_one_line_exit_2(fake_model_dir, tmp_path):
    """Where torch is missing, only a run that generates needs it: the engine's import fails with what to install."""
    report, stderr = probe("stage1.generate", ["--model", fake_model_dir, "--out", tmp_path / "o", "--limit", 2],
                           setup="sys.modules['torch'] = None  # as if torch were not installed")
    assert report["rc"] == 2, stderr
    assert stderr.startswith("error: the stage1 engine can't be imported (") and stderr.count("\n") == 1, stderr
    assert "generating needs torch" in stderr and "only --merge and the SLURM launcher run without them" in stderr
