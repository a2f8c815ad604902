"""The engine with kernels='triton' (interpreted on the CPU): decode steps through CUDA graphs give the eager
tokens, and a Triton kernel that fails to compile is replaced or an error. Its tokens against kernels='torch'
(greedy, sampled, prefix caching, two ranks) are test_engine_kernels.py's, written once for every choice."""

from __future__ import annotations

import pytest
import torch

from stage1 import LLM, SamplingParams
from stage1.engine.backends import triton_available

pytestmark = pytest.mark.skipif(not triton_available(), reason="triton is not installed (pip install triton)")


def test_decode_graphs_give_the_eager_tokens(checkpoint, request):
    """On a GPU, decode steps replay CUDA graphs (captured per batch bucket) and must give the eager engine's
    tokens; on the CPU the interpreted kernels run the same padded step eagerly (capturing needs a GPU)."""
    path = checkpoint("gqa2-d128-untied")
    if not torch.cuda.is_available():
        request.getfixturevalue("decode_graphs_on_cpu")
    g = torch.Generator().manual_seed(2)
    prompts = [{"prompt_token_ids": torch.randint(3, 400, (n,), generator=g).tolist()} for n in (3, 30, 17, 9, 1)]
    params = [SamplingParams(max_tokens=m, temperature=t, top_p=0.9, seed=i, ignore_eos=True)
              for i, (m, t) in enumerate([(6, 0), (3, 0.9), (8, 0), (2, 1.0), (5, 0.7)])]
    outputs = {}
    for eager in (True, False):
        llm = LLM(path, dtype="float32", kernels="triton", max_model_len=128, enforce_eager=eager)
        assert (llm.core.runner.graphs is None) == eager
        outputs[eager] = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
        if not eager and torch.cuda.is_available():  # graphs were captured (no silent fall back to eager)
            assert llm.core.runner.graphs.capture and 8 in llm.core.runner.graphs.captured  # 5 rows: bucket 8
    assert outputs[False] == outputs[True]


def test_a_triton_kernel_that_fails_to_compile_is_replaced_under_auto_and_an_error_when_chosen(
        tiny_model_dir, tmp_path, monkeypatch, caplog):
    """The decode kernel made to fail compiling (as a Triton or driver a kernel was never built for can): the check
    replaces the Triton attention by the reference, with a warning naming it, where the choice was not explicit;
    kernels='triton' is an error naming it. (On a CPU `auto` never picks Triton, so the first half calls the check
    as `auto` would.)"""
    import logging

    import triton

    from stage1 import LLM
    from stage1.engine import kernel_check
    from stage1.engine.attention import ReferenceAttentionBackend
    from stage1.engine.backends import select_kernels
    from stage1.kernels import attention

    class FailsToCompile:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                raise triton.compiler.errors.CompilationError("", None, "ptxas fatal: unsupported GPU architecture")
            return launch

    monkeypatch.setenv("STAGE1_CACHE", str(tmp_path))
    monkeypatch.setattr(attention, "_decode_split_kernel", FailsToCompile())
    device = torch.device("cpu")
    kernels = select_kernels("triton", device)
    with caplog.at_level(logging.WARNING, logger="stage1"):
        checked = kernel_check.verify(kernels, device, torch.float32, explicit=False)
    assert isinstance(checked.attention, ReferenceAttentionBackend)
    assert "triton paged_decode_attention" in caplog.text and "CompilationError" in caplog.text
    assert checked.sample is kernels.sample  # the sampler passed its own check
    with pytest.raises(kernel_check.KernelCheckError, match="triton paged_decode_attention"):
        LLM(tiny_model_dir, dtype="float32", kernels="triton", max_model_len=64)
