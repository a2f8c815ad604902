"""The inference engine: config, weights, the Qwen-2.5 decoder, paged KV cache, scheduler, sampler, `LLM`."""

from .llm import LLM
from .outputs import CompletionOutput, Logprob, RequestOutput
from .params import SamplingParams

__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput", "Logprob"]
