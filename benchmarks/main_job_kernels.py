"""The main job (`python -m stage1.generate`, default model, all built-in instructions, default settings) once per
`KERNELS/DTYPE`, one run after the other, each a fresh process; prints one JSON line per run (wall time, the
manifest's last session) and how many raw responses differ from the first configuration's.

    python benchmarks/main_job_kernels.py torch/float32 native/bfloat16 native/float32 torch/bfloat16
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import json_line, print_header

from stage1.data.writer import DATA_FILE, REJECTS_FILE, iter_jsonl

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("configs", nargs="+", help="KERNELS/DTYPE, e.g. native/bfloat16")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "main-job-kernels")
    args = parser.parse_args()
    configs = [tuple(c.split("/")) for c in args.configs]
    print_header()
    responses, runs = {}, []
    for kernels, dtype in configs:
        out = args.work / f"{kernels}-{dtype}"
        start = time.time()
        rc = subprocess.run([sys.executable, "-m", "stage1.generate", "--out", str(out), "--overwrite",
                             "--no-progress", "--kernels", kernels, "--dtype", dtype], cwd=REPO).returncode
        wall = time.time() - start
        manifest = json.loads((out / "manifest.json").read_text())
        responses[kernels, dtype] = {(row["id"], row.get("index")): row["raw_response"]
                                     for name in (DATA_FILE, REJECTS_FILE) for row in iter_jsonl(out / name)}
        runs.append({"kernels": kernels, "dtype": dtype, "rc": rc, "process_wall_s": round(wall, 1),
                     "session": manifest["sessions"][-1]})
        print(json.dumps(runs[-1]), flush=True)
    first = responses[configs[0]]
    differing = {}
    for config in configs[1:]:
        differing["/".join(config)] = sum(first.get(key) != text for key, text in responses[config].items())
        print(f"# raw responses differing from {'/'.join(configs[0])}: {'/'.join(config)} "
              f"{differing['/'.join(config)]} of {len(first)}")
    print(json_line("main_job_kernels", {"runs": runs, "responses": len(first),
                                         f"differing_from_{'/'.join(configs[0])}": differing}))


if __name__ == "__main__":
    main()
