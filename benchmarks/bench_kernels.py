"""How fast is each kernel against the best alternative on the same machine, in one run?

    python benchmarks/bench_kernels.py                      # GPU: real figures; CPU: interpreter figures
    python benchmarks/bench_kernels.py --out results.json   # also write the rows, with device, date and commit

Attention (kernels_attention.py): Triton paged decode/prefill against PyTorch SDPA (and FlexAttention where
available) on equivalent contiguous tensors and against our paged reference; decode also in GB/s. Sampling
(kernels_sampling.py): the fused Triton sampler against a sort-based torch top-k/top-p sampler. On the CPU the
Triton kernels run in the interpreter (TRITON_INTERPRET=1), so those figures say nothing about GPU speed.
Native CPU ops (kernels_native.py, stage1._C): on a CPU, each against the PyTorch path it replaces (decode attention,
the linear layers, the sampler, the fused elementwise ops).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

sys.path.insert(0, str(Path(__file__).parent))
import kernels_attention  # noqa: E402
import kernels_native  # noqa: E402
import kernels_sampling  # noqa: E402
from common import git_commit  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", default=None, help="attention storage dtype (default: bf16 on GPU, fp32 on CPU)")
    parser.add_argument("--out", type=Path, help="write the rows and the run's facts to this JSON file")
    args = parser.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (Triton interpreter)"
    print(f"device: {name}; torch {torch.__version__}")
    if device.type != "cuda":
        print("NOTE: no GPU here: Triton kernels run in the interpreter; these are interpreter figures, "
              "not kernel speed.")
    rows = kernels_attention.run(device, dtype) + kernels_sampling.run(device)
    print(f"{'kernel':<17} {'impl':<16} {'ms':>10} {'x triton':>9} {'GB/s':>8}  shape")
    for r in rows:
        ratio = r.get("ratio_vs_triton")
        gbps = r.get("gbps")
        ms = "failed" if r["ms"] is None else f"{r['ms']:.3f}"
        same = r.get("same_tokens_as_reference")
        note = "" if same is None else f"  (tokens equal to the reference sampler's: {same:.1%}"
        note += "" if r.get("shortcut_rows") is None else f"; rows drawn by the shortcut: {r['shortcut_rows']:.0%}"
        note += ")" if note else ""
        print(f"{r['kernel']:<17} {r['impl']:<16} {ms:>10} {'' if ratio is None else f'{ratio:.2f}':>9} "
              f"{'' if gbps is None else f'{gbps:.1f}':>8}  {r['shape']}{note}")
    if device.type == "cpu":
        native_rows = kernels_native.run()
        kernels_native.print_rows(native_rows)
        linear_rows = kernels_native.run_linear()
        kernels_native.print_linear_rows(linear_rows)
        sampler_rows = kernels_native.run_sampler()
        kernels_native.print_sampler_rows(sampler_rows)
        fused_rows = kernels_native.run_fused()
        kernels_native.print_fused_rows(fused_rows)
        rows += native_rows + linear_rows + sampler_rows + fused_rows
    facts = {"device": name, "date": datetime.date.today().isoformat(), "commit": git_commit(),
             "torch": torch.__version__, "interpreted": device.type != "cuda", "rows": rows}
    if args.out:
        args.out.write_text(json.dumps(facts, indent=2))
    print(json.dumps({k: v for k, v in facts.items() if k != "rows"}))


if __name__ == "__main__":
    main()
