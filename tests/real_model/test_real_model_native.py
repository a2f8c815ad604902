"""The native kernels on the real default model (Qwen2.5-Coder-0.5B, bf16 checkpoint): 64 greedy tokens of three
few-shot prompts with kernels='native' in float32 (oneDNN on prepacked weights) and in bfloat16 (bf16 weights, fp32
arithmetic) are kernels='torch''s in float32, token for token. The arithmetic is fp32 in all three; only the order
of the sums differs, which on the main job's 124 rows changed none (README, Speed)."""

from __future__ import annotations

import pytest

from stage1.engine.native import native_available, native_error

if not native_available():
    pytest.skip(f"stage1._C is not built: {native_error()}", allow_module_level=True)

from stage1 import LLM, SamplingParams  # noqa: E402
from stage1.data.prompts import CompletionStylePrompts  # noqa: E402

INSTRUCTIONS = ["What is gravity?", "Write a short sentence about winter:", "List three prime numbers."]


@pytest.mark.real_model
def test_native_kernels_give_torch_fp32_greedy_tokens_on_the_default_model(real_model_dir):
    style = CompletionStylePrompts()
    prompts = [style.build(text, seed=i).text for i, text in enumerate(INSTRUCTIONS)]
    params = SamplingParams(max_tokens=64, temperature=0, ignore_eos=True)

    def tokens(**kwargs) -> list[list[int]]:
        with LLM(str(real_model_dir), **kwargs) as llm:
            return [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]

    expected = tokens(dtype="float32", kernels="torch")
    assert all(len(t) == 64 for t in expected)
    assert tokens(dtype="float32", kernels="native") == expected
    assert tokens(dtype="bfloat16", kernels="native") == expected
