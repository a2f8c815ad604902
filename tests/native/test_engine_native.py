"""The whole engine with kernels='native' against kernels='torch' on the tiny checkpoints (fp32): the same greedy
tokens, on every GQA ratio and head size the tiny shapes cover, decode through the native op, the norms, the
activation and rotary + KV write through the fused ops; over two tensor-parallel ranks (the kernel choice pickled
to the worker); and the same sampled tokens, drawn by the native sampler."""

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

LENGTHS = [1, 16, 17, 5, 33, 7]


@pytest.mark.parametrize("shape", ["gqa1-d64-tied", "gqa2-d128-untied", "gqa7-d64-sharded"])
def test_native_engine_gives_the_reference_greedy_tokens(checkpoint, shape, monkeypatch):
    path = checkpoint(shape)
    g = torch.Generator().manual_seed(0)
    prompts = [{"prompt_token_ids": torch.randint(3, 300, (n,), generator=g).tolist()} for n in LENGTHS]
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    # a small chunk budget: prompts are cut, so prefill also reads cached prefixes the native write_kv wrote
    ref = LLM(path, dtype="float32", kernels="torch", max_num_batched_tokens=24)
    nat = LLM(path, dtype="float32", kernels="native", max_num_batched_tokens=24)
    assert ref.config.kernels.name == "torch" and nat.config.kernels.name == "native"
    layer = nat.core.runner.model.layers[0]
    assert layer.input_layernorm.add_rms_norm is native.fused_add_rms_norm
    # ATen's in-place silu and mul on the CPU (faster there); the op's one pass is the GPU's
    assert layer.mlp.act_fn.silu_and_mul is silu_and_mul_reference
    fused_steps = []
    monkeypatch.setattr(native, "rotary_write_kv", lambda *args: fused_steps.append(1) or rotary_write_kv(*args))
    expected = [o.outputs[0].token_ids for o in ref.generate(prompts, params, use_tqdm=False)]
    got = [o.outputs[0].token_ids for o in nat.generate(prompts, params, use_tqdm=False)]
    assert got == expected
    assert fused_steps  # rotary + KV write went through the fused op


@pytest.mark.slow
def test_native_engine_over_two_ranks(checkpoint):
    path = checkpoint("gqa2-d128-untied")
    g = torch.Generator().manual_seed(1)
    prompts = [{"prompt_token_ids": torch.randint(3, 300, (n,), generator=g).tolist()} for n in LENGTHS]
    params = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
    expected = [o.outputs[0].token_ids for o in
                LLM(path, dtype="float32", kernels="torch").generate(prompts, params, use_tqdm=False)]
    with LLM(path, dtype="float32", kernels="native", tensor_parallel_size=2) as llm:
        assert [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)] == expected


def test_native_engine_samples_the_reference_tokens(checkpoint):
    path = checkpoint("gqa2-d128-untied")
    g = torch.Generator().manual_seed(1)
    prompts = [{"prompt_token_ids": torch.randint(3, 300, (n,), generator=g).tolist()} for n in LENGTHS]
    params = [SamplingParams(max_tokens=16, temperature=0.8, top_p=0.9, seed=100 + i, ignore_eos=True)
              for i in range(len(prompts))]
    params[1] = SamplingParams(max_tokens=16, temperature=1.2, top_k=20, min_p=0.05, seed=7, ignore_eos=True)
    params[2] = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)  # greedy in a sampled batch
    outputs = {}
    for kernels in ("torch", "native"):
        llm = LLM(path, dtype="float32", kernels=kernels)
        outputs[kernels] = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    assert outputs["native"] == outputs["torch"]
    assert len({tuple(t) for t in outputs["native"]}) == len(prompts)  # the draws did differ


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
