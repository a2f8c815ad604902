"""The fused Triton sampler (kernels/sampling/) against sort-based PyTorch sampling.

    python benchmarks/kernels_sampling.py                  # batch 256 x vocab 152,064 on a GPU, tiny on a CPU
    python benchmarks/kernels_sampling.py --dtype bfloat16 --batch 64
    python benchmarks/kernels_sampling.py --sweep          # GPU: time alternative launch configs of the kernel

Implementations, each one token per row from the same logits and per-row parameters:
  triton          fused_sample: no sort; the race shortcut (statistics, candidates that outscore the top token,
                  one pass checking the filters at them), else a multi-pivot threshold search, then the race
  triton_search   the kernel as it was before the shortcut (SHORTCUT off, FUSE on): every filtered row searched
  torch_sort      compact sort-based sampler: sort each row, softmax, cumsum for top-p, masks, one exponential
                  race over the whole batch (one RNG call), gather back (what vLLM-style PyTorch samplers do)
  torch_reference stage1.engine.sampler.sample, the engine's reference: also sorts, plus scatter, and
                  counter-based (Philox) noise for the tokens that can still win (the kernel's very numbers)
Parameter mixes: top-k 50 + top-p 0.9 (T 0.8); top-p 0.95; temperature only (T 1.0); a mixed batch (a quarter
greedy, the rest spread over the three); all greedy (torch: argmax).

Logits are LLM-like (common.llm_like_logits): N(0, 2^2) over the vocabulary plus a few dozen likely tokens per row
lifted by 4..12, so top-p cuts fall among a few to a few hundred tokens, as with a real model.

The rows (kernel, impl, shape, ms, ratio_vs_triton = ms / triton's ms, so above 1 means Triton is faster, device,
interpreted) go to --out for benchmarks/bench_kernels.py, which runs this script. On a CPU the kernel runs in the
Triton interpreter: those figures are interpreter figures, not kernel speed.
"""

from __future__ import annotations

import time

import torch
from common import (device_and_dtype, finish_rows, kernel_device, kernel_module, kernel_parser, kernel_rows,
                    llm_like_logits, print_kernel_rows, time_ms, try_timing)

GPU_SHAPE = dict(batch=256, vocab=152_064)
CPU_SHAPE = dict(batch=4, vocab=4096)

MIXES = {
    "topk50_topp0.9": dict(temperature=0.8, top_k=50, top_p=0.9, min_p=0.0),
    "topp0.95": dict(temperature=1.0, top_k=0, top_p=0.95, min_p=0.0),
    "temperature": dict(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0),
    "mixed": None,
    "greedy": dict(temperature=0.0, top_k=0, top_p=1.0, min_p=0.0),
}


def mix_params(mix: str, batch: int, device: torch.device, seed: int = 0) -> dict:
    if MIXES[mix] is not None:
        p = MIXES[mix]
        params = {name: [value] * batch for name, value in p.items()}
    else:
        g = torch.Generator().manual_seed(seed)
        choice = torch.randint(0, 4, (batch,), generator=g).tolist()  # greedy, and the three sampling mixes
        named = [MIXES["greedy"], MIXES["topk50_topp0.9"], MIXES["topp0.95"], MIXES["temperature"]]
        params = {name: [named[c][name] for c in choice] for name in named[0]}
    return dict(temperature=torch.tensor(params["temperature"], dtype=torch.float32, device=device),
                top_k=torch.tensor(params["top_k"], dtype=torch.int64, device=device),
                top_p=torch.tensor(params["top_p"], dtype=torch.float32, device=device),
                min_p=torch.tensor(params["min_p"], dtype=torch.float32, device=device),
                seeds=torch.arange(batch, dtype=torch.int64, device=device) * 7919 + 17,
                steps=torch.full((batch,), 5, dtype=torch.int64, device=device))


def torch_sort_sample(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
                      min_p: torch.Tensor) -> torch.Tensor:
    """Sort-based top-k / top-p / min-p sampling in plain PyTorch (the same filters as filtered_probs)."""
    greedy = logits.argmax(dim=-1)
    t = torch.where(temperature > 0, temperature, 1.0)
    x = logits.float() / t[:, None]
    vocab = x.shape[-1]
    sorted_x, order = x.sort(dim=-1, descending=True)
    probs = sorted_x.softmax(dim=-1)
    k = torch.where(top_k > 0, top_k, vocab)
    drop = torch.arange(vocab, device=x.device)[None, :] >= k[:, None]
    drop |= (probs.cumsum(dim=-1) - probs) >= top_p[:, None]
    drop |= probs < min_p[:, None] * probs[:, :1]
    drop[:, 0] = False
    probs = probs.masked_fill(drop, 0.0)
    noise = torch.empty_like(probs).exponential_()
    pick = (probs / noise).argmax(dim=-1, keepdim=True)
    return torch.where(temperature == 0, greedy, order.gather(-1, pick).squeeze(-1))


def bench_mix(mix, device, dtype, batch, vocab, warmup, reps, with_reference=True) -> list[dict]:
    from stage1 import SamplingParams
    from stage1.engine.sampler import SamplingBatch, sample

    sampling, interpreted = kernel_module('sampling.launch', device)
    logits = llm_like_logits(batch, vocab, dtype, device)
    p = mix_params(mix, batch, device)
    args = (logits, p["temperature"], p["top_k"], p["top_p"], p["min_p"], p["seeds"], p["steps"])
    tokens = sampling.fused_sample(*args)
    same = None
    greedy = p["temperature"] == 0
    assert torch.equal(tokens[greedy], logits.argmax(-1)[greedy]), "greedy rows differ from argmax"

    impls = {"triton": lambda: sampling.fused_sample(*args)}
    shortcut_rows = sampling._sample(*args).shortcut_drew.float().mean().item()  # the share of rows it drew
    if mix != "greedy":
        impls["triton_search"] = lambda: sampling._sample(*args, SHORTCUT=False, FUSE=True).tokens
    if mix == "greedy":
        impls["torch_argmax"] = lambda: logits.argmax(dim=-1)
    else:
        impls["torch_sort"] = lambda: torch_sort_sample(logits, p["temperature"], p["top_k"], p["top_p"], p["min_p"])
        if with_reference:
            params = [SamplingParams(max_tokens=1, temperature=t, top_k=k, top_p=tp, min_p=mp)
                      for t, k, tp, mp in zip(p["temperature"].tolist(), p["top_k"].tolist(), p["top_p"].tolist(),
                                              p["min_p"].tolist())]
            batch_params = SamplingBatch.build(params, device, seeds=p["seeds"].tolist(),
                                               steps=p["steps"].tolist())
            impls["torch_reference"] = lambda: sample(logits, batch_params)
            # the same noise and race: the tokens agree except where fp32 rounding decides a top-p cut
            same = (sample(logits, batch_params) == tokens).float().mean().item()
    timings = {name: try_timing(lambda fn=fn: time_ms(fn, device, warmup, reps)) for name, fn in impls.items()}
    shape = f"{batch}x{vocab} {str(dtype).removeprefix('torch.')} {mix}"
    rows = kernel_rows("sampling", shape, timings, device, interpreted, {})
    for row in rows:
        row["same_tokens_as_reference"] = same if row["impl"] == "triton" else None
        row["shortcut_rows"] = shortcut_rows if row["impl"] == "triton" else None
    return rows


def run(device="cuda", dtype=torch.float32, **shape) -> list[dict]:
    """Rows for every parameter mix on `device`/`dtype`; the shape defaults to batch 256 x vocab 152,064 on a
    GPU and a tiny one elsewhere (interpreted). Keyword arguments override batch / vocab."""
    device, dtype = device_and_dtype(device, dtype)
    cuda = device.type == "cuda"
    dims = {**(GPU_SHAPE if cuda else CPU_SHAPE), **shape}
    warmup, reps = (3, 20) if cuda else (1, 3)
    rows = []
    for mix in MIXES:
        rows += bench_mix(mix, device, dtype, dims["batch"], dims["vocab"], warmup, reps)
    return rows


def sweep(device="cuda", dtype=torch.float32, **shape) -> list[dict]:
    """Times a few launch configurations of the kernel (GPU only) on the top-k + top-p and temperature mixes."""
    device, dtype = device_and_dtype(device, dtype)
    sampling, _ = kernel_module('sampling.launch', device)
    dims = {**GPU_SHAPE, **shape}
    logits = llm_like_logits(dims["batch"], dims["vocab"], dtype, device)
    default = dict(sampling.GPU_CONFIG)
    configs = [default] + [dict(default, **change) for change in (
        dict(PROGRAMS_PER_SM=4), dict(PROGRAMS_PER_SM=16), dict(BLOCK=4096), dict(BLOCK=1024, num_warps=4),
        dict(SBLOCK=128), dict(NT=8, SBLOCK=512), dict(NT=32, SBLOCK=128), dict(FUSE=not default["FUSE"]),
        dict(BLOCK=4096, num_warps=16), dict(SHORTCUT=False), dict(SYNC=not default["SYNC"]), dict(CAP=512),
        dict(SHORTCUT=False, FUSE=not default["FUSE"]))]
    rows = []
    for cfg in configs:
        for mix in ("topk50_topp0.9", "topp0.95", "temperature"):
            p = mix_params(mix, dims["batch"], device)
            args = (logits, p["temperature"], p["top_k"], p["top_p"], p["min_p"], p["seeds"], p["steps"])
            ms = try_timing(lambda args=args, cfg=cfg: time_ms(lambda: sampling._sample(*args, **cfg), device, 3, 20))
            rows.append(dict(kernel="sampling_sweep", impl="triton", config=dict(cfg), mix=mix, ms=ms,
                             device=str(device)))
            print(f"  {cfg} {mix:16s} {ms if ms is None else round(ms, 4)} ms")
    return rows


def profile(device="cuda", dtype=torch.float32, calls: int = 20, **shape) -> list[dict]:
    """Where a call's time goes (GPU only): each kernel's GPU time and launches per call (torch.profiler), and the
    host's wall time per call."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    device, dtype = device_and_dtype(device, dtype)
    sampling, _ = kernel_module('sampling.launch', device)
    dims = {**GPU_SHAPE, **shape}
    logits = llm_like_logits(dims["batch"], dims["vocab"], dtype, device)
    rows = []
    for mix in ("topk50_topp0.9", "topp0.95", "temperature", "mixed"):
        p = mix_params(mix, dims["batch"], device)
        args = (logits, p["temperature"], p["top_k"], p["top_p"], p["min_p"], p["seeds"], p["steps"])
        time_ms(lambda: sampling.fused_sample(*args), device, 3, 3)
        torch.cuda.synchronize(device)
        with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
            start = time.perf_counter()
            for _ in range(calls):
                sampling.fused_sample(*args)
            torch.cuda.synchronize(device)
            wall = (time.perf_counter() - start) / calls * 1e6
        kernels = {}
        for event in prof.key_averages():
            if event.device_type.name == "CUDA" or getattr(event, "self_device_time_total", 0):
                total = getattr(event, "self_device_time_total", None) or getattr(event, "self_cuda_time_total", 0)
                kernels[event.key] = dict(us_per_call=round(total / calls, 1), launches_per_call=event.count / calls)
        row = dict(kernel="sampling_profile", mix=mix, wall_us_per_call=round(wall, 1), kernels=kernels,
                   device=str(device))
        rows.append(row)
        print(f"{mix}: {wall:.0f} us per call (host wall clock); GPU per call:", flush=True)
        for name, k in sorted(kernels.items(), key=lambda kv: -kv[1]["us_per_call"]):
            print(f"    {k['us_per_call']:8.1f} us  {k['launches_per_call']:5.1f} launches  {name[:80]}", flush=True)
    return rows


def main() -> None:
    parser = kernel_parser(__doc__)
    parser.add_argument("--dtype", default="float32", help="float32 | bfloat16 | float16 (the logits' dtype)")
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--vocab", type=int, default=None)
    parser.add_argument("--sweep", action="store_true", help="GPU: time alternative launch configurations")
    parser.add_argument("--profile", action="store_true", help="GPU: GPU time per kernel and host time per call")
    args = parser.parse_args()
    device = kernel_device(args)
    shape = {key: getattr(args, key) for key in GPU_SHAPE if getattr(args, key) is not None}
    if args.sweep or args.profile:
        if device.type != "cuda":
            raise SystemExit("--sweep and --profile time compiled kernels: they need a GPU")
        rows = sweep(device, args.dtype, **shape) if args.sweep else profile(device, args.dtype, **shape)
    else:
        rows = run(device, args.dtype, **shape)
        print_kernel_rows(rows)
    finish_rows("kernels_sampling", rows, args, device)


if __name__ == "__main__":
    main()
