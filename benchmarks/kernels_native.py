"""The native CPU ops of stage1._C (csrc/) against the PyTorch paths they replace, on the same machine.

    python benchmarks/kernels_native.py            # rows for each native CPU op, with machine and commit
    python benchmarks/kernels_native.py --out r.json

paged_decode_attention vs decode_attention_reference (gather the blocks, then SDPA with a mask) at batch 32,
context 1024, 14 query / 2 KV heads, head_dim 64 (the 0.5B's decode step, one layer), fp32 and bf16 caches;
each CPU kernel set the machine runs (avx2, scalar). bench_kernels.py prints these rows on a CPU.

The native linears at M = 1, 32 (decode) and 512 (prefill; not the LM head) on Qwen2.5-0.5B's shapes (qkv
896->1152, o 896->896, gate_up 896->9728, down 4864->896, LM head 896->151936): bf16 weights with fp32 arithmetic
(native.linear_bf16w, as the engine calls it: stage1::linear_bf16w, or from 4 rows the weight widened into oneDNN's
product) and fp32 through oneDNN on prepacked weights (onednn.py), against torch's F.linear on fp32 weights (the
same arithmetic) and on bf16 weights with bf16 x (torch's bf16 path: lower precision); GB/s counts each one's own
weight bytes, GFLOP/s 2*M*N*K; max err is against the fp32 product.

The fused elementwise ops (fused_add_rms_norm, silu_and_mul, rotary_write_kv) against the PyTorch ops they replace
(their references: residual add + RMSNorm, silu + mul, apply_rotary + write_kv) at decode (M = 1, 32 tokens) and
prefill (M = 512) shapes of the 0.5B (hidden 896, intermediate 4864, 14/2 heads, head_dim 64), fp32 and bf16;
`--fused-only` runs only these. `run_fused(device)` runs on CUDA tensors as well (where stage1._C has its CUDA
kernels), for the GPU check.

sample (stage1::sample) against the reference sampler it replaces (stage1.engine.sampler.sample: the same tokens)
at 1, 64 and 256 rows of Qwen's 151,936-token vocabulary, greedy and at temperature 0.8 / top-p 0.9, on the
LLM-like logits of common.py (a broad normal base and 48 peaks per row); each row checks the tokens are
equal. `--linear-only` / `--attention-only` / `--fused-only` / `--sampler-only` run one part.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from common import finish_rows, llm_like_logits, machine, print_header, time_ms, try_timing


LINEAR_SHAPES = [("qkv", 896, 1152), ("o", 896, 896), ("gate_up", 896, 9728), ("down", 4864, 896),
                 ("lm_head", 896, 151936)]


def run_linear(ms=(1, 32, 512), warmup: int = 2, reps: int = 10) -> list[dict]:
    """One row per (M, shape, impl): ms, GB/s of its weights, GFLOP/s, and for the native ones ratio_vs_torch_fp32
    (torch's time / ours) and the largest error against their reference."""
    import torch.nn.functional as F

    from stage1.engine import onednn
    from stage1.engine.native import linear_bf16w, linear_bf16w_reference, native_available, native_error

    if not native_available():
        print(f"native linear: skipped ({native_error()})")
        return []
    cpu = torch.device("cpu")
    rows = []
    for m in ms:
        for name, k, n in LINEAR_SHAPES:
            if name == "lm_head" and m > 32:
                continue  # the LM head multiplies one row per sequence, never a prefill's tokens
            g = torch.Generator().manual_seed(0)
            x = torch.randn(m, k, generator=g)
            w = torch.randn(n, k, generator=g).bfloat16()
            wf, xb = w.float(), x.bfloat16()
            reference = linear_bf16w_reference(x, w)
            # impl -> (the call, weight bytes per element, its output for the error check)
            impls = {"native bf16w": (lambda: linear_bf16w(x, w, None), 2),
                     "torch fp32": (lambda: F.linear(x, wf), 4),
                     "torch bf16": (lambda: F.linear(xb, w), 2)}
            if onednn.onednn_available():
                packed = onednn.prepack(wf)
                impls["native fp32"] = (lambda: onednn.linear(x, packed, None), 4)
            r = reps if n * k < 50e6 else max(3, reps // 3)
            timings = {impl: try_timing(lambda: time_ms(fn, cpu, warmup, r)) for impl, (fn, _) in impls.items()}
            base = timings["torch fp32"]
            for impl, (fn, nbytes) in impls.items():
                t = timings[impl]
                native = impl.startswith("native")
                rows.append(dict(kernel="linear", impl=impl, shape=f"{name} {k}->{n}, M {m}", m=m, k=k, n=n, ms=t,
                                 gbps=n * k * nbytes / t / 1e6 if t else None,
                                 gflops=2 * m * n * k / t / 1e6 if t else None,
                                 ratio_vs_torch_fp32=base / t if native and t and base else None,
                                 max_abs_err_vs_reference=(fn() - reference).abs().max().item() if native else None))
            print(f"  linear {name + f' {k}->{n}, M {m}':28s} " + " | ".join(
                f"{impl} {timings[impl] or float('nan'):8.3f} ms" for impl in impls), flush=True)
    return rows


def print_linear_rows(rows: list[dict]) -> None:
    if not rows:
        return
    print(f"linear layers on {machine()}: native bf16w = bf16 weights, fp32 arithmetic (stage1::linear_bf16w, "
          "from 4 rows widened into oneDNN); native fp32 = oneDNN on prepacked weights; torch = F.linear")
    print(f"  {'shape':28s} {'impl':13s} {'ms':>9s} {'GB/s':>6s} {'GFLOP/s':>8s} {'vs torch fp32':>13s} "
          f"{'max err':>8s}")
    for r in rows:
        ms = "failed" if r["ms"] is None else f"{r['ms']:9.3f}"
        ratio = f"{r['ratio_vs_torch_fp32']:.2f}x" if r["ratio_vs_torch_fp32"] else ""
        err = f"{r['max_abs_err_vs_reference']:.1e}" if r["max_abs_err_vs_reference"] is not None else ""
        print(f"  {r['shape']:28s} {r['impl']:13s} {ms:>9s} {r['gbps'] or 0:6.1f} {r['gflops'] or 0:8.1f} "
              f"{ratio:>13s} {err:>8s}")


SAMPLER_ROWS = (1, 64, 256)
SAMPLER_VOCAB = 151936
SAMPLER_PARAMS = {"greedy": dict(temperature=0.0), "T 0.8, top-p 0.9": dict(temperature=0.8, top_p=0.9)}


def run_sampler(row_counts=SAMPLER_ROWS, warmup: int = 1, reps: int = 5) -> list[dict]:
    """One row per (rows, parameters, impl): ms, ratio_vs_reference (the reference's ms / ours), same_tokens."""
    from stage1.engine.native import native_available, native_error, native_sample
    from stage1.engine.params import SamplingParams
    from stage1.engine.sampler import SamplingBatch, sample

    if not native_available():
        print(f"native sampler: skipped ({native_error()})")
        return []
    cpu = torch.device("cpu")
    out = []
    for rows in row_counts:
        logits = llm_like_logits(rows, SAMPLER_VOCAB)
        for label, params in SAMPLER_PARAMS.items():
            batch = SamplingBatch.build([SamplingParams(max_tokens=1, **params)] * rows, cpu,
                                        seeds=list(range(rows)), steps=[5] * rows)
            r = reps if rows < 256 or params["temperature"] == 0 else max(2, reps // 2)
            impls = {"native": lambda: native_sample(logits, batch), "reference": lambda: sample(logits, batch)}
            timings = {impl: try_timing(lambda: time_ms(fn, cpu, warmup, r)) for impl, fn in impls.items()}
            same = torch.equal(native_sample(logits, batch), sample(logits, batch))
            shape = f"{rows} x {SAMPLER_VOCAB}, {label}"
            for impl in impls:
                ours, ref = timings["native"], timings["reference"]
                out.append(dict(kernel="sample", impl=impl, shape=shape, rows=rows, vocab=SAMPLER_VOCAB,
                                ms=timings[impl], ratio_vs_reference=(ref / ours) if impl == "native" and ours and ref
                                else None, same_tokens=same if impl == "native" else None))
            print(f"  sample {shape:32s} native {ours or float('nan'):9.3f} ms | reference "
                  f"{ref or float('nan'):9.3f} ms | x{(ref / ours) if ours and ref else 0:.2f} | same tokens {same}",
                  flush=True)
    return out


def print_sampler_rows(rows: list[dict]) -> None:
    if not rows:
        return
    print(f"sample on {machine()}")
    print(f"  {'shape':32s} {'impl':10s} {'ms':>10s} {'x reference':>12s}  same tokens")
    for r in rows:
        ms = "failed" if r["ms"] is None else f"{r['ms']:10.3f}"
        ratio = "" if r["ratio_vs_reference"] is None else f"{r['ratio_vs_reference']:.2f}x"
        same = "" if r["same_tokens"] is None else str(r["same_tokens"])
        print(f"  {r['shape']:32s} {r['impl']:10s} {ms:>10s} {ratio:>12s}  {same}")


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


FUSED_SHAPE = dict(hidden=896, intermediate=4864, heads=14, kv_heads=2, head_dim=64, block_size=16)


def fused_cases(m: int, dtype: torch.dtype, device: torch.device) -> dict:
    """op -> (native, reference) closures on the 0.5B's shapes for M tokens. The in-place ops rewrite their inputs
    every call (the residual grows by x, the rotation turns further): fine for timing."""
    from stage1.engine import native
    from stage1.engine.attention import rotary_write_kv_reference
    from stage1.engine.layers.activation import silu_and_mul_reference
    from stage1.engine.layers.norm import fused_add_rms_norm_reference
    from stage1.engine.model import RotaryEmbedding

    c = FUSED_SHAPE
    g = torch.Generator().manual_seed(0)
    rand = lambda *shape: torch.randn(*shape, generator=g).to(device=device, dtype=dtype)  # noqa: E731
    x, residual, weight = rand(m, c["hidden"]), rand(m, c["hidden"]), rand(c["hidden"])
    gate_up = rand(m, 2 * c["intermediate"])
    all_heads = c["heads"] + 2 * c["kv_heads"]
    qkv = rand(m, all_heads * c["head_dim"])
    qk = qkv[:, :(all_heads - c["kv_heads"]) * c["head_dim"]].view(m, all_heads - c["kv_heads"], c["head_dim"])
    v = qkv[:, (all_heads - c["kv_heads"]) * c["head_dim"]:].view(m, c["kv_heads"], c["head_dim"])
    rope = RotaryEmbedding(c["head_dim"], 1_000_000.0, 32_768)(torch.arange(m, device=device) * 7)
    blocks = -(-m // c["block_size"]) + 1
    cache = rand(2, blocks, c["block_size"], c["kv_heads"], c["head_dim"])
    slots = torch.randperm(blocks * c["block_size"], generator=g)[:m].to(device)
    eps = 1e-6
    return {
        "fused_add_rms_norm": (lambda: native.fused_add_rms_norm(x, residual, weight, eps),
                               lambda: fused_add_rms_norm_reference(x, residual, weight, eps)),
        "silu_and_mul": (lambda: native.silu_and_mul(gate_up), lambda: silu_and_mul_reference(gate_up)),
        "rotary_write_kv": (lambda: native.rotary_write_kv(qk, v, rope, cache, slots),
                            lambda: rotary_write_kv_reference(qk, v, rope, cache, slots)),
    }


def run_fused(device: torch.device = torch.device("cpu"), ms=(1, 32, 512), dtypes=(torch.float32, torch.bfloat16),
              warmup: int = 3, reps: int = 20) -> list[dict]:
    """One row per (op, M, dtype, impl): ms, ratio_vs_reference (the PyTorch ops' ms / this one's)."""
    from stage1.engine.native import native_available, native_cuda_available, native_error

    if not native_available() or (device.type == "cuda" and not native_cuda_available()):
        print(f"native fused ops on {device}: skipped ({native_error() or 'stage1._C has no CUDA kernels'})")
        return []
    rows = []
    for m in ms:
        for dtype in dtypes:
            for op, (fused, reference) in fused_cases(m, dtype, device).items():
                timings = {"torch ops": try_timing(lambda: time_ms(reference, device, warmup, reps)),
                           "native fused": try_timing(lambda: time_ms(fused, device, warmup, reps))}
                shape = f"M {m}, {str(dtype).removeprefix('torch.')}, {device.type}"
                for impl, t in timings.items():
                    base = timings["torch ops"]
                    rows.append(dict(kernel=op, impl=impl, shape=shape, m=m, ms=t,
                                     ratio_vs_reference=(base / t) if impl == "native fused" and base and t else None))
    return rows


def print_fused_rows(rows: list[dict]) -> None:
    if not rows:
        return
    print(f"fused elementwise ops on {machine()} (0.5B shapes: {FUSED_SHAPE})")
    print(f"  {'op':20s} {'shape':24s} {'torch ops ms':>12s} {'native ms':>10s} {'native vs torch':>16s}")
    for r in rows:
        if r["impl"] != "native fused":
            continue
        base = next(o for o in rows if o["kernel"] == r["kernel"] and o["shape"] == r["shape"] and o is not r)
        fmt = lambda t: "failed" if t is None else f"{t:.4f}"  # noqa: E731
        ratio = "" if r["ratio_vs_reference"] is None else f"{r['ratio_vs_reference']:.2f}x"
        print(f"  {r['kernel']:20s} {r['shape']:24s} {fmt(base['ms']):>12s} {fmt(r['ms']):>10s} {ratio:>16s}")


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
    part = parser.add_mutually_exclusive_group()
    part.add_argument("--linear-only", action="store_true")
    part.add_argument("--attention-only", action="store_true")
    part.add_argument("--fused-only", action="store_true")
    part.add_argument("--sampler-only", action="store_true")
    args = parser.parse_args()
    print_header()
    only = args.linear_only or args.attention_only or args.fused_only or args.sampler_only
    rows = run(reps=args.reps) if args.attention_only or not only else []
    print_rows(rows)
    linear_rows = run_linear() if args.linear_only or not only else []
    print_linear_rows(linear_rows)
    fused_rows = run_fused(reps=args.reps) if args.fused_only or not only else []
    print_fused_rows(fused_rows)
    sampler_rows = run_sampler() if args.sampler_only or not only else []
    print_sampler_rows(sampler_rows)
    rows += linear_rows + fused_rows + sampler_rows
    finish_rows("kernels_native", rows, args)


if __name__ == "__main__":
    main()
