"""The main job (`python -m stage1.generate`) before and after streaming, side by side: the same instructions, the
same model and arguments, one run after the other (never in parallel), each a fresh process.

    python benchmarks/bench_main_job.py --old-tree /tmp/stream-old --sizes 124 512 --max-num-seqs 64 \\
        --results benchmarks/results/cpu-epyc-2026-12-01-streaming.jsonl

--old-tree is a checkout of the code before (git worktree add /tmp/stream-old <commit>); it runs with PYTHONPATH set
to it (its stage1/kernels must resolve inside it: a symlink stage1/kernels -> ../kernels). 124 is the built-in set;
a larger size repeats it with new ids (`<id>-r<k>`). The old code has no --max-num-seqs: it runs its defaults (the
engine's 256 sequences, --batch-size 256 prompts per LLM.generate call). Each run's result is one JSON line: wall
time of the process, generated tokens and tokens/s over that wall time, the manifest's session, and the data files'
sha256s (the two versions should write the same bytes).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import run_facts

REPO = Path(__file__).resolve().parents[1]


def instructions_file(size: int, directory: Path) -> Path | None:
    """None for the built-in set (124); else the built-in set repeated with new ids, cut to `size`."""
    from stage1.data.readers import read_instructions

    builtin = read_instructions()
    if size == len(builtin):
        return None
    rows = [{"id": f"{inst.id}-r{k}", "instruction": inst.instruction, "type": inst.type, "source": inst.source}
            for k in range(size // len(builtin) + 1) for inst in builtin][:size]
    path = directory / f"instructions-{size}.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def run_job(label: str, tree: Path, size: int, inputs: Path | None, out: Path, extra: list[str]) -> dict:
    cmd = [sys.executable, "-m", "stage1.generate", "--out", str(out), "--no-progress", *extra]
    if inputs is not None:
        cmd += ["--instructions", str(inputs)]
    env = {**os.environ, "PYTHONPATH": str(tree)}
    load_before = os.getloadavg()
    started = time.perf_counter()
    proc = subprocess.run(cmd, env=env, cwd=tempfile.gettempdir(), capture_output=True, text=True)
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"{label} {size}: exit {proc.returncode}\n{proc.stderr[-2000:]}")
    manifest = json.loads((out / "manifest.json").read_text())
    session = manifest["sessions"][-1]
    return {"label": label, "instructions": size, "command": " ".join(cmd), "commit": manifest["code"]["git_commit"],
            "process_wall_s": round(wall, 1), "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
            "generated_tokens": session["generated_tokens"],
            "tokens_per_s_wall": round(session["generated_tokens"] / wall, 2), "session": session,
            "counts": manifest["counts"],
            "sha256": {name: hashlib.sha256((out / name).read_bytes()).hexdigest()
                       for name in ("data.jsonl", "rejects.jsonl")}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--old-tree", type=Path, required=True)
    p.add_argument("--sizes", type=int, nargs="+", default=[124, 512])
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--results", type=Path, required=True)
    p.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "bench-main-job")
    args = p.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    info = run_facts()
    print(json.dumps(info))
    for size in args.sizes:
        inputs = instructions_file(size, args.work)
        old = run_job("old (chunked)", args.old_tree, size, inputs, args.work / f"old-{size}", ["--overwrite"])
        new = run_job("new (streaming)", REPO, size, inputs, args.work / f"new-{size}",
                      ["--overwrite", "--max-num-seqs", str(args.max_num_seqs)])
        for r in (old, new):
            r["machine"] = info
            with open(args.results, "a") as f:
                f.write(json.dumps(r) + "\n")
        ratio = new["tokens_per_s_wall"] / old["tokens_per_s_wall"]
        print(f"{size} instructions: old {old['tokens_per_s_wall']} tok/s ({old['process_wall_s']} s, "
              f"{old['generated_tokens']} tokens), new {new['tokens_per_s_wall']} tok/s ({new['process_wall_s']} s, "
              f"{new['generated_tokens']} tokens): x{ratio:.2f}; same files: {old['sha256'] == new['sha256']}",
              flush=True)


if __name__ == "__main__":
    main()
