"""The engine with kernels='native': the fused ops it installs and runs, its selection (pickled for tensor-parallel
workers) and its errors. Its tokens against kernels='torch' (greedy on every tiny shape, sampled, prefix caching, two
ranks) are tests/kernels/test_engine_kernels.py's, written once for every choice."""

from __future__ import annotations

import pickle

import pytest
import torch

from stage1.engine.native import native_available, native_error

if not native_available():
    pytest.skip(f"stage1._C is not built: {native_error()}", allow_module_level=True)

from stage1 import LLM, SamplingParams  # noqa: E402
from stage1.engine import native  # noqa: E402
from stage1.engine.backends import select_kernels  # noqa: E402
from stage1.engine.layers.activation import silu_and_mul_reference  # noqa: E402
from stage1.engine.native import rotary_write_kv  # noqa: E402


def test_native_engine_runs_the_fused_ops(checkpoint, monkeypatch):
    """kernels='native' installs stage1._C's fused RMSNorm (+ residual add) and runs rotary + KV write through its
    fused op; SiLU-and-mul stays ATen's in-place silu and mul on the CPU (faster there; the op's one pass is the
    GPU's)."""
    llm = LLM(checkpoint("gqa2-d128-untied"), dtype="float32", kernels="native", device="cpu")
    layer = llm.core.runner.model.layers[0]
    assert layer.input_layernorm.add_rms_norm is native.fused_add_rms_norm
    assert layer.mlp.act_fn.silu_and_mul is silu_and_mul_reference
    fused_steps = []
    monkeypatch.setattr(native, "rotary_write_kv", lambda *args: fused_steps.append(1) or rotary_write_kv(*args))
    llm.generate([{"prompt_token_ids": list(range(3, 20))}], SamplingParams(max_tokens=3, temperature=0),
                 use_tqdm=False)
    assert fused_steps


def test_select_native_on_cpu_and_its_errors(caplog):
    with caplog.at_level("INFO", logger="stage1"):
        kernels = select_kernels("native", torch.device("cpu"))
    assert kernels.name == "native" and kernels.attention.name == "native"
    assert kernels.sample.__name__ == "native_sample"
    assert "kernels native" in caplog.text
    unpickled = pickle.loads(pickle.dumps(kernels))  # tensor-parallel workers get it pickled
    assert unpickled.attention.name == "native" and unpickled.sample is kernels.sample
    with pytest.raises(ValueError, match="CPU kernels only"):
        select_kernels("native", torch.device("cuda"))
