"""stage1::linear_bf16w (bf16 weights, fp32 x and fp32 arithmetic) against its plain-PyTorch reference,
`linear_bf16w_reference` (x @ W.float().T + b), over odd shapes, with and without bias, on every CPU kernel set
this machine runs; the only difference is the order of the fp32 sums, so the tolerance is fp32-tight. Then
opcheck, the large-M path (widened chunks through ATen's GEMM), and the engine: kernels='native' on a bf16
checkpoint (bf16 weights kept, fp32 arithmetic) gives the greedy tokens of kernels='torch' on the same checkpoint
upcast to fp32."""

from __future__ import annotations

import pytest
import torch

from stage1.engine.native import linear_bf16w, linear_bf16w_reference, native_available, native_error

if not native_available():
    pytest.skip(f"stage1._C is not built: {native_error()}", allow_module_level=True)

from stage1 import LLM, SamplingParams  # noqa: E402


def randn(*shape, seed=0, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def check(out, x, w, bias):
    """fp32-tight: within a few fp32 roundings of the sum of |terms| (what reordering an fp32 sum can move)."""
    expected = linear_bf16w_reference(x, w, bias)
    assert out.dtype == torch.float32 and out.shape == expected.shape
    scale = (x.abs() @ w.float().abs().T) + (0 if bias is None else bias.abs())
    err = (out - expected).abs()
    bound = 4 * torch.finfo(torch.float32).eps * scale + 1e-30
    assert bool((err <= bound).all()), f"max error {err.max():.3g}, worst error / bound {(err / bound).max():.3g}"


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("k", [64, 200, 896, 4864, 203])  # 203: a K % 8 tail
@pytest.mark.parametrize("m", [1, 3, 32, 100])
def test_linear_bf16w_matches_reference(isa, m, k, bias):
    n = 1001 if k == 203 else 1000  # 1001: a block of 1 row at the end
    x, w = randn(m, k, seed=m), randn(n, k, seed=k, dtype=torch.bfloat16)
    b = randn(n, seed=3) if bias else None
    check(torch.ops.stage1.linear_bf16w(x, w, b), x, w, b)


@pytest.mark.parametrize("m", [256, 300])
def test_linear_bf16w_large_m_gemm_path(m):
    """From 256 rows of x the op widens W in chunks and calls ATen's GEMM: the same contract."""
    x, w, b = randn(m, 200, seed=1), randn(2500, 200, seed=2, dtype=torch.bfloat16), randn(2500, seed=3)
    check(torch.ops.stage1.linear_bf16w(x, w, b), x, w, b)
    check(torch.ops.stage1.linear_bf16w(x, w, None), x, w, None)


def test_linear_bf16w_views_and_leading_dims():
    """x a strided view (row stride > K), a 3-d x through the engine's wrapper, an empty batch."""
    wide = randn(7, 300, seed=5)
    x, w, b = wide[:, :256], randn(33, 256, seed=6, dtype=torch.bfloat16), randn(33, seed=7)
    assert not x.is_contiguous()
    check(torch.ops.stage1.linear_bf16w(x, w, b), x, w, b)
    x3 = randn(2, 5, 256, seed=8)
    torch.testing.assert_close(linear_bf16w(x3, w, b), linear_bf16w_reference(x3, w, b), rtol=1e-5, atol=1e-5)
    assert torch.ops.stage1.linear_bf16w(x[:0], w, b).shape == (0, 33)


def test_linear_bf16w_rejects_bad_arguments():
    x, w = randn(2, 64), randn(8, 64, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="w must be bfloat16"):
        torch.ops.stage1.linear_bf16w(x, w.float(), None)
    with pytest.raises(RuntimeError, match="x must be float32"):
        torch.ops.stage1.linear_bf16w(x.bfloat16(), w, None)
    with pytest.raises(RuntimeError, match="K = x.size"):
        torch.ops.stage1.linear_bf16w(randn(2, 65), w, None)
    with pytest.raises(RuntimeError, match="bias must be"):
        torch.ops.stage1.linear_bf16w(x, w, randn(9))


def test_linear_bf16w_opcheck():
    x, w, b = randn(5, 72), randn(13, 72, dtype=torch.bfloat16), randn(13)
    torch.library.opcheck(torch.ops.stage1.linear_bf16w.default, (x, w, b))
    torch.library.opcheck(torch.ops.stage1.linear_bf16w.default, (x, w, None))


LENGTHS = [1, 16, 17, 5, 33, 7]


@pytest.mark.parametrize("shape", ["gqa1-d64-tied", "gqa2-d128-untied", "gqa7-d64-sharded"])
def test_native_bf16_engine_gives_the_fp32_upcast_greedy_tokens(checkpoint, shape):
    path = checkpoint(shape, dtype=torch.bfloat16)
    g = torch.Generator().manual_seed(0)
    prompts = [{"prompt_token_ids": torch.randint(3, 300, (n,), generator=g).tolist()} for n in LENGTHS]
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    ref = LLM(path, dtype="float32", kernels="torch", max_num_batched_tokens=24)  # bf16 weights upcast: exact
    nat = LLM(path, dtype="bfloat16", kernels="native", max_num_batched_tokens=24)
    assert nat.config.dtype == torch.float32 and nat.config.kernels.weight_dtype == torch.bfloat16
    model = nat.core.runner.model
    assert model.layers[0].mlp.down_proj.weight.dtype == torch.bfloat16  # kept in bf16 ...
    assert model.lm_head.weight.dtype == torch.bfloat16 and model.norm.weight.dtype == torch.float32
    assert nat.core.runner.kv_cache[0].dtype == torch.float32  # ... the rest in fp32
    expected = [o.outputs[0].token_ids for o in ref.generate(prompts, params, use_tqdm=False)]
    got = [o.outputs[0].token_ids for o in nat.generate(prompts, params, use_tqdm=False)]
    assert got == expected
