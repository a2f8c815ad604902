"""The fused elementwise ops of stage1._C (csrc/fused_ops.cpp) on the CPU against the plain-PyTorch references named
beside them: rms_norm ~ rms_norm_reference and fused_add_rms_norm ~ fused_add_rms_norm_reference (layers/norm.py),
silu_and_mul ~ silu_and_mul_reference (layers/activation.py), rotary_write_kv ~ rotary_write_kv_reference
(attention.py); their in-place semantics; torch.library.opcheck; and where the kernel choice puts them (backends.py,
with a faked CUDA build for the GPU path).

Sizes are odd on purpose: hidden 64, 896 and 37, tokens 1, 7 and 300, head_dim 64 and 128, GQA 1, 2 and 7, block
sizes 16 and 256; fp32 tight (the residual sum and the rotary bit for bit), bf16 and fp16 loose.
"""

from __future__ import annotations

import pickle

import pytest
import torch

from stage1.engine.attention import ReferenceAttentionBackend, rotary_write_kv_reference
from stage1.engine.layers.activation import silu_and_mul_reference
from stage1.engine.layers.norm import fused_add_rms_norm_reference, rms_norm_reference
from stage1.engine.model import RotaryEmbedding
from stage1.engine.native import native_available, native_error

if not native_available():
    pytest.skip(f"stage1._C is not built: {native_error()}", allow_module_level=True)

from stage1.engine import native  # noqa: E402

TOLERANCE = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=2e-2, rtol=2e-2),
             torch.float16: dict(atol=2e-3, rtol=2e-3)}
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
EPS = 1e-6


def randn(*shape, dtype=torch.float32, seed=1, scale=1.0):
    return (scale * torch.randn(*shape, generator=torch.Generator().manual_seed(seed))).to(dtype)


# ----------------------------------------------------------------------------------------------------- RMSNorm

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens", [1, 7, 300])
@pytest.mark.parametrize("hidden", [64, 896, 37])
def test_rms_norm_matches_reference(hidden, tokens, dtype):
    x, weight = randn(tokens, hidden, dtype=dtype, scale=3.0), randn(hidden, dtype=dtype, seed=2)
    out = torch.ops.stage1.rms_norm(x, weight, EPS)
    assert out.dtype == dtype and out.shape == x.shape
    torch.testing.assert_close(out, rms_norm_reference(x, weight, EPS), **TOLERANCE[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens", [1, 7, 300])
@pytest.mark.parametrize("hidden", [64, 896, 37])
def test_fused_add_rms_norm_matches_reference_in_place(hidden, tokens, dtype):
    x, residual = randn(tokens, hidden, dtype=dtype), randn(tokens, hidden, dtype=dtype, seed=3, scale=4.0)
    weight = randn(hidden, dtype=dtype, seed=2)
    expected, expected_residual = fused_add_rms_norm_reference(x, residual, weight, EPS)
    x_ptr, residual_ptr = x.data_ptr(), residual.data_ptr()
    out, new_residual = native.fused_add_rms_norm(x, residual, weight, EPS)
    assert out.data_ptr() == x_ptr and new_residual.data_ptr() == residual_ptr  # in place: both overwritten
    assert torch.equal(new_residual, expected_residual)  # x + residual rounded once to the dtype, as the model adds
    torch.testing.assert_close(out, expected, **TOLERANCE[dtype])


def test_fused_add_rms_norm_3d_and_non_contiguous_inputs():
    x, residual, weight = randn(2, 5, 96), randn(2, 5, 96, seed=3), randn(96, seed=2)
    expected = fused_add_rms_norm_reference(x, residual, weight, EPS)
    got = native.fused_add_rms_norm(x.clone(), residual.clone(), weight, EPS)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, **TOLERANCE[torch.float32])
    # the op itself wants dense rows; the wrapper copies a strided view first and returns the copies
    wide = randn(5, 192)
    expected = fused_add_rms_norm_reference(wide[:, :96], residual[0], weight, EPS)
    got = native.fused_add_rms_norm(wide[:, :96], residual[0].clone(), weight, EPS)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, **TOLERANCE[torch.float32])
    with pytest.raises(RuntimeError, match="x must be contiguous"):
        torch.ops.stage1.fused_add_rms_norm(wide[:, :96], residual[0].clone(), weight, EPS)
    with pytest.raises(RuntimeError, match="weight must be \\[hidden\\]"):
        torch.ops.stage1.fused_add_rms_norm(x.clone(), residual.clone(), randn(95), EPS)
    with pytest.raises(RuntimeError, match="one dtype"):
        torch.ops.stage1.fused_add_rms_norm(x.clone(), residual.bfloat16(), weight, EPS)


# ------------------------------------------------------------------------------------------------ silu_and_mul

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens", [1, 7, 300])
@pytest.mark.parametrize("d", [64, 4864, 37])
def test_silu_and_mul_matches_reference(d, tokens, dtype):
    x = randn(tokens, 2 * d, dtype=dtype, scale=3.0)
    before = x.clone()
    out = native.silu_and_mul(x)
    assert out.shape == (tokens, d) and out.dtype == dtype
    assert torch.equal(x, before)  # unlike the reference, the op leaves its input alone
    torch.testing.assert_close(out, silu_and_mul_reference(x.clone()), **TOLERANCE[dtype])


def test_silu_and_mul_3d_and_strided():
    x = randn(3, 4, 2 * 48)
    torch.testing.assert_close(native.silu_and_mul(x), silu_and_mul_reference(x.clone()), **TOLERANCE[torch.float32])
    rows = randn(6, 2 * 48)[::2]  # every other row: copied to dense rows first
    torch.testing.assert_close(native.silu_and_mul(rows), silu_and_mul_reference(rows.clone()),
                               **TOLERANCE[torch.float32])
    with pytest.raises(RuntimeError, match="2 \\* d"):
        native.silu_and_mul(randn(2, 7))


# --------------------------------------------------------------------------------------------- rotary_write_kv

def rotary_case(tokens, heads, kv_heads, head_dim, block_size, dtype, seed=0):
    """qk and v as the model has them (strided views of one qkv projection output), the rope of scattered positions
    (a strided view of the table, as RotaryEmbedding returns it), a cache of large garbage over shuffled blocks and
    each token's slot."""
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * head_dim, generator=g).to(dtype)
    qk = qkv[:, :(heads + kv_heads) * head_dim].view(tokens, heads + kv_heads, head_dim)
    v = qkv[:, (heads + kv_heads) * head_dim:].view(tokens, kv_heads, head_dim)
    rope = RotaryEmbedding(head_dim, 1_000_000.0, 4096)(torch.randint(0, 4096, (tokens,), generator=g))
    num_blocks = (tokens + block_size - 1) // block_size + 3
    cache = (30 * torch.randn(2, num_blocks, block_size, kv_heads, head_dim, generator=g)).to(dtype)
    slots = torch.randperm(num_blocks * block_size, generator=g)[:tokens]
    return qk, v, rope, cache, slots


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens", [1, 7, 300])
@pytest.mark.parametrize("block_size", [16, 256])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("heads, kv_heads", [(4, 4), (4, 2), (14, 2)])  # GQA 1, 2, 7
def test_rotary_write_kv_matches_reference(heads, kv_heads, head_dim, block_size, tokens, dtype):
    qk, v, rope, cache, slots = rotary_case(tokens, heads, kv_heads, head_dim, block_size, dtype)
    ref_cache = cache.clone()
    expected = rotary_write_kv_reference(qk, v, rope, ref_cache, slots)
    assert tokens == 1 or not (qk.is_contiguous() or rope[0].is_contiguous())  # read through their strides
    got = native.rotary_write_kv(qk, v, rope, cache, slots)
    assert got is qk  # rotated in place
    exact = dtype == torch.float32
    tolerance = dict(atol=0, rtol=0) if exact else TOLERANCE[dtype]
    torch.testing.assert_close(got, expected, **tolerance)
    torch.testing.assert_close(cache, ref_cache, **tolerance)  # k (rotated) and v written, nothing else touched


def test_rotary_write_kv_skips_negative_slots():
    qk, v, rope, cache, slots = rotary_case(9, 4, 2, 64, 16, torch.float32)
    slots[[0, 4, 8]] = -1  # padding rows: rotated, never stored
    kept = slots >= 0
    ref_cache = cache.clone()
    rotary_write_kv_reference(qk[kept], v[kept], (rope[0][kept], rope[1][kept]), ref_cache, slots[kept])
    got = native.rotary_write_kv(qk.clone(), v, rope, cache, slots)
    torch.testing.assert_close(got, rotary_write_kv_reference(qk, v, rope, cache.clone(), slots.clamp(min=0)),
                               atol=0, rtol=0)
    assert torch.equal(cache, ref_cache)


def test_rotary_write_kv_rejects_bad_arguments():
    qk, v, rope, cache, slots = rotary_case(5, 4, 2, 64, 16, torch.float32)
    with pytest.raises(RuntimeError, match="outside the cache"):
        native.rotary_write_kv(qk, v, rope, cache, slots + 10_000)
    with pytest.raises(RuntimeError, match="one dtype"):
        native.rotary_write_kv(qk, v, rope, cache.bfloat16(), slots)
    with pytest.raises(RuntimeError, match="v must be"):
        native.rotary_write_kv(qk, v[:, :1], rope, cache, slots)
    with pytest.raises(RuntimeError, match="one row of head_dim / 2"):
        native.rotary_write_kv(qk, v, (rope[0][:4], rope[1][:4]), cache, slots)


def test_native_backend_fuses_rotary_and_write_and_falls_back_where_it_cannot():
    qk, v, rope, cache, slots = rotary_case(7, 14, 2, 64, 16, torch.float32)
    backend, reference = native.NativeAttentionBackend(), ReferenceAttentionBackend()
    ref_cache = cache.clone()
    expected = reference.rotary_write_kv(qk.clone(), v, rope, ref_cache, slots)
    torch.testing.assert_close(backend.rotary_write_kv(qk.clone(), v, rope, cache, slots), expected, atol=0, rtol=0)
    assert torch.equal(cache, ref_cache)
    # a cache in another dtype than qk: the unfused default (rotary, then a converting write_kv)
    bf16_cache, ref_bf16 = cache.bfloat16(), cache.bfloat16()
    got = backend.rotary_write_kv(qk.clone(), v, rope, bf16_cache, slots)
    reference.rotary_write_kv(qk.clone(), v, rope, ref_bf16, slots)
    torch.testing.assert_close(got, expected, atol=0, rtol=0)
    assert torch.equal(bf16_cache, ref_bf16)


# ----------------------------------------------------------------------------------------------------- opcheck

def test_fused_ops_opcheck():
    for dtype in (torch.float32, torch.bfloat16):
        x, residual, weight = randn(7, 96, dtype=dtype), randn(7, 96, dtype=dtype, seed=3), randn(96, dtype=dtype)
        torch.library.opcheck(torch.ops.stage1.rms_norm.default, (x, weight, EPS))
        torch.library.opcheck(torch.ops.stage1.fused_add_rms_norm.default, (x, residual, weight, EPS))
        torch.library.opcheck(torch.ops.stage1.silu_and_mul.default, (randn(7, 2 * 48, dtype=dtype),))
        qk, v, (cos, sin), cache, slots = rotary_case(7, 4, 2, 64, 16, dtype)
        torch.library.opcheck(torch.ops.stage1.rotary_write_kv.default, (qk, v, cos, sin, cache, slots))


# ----------------------------------------------------------------------------------------- where they are used

def test_native_kernels_install_the_fused_ops_in_the_layers():
    from stage1.engine.backends import select_kernels
    from stage1.engine.layers import RMSNorm, SiluAndMul, use_elementwise_kernels
    from stage1.engine.layers.norm import RMSNorm as NormLayer

    kernels = select_kernels("native", torch.device("cpu"))
    assert kernels.elementwise is native.CPU_ELEMENTWISE
    assert pickle.loads(pickle.dumps(kernels)).elementwise == native.CPU_ELEMENTWISE  # as a TP worker receives it
    model = torch.nn.Sequential(RMSNorm(8, EPS), SiluAndMul())
    use_elementwise_kernels(model, kernels.elementwise)
    # the activation stays ATen's in-place silu and mul on the CPU (measured faster there than the op)
    assert model[0].add_rms_norm is native.fused_add_rms_norm and model[1].silu_and_mul is silu_and_mul_reference
    assert NormLayer.add_rms_norm is fused_add_rms_norm_reference  # the class default stays the reference
    assert select_kernels("torch", torch.device("cpu")).elementwise.name == "torch"


def test_gpu_kernels_get_the_native_cuda_ops_only_from_a_cuda_build(monkeypatch):
    """On this CPU machine with a faked 'stage1._C has CUDA kernels': Triton on a GPU gets the fused ops beside it,
    its own name kept; without a CUDA build, or off a GPU, nothing changes."""
    pytest.importorskip("triton")
    from stage1.engine.backends import Kernels, select_kernels, triton_sample, with_native_cuda_ops
    from stage1.kernels.attention import TritonAttentionBackend

    cuda = torch.device("cuda")
    monkeypatch.setattr(native, "native_cuda_available", lambda: False)
    assert native.native_cuda_available() is False
    plain = select_kernels("triton", cuda)
    assert isinstance(plain.attention, TritonAttentionBackend) and plain.elementwise.name == "torch"
    monkeypatch.setattr(native, "native_cuda_available", lambda: True)
    fused = select_kernels("triton", cuda)
    assert fused.name == "triton" and fused.attention.name == "triton"
    assert isinstance(fused.attention, native.WithNativeRotaryKV) and fused.elementwise is native.ELEMENTWISE
    assert isinstance(pickle.loads(pickle.dumps(fused)).attention.inner, TritonAttentionBackend)
    kernels = Kernels("triton", TritonAttentionBackend(), triton_sample)
    assert with_native_cuda_ops(kernels, torch.device("cpu")) is kernels


def test_with_native_rotary_kv_delegates_everything_else():
    calls = []

    class Spy(ReferenceAttentionBackend):
        name = "spy"

        def decode(self, q, cache, ctx, scale):
            calls.append("decode")
            return super().decode(q, cache, ctx, scale)

    backend = native.WithNativeRotaryKV(Spy())
    assert backend.name == "spy"
    qk, v, rope, cache, slots = rotary_case(3, 4, 2, 64, 16, torch.float32)
    ref_cache = cache.clone()
    expected = rotary_write_kv_reference(qk, v, rope, ref_cache, slots)
    torch.testing.assert_close(backend.rotary_write_kv(qk, v, rope, cache, slots), expected, atol=0, rtol=0)
    assert torch.equal(cache, ref_cache)
    from stage1.contract import AttentionContext

    tables = (slots // 16).view(3, 1).int()
    ctx = AttentionContext(is_prefill=False, kv_cache=[cache], slot_mapping=slots, block_tables=tables,
                           context_lens=torch.ones(3, dtype=torch.int32))
    q = expected[:, :4]
    torch.testing.assert_close(backend.decode(q, cache, ctx, 0.125), Spy().decode(q, cache, ctx, 0.125))
    assert calls == ["decode", "decode"]
