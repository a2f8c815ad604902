"""Kernel selection: one place, `auto` never picks Triton for CPU tensors, clear errors otherwise."""

from __future__ import annotations

import pytest
import torch

from stage1.engine.backends import select_kernels

CPU = torch.device("cpu")


def test_auto_on_cpu_is_the_reference():
    kernels = select_kernels("auto", CPU)
    assert kernels.name == "torch"


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
