"""The native kernels' oneDNN matmuls (stage1/engine/onednn.py) against their plain-PyTorch references: the fp32
product on prepacked and plain weights against F.linear, and the bf16 weight widened slice by slice against
`linear_bf16w_reference`, over odd shapes and slice boundaries, fp32-tight (only the order of the sums differs).
Then the routing (`linear_bf16w` hands x with a few rows to the widened product) and the engine's use: with
kernels='native' in fp32 the loader prepacks every weight only a matmul reads and leaves a tied LM head's table
plain, and without oneDNN the kernels keep F.linear."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from stage1.engine import native, onednn
from stage1.engine.native import linear_bf16w, linear_bf16w_reference, native_available

if not onednn.onednn_available():
    pytest.skip("this torch has no oneDNN inner product (torch.backends.mkldnn)", allow_module_level=True)

from stage1 import LLM  # noqa: E402
from stage1.engine.backends import select_kernels  # noqa: E402


def randn(*shape, seed=0, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def assert_fp32_tight(out, expected, x, w, bias):
    """Within a few fp32 roundings of the sum of |terms| (what reordering an fp32 sum can move)."""
    assert out.dtype == torch.float32 and out.shape == expected.shape
    scale = (x.abs().reshape(-1, x.shape[-1]) @ w.float().abs().T).view(expected.shape)
    scale = scale + (0 if bias is None else bias.abs())
    err = (out - expected).abs()
    bound = 8 * torch.finfo(torch.float32).eps * scale + 1e-30
    assert bool((err <= bound).all()), f"max error {err.max():.3g}, worst error / bound {(err / bound).max():.3g}"


@pytest.mark.parametrize("packed", [True, False])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("m, k, n", [(1, 64, 100), (3, 203, 1001), (32, 896, 1152), (300, 200, 77)])
def test_onednn_linear_matches_f_linear(m, k, n, bias, packed):
    x, w = randn(m, k, seed=m), randn(n, k, seed=k)
    b = randn(n, seed=3) if bias else None
    weight = onednn.prepack(w) if packed else w
    assert weight.shape == w.shape and weight.is_mkldnn == packed
    assert_fp32_tight(onednn.linear(x, weight, b), F.linear(x, w, b), x, w, b)


def test_onednn_linear_views_leading_dims_and_empty_batch():
    w, b = randn(33, 256, seed=6), randn(33, seed=7)
    packed = onednn.prepack(w)
    x = randn(7, 300, seed=5)[:, :256]
    assert not x.is_contiguous()
    assert_fp32_tight(onednn.linear(x, packed, b), F.linear(x, w, b), x, w, b)
    x3 = randn(2, 5, 256, seed=8)
    assert_fp32_tight(onednn.linear(x3, packed, b), F.linear(x3, w, b), x3, w, b)
    assert onednn.linear(x[:0], packed, b).shape == (0, 33)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("m, k, n", [(4, 896, 1000), (17, 4864, 903), (64, 200, 5000)])
def test_widened_product_matches_reference_across_slices(m, k, n, bias, monkeypatch):
    """Slices of 64 rows here (16 KB slices), so every shape crosses several slice boundaries and ends on a
    partial slice."""
    monkeypatch.setattr(onednn, "WIDENED_SLICE_BYTES", 64 * 4 * k)
    x, w = randn(m, k, seed=m), randn(n, k, seed=k, dtype=torch.bfloat16)
    b = randn(n, seed=3) if bias else None
    assert_fp32_tight(onednn.linear_widened(x, w, b), linear_bf16w_reference(x, w, b), x, w, b)


@pytest.mark.skipif(not native_available(), reason="stage1._C is not built: linear_bf16w's small-M kernel is its op")
def test_linear_bf16w_hands_a_few_rows_on_to_the_widened_product(monkeypatch):
    calls = []
    monkeypatch.setattr(native, "linear_widened", lambda *a: calls.append(a[0].shape[0]) or onednn.linear_widened(*a))
    w, b = randn(50, 64, seed=1, dtype=torch.bfloat16), randn(50, seed=2)
    for m in (1, onednn.WIDENED_MIN_ROWS - 1, onednn.WIDENED_MIN_ROWS, 40):
        x = randn(2, m, 64, seed=m)
        assert_fp32_tight(linear_bf16w(x, w, b), linear_bf16w_reference(x, w, b), x, w, b)
    assert calls == [2 * onednn.WIDENED_MIN_ROWS - 2, 2 * onednn.WIDENED_MIN_ROWS, 80]  # rows of the flattened x


@pytest.mark.skipif(not native_available(), reason="stage1._C is not built: kernels='native' needs it")
@pytest.mark.parametrize("shape", ["gqa1-d64-tied", "gqa2-d128-untied"])
def test_native_fp32_engine_prepacks_matmul_weights_and_keeps_the_table_plain(checkpoint, shape):
    llm = LLM(checkpoint(shape), dtype="float32", kernels="native")
    assert llm.config.kernels.linear is onednn.linear and llm.config.kernels.prepack is onednn.prepack
    model = llm.core.runner.model
    layer = model.layers[0]
    for linear in (layer.self_attn.qkv_proj, layer.self_attn.o_proj, layer.mlp.gate_up_proj, layer.mlp.down_proj):
        assert linear.weight.is_mkldnn and linear.linear is onednn.linear
    assert not model.embed_tokens.weight.is_mkldnn  # the lookup reads it
    tied = model.lm_head.weight is model.embed_tokens.weight
    assert tied == shape.endswith("-tied") and model.lm_head.weight.is_mkldnn == (not tied)


@pytest.mark.skipif(not native_available(), reason="stage1._C is not built: kernels='native' needs it")
def test_without_onednn_native_fp32_keeps_f_linear(monkeypatch):
    monkeypatch.setattr(onednn, "onednn_available", lambda: False)
    kernels, dtype = select_kernels("native", torch.device("cpu")).for_dtype(torch.float32, torch.device("cpu"))
    assert kernels.linear is F.linear and kernels.prepack is None and dtype == torch.float32
