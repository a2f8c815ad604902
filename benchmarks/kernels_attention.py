"""Paged attention kernels (kernels/attention.py) against our PyTorch reference and PyTorch's own attention.

    python benchmarks/kernels_attention.py                      # the GPU's target shape, or tiny shapes on a CPU
    python benchmarks/kernels_attention.py --dtype float16 --batch 1 --context 32768

Decode: one query per sequence over a paged cache of `context` tokens (block size 16, the engine's default) —
Triton's split-K kernel, our reference (gathers the blocks, then SDPA), SDPA and FlexAttention on the same K/V
laid out contiguously `[batch, kv_heads, context, head_dim]` (what a paged kernel would ideally match). Prefill:
causal attention over `prefill_batch` fresh prompts of `prefill_len` tokens, packed for ours, batched for SDPA/Flex.

Target shape (a GPU): batch 64, context 4096, 40 query / 8 KV heads, head_dim 128, bf16: Qwen2.5-32B on one GPU.
Decode reports the achieved memory bandwidth (K/V bytes read plus q and out, over the time); prefill TFLOP/s.
write_kv (the step's K/V into their slots) and rotary (on the step's q|k heads) run at a decode step's and a
prefill step's token counts, in GB/s.
On a CPU the kernels run in the Triton interpreter: the figures there are interpreter figures, not kernel speed.

The rows (kernel, impl, shape, ms, ratio_vs_triton = ms / triton's ms, so above 1 means Triton is faster, gbps or
tflops, device, interpreted) go to --out for benchmarks/bench_kernels.py, which runs this script.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from common import (device_and_dtype, finish_rows, kernel_device, kernel_module, kernel_parser, kernel_rows,
                    overridden, print_kernel_rows, time_ms, try_timing)

GPU_SHAPE = dict(batch=64, context=4096, heads=40, kv_heads=8, head_dim=128, block_size=16, prefill_batch=8,
                 prefill_len=1024)
CPU_SHAPE = dict(batch=2, context=256, heads=4, kv_heads=2, head_dim=64, block_size=16, prefill_batch=2,
                 prefill_len=64)


def _flex():
    # On a CPU flex runs eagerly (unfused, the full score matrix): a fair CPU row, but torch warns every time.
    warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except ImportError:
        return None
    return flex_attention, create_block_mask


def _paged_cache(batch, context, kv_heads, head_dim, block_size, dtype, device, g):
    """K/V `[batch, kv_heads, context, head_dim]` and the same values in a paged cache of shuffled blocks."""
    k = torch.randn(batch, kv_heads, context, head_dim, generator=g, device=device).to(dtype)
    v = torch.randn(batch, kv_heads, context, head_dim, generator=g, device=device).to(dtype)
    per_seq = -(-context // block_size)
    num_blocks = batch * per_seq
    perm = torch.randperm(num_blocks, generator=g, device=device)
    tables = perm.view(batch, per_seq).to(torch.int32)
    cache = torch.zeros(2, num_blocks, block_size, kv_heads, head_dim, dtype=dtype, device=device)
    pad = per_seq * block_size - context
    for i, kv in enumerate((k, v)):
        blocks = F.pad(kv.transpose(1, 2), (0, 0, 0, 0, 0, pad))  # [batch, padded, kv_heads, head_dim]
        cache[i][tables.flatten().long()] = blocks.reshape(num_blocks, block_size, kv_heads, head_dim)
    return k, v, cache, tables


def bench_decode(device, dtype, batch, context, heads, kv_heads, head_dim, block_size, warmup, reps, **_):
    from stage1.engine.attention import decode_attention_reference

    attention, interpreted = kernel_module('attention', device)
    g = torch.Generator(device=device).manual_seed(0)
    k, v, cache, tables = _paged_cache(batch, context, kv_heads, head_dim, block_size, dtype, device, g)
    q = torch.randn(batch, heads, head_dim, generator=g, device=device).to(dtype)
    lens = torch.full((batch,), context, dtype=torch.int32, device=device)
    scale = head_dim ** -0.5
    q4 = q.unsqueeze(2)  # [batch, heads, 1, head_dim]

    out = attention.paged_decode_attention(q, cache, tables, lens, scale, max_context_len=context)
    expected = F.scaled_dot_product_attention(q4, k, v, scale=scale, enable_gqa=True).squeeze(2)
    err = (out.float() - expected.float()).abs().max().item()

    impls = {
        "triton": lambda: attention.paged_decode_attention(q, cache, tables, lens, scale, max_context_len=context),
        "torch_reference": lambda: decode_attention_reference(q, cache, tables, lens, scale),
        "sdpa": lambda: F.scaled_dot_product_attention(q4, k, v, scale=scale, enable_gqa=True),
    }
    flex = _flex()
    if flex is not None:
        flex_fn = torch.compile(flex[0]) if device.type == "cuda" else flex[0]
        impls["flex"] = lambda: flex_fn(q4, k, v, scale=scale, enable_gqa=True)
    timings = {}
    for name, fn in impls.items():
        timings[name] = try_timing(lambda fn=fn: time_ms(fn, device, warmup, reps))
    elem = torch.empty((), dtype=dtype).element_size()
    moved = (2 * batch * context * kv_heads * head_dim + 2 * batch * heads * head_dim) * elem
    splits = attention.decode_num_splits(batch, kv_heads, context, device)
    shape = (f"B={batch} L={context} H={heads}/{kv_heads} D={head_dim} bs={block_size} "
             f"{str(dtype).removeprefix('torch.')} splits={splits}")
    rows = kernel_rows("decode_attention", shape, timings, device, interpreted, {"gbps": lambda ms: moved / ms / 1e6})
    for row in rows:
        row["max_abs_err_vs_sdpa"] = err if row["impl"] == "triton" else None
    return rows


def bench_prefill(device, dtype, prefill_batch, prefill_len, heads, kv_heads, head_dim, block_size, warmup, reps,
                  **_):
    from stage1.engine.attention import AttentionContext, prefill_attention_reference

    attention, interpreted = kernel_module('attention', device)
    g = torch.Generator(device=device).manual_seed(1)
    batch, length = prefill_batch, prefill_len
    k, v, cache, tables = _paged_cache(batch, length, kv_heads, head_dim, block_size, dtype, device, g)
    q4 = torch.randn(batch, heads, length, head_dim, generator=g, device=device).to(dtype)
    q = q4.transpose(1, 2).reshape(batch * length, heads, head_dim)  # packed [tokens, heads, head_dim]
    kp = k.transpose(1, 2).reshape(batch * length, kv_heads, head_dim)
    vp = v.transpose(1, 2).reshape(batch * length, kv_heads, head_dim)
    cu_host = [i * length for i in range(batch + 1)]
    cu = torch.tensor(cu_host, dtype=torch.int32, device=device)
    lens = torch.full((batch,), length, dtype=torch.int32, device=device)
    ctx = AttentionContext(is_prefill=True, kv_cache=[cache], slot_mapping=None, block_tables=tables,
                           context_lens=lens, cu_seqlens_q=cu, cu_seqlens_q_host=cu_host,
                           context_lens_host=[length] * batch)
    scale = head_dim ** -0.5

    out = attention.paged_prefill_attention(q, kp, vp, cache, cu, lens, tables, scale)
    expected = F.scaled_dot_product_attention(q4, k, v, scale=scale, is_causal=True, enable_gqa=True)
    err = (out.float() - expected.transpose(1, 2).reshape_as(out).float()).abs().max().item()

    impls = {
        "triton": lambda: attention.paged_prefill_attention(q, kp, vp, cache, cu, lens, tables, scale),
        "torch_reference": lambda: prefill_attention_reference(q, kp, vp, cache, ctx, scale),
        "sdpa": lambda: F.scaled_dot_product_attention(q4, k, v, scale=scale, is_causal=True, enable_gqa=True),
    }
    flex = _flex()
    if flex is not None:
        flex_attention, create_block_mask = flex
        flex_fn = torch.compile(flex_attention) if device.type == "cuda" else flex_attention
        mask = try_timing(lambda: create_block_mask(lambda b, h, qi, ki: qi >= ki, None, None, length, length,
                                              device=str(device)))
        if mask is not None:
            impls["flex"] = lambda: flex_fn(q4, k, v, block_mask=mask, scale=scale, enable_gqa=True)
    timings = {}
    for name, fn in impls.items():
        timings[name] = try_timing(lambda fn=fn: time_ms(fn, device, warmup, reps))
    flops = 4 * batch * heads * head_dim * length * (length + 1) / 2  # QK^T and PV over the causal half
    shape = (f"B={batch}x{length} tokens H={heads}/{kv_heads} D={head_dim} bs={block_size} "
             f"{str(dtype).removeprefix('torch.')} causal")
    rows = kernel_rows("prefill_attention", shape, timings, device, interpreted, {"tflops": lambda ms: flops / ms / 1e9})
    for row in rows:
        row["max_abs_err_vs_sdpa"] = err if row["impl"] == "triton" else None
    return rows


def bench_write_kv(device, dtype, batch, kv_heads, head_dim, block_size, prefill_batch, prefill_len, warmup, reps,
                   **_):
    """The step's K/V into their cache slots: a decode step (one token per sequence) and a prefill step, the
    Triton kernel against the reference (index_copy_), in GB/s of K/V read and written."""
    from stage1.engine.attention import write_kv_reference

    attention, interpreted = kernel_module('attention', device)
    rows = []
    for tokens in (batch, prefill_batch * prefill_len):
        g = torch.Generator(device=device).manual_seed(2)
        num_blocks = -(-tokens // block_size) + 8
        cache = torch.zeros(2, num_blocks, block_size, kv_heads, head_dim, dtype=dtype, device=device)
        slots = torch.randperm(num_blocks * block_size, generator=g, device=device)[:tokens]
        # k and v as views into one fused qkv output, as the model passes them
        qkv = torch.randn(tokens, 3, kv_heads, head_dim, generator=g, device=device).to(dtype)
        k, v = qkv[:, 1], qkv[:, 2]
        attention.write_kv(cache, k, v, slots)
        expected = torch.zeros_like(cache)
        write_kv_reference(expected, k, v, slots)
        assert torch.equal(cache, expected), "write_kv differs from write_kv_reference"
        timings = {
            "triton": try_timing(lambda: time_ms(lambda: attention.write_kv(cache, k, v, slots), device, warmup, reps)),
            "torch_reference": try_timing(lambda: time_ms(lambda: write_kv_reference(cache, k, v, slots), device, warmup,
                                                    reps)),
        }
        moved = 4 * tokens * kv_heads * head_dim * dtype.itemsize  # k and v read, then written
        shape = f"{tokens} tokens H_kv={kv_heads} D={head_dim} bs={block_size} {str(dtype).removeprefix('torch.')}"
        rows += kernel_rows("write_kv", shape, timings, device, interpreted, {"gbps": lambda ms: moved / ms / 1e6})
    return rows


def bench_rotary(device, dtype, batch, heads, kv_heads, head_dim, prefill_batch, prefill_len, warmup, reps, **_):
    """Rotary on a step's q|k heads (one launch) against the reference apply_rotary, at a decode step's and a
    prefill step's token counts, in GB/s of q|k read and written."""
    from stage1.engine.attention import apply_rotary
    from stage1.engine.model import RotaryEmbedding

    _, interpreted = kernel_module('attention', device)  # sets up the interpreter on a CPU
    from stage1.kernels.rotary import rotary

    rows = []
    for tokens in (batch, prefill_batch * prefill_len):
        g = torch.Generator(device=device).manual_seed(3)
        qkv = torch.randn(tokens, (heads + 2 * kv_heads) * head_dim, generator=g, device=device).to(dtype)
        qk = qkv[:, :(heads + kv_heads) * head_dim].view(tokens, heads + kv_heads, head_dim)
        rope = RotaryEmbedding(head_dim, 1_000_000.0, 32_768)(torch.arange(tokens, device=device) % 32_768)
        timings = {
            "triton": try_timing(lambda: time_ms(lambda: rotary(qk, *rope), device, warmup, reps)),
            "torch_reference": try_timing(lambda: time_ms(lambda: apply_rotary(qk, rope), device, warmup, reps)),
        }
        moved = 2 * qk.numel() * dtype.itemsize + 2 * rope[0].numel() * 4
        shape = f"{tokens} tokens H={heads}+{kv_heads} D={head_dim} {str(dtype).removeprefix('torch.')}"
        rows += kernel_rows("rotary", shape, timings, device, interpreted, {"gbps": lambda ms: moved / ms / 1e6})
    return rows


def run(device="cuda", dtype=torch.bfloat16, **shape) -> list[dict]:
    """Decode and prefill rows for `device`/`dtype`; shapes default to the target shape on a GPU and tiny ones
    elsewhere (interpreted). Keyword arguments override single dimensions (see GPU_SHAPE)."""
    device, dtype = device_and_dtype(device, dtype)
    cuda = device.type == "cuda"
    dims = {**(GPU_SHAPE if cuda else CPU_SHAPE), **shape}
    warmup, reps = (3, 20) if cuda else (1, 3)
    rows = bench_decode(device, dtype, warmup=warmup, reps=reps, **dims)
    rows += bench_prefill(device, dtype, warmup=warmup, reps=reps, **dims)
    rows += bench_write_kv(device, dtype, warmup=warmup, reps=reps, **dims)
    rows += bench_rotary(device, dtype, warmup=warmup, reps=reps, **dims)
    return rows


def sweep(device="cuda", dtype=torch.bfloat16, **shape) -> list[dict]:
    """Times decode-kernel tile/launch configurations and split counts at the target shape (GPU only)."""
    device, dtype = device_and_dtype(device, dtype)
    attention, _ = kernel_module('attention', device)
    dims = {**GPU_SHAPE, **shape}
    batch, context, heads, kv_heads, head_dim = (dims[k] for k in ("batch", "context", "heads", "kv_heads",
                                                                   "head_dim"))
    g = torch.Generator(device=device).manual_seed(0)
    _, _, cache, tables = _paged_cache(batch, context, kv_heads, head_dim, dims["block_size"], dtype, device, g)
    q = torch.randn(batch, heads, head_dim, generator=g, device=device).to(dtype)
    lens = torch.full((batch,), context, dtype=torch.int32, device=device)
    moved = (2 * batch * context * kv_heads * head_dim + 2 * batch * heads * head_dim) * dtype.itemsize
    default = dict(attention.DECODE_CONFIG)
    chosen = attention.decode_num_splits(batch, kv_heads, context, device)
    rows = []
    for block_n in (32, 64, 128):
        for num_warps in (4, 8):
            for num_stages in (2, 3):
                cfg = dict(BLOCK_N=block_n, num_warps=num_warps, num_stages=num_stages)
                with overridden(attention.DECODE_CONFIG, **cfg):
                    for splits in sorted({1, 2, 4, chosen}):
                        ms = try_timing(lambda: time_ms(lambda: attention.paged_decode_attention(
                            q, cache, tables, lens, head_dim ** -0.5, num_splits=splits), device, 3, 20))
                        gbps = None if ms is None else moved / ms / 1e6
                        rows.append(dict(kernel="decode_sweep", config=cfg, num_splits=splits, ms=ms, gbps=gbps,
                                         default=cfg == default and splits == chosen, device=str(device)))
                        print(f"  {cfg} splits={splits}: {ms if ms is None else round(ms, 4)} ms, "
                              f"{gbps if gbps is None else round(gbps)} GB/s", flush=True)
    return rows + sweep_prefill(device, dtype, **shape)


def sweep_prefill(device="cuda", dtype=torch.bfloat16, **shape) -> list[dict]:
    """Times prefill-kernel tile/launch configurations on the benchmark's prefill batch (GPU only)."""
    device, dtype = device_and_dtype(device, dtype)
    attention, _ = kernel_module('attention', device)
    dims = {**GPU_SHAPE, **shape}
    batch, length, heads, kv_heads, head_dim = (dims[k] for k in ("prefill_batch", "prefill_len", "heads",
                                                                  "kv_heads", "head_dim"))
    g = torch.Generator(device=device).manual_seed(1)
    _, _, cache, tables = _paged_cache(batch, length, kv_heads, head_dim, dims["block_size"], dtype, device, g)
    q = torch.randn(batch * length, heads, head_dim, generator=g, device=device).to(dtype)
    cu = torch.tensor([i * length for i in range(batch + 1)], dtype=torch.int32, device=device)
    lens = torch.full((batch,), length, dtype=torch.int32, device=device)
    flops = 4 * batch * heads * head_dim * length * (length + 1) / 2
    default = dict(attention.PREFILL_CONFIG)
    rows = []
    for block_m, block_n, num_warps, num_stages in ((128, 64, 8, 2), (128, 64, 8, 3), (128, 64, 4, 2),
                                                    (64, 64, 4, 2), (64, 64, 4, 3), (128, 128, 8, 2),
                                                    (128, 32, 4, 2), (64, 32, 4, 3)):
        cfg = dict(BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps, num_stages=num_stages)
        with overridden(attention.PREFILL_CONFIG, **cfg):
            ms = try_timing(lambda: time_ms(lambda: attention.paged_prefill_attention(
                q, None, None, cache, cu, lens, tables, head_dim ** -0.5), device, 3, 20))
        tflops = None if ms is None else flops / ms / 1e9
        rows.append(dict(kernel="prefill_sweep", config=cfg, ms=ms, tflops=tflops, default=cfg == default,
                         device=str(device)))
        print(f"  prefill {cfg}: {ms if ms is None else round(ms, 4)} ms, "
              f"{tflops if tflops is None else round(tflops, 1)} TFLOP/s", flush=True)
    return rows


def main() -> None:
    parser = kernel_parser(__doc__)
    parser.add_argument("--dtype", default=None, help="bfloat16 | float16 | float32 (default bf16 on a GPU, fp32 "
                                                      "on a CPU, where the interpreter's bf16 tl.dot is wrong)")
    for key in GPU_SHAPE:
        parser.add_argument("--" + key.replace("_", "-"), type=int, default=None)
    parser.add_argument("--sweep", action="store_true", help="GPU: time decode and prefill tile/launch configurations")
    args = parser.parse_args()
    device = kernel_device(args)
    dtype = args.dtype or ("bfloat16" if device.type == "cuda" else "float32")
    shape = {key: getattr(args, key) for key in GPU_SHAPE if getattr(args, key) is not None}
    if args.sweep:
        if device.type != "cuda":
            raise SystemExit("--sweep times compiled kernels: it needs a GPU")
        rows = sweep(device, dtype, **shape)
    else:
        rows = run(device, dtype, **shape)
        print_kernel_rows(rows)
    finish_rows("kernels_attention", rows, args, device, dtype=dtype)


if __name__ == "__main__":
    main()
