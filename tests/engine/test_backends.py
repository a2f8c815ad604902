"""Kernel selection: one place, `auto` never picks Triton for CPU tensors, clear errors otherwise."""

from __future__ import annotations

import pytest
import torch

from stage1.engine import backends
from stage1.engine.backends import select_kernels

CPU = torch.device("cpu")


def test_auto_on_a_cpu_with_native_bf16_is_native_in_fp32_where_the_weights_fit(monkeypatch, tiny_model_dir):
    """A bf16 checkpoint gets fp32 weights (oneDNN) while they fit in half the available memory, else keeps bf16
    weights; fp32 arithmetic either way. With no stage1._C built, the reference in the checkpoint's dtype."""
    from stage1.engine import native
    from stage1.engine.config import ModelConfig
    from stage1.engine.backends import auto_dtype
    from stage1.engine.memory import fp32_weight_bytes

    monkeypatch.setattr(backends, "cpu_has_native_bf16", lambda: True)
    model = ModelConfig.from_dir(tiny_model_dir)
    need = 2 * fp32_weight_bytes(model)
    if native.native_available():
        kernels = select_kernels("auto", CPU)
        assert kernels.name == "native"
        monkeypatch.setattr(backends, "available_memory", lambda: need)
        assert auto_dtype(torch.bfloat16, CPU, kernels, model) == torch.float32
        monkeypatch.setattr(backends, "available_memory", lambda: need - 1)
        assert auto_dtype(torch.bfloat16, CPU, kernels, model) == torch.bfloat16
        assert kernels.for_dtype(torch.bfloat16, CPU)[1] == torch.float32  # bf16 weights, fp32 arithmetic
        assert auto_dtype(torch.float16, CPU, kernels, model) == torch.float32
    monkeypatch.setattr(native, "native_available", lambda: False)
    kernels = select_kernels("auto", CPU)
    assert kernels.name == "torch" and auto_dtype(torch.bfloat16, CPU, kernels, model) == torch.bfloat16


def test_fp32_weight_bytes_counts_every_weight_of_the_model(tiny_model_dir):
    from stage1 import LLM
    from stage1.engine.memory import fp32_weight_bytes

    llm = LLM(tiny_model_dir, dtype="float32", kernels="torch")
    model = llm.core.runner.model
    assert fp32_weight_bytes(llm.config.model) == 4 * sum(p.numel() for p in model.parameters())


def test_auto_on_a_cpu_without_native_bf16_is_native_where_built(monkeypatch):
    """Without avx512_bf16/AMX the native ops run a bf16 checkpoint with bf16 weights and fp32 arithmetic (dtype
    auto keeps bf16 for them); with no stage1._C built, the reference in fp32."""
    from stage1.engine import native
    from stage1.engine.backends import auto_dtype

    monkeypatch.setattr(backends, "cpu_has_native_bf16", lambda: False)
    if native.native_available():
        kernels = select_kernels("auto", CPU)
        assert kernels.name == "native"
        assert auto_dtype(torch.bfloat16, CPU, kernels) == torch.bfloat16
        assert kernels.for_dtype(torch.bfloat16, CPU)[1] == torch.float32  # bf16 weights, fp32 arithmetic
        assert auto_dtype(torch.float16, CPU, kernels) == torch.float32
    monkeypatch.setattr(native, "native_available", lambda: False)
    kernels = select_kernels("auto", CPU)
    assert kernels.name == "torch" and auto_dtype(torch.bfloat16, CPU, kernels) == torch.float32


def test_unknown_choice_is_rejected():
    with pytest.raises(ValueError, match="kernels='cuda-magic': use one of auto, torch, triton"):
        select_kernels("cuda-magic", CPU)


def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1|needs the triton package"):
        select_kernels("triton", CPU)


def test_llm_rejects_a_bad_choice_before_loading(tiny_model_dir):
    from stage1 import LLM

    with pytest.raises(ValueError, match="use one of auto, torch, triton"):
        LLM(tiny_model_dir, kernels="fast")
