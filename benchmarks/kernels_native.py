"""The native CPU ops of stage1._C (csrc/) against the PyTorch paths they replace, on the same machine.

    python benchmarks/kernels_native.py            # rows for each native CPU op, with machine and commit
    python benchmarks/kernels_native.py --out r.json

paged_decode_attention vs decode_attention_reference (gather the blocks, then SDPA with a mask) at batch 32,
context 1024, 14 query / 2 KV heads, head_dim 64 (the 0.5B's decode step, one layer), fp32 and bf16 caches;
each CPU kernel set the machine runs (avx2, scalar). bench_kernels.py prints these rows on a CPU.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import git_commit, time_ms, try_timing  # noqa: E402


def machine() -> str:
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() \
        else platform.processor()
    return f"{model}, {torch.get_num_threads()} threads"


def decode_inputs(batch: int, context: int, heads: int, kv_heads: int, head_dim: int, block_size: int,
                  dtype: torch.dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    per_seq = (context + block_size - 1) // block_size
    num_blocks = batch * per_seq + 1
    cache = torch.randn(2, num_blocks, block_size, kv_heads, head_dim, generator=g).to(dtype)
    tables = torch.randperm(num_blocks, generator=g)[:batch * per_seq].view(batch, per_seq).to(torch.int32)
    lens = torch.full((batch,), context, dtype=torch.int32)
    q = torch.randn(batch, heads, head_dim, generator=g).to(dtype)
    return q, cache, tables, lens


def run(warmup: int = 3, reps: int = 20, batch: int = 32, context: int = 1024, heads: int = 14, kv_heads: int = 2,
        head_dim: int = 64, block_size: int = 16) -> list[dict]:
    """One row per (op, dtype, impl): ms, ratio_vs_reference (the reference's ms / this one's: above 1, faster)."""
    from stage1.engine.attention import decode_attention_reference
    from stage1.engine.native import native_available, native_error

    if not native_available():
        print(f"native ops: skipped ({native_error()})")
        return []
    from stage1 import _C

    cpu = torch.device("cpu")
    isas = ["avx2", "scalar"] if _C.cpu_isa() == "avx2" else ["scalar"]
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        q, cache, tables, lens = decode_inputs(batch, context, heads, kv_heads, head_dim, block_size, dtype)
        scale = head_dim ** -0.5
        shape = (f"batch {batch}, context {context}, heads {heads}/{kv_heads}, head_dim {head_dim}, "
                 f"block {block_size}, {str(dtype).removeprefix('torch.')}")
        timings = {"torch reference": try_timing(lambda: time_ms(
            lambda: decode_attention_reference(q, cache, tables, lens, scale), cpu, warmup, reps))}
        expected = decode_attention_reference(q.float(), cache.float(), tables, lens, scale)
        errors = {}
        for isa in isas:
            previous = _C._set_cpu_isa(isa)
            try:
                op = lambda: torch.ops.stage1.paged_decode_attention(q, cache, tables, lens, scale)  # noqa: E731
                timings[f"native {isa}"] = try_timing(lambda: time_ms(op, cpu, warmup, reps))
                errors[f"native {isa}"] = (op().float() - expected).abs().max().item()
            finally:
                _C._set_cpu_isa(previous)
        base = timings["torch reference"]
        for impl, ms in timings.items():
            rows.append(dict(kernel="decode_attention", impl=impl, shape=shape, ms=ms,
                             ratio_vs_reference=(base / ms) if (base and ms) else None,
                             max_abs_err_vs_reference=errors.get(impl)))
    return rows


def print_rows(rows: list[dict]) -> None:
    if not rows:
        return
    print(f"native CPU ops on {machine()}")
    for shape in dict.fromkeys(r["shape"] for r in rows):
        print(f"{rows[0]['kernel']}: {shape}")
        for r in (r for r in rows if r["shape"] == shape):
            ms = "failed" if r["ms"] is None else f"{r['ms']:10.3f} ms"
            ratio = "" if r["ratio_vs_reference"] is None else f"{r['ratio_vs_reference']:6.2f}x the reference's speed"
            err = "" if r["max_abs_err_vs_reference"] is None else f"  max |err| {r['max_abs_err_vs_reference']:.1e}"
            print(f"  {r['impl']:16s} {ms}  {ratio}{err}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--out", type=Path, help="write the rows and the run's facts to this JSON file")
    args = parser.parse_args()
    rows = run(reps=args.reps)
    print_rows(rows)
    facts = {"machine": machine(), "date": datetime.date.today().isoformat(), "commit": git_commit(),
             "torch": torch.__version__, "rows": rows}
    if args.out:
        args.out.write_text(json.dumps(facts, indent=2))
    print(json.dumps({k: v for k, v in facts.items() if k != "rows"}))


if __name__ == "__main__":
    main()
