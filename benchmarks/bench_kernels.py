"""How fast is each kernel against the best alternative on the same machine, in one run?

    python benchmarks/bench_kernels.py                      # GPU: real figures; CPU: interpreter figures
    python benchmarks/bench_kernels.py --out results.json   # also write the rows, with device, date and commit

Runs each kernel benchmark script, one process after the other, and merges their rows. Attention
(kernels_attention.py): Triton paged decode/prefill against PyTorch SDPA (and FlexAttention where available) on
equivalent contiguous tensors and against our paged reference; decode also in GB/s. Sampling (kernels_sampling.py):
the fused Triton sampler against a sort-based torch top-k/top-p sampler. On the CPU the Triton kernels run in the
interpreter (TRITON_INTERPRET=1), so those figures say nothing about GPU speed. Native CPU ops (kernels_native.py,
stage1._C): on a CPU, each against the PyTorch path it replaces (decode attention, the linear layers, the sampler,
the fused elementwise ops). Each script prints its own table; the last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from common import json_line, print_header, write_rows

HERE = Path(__file__).resolve().parent


def run_part(script: str, *args: str) -> list[dict]:
    """The rows `script` (a benchmark in this folder) wrote to its --out file; none if it failed (said so)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "rows.json"
        print(f"== {script} {' '.join(args)}", flush=True)
        proc = subprocess.run([sys.executable, str(HERE / script), "--out", str(out), *args])
        if proc.returncode != 0 or not out.is_file():
            print(f"== {script} failed (exit {proc.returncode}): its rows are missing", flush=True)
            return []
        return json.loads(out.read_text())["rows"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", default=None, help="attention storage dtype (default: bf16 on GPU, fp32 on CPU)")
    parser.add_argument("--out", type=Path, help="write the rows and the run's facts to this JSON file")
    args = parser.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    print_header(device)
    if device.type != "cuda":
        print("NOTE: no GPU here: Triton kernels run in the interpreter; these are interpreter figures, "
              "not kernel speed.")
    rows = run_part("kernels_attention.py", *(["--dtype", args.dtype] if args.dtype else []))
    rows += run_part("kernels_sampling.py")
    if device.type == "cpu":
        rows += run_part("kernels_native.py")
    facts = dict(device=str(device), interpreted=device.type != "cuda")
    if args.out:
        write_rows(args.out, rows, device, **facts)
    print(json_line("bench_kernels", {**facts, "rows": len(rows)}, device))


if __name__ == "__main__":
    main()
