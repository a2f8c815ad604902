"""The whole engine with each fast kernel choice against kernels='torch' on the tiny checkpoints (fp32), written
once for every choice: the same greedy tokens (prompts cut into chunks, so prefill also reads cached prefixes), the
same sampled tokens (every sampler draws from the same counter-based noise), a seeded request's tokens alone and
in a batch, prefix caching, and two tensor-parallel ranks (the kernel choice travels to the worker pickled).

Choices: 'triton' (on a CPU through the Triton interpreter, which tests/kernels/conftest.py turns on before the
kernels are imported) and 'native' (stage1._C's CPU ops: on the CPU, GPU or not), each skipped where it is not
available. kernels='torch' against transformers is tests/engine/test_model_vs_transformers.py; what belongs to one
choice stays beside it: test_engine_triton.py (CUDA graphs, a kernel that fails to compile) and
tests/native/test_engine_native.py (the fused ops installed, the selection and its errors).
"""

from __future__ import annotations

import pytest
import torch

from stage1 import LLM, SamplingParams
from stage1.engine.backends import triton_available
from stage1.engine.native import native_available, native_error

TRITON = pytest.param("triton", marks=pytest.mark.skipif(not triton_available(), reason="triton is not installed"))
NATIVE = pytest.param("native", marks=pytest.mark.skipif(not native_available(),
                                                         reason=f"stage1._C is not built: {native_error()}"))
CHOICES = [TRITON, NATIVE]
LENGTHS = [1, 16, 17, 5, 33, 7]
NEW_TOKENS = {"triton": 12, "native": 24}  # the interpreter runs Triton's kernels slowly: fewer steps


def device_for(kernels: str) -> str:
    return "cpu" if kernels == "native" else "auto"  # the native kernels are CPU kernels, GPU or not


def engine(path, kernels: str, **kwargs) -> LLM:
    """An fp32 engine with these kernels, on their device."""
    return LLM(path, dtype="float32", kernels=kernels, device=device_for(kernels), **kwargs)


def reference(path, kernels: str, **kwargs) -> LLM:
    """kernels='torch' on the device the `kernels` engine runs on."""
    return LLM(path, dtype="float32", kernels="torch", device=device_for(kernels), **kwargs)


def token_prompts(seed: int) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    return [{"prompt_token_ids": torch.randint(3, 300, (n,), generator=g).tolist()} for n in LENGTHS]


def tokens(llm: LLM, prompts, params) -> list[list[list[int]]]:
    return [[o.token_ids for o in r.outputs] for r in llm.generate(prompts, params, use_tqdm=False)]


@pytest.mark.parametrize("kernels, shape", [
    *[pytest.param(*NATIVE.values, shape, marks=NATIVE.marks)
      for shape in ("gqa1-d64-tied", "gqa2-d128-untied", "gqa7-d64-sharded")],
    pytest.param(*TRITON.values, "gqa2-d128-untied", marks=TRITON.marks),
])
def test_greedy_tokens_equal_the_torch_kernels(checkpoint, kernels, shape):
    path = checkpoint(shape)
    params = SamplingParams(max_tokens=NEW_TOKENS[kernels], temperature=0, ignore_eos=True)
    # a small chunk budget: prompts are cut, so the prefill kernel also reads cached prefixes
    ref = reference(path, kernels, max_num_batched_tokens=24)
    fast = engine(path, kernels, max_num_batched_tokens=24)
    assert (ref.config.kernels.name, fast.config.kernels.name) == ("torch", kernels)
    assert tokens(fast, token_prompts(0), params) == tokens(ref, token_prompts(0), params)


@pytest.mark.parametrize("kernels", CHOICES)
def test_sampled_tokens_equal_the_torch_kernels(checkpoint, kernels):
    """Both samplers draw from the same counter-based noise: seeded requests and, from the same LLM seed, unseeded
    ones give the same tokens; top-k, top-p, min-p, n > 1 and a greedy row in a sampled batch."""
    path = checkpoint("gqa2-d128-untied")
    params = [SamplingParams(max_tokens=10, temperature=0.8, top_p=0.9, seed=100, ignore_eos=True),
              SamplingParams(max_tokens=10, temperature=1.2, top_k=20, min_p=0.05, seed=7, ignore_eos=True),
              SamplingParams(max_tokens=10, temperature=0, ignore_eos=True),
              SamplingParams(max_tokens=10, temperature=1.2, top_k=20, ignore_eos=True),
              SamplingParams(max_tokens=10, temperature=0.7, min_p=0.05, seed=5, n=2, ignore_eos=True),
              SamplingParams(max_tokens=10, temperature=0.9, top_p=0.9, seed=3, ignore_eos=True)]
    expected = tokens(reference(path, kernels, seed=1), token_prompts(1), params)
    got = tokens(engine(path, kernels, seed=1), token_prompts(1), params)
    assert got == expected
    assert len({tuple(t) for row in got for t in row}) == len(params) + 1  # the draws did differ


@pytest.mark.parametrize("kernels", CHOICES)
def test_a_seeded_request_draws_the_same_alone_and_in_a_batch(checkpoint, kernels):
    llm = engine(checkpoint("gqa2-d128-untied"), kernels)
    seeded = SamplingParams(max_tokens=8, temperature=0.9, top_p=0.9, seed=3, ignore_eos=True)
    alone = llm.generate(["What is gravity?"], seeded, use_tqdm=False)[0].outputs[0].token_ids
    mixed = llm.generate(["The quick brown fox", "What is gravity?"],
                         [SamplingParams(max_tokens=5, temperature=1.0, ignore_eos=True), seeded],
                         use_tqdm=False)[1].outputs[0].token_ids
    assert alone == mixed and len(alone) == 8


@pytest.mark.parametrize("kernels", CHOICES)
def test_prefix_caching_gives_the_uncached_torch_tokens(checkpoint, kernels):
    """Prompts sharing a prefix: the prefill kernel reads the shared blocks (some written earlier in the same step
    by another prompt's tokens) and gives the tokens of the reference engine without the cache."""
    path = checkpoint("gqa2-d128-untied")
    g = torch.Generator().manual_seed(5)
    shared = torch.randint(3, 400, (40,), generator=g).tolist()
    prompts = [{"prompt_token_ids": shared + torch.randint(3, 400, (n,), generator=g).tolist()} for n in (2, 9, 5)]
    params = SamplingParams(max_tokens=5, temperature=0, ignore_eos=True)
    fast = engine(path, kernels)
    assert tokens(fast, prompts, params) == tokens(reference(path, kernels, enable_prefix_caching=False), prompts,
                                                   params)
    assert fast.stats.prefix_cached_tokens == 2 * 32  # two later prompts x two full blocks of the shared 40 tokens


@pytest.mark.slow
@pytest.mark.parametrize("kernels", CHOICES)
def test_two_tensor_parallel_ranks_give_the_torch_tokens(checkpoint, kernels):
    """Two gloo ranks, each running the kernels on its own heads, sample the single-rank torch engine's tokens."""
    path = checkpoint("gqa2-d128-untied")
    prompts = token_prompts(2)[:3]
    params = SamplingParams(max_tokens=6, temperature=0.8, top_p=0.9, seed=3, ignore_eos=True)
    expected = tokens(reference(path, kernels), prompts, params)
    with engine(path, kernels, tensor_parallel_size=2) as llm:
        assert tokens(llm, prompts, params) == expected
