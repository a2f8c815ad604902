"""The inference engine: config, weights, the Qwen-2.5 decoder, paged KV cache, scheduler, sampler, `LLM`.

Its names load on first use (as `stage1`'s do), so that a torch-free part such as `stage1.engine.params`
(`SamplingParams`) imports without torch: the data layer, the SLURM launcher and the merge run on a login node.
"""

from importlib import import_module

_HOMES = {"LLM": ".llm", "SamplingParams": ".params", "RequestOutput": ".outputs", "CompletionOutput": ".outputs",
          "Logprob": ".outputs"}
__all__ = list(_HOMES)


def __getattr__(name: str):
    if name in _HOMES:
        return getattr(import_module(_HOMES[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
