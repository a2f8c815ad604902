"""`LLM`: the offline API, shaped like vLLM's. Loads a checkpoint, then `generate` runs prompts to completion
with continuous batching over the paged KV cache."""

from __future__ import annotations

import itertools
import logging
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence as SequenceT

import torch

from .backends import Kernels, select_kernels
from .config import ModelConfig, parse_dtype, read_eos_token_ids
from .cuda_graphs import DecodeGraphs
from .kv_cache import BlockManager, allocate_kv_cache, bytes_per_block, num_blocks_for_budget
from .model_runner import ModelRunner
from .outputs import CompletionOutput, Logprob, RequestOutput
from .params import SamplingParams
from .sampler import SamplingBatch
from .scheduler import Scheduler
from .sequence import Sequence
from .tokenizer import IncrementalDetokenizer, Tokenizer
from .weights import load_model

logger = logging.getLogger("stage1")

PromptType = str | dict

_CPU_KV_CACHE_BYTES = 4 << 30


class LLM:
    def __init__(self, model: str | Path, *, dtype: str | torch.dtype = "auto", device: str = "auto",
                 block_size: int = 16, kv_cache_memory: int | None = None, max_num_seqs: int = 256,
                 max_model_len: int | None = None, max_num_batched_tokens: int | None = None, seed: int = 0,
                 skip_tokenizer_init: bool = False, kernels: str = "auto", enforce_eager: bool = False,
                 enable_prefix_caching: bool = True):
        self.model_dir = Path(model)
        self.config = ModelConfig.from_dir(self.model_dir)
        self.device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device)
        self.dtype = auto_dtype(self.config.torch_dtype, self.device) if dtype == "auto" else parse_dtype(dtype)
        self.kernels = select_kernels(kernels, self.device)  # before any loading, so a bad choice fails at once
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.max_model_len = min(max_model_len or self.config.max_position_embeddings,
                                 self.config.max_position_embeddings)
        self.tokenizer = None if skip_tokenizer_init else Tokenizer(self.model_dir)
        self.eos_token_ids = read_eos_token_ids(self.model_dir, self.config)

        model_obj = load_model(self.model_dir, self.config, self.dtype, self.device)
        budget = kv_cache_memory if kv_cache_memory is not None else self._default_kv_budget(
            block_size, max_num_seqs)
        num_blocks = num_blocks_for_budget(self.config, block_size, self.dtype, budget)
        graph_mode = self._decode_graph_mode(self.device, self.kernels, enforce_eager)
        # with decode graphs the pool's last block is their padding rows' sink, owned by no sequence
        self.block_manager = BlockManager(num_blocks - (graph_mode is not None), block_size, enable_prefix_caching)
        kv_cache = allocate_kv_cache(self.config, num_blocks, block_size, self.dtype, self.device)
        graphs = None
        if graph_mode is not None:
            graphs = DecodeGraphs(model_obj, kv_cache, self.kernels.attention, max_num_seqs,
                                  self.block_manager.blocks_needed(self.max_model_len), num_blocks - 1, block_size,
                                  self.device, capture=graph_mode == "capture")
        self.runner = ModelRunner(model_obj, kv_cache, block_size, self.kernels, self.device, graphs)
        self.max_num_seqs = max_num_seqs
        # Tokens per prefill step. On the CPU, ~1k keeps a layer's activations in the last-level cache while the
        # weights are still read once per 1k tokens (measured best on the 0.5B shape); a GPU wants bigger steps.
        self.max_num_batched_tokens = max(max_num_batched_tokens or (8192 if self.device.type == "cuda" else 1024), 1)
        self._seed_stream = random.Random(seed)  # seeds for requests that set none
        self.scheduler = Scheduler(self.block_manager, max_num_seqs, self.max_num_batched_tokens)
        self._requests: dict[str, _Request] = {}
        self._request_counter, self._seq_counter = itertools.count(), itertools.count()
        self._last_step_tokens = 0
        self.stats = StepStats()
        logger.info("stage1: %s on %s in %s, kernels %s, decode %s, KV cache %d blocks x %d tokens (%.2f GiB)",
                    self.model_dir, self.device, str(self.dtype).removeprefix("torch."), self.kernels.name,
                    "through CUDA graphs" if graph_mode == "capture" else "eager", num_blocks, block_size,
                    num_blocks * bytes_per_block(self.config, block_size, self.dtype) / 2**30)

    @staticmethod
    def _decode_graph_mode(device: torch.device, kernels: Kernels, enforce_eager: bool) -> str | None:
        """How decode steps run: "capture" replays CUDA graphs (on a GPU with the Triton kernels: the reference
        attention would gather every row's full-width block table, max_model_len tokens); None runs them eagerly.
        Tests patch in "padded": the graphs' padded step, run eagerly, which needs no GPU."""
        if enforce_eager or device.type != "cuda" or kernels.name != "triton":
            return None
        return "capture"

    def _default_kv_budget(self, block_size: int, max_num_seqs: int) -> int:
        """On a GPU most of what the weights leave free, on the CPU a fixed share; never more than the most
        tokens `max_num_seqs` full-length sequences could hold."""
        per_block = bytes_per_block(self.config, block_size, self.dtype)
        most_needed = max_num_seqs * ((self.max_model_len + block_size - 1) // block_size) * per_block
        if self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            return min(int(free * 0.85), most_needed)
        return min(_CPU_KV_CACHE_BYTES, most_needed)

    # ---- the offline API ----

    def generate(self, prompts: PromptType | SequenceT[PromptType],
                 sampling_params: SamplingParams | SequenceT[SamplingParams] | None = None,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        if isinstance(prompts, (str, dict)):
            prompts = [prompts]
        prompts = list(prompts)
        if sampling_params is None:
            raise ValueError("generate() needs sampling_params, e.g. SamplingParams(max_tokens=256): "
                             "there is no silent default length")
        if isinstance(sampling_params, SamplingParams):
            params = [sampling_params] * len(prompts)
        else:
            params = list(sampling_params)
            if len(params) != len(prompts):
                raise ValueError(f"got {len(prompts)} prompts but {len(params)} SamplingParams: pass one for all "
                                 "or one per prompt")
        # Check every request before running any, so a bad one fails the call before work is spent.
        requests = [(self._prompt_ids(i, p), p if isinstance(p, str) else p.get("prompt")) for i, p in
                    enumerate(prompts)]
        for i, ((ids, _), sp) in enumerate(zip(requests, params)):
            self._check_request(i, ids, sp)
        ids = [self._add(token_ids, text, sp) for (token_ids, text), sp in zip(requests, params)]
        finished: dict[str, RequestOutput] = {}
        progress = _Progress(len(ids), use_tqdm)
        try:
            while len(finished) < len(ids):
                for out in self.step():
                    finished[out.request_id] = out
                    progress.request_done()
                progress.tokens(self._last_step_tokens)
        except BaseException:
            self.abort(ids)  # leave the engine usable after an interrupt or an error
            raise
        finally:
            progress.close()
        return [finished[i] for i in ids]

    # ---- the step-level API: requests can be added while others run ----

    def add_request(self, prompt: PromptType, sampling_params: SamplingParams) -> str:
        """Queues one request; it joins the running batch at the next step that has room. Returns its id."""
        ids = self._prompt_ids(0, prompt)
        self._check_request(0, ids, sampling_params)
        return self._add(ids, prompt if isinstance(prompt, str) else prompt.get("prompt"), sampling_params)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished()

    def step(self) -> list[RequestOutput]:
        """Runs one scheduled step (a prefill or a decode); returns the requests that finished in it."""
        cached_before = self.scheduler.num_cached_tokens
        batch = self.scheduler.schedule()
        self._last_step_tokens = 0
        if not batch.seqs:
            if self.scheduler.has_unfinished():
                raise RuntimeError("scheduler found nothing to run although requests are pending: "
                                   "raise kv_cache_memory")
            return []
        sampling_seqs = [s for i, s in enumerate(batch.seqs) if batch.samples(i)]
        sampling = SamplingBatch.build([s.params for s in sampling_seqs], self.device,
                                       seeds=[s.seed for s in sampling_seqs],
                                       steps=[s.num_output_tokens for s in sampling_seqs])
        started = time.perf_counter()
        try:
            result = self.runner.run(batch, sampling)
        except BaseException:
            self.scheduler.discard_step(batch)  # its blocks were registered for prefix caching, never filled
            raise
        self.stats.record(batch.is_prefill, sum(batch.num_new_tokens), len(result.tokens),
                          time.perf_counter() - started, self.scheduler.num_cached_tokens - cached_before)
        self.scheduler.update(batch)
        self._last_step_tokens = len(result.tokens)
        done = []
        for row, (seq, token) in enumerate(zip(sampling_seqs, result.tokens)):
            self._append_token(seq, token, result.logprobs, row)
            if seq.finish_reason is not None:
                self.scheduler.finish(seq)
                request = self._requests[seq.request_id]
                if all(s.finish_reason is not None for s in request.seqs):
                    done.append(self._request_output(self._requests.pop(seq.request_id)))
        return done

    def abort(self, request_ids: list[str]) -> None:
        for request_id in request_ids:
            request = self._requests.pop(request_id, None)
            for seq in request.seqs if request else []:
                if seq.finish_reason is None:
                    self.scheduler.abort(seq)

    def _add(self, ids: list[int], text: str | None, sp: SamplingParams) -> str:
        request_id = str(next(self._request_counter))
        seqs = []
        for sample_index in range(sp.n):
            seq = Sequence(next(self._seq_counter), request_id, sample_index, list(ids), len(ids), sp,
                           seed=self._sequence_seed(sp.seed, sample_index),
                           detokenizer=IncrementalDetokenizer(self.tokenizer) if self.tokenizer else None,
                           logprobs=[] if sp.logprobs is not None else None)
            seqs.append(seq)
            self.scheduler.add(seq)
        self._requests[request_id] = _Request(request_id, list(ids), text, seqs)
        return request_id

    def _prompt_ids(self, index: int, prompt: PromptType) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError(f"prompt {index} is text but the LLM was built with skip_tokenizer_init=True: "
                                 "pass {'prompt_token_ids': [...]} instead")
            return self.tokenizer.encode(prompt)
        if isinstance(prompt, dict) and "prompt_token_ids" in prompt:
            ids = prompt["prompt_token_ids"]
            if not all(isinstance(t, int) and 0 <= t < self.config.vocab_size for t in ids):
                raise ValueError(f"prompt {index}: prompt_token_ids must be ints in [0, {self.config.vocab_size})")
            return list(ids)
        if isinstance(prompt, dict) and isinstance(prompt.get("prompt"), str):
            return self._prompt_ids(index, prompt["prompt"])
        raise TypeError(f"prompt {index} must be a string, {{'prompt': str}} or {{'prompt_token_ids': [int, ...]}}, "
                        f"got {type(prompt).__name__}")

    def _check_request(self, index: int, ids: list[int], params: SamplingParams) -> None:
        if not ids:
            raise ValueError(f"prompt {index} is empty: a prompt needs at least one token")
        if len(ids) >= self.max_model_len:
            raise ValueError(f"prompt {index} has {len(ids)} tokens, but the context holds {self.max_model_len} "
                             "(max_model_len) and must leave room for one new token: shorten the prompt")
        if params.stop_strings and self.tokenizer is None:
            raise ValueError(f"prompt {index}: stop strings need a tokenizer (skip_tokenizer_init=True was set)")
        longest = min(len(ids) + (params.max_tokens or self.max_model_len), self.max_model_len)
        if self.block_manager.blocks_needed(longest) > self.block_manager.num_blocks:
            raise ValueError(f"prompt {index}: {longest} tokens need {self.block_manager.blocks_needed(longest)} KV "
                             f"cache blocks but the pool has {self.block_manager.num_blocks}: raise "
                             "kv_cache_memory or lower max_tokens")

    def _sequence_seed(self, seed: int | None, sample_index: int) -> int:
        if seed is None:
            return self._seed_stream.getrandbits(63)
        # distinct, reproducible streams for the n samples of one seeded request; any int maps into the int64 key
        return seed % 2**63 if sample_index == 0 else (seed * 0x9E3779B1 + sample_index) % 2**63

    def _append_token(self, seq: Sequence, token: int, logprobs, row: int) -> None:
        seq.token_ids.append(token)
        sp = seq.params
        if seq.logprobs is not None:
            chosen, rank, top_ids, top_values = (x[row] for x in logprobs)
            entry = {token: Logprob(chosen, rank, self._decode_one(token))}
            for position, (tid, value) in enumerate(list(zip(top_ids, top_values))[:sp.logprobs]):
                entry.setdefault(tid, Logprob(value, position + 1, self._decode_one(tid)))
            seq.logprobs.append(entry)
            seq.cumulative_logprob += chosen
        may_stop = seq.num_output_tokens >= sp.min_tokens
        if may_stop and not sp.ignore_eos and token in self.eos_token_ids:
            return self._finish(seq, "stop", None)
        if may_stop and token in sp.stop_token_ids:
            return self._finish(seq, "stop", token)
        if seq.detokenizer is not None:
            before = len(seq.text)
            seq.text += seq.detokenizer.add(token)
            if may_stop and sp.stop_strings and self._cut_at_stop_string(seq, before):
                return
        if sp.max_tokens is not None and seq.num_output_tokens >= sp.max_tokens:
            return self._finish(seq, "length", None)
        if seq.num_tokens >= self.max_model_len:
            return self._finish(seq, "length", None)

    def _cut_at_stop_string(self, seq: Sequence, before: int) -> bool:
        """Finds the earliest stop string that ends in the new text (it may have started in earlier tokens)."""
        longest = max(len(s) for s in seq.params.stop_strings)
        search_from = max(0, before - longest + 1)
        hits = [(seq.text.find(s, search_from), s) for s in seq.params.stop_strings]
        hits = [(at, s) for at, s in hits if at != -1]
        if not hits:
            return False
        at, stop = min(hits)
        seq.text = seq.text[:at + len(stop)] if seq.params.include_stop_str_in_output else seq.text[:at]
        self._finish(seq, "stop", stop, flush=False)
        return True

    def _finish(self, seq: Sequence, reason: str, stop_reason, flush: bool = True) -> None:
        if flush and seq.detokenizer is not None and reason == "length":
            seq.text += seq.detokenizer.flush()
        seq.finish_reason, seq.stop_reason = reason, stop_reason

    def _decode_one(self, token: int) -> str | None:
        return self.tokenizer.decode([token]) if self.tokenizer is not None else None

    @staticmethod
    def _request_output(request: "_Request") -> RequestOutput:
        outputs = [CompletionOutput(index=s.sample_index, text=s.text, token_ids=s.output_token_ids,
                                    finish_reason=s.finish_reason, stop_reason=s.stop_reason, logprobs=s.logprobs,
                                    cumulative_logprob=s.cumulative_logprob if s.logprobs is not None else None)
                   for s in request.seqs]
        return RequestOutput(request_id=request.request_id, prompt=request.prompt,
                             prompt_token_ids=request.prompt_token_ids, outputs=outputs)


@dataclass
class _Request:
    request_id: str
    prompt_token_ids: list[int]
    prompt: str | None
    seqs: list[Sequence]


def cpu_has_native_bf16() -> bool:
    """avx512_bf16 or AMX: without them torch's bf16 matmuls on the CPU run an emulated path many times slower
    than fp32 (0.2 vs 1.8 GB/s of weights measured on an AVX2-only EPYC)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def auto_dtype(checkpoint_dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """The checkpoint's dtype, except half precision on a CPU that cannot compute in it fast: fp32 there."""
    if device.type == "cpu" and checkpoint_dtype != torch.float32 and not cpu_has_native_bf16():
        logger.info("stage1: this CPU has no native bf16 (avx512_bf16/AMX): running in float32; "
                    "pass dtype='bfloat16' to force it")
        return torch.float32
    return checkpoint_dtype


@dataclass
class StepStats:
    """Where the time went, for benchmarks and run manifests (a clock read per step, nothing more)."""

    prefill_steps: int = 0
    prefill_tokens: int = 0
    prefill_seconds: float = 0.0
    decode_steps: int = 0
    decode_tokens: int = 0
    decode_seconds: float = 0.0
    generated_tokens: int = 0
    prefix_cached_tokens: int = 0  # prompt tokens taken from the prefix cache instead of computed

    def record(self, is_prefill: bool, computed: int, sampled: int, seconds: float, cached: int = 0) -> None:
        self.prefix_cached_tokens += cached
        if is_prefill:
            self.prefill_steps += 1
            self.prefill_tokens += computed
            self.prefill_seconds += seconds
        else:
            self.decode_steps += 1
            self.decode_tokens += computed
            self.decode_seconds += seconds
        self.generated_tokens += sampled


class _Progress:
    """A tqdm bar over requests with output tokens/s, or nothing."""

    def __init__(self, total: int, enabled: bool):
        self.bar = None
        self.start, self.generated = time.perf_counter(), 0
        if enabled:
            from tqdm.auto import tqdm
            self.bar = tqdm(total=total, desc="generate", unit="req", dynamic_ncols=True)

    def tokens(self, n: int) -> None:
        self.generated += n

    def request_done(self) -> None:
        if self.bar is not None:
            rate = self.generated / max(time.perf_counter() - self.start, 1e-9)
            self.bar.set_postfix_str(f"{rate:.1f} tok/s out", refresh=False)
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
