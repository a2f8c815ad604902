"""The whole engine with kernels='triton' (interpreted on the CPU) against kernels='torch' on a tiny model:
the same greedy tokens, and the same sampled tokens (both samplers use the same counter-based noise)."""

from __future__ import annotations

import pytest
import torch

from stage1 import LLM, SamplingParams
from stage1.engine.backends import triton_available

pytestmark = pytest.mark.skipif(not triton_available(), reason="triton is not installed (pip install triton)")

LENGTHS = [1, 16, 17, 5, 33, 7]


def test_greedy_output_identical_to_torch_kernels(checkpoint):
    path = checkpoint("gqa2-d128-untied")
    g = torch.Generator().manual_seed(0)
    prompts = [{"prompt_token_ids": torch.randint(3, 500, (n,), generator=g).tolist()} for n in LENGTHS]
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    # a small chunk budget: prompts are cut, so the prefill kernel also reads cached prefixes
    ref = LLM(path, dtype="float32", kernels="torch", max_num_batched_tokens=24)
    tri = LLM(path, dtype="float32", kernels="triton", max_num_batched_tokens=24)
    assert tri.config.kernels.name == "triton" and ref.config.kernels.name == "torch"
    expected = [o.outputs[0].token_ids for o in ref.generate(prompts, params, use_tqdm=False)]
    got = [o.outputs[0].token_ids for o in tri.generate(prompts, params, use_tqdm=False)]
    assert got == expected


def test_seeded_sampling_reproducible_with_triton_kernels(checkpoint):
    path = checkpoint("gqa2-d128-untied")
    llm = LLM(path, dtype="float32", kernels="triton")
    seeded = SamplingParams(max_tokens=8, temperature=0.9, top_p=0.9, seed=3, ignore_eos=True)
    alone = llm.generate(["What is gravity?"], seeded, use_tqdm=False)[0].outputs[0].token_ids
    mixed = llm.generate(["The quick brown fox", "What is gravity?"],
                         [SamplingParams(max_tokens=5, temperature=1.0, ignore_eos=True), seeded],
                         use_tqdm=False)[1].outputs[0].token_ids
    assert alone == mixed and len(alone) == 8


def test_sampled_output_identical_to_torch_kernels(checkpoint):
    """Both samplers draw from the same counter-based noise: seeded (and, from the same LLM seed, unseeded)
    sampling gives the same tokens with kernels='triton' as with kernels='torch'."""
    path = checkpoint("gqa2-d128-untied")
    prompts = ["What is gravity?", "The quick brown fox", "def add(a, b):"]
    params = [SamplingParams(max_tokens=10, temperature=0.9, top_p=0.9, seed=3, ignore_eos=True),
              SamplingParams(max_tokens=10, temperature=1.2, top_k=20, ignore_eos=True),
              SamplingParams(max_tokens=10, temperature=0.7, min_p=0.05, seed=5, n=2, ignore_eos=True)]
    outputs = {}
    for kernels in ("torch", "triton"):
        llm = LLM(path, dtype="float32", kernels=kernels, seed=1)
        outputs[kernels] = [[o.token_ids for o in r.outputs] for r in llm.generate(prompts, params, use_tqdm=False)]
    assert outputs["triton"] == outputs["torch"]


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


def test_prefix_caching_with_triton_kernels(checkpoint):
    """Prompts sharing a prefix: the Triton prefill kernel reads the shared blocks (some written earlier in the
    same step by another prompt's tokens) and gives the tokens of the reference engine without the cache."""
    path = checkpoint("gqa2-d128-untied")
    g = torch.Generator().manual_seed(5)
    shared = torch.randint(3, 400, (40,), generator=g).tolist()
    prompts = [{"prompt_token_ids": shared + torch.randint(3, 400, (n,), generator=g).tolist()} for n in (2, 9, 5)]
    params = SamplingParams(max_tokens=5, temperature=0, ignore_eos=True)
    ref = LLM(path, dtype="float32", kernels="torch", enable_prefix_caching=False)
    tri = LLM(path, dtype="float32", kernels="triton")
    expected = [o.outputs[0].token_ids for o in ref.generate(prompts, params, use_tqdm=False)]
    assert [o.outputs[0].token_ids for o in tri.generate(prompts, params, use_tqdm=False)] == expected
    assert tri.stats.prefix_cached_tokens == 2 * 32  # two later prompts x two full blocks of the shared 40 tokens


@pytest.mark.slow
def test_tensor_parallel_with_triton_kernels(checkpoint):
    """Two gloo ranks running the Triton kernels (interpreted here) on their own heads: the kernel choice travels
    to the worker pickled, and the tokens are one rank's."""
    path = checkpoint("gqa2-d128-untied")
    prompts = [{"prompt_token_ids": list(range(3, 3 + n))} for n in (5, 21, 2)]
    params = SamplingParams(max_tokens=4, temperature=0.8, top_p=0.9, seed=3, ignore_eos=True)
    expected = [o.outputs[0].token_ids for o in LLM(path, dtype="float32", kernels="triton").generate(
        prompts, params, use_tqdm=False)]
    with LLM(path, dtype="float32", kernels="triton", tensor_parallel_size=2) as llm:
        assert [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)] == expected


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
