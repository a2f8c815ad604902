"""stage1: a small, fast Qwen-2.5 inference engine and the SFT data generator it exists for."""

from .engine import LLM, CompletionOutput, Logprob, RequestOutput, SamplingParams

__version__ = "0.1.0"
__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput", "Logprob", "__version__"]
