"""stage1: a small, fast Qwen-2.5 inference engine and the SFT data generator it exists for."""

__version__ = "0.1.0"
__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput", "Logprob", "__version__"]


def __getattr__(name: str):
    # The engine (and torch) load on first use, so `python -m stage1.models fetch` stays light.
    if name in __all__:
        from . import engine
        return getattr(engine, name)
    raise AttributeError(f"module 'stage1' has no attribute {name!r}")
