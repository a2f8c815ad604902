"""`LLM`: the offline API, shaped like vLLM's, over the engine core.

It turns prompts into requests (checked before any runs), each request into its `n` sequences, and finished
sequences back into `RequestOutput`s; `generate` steps the core until its requests are done. How the engine is
built is `EngineConfig`'s business, how a step runs the core's (engine_core.py).
"""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence as SequenceT

import torch

from .engine_config import EngineConfig
from .engine_core import EngineCore, StepStats
from .progress import RequestProgress
from .outputs import CompletionOutput, RequestOutput
from .params import SamplingParams
from .sequence import Sequence
from .tokenizer import IncrementalDetokenizer, Tokenizer

PromptType = str | dict


class LLM:
    def __init__(self, model: str | Path, *, dtype: str | torch.dtype = "auto", device: str = "auto",
                 block_size: int = 16, kv_cache_memory: int | None = None, max_num_seqs: int = 256,
                 max_model_len: int | None = None, max_num_batched_tokens: int | None = None, seed: int = 0,
                 skip_tokenizer_init: bool = False, kernels: str = "auto", enforce_eager: bool = False,
                 enable_prefix_caching: bool = True, tensor_parallel_size: int = 1,
                 async_scheduling: bool | None = None):
        self.config = EngineConfig.build(
            model, dtype=dtype, device=device, block_size=block_size, kv_cache_memory=kv_cache_memory,
            max_num_seqs=max_num_seqs, max_model_len=max_model_len, max_num_batched_tokens=max_num_batched_tokens,
            seed=seed, skip_tokenizer_init=skip_tokenizer_init, kernels=kernels, enforce_eager=enforce_eager,
            enable_prefix_caching=enable_prefix_caching, tensor_parallel_size=tensor_parallel_size,
            async_scheduling=async_scheduling)
        self.tokenizer = None if skip_tokenizer_init else Tokenizer(self.config.model_dir)
        self._seed_stream = random.Random(seed)  # seeds for requests that set none
        self._requests: dict[str, _Request] = {}
        self._request_counter, self._seq_counter = itertools.count(), itertools.count()
        # Last: it starts the tensor-parallel workers, and ends them itself if it fails after that.
        self.core = EngineCore(self.config, self.tokenizer)

    def shutdown(self) -> None:
        """Ends the tensor-parallel workers and frees their process group now; idempotent, and the LLM is
        unusable after. `del llm` (garbage collection) does the same, and so does the end of this process."""
        self.core.shutdown()

    def __enter__(self) -> "LLM":
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()

    @property
    def max_model_len(self) -> int:
        return self.config.max_model_len

    @property
    def max_num_seqs(self) -> int:
        return self.config.max_num_seqs

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        return self.config.eos_token_ids

    @property
    def vocab_size(self) -> int:
        return self.config.model.vocab_size

    @property
    def stats(self) -> StepStats:
        return self.core.stats

    @property
    def engine_info(self) -> dict:
        """What `auto` and the other arguments resolved to on this machine: the rows depend on it."""
        c = self.config
        name = lambda dtype: str(dtype).removeprefix("torch.")  # noqa: E731
        return {"device": str(c.device), "kernels": c.kernels.name, "dtype": name(c.dtype),
                "matmul_weights": name(c.kernels.weight_dtype or c.dtype),
                "tensor_parallel_size": c.tensor_parallel_size, "kernels_replaced": list(c.kernels.replaced)}

    # ---- the offline API ----

    def generate(self, prompts: PromptType | SequenceT[PromptType],
                 sampling_params: SamplingParams | SequenceT[SamplingParams] | None = None,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        prompts = [prompts] if isinstance(prompts, (str, dict)) else list(prompts)
        if sampling_params is None:
            raise ValueError("generate() needs sampling_params, e.g. SamplingParams(max_tokens=256): "
                             "there is no silent default length")
        params = [sampling_params] * len(prompts) if isinstance(sampling_params, SamplingParams) \
            else list(sampling_params)
        if len(params) != len(prompts):
            raise ValueError(f"got {len(prompts)} prompts but {len(params)} SamplingParams: pass one for all "
                             "or one per prompt")
        # Check every request before running any, so a bad one fails the call before work is spent.
        requests = [self._request_ids(i, p, sp) for i, (p, sp) in enumerate(zip(prompts, params))]
        ids = [self._add(token_ids, _prompt_text(p), sp) for token_ids, p, sp in zip(requests, prompts, params)]
        finished: dict[str, RequestOutput] = {}
        progress = RequestProgress(len(ids), self.stats, use_tqdm)
        try:
            while len(finished) < len(ids):
                for out in self.step():
                    finished[out.request_id] = out
                    progress.request_done()
        except BaseException:
            self.abort(ids)  # leave the engine usable after an interrupt or an error
            raise
        finally:
            progress.close()
        return [finished[i] for i in ids]

    # ---- the step-level API: requests can be added while others run ----

    def add_request(self, prompt: PromptType, sampling_params: SamplingParams) -> str:
        """Queues one request; it joins the running batch at the next step that has room. Returns its id."""
        return self._add(self._request_ids(0, prompt, sampling_params), _prompt_text(prompt), sampling_params)

    def has_unfinished_requests(self) -> bool:
        return self.core.has_unfinished()

    def step(self) -> list[RequestOutput]:
        """Runs one engine step (a prefill or a decode); returns the requests that finished in it."""
        done = []
        for seq in self.core.step():
            request = self._requests.get(seq.request_id)  # None: its siblings finished it in this step
            if request is not None and all(s.finish_reason is not None for s in request.seqs):
                done.append(self._requests.pop(seq.request_id).output())
        return done

    def abort(self, request_ids: list[str]) -> None:
        for request_id in request_ids:
            request = self._requests.pop(request_id, None)
            for seq in request.seqs if request else []:
                self.core.abort(seq)

    # ---- requests ----

    def _add(self, ids: list[int], text: str | None, sp: SamplingParams) -> str:
        request_id = str(next(self._request_counter))
        seqs = [Sequence(next(self._seq_counter), request_id, sample_index, list(ids), len(ids), sp,
                         seed=self._sequence_seed(sp.seed, sample_index),
                         detokenizer=IncrementalDetokenizer(self.tokenizer, len(ids)) if self.tokenizer else None,
                         logprobs=[] if sp.logprobs is not None else None)
                for sample_index in range(sp.n)]
        for seq in seqs:
            self.core.add(seq)
        self._requests[request_id] = _Request(request_id, list(ids), text, seqs)
        return request_id

    def _request_ids(self, index: int, prompt: PromptType, params: SamplingParams) -> list[int]:
        """The prompt's token ids, once the request is known to fit; else a ValueError naming prompt `index`."""
        ids = self._prompt_ids(index, prompt)
        if not ids:
            raise ValueError(f"prompt {index} is empty: a prompt needs at least one token")
        if len(ids) >= self.max_model_len:
            raise ValueError(f"prompt {index} has {len(ids)} tokens, but the context holds {self.max_model_len} "
                             "(max_model_len) and must leave room for one new token: shorten the prompt")
        if params.stop_strings and self.tokenizer is None:
            raise ValueError(f"prompt {index}: stop strings need a tokenizer (skip_tokenizer_init=True was set)")
        blocks = self.core.block_manager
        longest = min(len(ids) + (params.max_tokens or self.max_model_len), self.max_model_len)
        if blocks.blocks_needed(longest) > blocks.num_blocks:
            raise ValueError(f"prompt {index}: {longest} tokens need {blocks.blocks_needed(longest)} KV cache blocks "
                             f"but the pool has {blocks.num_blocks}: raise kv_cache_memory or lower max_tokens")
        return ids

    def _prompt_ids(self, index: int, prompt: PromptType) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError(f"prompt {index} is text but the LLM was built with skip_tokenizer_init=True: "
                                 "pass {'prompt_token_ids': [...]} instead")
            return self.tokenizer.encode(prompt)
        if isinstance(prompt, dict) and "prompt_token_ids" in prompt:
            ids = prompt["prompt_token_ids"]
            if not all(isinstance(t, int) and 0 <= t < self.vocab_size for t in ids):
                raise ValueError(f"prompt {index}: prompt_token_ids must be ints in [0, {self.vocab_size})")
            return list(ids)
        if isinstance(prompt, dict) and isinstance(prompt.get("prompt"), str):
            return self._prompt_ids(index, prompt["prompt"])
        raise TypeError(f"prompt {index} must be a string, {{'prompt': str}} or {{'prompt_token_ids': [int, ...]}}, "
                        f"got {type(prompt).__name__}")

    def _sequence_seed(self, seed: int | None, sample_index: int) -> int:
        if seed is None:
            return self._seed_stream.getrandbits(63)
        # distinct, reproducible streams for the n samples of one seeded request; any int maps into the int64 key
        return seed % 2**63 if sample_index == 0 else (seed * 0x9E3779B1 + sample_index) % 2**63


def _prompt_text(prompt: PromptType) -> str | None:
    return prompt if isinstance(prompt, str) else prompt.get("prompt")


@dataclass
class _Request:
    request_id: str
    prompt_token_ids: list[int]
    prompt: str | None
    seqs: list[Sequence]

    def output(self) -> RequestOutput:
        outputs = [CompletionOutput(index=s.sample_index, text=s.text, token_ids=s.output_token_ids,
                                    finish_reason=s.finish_reason, stop_reason=s.stop_reason, logprobs=s.logprobs,
                                    cumulative_logprob=s.cumulative_logprob if s.logprobs is not None else None)
                   for s in self.seqs]
        return RequestOutput(request_id=self.request_id, prompt=self.prompt,
                             prompt_token_ids=self.prompt_token_ids, outputs=outputs,
                             num_cached_tokens=sum(s.num_cached_tokens for s in self.seqs))
