"""How fast is batched generation, ours against transformers `generate`, on the same model, prompts and dtype?

    python benchmarks/bench_generate.py --config qwen2.5-0.5b --batch 32 --new-tokens 64 --dtype bfloat16
    python benchmarks/bench_generate.py --model ~/.cache/stage1/models/qwen2.5-coder-0.5b-instruct

Both run greedy (or, with --temperature, sample the same way) for exactly --new-tokens tokens per prompt (EOS
ignored) on prompts of mixed lengths; transformers gets them left-padded into one batch, as its users run it. Prints both figures and their ratio, then how close
our decode step comes to the time of the same step's matrix multiplies alone. The last line is one JSON object.

`--kernels auto|torch|triton|native` picks our kernels (default auto). `--decode-step KERNELS:DTYPE,...` instead
times a batch-1 decode step (the median of --new-tokens steps after one prompt's prefill, through the step API)
for each kernels/dtype pair in one run, side by side, e.g. the native bf16-weight path against torch in fp32 and
in bf16:

    python benchmarks/bench_generate.py --model ~/.cache/stage1/models/qwen2.5-coder-0.5b-instruct \
        --decode-step native:bfloat16,torch:float32,torch:bfloat16
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import PRESETS, git_commit, mixed_prompts, random_checkpoint  # noqa: E402

from stage1 import LLM, SamplingParams  # noqa: E402
from stage1.engine.config import parse_dtype  # noqa: E402


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")),
               platform.processor()) if Path("/proc/cpuinfo").exists() else platform.processor()
    return f"{cpu} ({torch.get_num_threads()} threads)"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_ours(model_dir: Path, prompts, new_tokens: int, dtype: torch.dtype, device: str, temperature: float,
             top_p: float, enforce_eager: bool = False, kernels: str = "auto") -> tuple[float, LLM]:
    llm = LLM(model_dir, dtype=dtype, device=device, skip_tokenizer_init=True,
              max_num_seqs=max(len(prompts), 1), enforce_eager=enforce_eager, kernels=kernels)
    params = SamplingParams(max_tokens=new_tokens, temperature=temperature, top_p=top_p, seed=0, ignore_eos=True)
    warm = SamplingParams(max_tokens=2, temperature=temperature, top_p=top_p, seed=1, ignore_eos=True)
    # compiles what it runs; on a GPU the whole batch, so the decode graph of its size is captured here too. Other
    # prompts of the same lengths: the timed ones must not find their blocks in the prefix cache.
    warm_prompts = mixed_prompts(len(prompts), llm.vocab_size, min(map(len, prompts)), max(map(len, prompts)),
                                 seed=1)
    if llm.config.device.type != "cuda":
        warm_prompts = warm_prompts[:2]
    llm.generate([{"prompt_token_ids": p} for p in warm_prompts], warm, use_tqdm=False)
    llm.stats.reset()  # count the timed run only
    sync(llm.config.device)
    start = time.perf_counter()
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    sync(llm.config.device)
    elapsed = time.perf_counter() - start
    assert all(len(o.outputs[0].token_ids) == new_tokens for o in outs)
    assert llm.stats.prefix_cached_tokens == 0, "the timed prompts reused cached blocks: not the peer's work"
    return elapsed, llm


def run_transformers(model_dir: Path, prompts, new_tokens: int, dtype: torch.dtype, device: torch.device,
                     temperature: float, top_p: float) -> float:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device).eval()
    width = max(map(len, prompts))
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for i, p in enumerate(prompts):  # left padding, as decoder-only generation needs
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    ids, mask = ids.to(device), mask.to(device)
    kwargs = dict(do_sample=False, eos_token_id=None, pad_token_id=0) if temperature == 0 else \
        dict(do_sample=True, temperature=temperature, top_p=top_p, top_k=0, eos_token_id=None, pad_token_id=0)
    with torch.inference_mode():
        model.generate(ids[:2, -8:], attention_mask=mask[:2, -8:], max_new_tokens=2, min_new_tokens=2, **kwargs)
        sync(device)
        start = time.perf_counter()
        out = model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **kwargs)
        sync(device)
    assert out.shape[1] == width + new_tokens
    return time.perf_counter() - start


def weight_bytes(llm: LLM) -> int:
    """Bytes of the weights one decode step reads: every parameter but the embedding table (unless it is the
    tied LM head's)."""
    model = llm.core.runner.model
    tied = model.lm_head.weight is model.embed_tokens.weight
    return sum(p.numel() * p.element_size() for name, p in model.named_parameters()
               if tied or name != "embed_tokens.weight")


def decode_step_ms(model_dir: Path, kernels: str, dtype: str, device: str, steps: int, prompt_len: int = 32) -> dict:
    """Median ms of a batch-1 decode step with these kernels and dtype (one prompt prefilled, then `steps` steps)."""
    llm = LLM(model_dir, dtype=dtype, device=device, skip_tokenizer_init=True, max_num_seqs=1, kernels=kernels)
    prompt = {"prompt_token_ids": mixed_prompts(1, llm.vocab_size, prompt_len, prompt_len, seed=2)[0]}
    params = SamplingParams(max_tokens=steps + 1, temperature=0, ignore_eos=True)
    llm.generate([prompt], SamplingParams(max_tokens=4, temperature=0, ignore_eos=True), use_tqdm=False)  # warm
    llm.add_request(prompt, params)
    llm.step()  # prefill (and the first token)
    times = []
    while llm.has_unfinished_requests():
        sync(llm.config.device)
        start = time.perf_counter()
        llm.step()
        sync(llm.config.device)
        times.append(time.perf_counter() - start)
    ms = statistics.median(times) * 1e3
    nbytes = weight_bytes(llm)
    row = {"kernels": llm.config.kernels.name, "dtype_arg": dtype,
           "run_dtype": str(llm.config.dtype).removeprefix("torch."),
           "weight_dtype": str(llm.config.kernels.weight_dtype or llm.config.dtype).removeprefix("torch."),
           "decode_step_ms": round(ms, 2), "steps": len(times), "weight_gb": round(nbytes / 1e9, 3),
           "weight_gb_s": round(nbytes / ms / 1e6, 2)}
    del llm
    gc.collect()
    return row


def run_decode_steps(model_dir: Path, pairs: str, device: str, steps: int) -> None:
    rows = []
    for pair in pairs.split(","):
        kernels, dtype = pair.split(":")
        row = decode_step_ms(model_dir, kernels, dtype, device, steps)
        rows.append(row)
        print(f"  kernels {kernels:7s} dtype {dtype:9s} -> weights {row['weight_dtype']:8s} arithmetic "
              f"{row['run_dtype']:8s}: {row['decode_step_ms']:8.1f} ms per batch-1 decode step "
              f"({row['weight_gb']:.3f} GB of weights at {row['weight_gb_s']:.1f} GB/s)", flush=True)
    base = rows[0]["decode_step_ms"]
    for row in rows[1:]:
        print(f"  {rows[0]['kernels']}:{rows[0]['dtype_arg']} is {row['decode_step_ms'] / base:.2f}x faster than "
              f"{row['kernels']}:{row['dtype_arg']}")
    print(json.dumps({"batch": 1, "model": str(model_dir), "device": device_name(torch.device(
        "cuda" if device == "cuda" else "cpu")), "rows": rows, "torch": torch.__version__,
        "date": datetime.date.today().isoformat(), "commit": git_commit()}))


def matmul_only_decode_step(llm: LLM, batch: int, repeats: int = 5) -> float:
    """Seconds for one decode step's matrix multiplies alone (every layer's projections and the LM head)."""
    model, linear = llm.core.runner.model, llm.config.kernels.linear  # the engine's matmul (bf16 weights: native)
    x = torch.randn(batch, llm.config.model.hidden_size, dtype=llm.config.dtype, device=llm.config.device)
    weights = [w for layer in model.layers for w in (layer.self_attn.qkv_proj.weight, layer.self_attn.o_proj.weight,
                                                     layer.mlp.gate_up_proj.weight, layer.mlp.down_proj.weight)]
    inputs = {w.shape[1]: torch.randn(batch, w.shape[1], dtype=llm.config.dtype, device=llm.config.device) for w in weights}
    times = []
    with torch.inference_mode():
        for _ in range(repeats):
            sync(llm.config.device)
            start = time.perf_counter()
            for w in weights:
                linear(inputs[w.shape[1]], w, None)
            linear(x, model.lm_head.weight, None)
            sync(llm.config.device)
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--model", type=Path, help="a checkpoint directory (e.g. the fetched default model)")
    source.add_argument("--config", choices=sorted(PRESETS), default="qwen2.5-0.5b",
                        help="a Qwen-2.5 shape with random weights (default: qwen2.5-0.5b)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--min-prompt", type=int, default=16)
    parser.add_argument("--max-prompt", type=int, default=256)
    parser.add_argument("--dtype", default="bfloat16", help="bfloat16 | float16 | float32")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default); else sampled, both")
    parser.add_argument("--top-p", type=float, default=1.0, help="with --temperature: nucleus sampling, both")
    parser.add_argument("--skip-reference", action="store_true", help="time ours only")
    parser.add_argument("--enforce-eager", action="store_true", help="ours without CUDA graphs for decode steps")
    parser.add_argument("--kernels", default="auto", choices=["auto", "torch", "triton", "native"],
                        help="our kernels (native: stage1._C on the CPU; with bfloat16, bf16 weights + fp32 math)")
    parser.add_argument("--decode-step", metavar="KERNELS:DTYPE,...",
                        help="only time a batch-1 decode step for each pair, side by side (see above)")
    args = parser.parse_args()

    dtype = parse_dtype(args.dtype)
    model_dir = args.model or random_checkpoint(args.config)
    if args.decode_step:
        print(f"model {model_dir}, batch 1, median of {args.new_tokens} decode steps, on "
              f"{device_name(torch.device('cuda' if args.device == 'cuda' else 'cpu'))}; commit {git_commit()}",
              flush=True)
        run_decode_steps(model_dir, args.decode_step, args.device, args.new_tokens)
        return
    from stage1.engine.config import ModelConfig
    vocab = ModelConfig.from_dir(model_dir).vocab_size
    prompts = mixed_prompts(args.batch, vocab, args.min_prompt, args.max_prompt)
    print(f"model {model_dir}\nbatch {args.batch}, prompts {min(map(len, prompts))}-{max(map(len, prompts))} "
          f"tokens ({sum(map(len, prompts))} in all), {args.new_tokens} new tokens each, {args.dtype}, "
          f"{'greedy' if args.temperature == 0 else f'sampled (T {args.temperature}, top-p {args.top_p})'}",
          flush=True)

    ours_s, llm = run_ours(model_dir, prompts, args.new_tokens, dtype, args.device, args.temperature, args.top_p,
                           args.enforce_eager, args.kernels)
    generated = args.batch * args.new_tokens
    ours = generated / ours_s
    s = llm.stats
    step = s.decode_seconds / max(s.decode_steps, 1)
    matmul = matmul_only_decode_step(llm, args.batch)
    print(f"ours:         {ours:8.1f} output tok/s  ({ours_s:.1f} s: prefill {s.prefill_seconds:.1f} s for "
          f"{s.prefill_tokens} tokens, decode {s.decode_seconds:.1f} s in {s.decode_steps} steps)", flush=True)
    print(f"decode step:  {step * 1e3:.1f} ms; its matmuls alone {matmul * 1e3:.1f} ms "
          f"({matmul / step:.0%} of the step; at most {args.batch / matmul:.0f} tok/s from matmuls)", flush=True)
    result = {"ours_tok_s": round(ours, 2), "device": device_name(llm.config.device), "batch": args.batch,
              "new_tokens": args.new_tokens, "dtype": str(dtype).removeprefix("torch."),
              "kernels": llm.config.kernels.name,
              "temperature": args.temperature, "top_p": args.top_p,
              "model": args.config if args.model is None else str(args.model),
              "decode_step_ms": round(step * 1e3, 2), "matmul_only_step_ms": round(matmul * 1e3, 2),
              "cuda_graphs": llm.core.runner.graphs is not None and llm.core.runner.graphs.capture,
              "prefill_s": round(s.prefill_seconds, 2), "torch": torch.__version__,
              "date": datetime.date.today().isoformat(), "commit": git_commit()}
    if not args.skip_reference:
        device = llm.config.device
        del llm  # frees our weights and KV cache before transformers loads its copy
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        ref_s = run_transformers(model_dir, prompts, args.new_tokens, dtype, device, args.temperature, args.top_p)
        ref = generated / ref_s
        print(f"transformers: {ref:8.1f} output tok/s  ({ref_s:.1f} s)")
        print(f"ratio:        {ours / ref:8.2f}x")
        result.update(ref_tok_s=round(ref, 2), ratio=round(ours / ref, 3))
    else:
        result.update(ref_tok_s=None, ratio=None)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
