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

`--workload nano` is nano-vllm's (and vLLM's) offline throughput benchmark: 256 prompts of random token ids with
lengths uniform in [100, 1024], each with its own output length uniform in [100, 1024] (seed --seed, EOS ignored,
greedy), against two peers on the same model and dtype (`--peers generate,cb`):

    python benchmarks/bench_generate.py --workload nano --config qwen2.5-0.5b --eager-too
    OMP_NUM_THREADS=1 python benchmarks/bench_generate.py --workload nano --config smoke --dtype float32 --batch 4 \
        --nano-min 8 --nano-max 16        # CPU smoke run of every code path (random figures)

- ours: `LLM.generate` with one SamplingParams per request (max_tokens = its output length); output tok/s = the
  generated tokens / the timed call's wall time. The warm-up before it runs other (short) prompts that end one
  decode step apart, so the decode batch passes every CUDA-graph bucket and the timed run captures nothing; its
  prompts are not the timed ones (the timed run must find nothing in the prefix cache: asserted).
  `--eager-too` also times ours with enforce_eager (no CUDA graphs) in the same run, `--sync-too` with
  async_scheduling=False (on by default for one GPU).
- `generate`: transformers `generate` on the prompts left-padded into batches of --generate-batch (default: all
  of them in one). A static batch runs until its longest request is done, so every batch generates to its
  largest max_tokens and only each request's asked tokens count (the rest is the waste a static batch pays);
  --generate-max-time caps the call (transformers' max_time): a capped run counts the tokens of the steps that
  ran, which flatters the peer (the later steps, which carry fewer asked tokens, did not run); marked truncated.
- `cb`: transformers continuous batching (ContinuousBatchingManager through
  `model.continuous_batching_context_manager`, the machinery of `model.generate_batch`), each request added with
  its own max_new_tokens and EOS off; attention "paged|sdpa" (transformers < 5.23; from 5.23 plain "sdpa", the
  paged prefix being deprecated there), CUDA graphs and async batching requested on a GPU (what transformers
  resolved is printed), the same warm-up requests first. --cb-max-time caps the collection: a capped run counts
  the finished requests only, which understates the peer; marked truncated.
- roofline: a decode step must read the weights (the embedding table only when it is the tied LM head) and each
  sequence's KV cache; at the mean context of our decode steps (the workload's lengths give the KV tokens read;
  our stats give the step count) over --bandwidth (default 4.3e12 B/s, measured on the H200), printed beside our
  mean decode-step time (decode seconds / decode steps) as ms and as a fraction.
The last line is one JSON object (after ours, a partial one is printed too, so a run cut short keeps ours).
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time
from pathlib import Path

import torch
from common import (PRESETS, dtype_name, free_memory, git_commit, json_line, machine, mixed_prompts, nano_workload,
                    random_checkpoint, sync)

from stage1 import LLM, SamplingParams
from stage1.engine.config import ModelConfig, parse_dtype


@dataclasses.dataclass
class Workload:
    """The timed requests: prompts of token ids and each one's output length (EOS ignored)."""

    name: str
    seed: int
    prompts: list[list[int]]
    max_tokens: list[int]

    @classmethod
    def build(cls, args: argparse.Namespace, vocab: int) -> "Workload":
        if args.workload == "nano":
            prompts, max_tokens = nano_workload(args.batch or 256, vocab, args.nano_min, args.nano_max, args.seed)
        else:
            batch = args.batch or 32
            prompts = mixed_prompts(batch, vocab, args.min_prompt, args.max_prompt, args.seed)
            max_tokens = [args.new_tokens] * batch
        return cls(args.workload, args.seed, prompts, max_tokens)

    @property
    def generated(self) -> int:
        return sum(self.max_tokens)

    def facts(self) -> dict:
        lengths = list(map(len, self.prompts))
        return {"workload": self.name, "seed": self.seed, "batch": len(self.prompts), "input_tokens": sum(lengths),
                "output_tokens": self.generated, "prompt_len_range": [min(lengths), max(lengths)],
                "new_tokens_range": [min(self.max_tokens), max(self.max_tokens)]}


def warm_requests(count: int, vocab: int, seed: int = 1) -> tuple[list[list[int]], list[int]]:
    """Short prompts (16-32 tokens) whose requests end one decode step apart (max_tokens 2, 3, ...): the decode
    batch shrinks through every size from `count` to 1, so every CUDA-graph bucket is captured before a timed run.
    Their own seed: the timed prompts must not find these in the prefix cache."""
    return mixed_prompts(count, vocab, 16, 32, seed=seed), [2 + i for i in range(count)]


def run_ours(model_dir: Path, prompts, max_tokens: list[int], dtype: torch.dtype, device: str, temperature: float,
             top_p: float, enforce_eager: bool = False, kernels: str = "auto",
             async_scheduling: bool | None = None) -> tuple[float, LLM]:
    llm = LLM(model_dir, dtype=dtype, device=device, skip_tokenizer_init=True,
              max_num_seqs=max(len(prompts), 1), enforce_eager=enforce_eager, kernels=kernels,
              async_scheduling=async_scheduling)
    params = [SamplingParams(max_tokens=m, temperature=temperature, top_p=top_p, seed=i, ignore_eos=True)
              for i, m in enumerate(max_tokens)]
    # compiles what it runs; on a GPU every decode-graph bucket is captured here (see warm_requests)
    warm_prompts, warm_lens = warm_requests(len(prompts) if llm.config.device.type == "cuda" else min(2, len(prompts)),
                                            llm.vocab_size)
    warm = [SamplingParams(max_tokens=m, temperature=temperature, top_p=top_p, seed=1, ignore_eos=True)
            for m in warm_lens]
    llm.generate([{"prompt_token_ids": p} for p in warm_prompts], warm, use_tqdm=False)
    llm.stats.reset()  # count the timed run only
    captured_before = list(llm.core.runner.graphs.captured) if llm.core.runner.graphs is not None else []
    sync(llm.config.device)
    start = time.perf_counter()
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    sync(llm.config.device)
    elapsed = time.perf_counter() - start
    assert [len(o.outputs[0].token_ids) for o in outs] == list(max_tokens), "a request stopped early"
    assert llm.stats.prefix_cached_tokens == 0, "the timed prompts reused cached blocks: not the peer's work"
    graphs = llm.core.runner.graphs
    llm.graphs_captured_in_timed_run = (sorted(set(graphs.captured) - set(captured_before))
                                        if graphs is not None else [])
    return elapsed, llm


def load_transformers_model(model_dir: Path, dtype: torch.dtype, device: torch.device, attn: str | None = None):
    from transformers import AutoModelForCausalLM

    kwargs = dict(dtype=dtype)
    if attn:
        kwargs["attn_implementation"] = attn
    if device.type == "cuda":
        try:  # straight onto the GPU (a 7B shape's 15 GB through host memory takes a while)
            return AutoModelForCausalLM.from_pretrained(model_dir, device_map=str(device), **kwargs).eval()
        except (ImportError, ValueError, TypeError) as error:
            print(f"  (device_map={device} refused: {type(error).__name__}: {error}; loading on the CPU first)")
    return AutoModelForCausalLM.from_pretrained(model_dir, **kwargs).to(device).eval()


def run_transformers(model_dir: Path, prompts, max_tokens: list[int], dtype: torch.dtype, device: torch.device,
                     temperature: float, top_p: float, batch_size: int | None = None,
                     max_time: float | None = None) -> dict:
    """transformers `generate` on left-padded static batches of `batch_size` prompts (default: all), each batch
    generating to its longest request; counts each request's asked tokens only (see the module's docstring)."""
    model = load_transformers_model(model_dir, dtype, device)
    kwargs = dict(do_sample=False, eos_token_id=None, pad_token_id=0) if temperature == 0 else \
        dict(do_sample=True, temperature=temperature, top_p=top_p, top_k=0, eos_token_id=None, pad_token_id=0)
    batch_size = batch_size or len(prompts)

    def padded(batch):
        width = max(map(len, batch))
        ids = torch.zeros(len(batch), width, dtype=torch.long)
        mask = torch.zeros(len(batch), width, dtype=torch.long)
        for i, p in enumerate(batch):  # left padding, as decoder-only generation needs
            ids[i, width - len(p):] = torch.tensor(p)
            mask[i, width - len(p):] = 1
        return ids.to(device), mask.to(device)

    counted = computed = 0
    truncated = False
    with torch.inference_mode():
        ids, mask = padded([p[-8:] for p in prompts[:2]])
        model.generate(ids, attention_mask=mask, max_new_tokens=2, min_new_tokens=2, **kwargs)
        sync(device)
        start = time.perf_counter()
        for lo in range(0, len(prompts), batch_size):
            ids, mask = padded(prompts[lo:lo + batch_size])
            lens = max_tokens[lo:lo + batch_size]
            extra = {}
            if max_time is not None:
                left = max_time - (time.perf_counter() - start)
                if left <= 0:
                    truncated = True
                    break
                extra["max_time"] = left
            out = model.generate(ids, attention_mask=mask, max_new_tokens=max(lens), min_new_tokens=max(lens),
                                 **kwargs, **extra)
            steps = out.shape[1] - ids.shape[1]
            truncated |= steps < max(lens)
            counted += sum(min(m, steps) for m in lens)
            computed += steps * len(lens)
        sync(device)
        elapsed = time.perf_counter() - start
    del model
    free_memory(device)
    return dict(seconds=elapsed, counted_tokens=counted, computed_tokens=computed, truncated=truncated,
                batch_size=batch_size, tok_s=counted / elapsed if elapsed > 0 else None)


def transformers_cb_attn() -> str:
    """'paged|sdpa' where transformers has it (< 5.23); from 5.23 the paged prefix is gone (plain 'sdpa' is paged
    under continuous batching)."""
    import transformers
    from packaging.version import Version

    return "sdpa" if Version(transformers.__version__).release >= (5, 23) else "paged|sdpa"


def run_transformers_cb(model_dir: Path, prompts, max_tokens: list[int], dtype: torch.dtype, device: torch.device,
                        temperature: float, top_p: float, attn: str | None = None,
                        max_time: float | None = None, graphs: bool = True) -> dict:
    """transformers' continuous batching: the manager behind `model.generate_batch`, each request with its own
    max_new_tokens (generate_batch itself takes one for all), EOS off, CUDA graphs and async batching asked for on
    a GPU. Returns the figures and what transformers resolved."""
    import dataclasses

    import transformers
    from transformers import GenerationConfig

    attn = attn or transformers_cb_attn()
    model = load_transformers_model(model_dir, dtype, device, attn)
    sampling = dict(do_sample=False) if temperature == 0 else dict(do_sample=True, temperature=temperature,
                                                                   top_p=top_p, top_k=0)
    gen = GenerationConfig(max_new_tokens=max(max_tokens), eos_token_id=None, pad_token_id=0, **sampling)
    info = dict(transformers=transformers.__version__, attn_implementation=attn)
    if not hasattr(model, "continuous_batching_context_manager"):  # not in 5.17 or 5.24; kept as a fallback
        if not hasattr(model, "generate_batch"):
            raise RuntimeError(f"transformers {transformers.__version__} has no continuous batching")
        start = time.perf_counter()
        out = model.generate_batch(inputs=prompts, generation_config=gen)
        sync(device)
        elapsed = time.perf_counter() - start
        counted = sum(min(m, len(o.generated_tokens)) for m, o in zip(max_tokens, out.values()))
        info.update(api="generate_batch (one max_new_tokens: the longest; only the asked tokens count)")
        return dict(seconds=elapsed, counted_tokens=counted, truncated=False, tok_s=counted / elapsed, **info)

    from transformers.generation.continuous_batching.utils import WorkloadHints

    cuda = device.type == "cuda"
    cb_config, info["asked"] = cb_config_for(prompts, max_tokens, cuda, graphs)
    warm_prompts, warm_lens = warm_requests(min(len(prompts), 64) if cuda else min(2, len(prompts)),
                                            model.config.vocab_size)
    hints = WorkloadHints(max_prompt_length=max(map(len, prompts)), max_generated_length=max(max_tokens),
                          num_requests=len(prompts))
    with torch.inference_mode(), model.continuous_batching_context_manager(
            generation_config=gen, continuous_batching_config=cb_config, block=True, timeout=30,
            workload_hints=hints, warmup=cuda) as manager:
        resolved = manager.continuous_batching_config
        info.update(api="continuous_batching_context_manager + add_request(max_new_tokens=each)",
                    resolved_use_cuda_graph=list(resolved.use_cuda_graph) if isinstance(
                        resolved.use_cuda_graph, (tuple, list)) else resolved.use_cuda_graph,
                    resolved_use_async_batching=resolved.use_async_batching,
                    attn_implementation_run=model.config._attn_implementation)
        collect_cb_requests(manager, warm_prompts, warm_lens)
        sync(device)
        start = time.perf_counter()
        got = collect_cb_requests(manager, prompts, max_tokens, None if max_time is None else start + max_time)
        sync(device)
        elapsed = time.perf_counter() - start
        if got["finished"] < len(prompts):  # cut off: fail the rest now rather than let the exit finish them
            manager.stop(block=True, timeout=30, hard_stop=True)
    del model, manager
    free_memory(device)
    truncated = got["finished"] < len(prompts)
    return dict(seconds=elapsed, counted_tokens=got["counted"], finished=got["finished"], truncated=truncated,
                tok_s=got["counted"] / elapsed if elapsed > 0 else None, **info)


def cb_config_for(prompts, max_tokens: list[int], cuda: bool, graphs: bool):
    """transformers' ContinuousBatchingConfig for the workload, and the settings asked of it (those its version
    has): CUDA graphs and async batching on a GPU; on the CPU a small cache (one sized from the host's memory takes
    long to set up)."""
    from transformers.generation.configuration_utils import ContinuousBatchingConfig

    wanted = dict(use_cuda_graph=cuda and graphs, use_async_batching=cuda and graphs, auto_switch_to_flash=False)
    if not cuda:
        page = 256
        wanted["num_blocks"] = len(prompts) * -(-(max(map(len, prompts)) + max(max_tokens)) // page) + 8
    names = {f.name for f in dataclasses.fields(ContinuousBatchingConfig)}
    asked = {k: v for k, v in wanted.items() if k in names}
    return ContinuousBatchingConfig(**asked), asked


def collect_cb_requests(manager, batch, lens, deadline=None) -> dict:
    """Adds the requests to transformers' CB manager and collects their results until all finished or `deadline`
    (perf_counter seconds) passed: how many finished and their asked tokens."""
    ids = [manager.add_request(p, max_new_tokens=m, eos_token_id=-1) for p, m in zip(batch, lens)]
    done = {}
    while len(done) < len(ids):
        if deadline is not None and time.perf_counter() > deadline:
            break
        result = manager.get_result(timeout=1)
        if result is not None and result.is_finished():
            if result.error is not None:
                raise RuntimeError(f"transformers CB request {result.request_id} failed: {result.error}")
            done[result.request_id] = len(result.generated_tokens)
        elif result is None and not manager.is_running():
            raise RuntimeError("transformers' continuous batching loop died")
    asked = dict(zip(ids, lens))
    wrong = {i: (n, asked[i]) for i, n in done.items() if n != asked[i]}
    if wrong:
        print(f"  transformers CB: {len(wrong)} requests gave another length than asked (got, asked): "
              f"{list(wrong.values())[:5]}")
    return dict(finished=len(done), counted=sum(min(n, asked[i]) for i, n in done.items()))


def decode_roofline(llm: LLM, prompts, max_tokens: list[int], bandwidth: float) -> dict:
    """The bytes a mean decode step of the timed run must read (weights + KV at the mean context) over `bandwidth`,
    beside the measured mean decode step. A request of prompt length p and m output tokens has m - 1 decode steps
    (its first token comes from the prefill); its j-th attends over p + j tokens."""
    model = llm.config.model
    kv_elem = llm.core.runner.kv_cache[0].element_size()
    kv_token = model.num_hidden_layers * model.num_key_value_heads * model.head_dim * 2 * kv_elem
    kv_tokens = sum((m - 1) * len(p) + (m - 1) * m // 2 for p, m in zip(prompts, max_tokens))
    s = llm.stats
    steps = max(s.decode_steps, 1)
    weights = weight_bytes(llm)
    step_bytes = weights + kv_tokens * kv_token / steps
    measured = s.decode_seconds / steps
    bound = step_bytes / bandwidth
    return dict(bandwidth_b_s=bandwidth, weight_bytes=weights, kv_bytes_per_token=kv_token,
                decode_steps=s.decode_steps, mean_batch=round(s.decode_tokens / steps, 2),
                mean_context=round(kv_tokens / max(s.decode_tokens, 1), 1),
                mean_step_bytes=round(step_bytes), roofline_step_ms=round(bound * 1e3, 4),
                measured_step_ms=round(measured * 1e3, 4),
                roofline_fraction=round(bound / measured, 4) if measured > 0 else None)


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
    free_memory(torch.device("cpu"))
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
    print(json_line("bench_generate decode_step", {"batch": 1, "model": str(model_dir), "rows": rows},
                    "cuda" if device == "cuda" else "cpu"))


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


def unfused_decode_steps(args, model_dir: Path, prompts, max_tokens: list[int], dtype: torch.dtype,
                         device: torch.device, fused_step: float, graphs: bool) -> dict:
    """Ours again without stage1._C's fused CUDA ops (RMSNorm + residual, SiLU-and-mul, rotary + KV write): the
    Triton kernels with the PyTorch norm and activation they replace, with CUDA graphs and eagerly; the decode step
    against the first run's. The kernel choice is patched here, in the benchmark: the engine has no switch for it."""
    from stage1.engine import backends
    from stage1.engine.native import native_cuda_available

    if device.type != "cuda" or not native_cuda_available():
        print("ours unfused: skipped (stage1._C has no CUDA ops here, so every run above was unfused)", flush=True)
        return {"unfused": None}
    rows = {}
    real = backends.with_native_cuda_ops
    backends.with_native_cuda_ops = lambda kernels, device: kernels
    try:
        for eager in sorted({args.enforce_eager, True}):
            seconds, llm = run_ours(model_dir, prompts, max_tokens, dtype, args.device, args.temperature,
                                    args.top_p, eager, args.kernels)
            assert llm.config.kernels.elementwise.name != "native", "the fused ops were not taken out"
            s = llm.stats
            rows["eager" if eager else "graphs"] = {"tok_s": round(sum(max_tokens) / seconds, 2),
                                                    "decode_step_ms": round(s.decode_seconds / max(s.decode_steps, 1)
                                                                            * 1e3, 4)}
            del llm
            free_memory(device)
    finally:
        backends.with_native_cuda_ops = real
    first = "graphs" if graphs else "eager"
    for how, row in rows.items():
        vs = (f"the fused run's step ({first}) {row['decode_step_ms'] / (fused_step * 1e3):.2f}x shorter"
              if how == first else "compare with the fused eager run (--eager-too)")
        print(f"ours unfused, {how}: {row['tok_s']:10.1f} output tok/s, decode step {row['decode_step_ms']:.3f} ms; "
              f"{vs}", flush=True)
    return {"unfused": rows}


def ratio(a, b):
    return round(a / b, 3) if a and b else None


def rounded(figures: dict) -> dict:
    return {k: (round(v, 3) if isinstance(v, float) else v) for k, v in figures.items()}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--model", type=Path, help="a checkpoint directory (e.g. the fetched default model)")
    source.add_argument("--config", choices=sorted(PRESETS), default="qwen2.5-0.5b",
                        help="a Qwen-2.5 shape with random weights (default: qwen2.5-0.5b; smoke: a tiny one)")
    parser.add_argument("--workload", choices=["mixed", "nano"], default="mixed",
                        help="mixed (default): --batch prompts of --min/--max-prompt tokens, --new-tokens each; "
                             "nano: nano-vllm's benchmark (see above)")
    parser.add_argument("--batch", type=int, default=None, help="prompts (default 32; nano: 256)")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--min-prompt", type=int, default=16)
    parser.add_argument("--max-prompt", type=int, default=256)
    parser.add_argument("--nano-min", type=int, default=100, help="nano: least prompt and output length (100)")
    parser.add_argument("--nano-max", type=int, default=1024, help="nano: largest prompt and output length (1024)")
    parser.add_argument("--seed", type=int, default=0, help="the workload's seed (default 0)")
    parser.add_argument("--dtype", default="bfloat16", help="bfloat16 | float16 | float32")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default); else sampled, both")
    parser.add_argument("--top-p", type=float, default=1.0, help="with --temperature: nucleus sampling, both")
    parser.add_argument("--peers", default=None,
                        help="comma-separated: generate (transformers generate), cb (its continuous batching), none; "
                             "default: generate for mixed, generate,cb for nano")
    parser.add_argument("--skip-reference", action="store_true", help="time ours only (= --peers none)")
    parser.add_argument("--generate-batch", type=int, default=None,
                        help="generate peer: prompts per static batch (default: all in one)")
    parser.add_argument("--generate-max-time", type=float, default=None,
                        help="generate peer: seconds before it is cut off (transformers' max_time; marked truncated)")
    parser.add_argument("--cb-max-time", type=float, default=None,
                        help="cb peer: seconds before collecting stops (finished requests count; marked truncated)")
    parser.add_argument("--cb-attn", default=None,
                        help="cb peer's attn_implementation (default: paged|sdpa before transformers 5.23, else sdpa)")
    parser.add_argument("--bandwidth", type=float, default=4.3e12,
                        help="memory bandwidth for the decode roofline, B/s (default 4.3e12, measured on the H200)")
    parser.add_argument("--enforce-eager", action="store_true", help="ours without CUDA graphs for decode steps")
    parser.add_argument("--eager-too", action="store_true",
                        help="also time ours with enforce_eager in the same run (graphs against eager)")
    parser.add_argument("--unfused-too", action="store_true",
                        help="on a GPU with stage1._C's CUDA ops: ours again without them (graphs and eager), "
                             "the decode step against the fused run's")
    parser.add_argument("--sync-too", action="store_true",
                        help="also time ours with async_scheduling=False in the same run (the host loop overlapped "
                             "with the device's work or not)")
    parser.add_argument("--kernels", default="auto", choices=["auto", "torch", "triton", "native"],
                        help="our kernels (native: stage1._C on the CPU; with bfloat16, bf16 weights + fp32 math)")
    parser.add_argument("--decode-step", metavar="KERNELS:DTYPE,...",
                        help="only time a batch-1 decode step for each pair, side by side (see above)")
    return parser


def peer_names(args: argparse.Namespace, parser: argparse.ArgumentParser) -> list[str]:
    if args.skip_reference:
        return []
    default = "generate,cb" if args.workload == "nano" else "generate"
    peers = [p for p in (args.peers or default).split(",") if p and p != "none"]
    unknown = set(peers) - {"generate", "cb"}
    if unknown:
        parser.error(f"--peers: unknown {sorted(unknown)} (use generate, cb, none)")
    return peers


def time_ours(args: argparse.Namespace, model_dir: Path, work: Workload,
              dtype: torch.dtype) -> tuple[dict, torch.device, float]:
    """Ours on the workload (then eager, synchronous and unfused where asked): prints the figures; returns the
    result's fields, the device it ran on and its output tok/s unrounded (the peers' ratios)."""
    ours_s, llm = run_ours(model_dir, work.prompts, work.max_tokens, dtype, args.device, args.temperature,
                           args.top_p, args.enforce_eager, args.kernels)
    device, s = llm.config.device, llm.stats
    ours = work.generated / ours_s
    step = s.decode_seconds / max(s.decode_steps, 1)
    roof = decode_roofline(llm, work.prompts, work.max_tokens, args.bandwidth)
    mean_batch = max(round(roof["mean_batch"]), 1)
    matmul = matmul_only_decode_step(llm, mean_batch)
    graphs = llm.core.runner.graphs is not None and llm.core.runner.graphs.capture
    print(f"ours:         {ours:10.1f} output tok/s  ({ours_s:.2f} s: prefill {s.prefill_seconds:.2f} s for "
          f"{s.prefill_tokens} tokens, decode {s.decode_seconds:.2f} s in {s.decode_steps} steps; "
          f"{'CUDA graphs' if graphs else 'eager'}"
          f"{f', graphs captured during the timed run: {llm.graphs_captured_in_timed_run}' if graphs else ''})",
          flush=True)
    print(f"decode step:  {step * 1e3:.3f} ms at a mean batch of {roof['mean_batch']} and context "
          f"{roof['mean_context']}; roofline {roof['roofline_step_ms']:.3f} ms ({roof['mean_step_bytes'] / 1e9:.3f} GB: "
          f"weights {roof['weight_bytes'] / 1e9:.3f} GB + KV, at {args.bandwidth / 1e12:.2f} TB/s) = "
          f"{roof['roofline_fraction']:.1%} of the measured step; its matmuls alone at batch {mean_batch} "
          f"{matmul * 1e3:.3f} ms ({matmul / step:.0%} of the step)", flush=True)
    result = {**work.facts(), "ours_tok_s": round(ours, 2), "ours_s": round(ours_s, 3), "device": str(device),
              "new_tokens": args.new_tokens if work.name != "nano" else None, "dtype": dtype_name(dtype),
              "kernels": llm.config.kernels.name, "temperature": args.temperature, "top_p": args.top_p,
              "model": args.config if args.model is None else str(args.model),
              "decode_step_ms": round(step * 1e3, 4), "matmul_only_step_ms": round(matmul * 1e3, 4),
              "roofline": roof, "cuda_graphs": graphs,
              "graphs_captured_in_timed_run": llm.graphs_captured_in_timed_run,
              "prefill_s": round(s.prefill_seconds, 3), "decode_s": round(s.decode_seconds, 3),
              "async_scheduling": llm.config.async_scheduling}
    del llm  # frees our weights and KV cache before the next engine or transformers loads its copy
    free_memory(device)
    if args.eager_too:
        result.update(time_ours_eager(args, model_dir, work, dtype, ours, step, graphs))
    if args.sync_too:
        result.update(time_ours_sync(args, model_dir, work, dtype, ours, result["async_scheduling"]))
    if args.unfused_too:
        result.update(unfused_decode_steps(args, model_dir, work.prompts, work.max_tokens, dtype, device, step,
                                           graphs))
    return result, device, ours


def time_ours_eager(args, model_dir: Path, work: Workload, dtype: torch.dtype, ours: float, step: float,
                    graphs: bool) -> dict:
    """Ours again with enforce_eager: graphs against eager."""
    eager_s, llm = run_ours(model_dir, work.prompts, work.max_tokens, dtype, args.device, args.temperature,
                            args.top_p, True, args.kernels)
    es, device = llm.stats, llm.config.device
    eager_step = es.decode_seconds / max(es.decode_steps, 1)
    eager = work.generated / eager_s
    print(f"ours eager:   {eager:10.1f} output tok/s  ({eager_s:.2f} s; decode step {eager_step * 1e3:.3f} ms): "
          + (f"graphs {ours / eager:.2f}x eager, decode step {eager_step / step:.2f}x shorter with graphs" if graphs
             else "no CUDA graphs here: both runs were eager"),
          flush=True)
    del llm
    free_memory(device)
    return dict(ours_eager_tok_s=round(eager, 2), ours_eager_decode_step_ms=round(eager_step * 1e3, 4),
                graphs_vs_eager=ratio(ours, eager))


def time_ours_sync(args, model_dir: Path, work: Workload, dtype: torch.dtype, ours: float, async_on: bool) -> dict:
    """Ours again with async_scheduling=False: the host loop overlapped with the device's work or not."""
    sync_s, llm = run_ours(model_dir, work.prompts, work.max_tokens, dtype, args.device, args.temperature,
                           args.top_p, args.enforce_eager, args.kernels, async_scheduling=False)
    device = llm.config.device
    synced = work.generated / sync_s
    print(f"ours sync:    {synced:10.1f} output tok/s  ({sync_s:.2f} s; async scheduling "
          f"{'on' if async_on else 'off'} in the first run: {ours / synced:.2f}x this one)", flush=True)
    del llm
    free_memory(device)
    return dict(ours_sync_tok_s=round(synced, 2), async_vs_sync=ratio(ours, synced))


def generate_peer(args, model_dir: Path, work: Workload, dtype: torch.dtype, device: torch.device,
                  ours: float) -> dict:
    """transformers generate on the workload; its failure is a result too (the other peer still runs)."""
    try:
        ref = run_transformers(model_dir, work.prompts, work.max_tokens, dtype, device, args.temperature, args.top_p,
                               args.generate_batch, args.generate_max_time)
    except Exception as error:  # noqa: BLE001 - one peer failing leaves the other's figures
        print(f"transformers generate failed: {type(error).__name__}: {str(error)[:300]}", flush=True)
        return dict(ref_tok_s=None, ratio=None, generate={"error": f"{type(error).__name__}: {error}"[:300]})
    note = "" if len(set(work.max_tokens)) == 1 else \
        (f"; static batches of {ref['batch_size']} generate to their longest request, only the asked "
         f"tokens count: {ref['counted_tokens']} of {ref['computed_tokens']} computed")
    if ref["truncated"]:
        note += (f"; TRUNCATED at --generate-max-time {args.generate_max_time} s: the rate of the part that "
                 "ran, which flatters the peer")
    print(f"transformers generate: {ref['tok_s']:10.1f} output tok/s  ({ref['seconds']:.2f} s{note})", flush=True)
    print(f"ratio vs generate:     {ours / ref['tok_s']:10.2f}x", flush=True)
    return dict(ref_tok_s=round(ref["tok_s"], 2), ratio=ratio(ours, ref["tok_s"]), generate=rounded(ref))


def cb_peer(args, model_dir: Path, work: Workload, dtype: torch.dtype, device: torch.device, ours: float) -> dict:
    """transformers continuous batching on the workload; on a GPU a failure is retried once without CUDA graphs
    and async batching (a figure, marked so)."""
    try:
        cb = run_transformers_cb(model_dir, work.prompts, work.max_tokens, dtype, device, args.temperature,
                                 args.top_p, args.cb_attn, args.cb_max_time)
    except Exception as error:  # noqa: BLE001
        print(f"transformers CB failed: {type(error).__name__}: {str(error)[:300]}", flush=True)
        failed = dict(cb_tok_s=None, ratio_vs_cb=None, cb={"error": f"{type(error).__name__}: {error}"[:300]})
        return cb_retry_without_graphs(args, model_dir, work, dtype, device, ours, failed) \
            if device.type == "cuda" else failed
    note = (f"; TRUNCATED at --cb-max-time {args.cb_max_time} s: {cb['finished']} of {len(work.prompts)} requests "
            "finished and only theirs count, which understates the peer") if cb["truncated"] else ""
    print(f"transformers CB:       {cb['tok_s']:10.1f} output tok/s  ({cb['seconds']:.2f} s; "
          f"transformers {cb['transformers']}, attn {cb['attn_implementation']} "
          f"(ran as {cb.get('attn_implementation_run')}), {cb['api']}, asked {cb.get('asked')}, resolved "
          f"use_cuda_graph {cb.get('resolved_use_cuda_graph')}, use_async_batching "
          f"{cb.get('resolved_use_async_batching')}{note})", flush=True)
    print(f"ratio vs CB:           {ours / cb['tok_s']:10.2f}x", flush=True)
    return dict(cb_tok_s=round(cb["tok_s"], 2), ratio_vs_cb=ratio(ours, cb["tok_s"]), cb=rounded(cb))


def cb_retry_without_graphs(args, model_dir: Path, work: Workload, dtype: torch.dtype, device: torch.device,
                            ours: float, failed: dict) -> dict:
    free_memory(device)
    try:
        cb = run_transformers_cb(model_dir, work.prompts, work.max_tokens, dtype, device, args.temperature,
                                 args.top_p, args.cb_attn, args.cb_max_time, graphs=False)
    except Exception as again:  # noqa: BLE001
        print(f"transformers CB failed again: {type(again).__name__}: {str(again)[:300]}", flush=True)
        return failed
    print(f"transformers CB without CUDA graphs / async batching (the retry): {cb['tok_s']:10.1f} "
          f"output tok/s ({cb['seconds']:.2f} s; truncated {cb['truncated']})", flush=True)
    return dict(cb_tok_s=round(cb["tok_s"], 2), ratio_vs_cb=ratio(ours, cb["tok_s"]),
                cb={**rounded(cb), "retry_without_graphs": True, "first_error": failed["cb"]["error"]})


def main() -> None:
    parser = build_parser()
    args = parser.parse_args()
    dtype = parse_dtype(args.dtype)
    model_dir = args.model or random_checkpoint(args.config)
    if args.decode_step:
        print(f"model {model_dir}, batch 1, median of {args.new_tokens} decode steps, on "
              f"{machine('cuda' if args.device == 'cuda' else 'cpu')}; commit {git_commit()}", flush=True)
        run_decode_steps(model_dir, args.decode_step, args.device, args.new_tokens)
        return
    work = Workload.build(args, ModelConfig.from_dir(model_dir).vocab_size)
    peers = peer_names(args, parser)
    facts = work.facts()
    how = "greedy" if args.temperature == 0 else f"sampled (T {args.temperature}, top-p {args.top_p})"
    print(f"model {model_dir}\nworkload {work.name} (seed {work.seed}): {facts['batch']} prompts of "
          f"{'-'.join(map(str, facts['prompt_len_range']))} tokens ({facts['input_tokens']} input tokens in all), "
          f"{'-'.join(map(str, facts['new_tokens_range']))} new tokens each ({work.generated} output tokens in all), "
          f"EOS ignored, {args.dtype}, {how}; commit {git_commit()}", flush=True)

    result, device, ours = time_ours(args, model_dir, work, dtype)
    print(json_line("bench_generate", result, device, partial=True), flush=True)  # a run cut short keeps ours
    if "generate" in peers:
        result.update(generate_peer(args, model_dir, work, dtype, device, ours))
    else:
        result.update(ref_tok_s=None, ratio=None)
    if "cb" in peers:
        result.update(cb_peer(args, model_dir, work, dtype, device, ours))
    print(json_line("bench_generate", result, device))


if __name__ == "__main__":
    main()
