"""The native ops of stage1._C (csrc/) against the plain-PyTorch references in stage1/engine/attention.py, named
beside them as the Triton kernels' tests are: paged_decode_attention ~ decode_attention_reference, write_kv ~
write_kv_reference; torch.library.opcheck on both; every CPU kernel set this machine runs (avx2, scalar).

The grid crosses GQA ratios 1, 2, 7 (and 8+ heads per KV head, which the kernel serves in chunks), head sizes
64 and 128, block sizes 16 and 256, fp32 (tight) and bf16 (loose), over ragged odd-sized batches whose contexts
run from 1 to 1000 tokens (a block's edges and a long one). Skipped only where stage1._C is not built; CI builds it
(.ci/run checks the import).
"""

from __future__ import annotations

import pytest
import torch

from stage1.engine.attention import decode_attention_reference, write_kv_reference
from stage1.engine.native import native_available, native_error

if not native_available():
    pytest.skip(f"stage1._C is not built: {native_error()}", allow_module_level=True)


FP32 = dict(atol=1e-5, rtol=1e-5)
BF16 = dict(atol=2e-2, rtol=2e-2)
LENGTHS = [17, 1000, 1, 16, 15]  # ragged, unsorted, odd batch


def paged(lengths, block_size, kv_heads, head_dim, dtype=torch.float32, seed=0):
    """Random K/V for sequences of `lengths` scattered over a shuffled block pool whose other slots hold large
    garbage (reading past a context or through a table's padding gives a visibly wrong answer).
    Returns cache, block tables (int32, padded with 0), context lengths (int32)."""
    g = torch.Generator().manual_seed(seed)
    per_seq = [(n + block_size - 1) // block_size for n in lengths]
    num_blocks = sum(per_seq) + 3
    cache = 30 * torch.randn(2, num_blocks, block_size, kv_heads, head_dim, generator=g)
    order = torch.randperm(num_blocks, generator=g).tolist()
    tables, used = [], 0
    for n, count in zip(lengths, per_seq):
        table = order[used:used + count]
        used += count
        slots = torch.tensor([table[p // block_size] * block_size + p % block_size for p in range(n)])
        k = torch.randn(n, kv_heads, head_dim, generator=g)
        v = torch.randn(n, kv_heads, head_dim, generator=g)
        write_kv_reference(cache, k, v, slots)
        tables.append(table)
    width = max(per_seq)
    block_tables = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32)
    return cache.to(dtype), block_tables, torch.tensor(lengths, dtype=torch.int32)


def randn(*shape, dtype=torch.float32, seed=1):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


# ------------------------------------------------------------------------------------------------------ decode

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("block_size", [16, 256])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("heads, kv_heads", [(4, 4), (4, 2), (14, 2)])  # GQA 1, 2, 7
def test_paged_decode_attention_matches_reference(isa, heads, kv_heads, head_dim, block_size, dtype):
    cache, tables, lens = paged(LENGTHS, block_size, kv_heads, head_dim, dtype)
    q = randn(len(LENGTHS), heads, head_dim, dtype=dtype)
    scale = head_dim ** -0.5
    out = torch.ops.stage1.paged_decode_attention(q, cache, tables, lens, scale)
    assert out.dtype == dtype and out.shape == q.shape
    expected = decode_attention_reference(q.float(), cache.float(), tables, lens, scale)
    torch.testing.assert_close(out.float(), expected, **(FP32 if dtype == torch.float32 else BF16))


@pytest.mark.parametrize("heads, kv_heads, lengths", [
    (7, 1, [1]),  # one sequence, one token
    (9, 3, [33, 2, 999]),  # GQA 3, odd batch
    (20, 2, [300, 5, 64]),  # GQA 10: two chunks of query heads (8 + 2) per KV head
    (16, 1, [1000]),  # GQA 16
])
def test_paged_decode_attention_other_shapes(isa, heads, kv_heads, lengths):
    cache, tables, lens = paged(lengths, 16, kv_heads, 64, seed=len(lengths))
    q = randn(len(lengths), heads, 64)
    out = torch.ops.stage1.paged_decode_attention(q, cache, tables, lens, 0.125)
    torch.testing.assert_close(out, decode_attention_reference(q, cache, tables, lens, 0.125), **FP32)


@pytest.mark.parametrize("block_size", [1, 5, 24, 33])
def test_paged_decode_attention_blocks_that_do_not_divide_the_tile(isa, block_size):
    """The kernel walks 32-token tiles block by block (one division per tile): blocks smaller than, not dividing,
    and larger than a tile, with lengths ending on and off block and tile boundaries."""
    lengths = [1, 31, 32, 33, 64, 97, 5 * 33]
    cache, tables, lens = paged(lengths, block_size, 2, 64, seed=block_size)
    q = randn(len(lengths), 14, 64)
    out = torch.ops.stage1.paged_decode_attention(q, cache, tables, lens, 0.125)
    torch.testing.assert_close(out, decode_attention_reference(q, cache, tables, lens, 0.125), **FP32)


def test_paged_decode_attention_strided_query_and_int64_lengths():
    """q as a strided view of a packed qkv row (as the model passes it) and int64 context lengths."""
    heads, kv_heads, head_dim = 8, 2, 128
    cache, tables, lens = paged(LENGTHS, 16, kv_heads, head_dim)
    qkv = randn(len(LENGTHS), (heads + 2 * kv_heads) * head_dim)
    q = qkv[:, :heads * head_dim].view(len(LENGTHS), heads, head_dim)
    assert not q.is_contiguous()
    out = torch.ops.stage1.paged_decode_attention(q, cache, tables, lens.long(), 0.1)
    torch.testing.assert_close(out, decode_attention_reference(q, cache, tables, lens, 0.1), **FP32)


def test_paged_decode_attention_rejects_bad_tables():
    cache, tables, lens = paged([20], 16, 2, 64)
    q = randn(1, 4, 64)
    with pytest.raises(RuntimeError, match="exceeds the block table"):
        torch.ops.stage1.paged_decode_attention(q, cache, tables, lens + 100, 0.125)
    with pytest.raises(RuntimeError, match="outside the cache"):
        torch.ops.stage1.paged_decode_attention(q, cache, tables + 1000, lens, 0.125)
    with pytest.raises(RuntimeError, match="multiple of kv_heads"):
        torch.ops.stage1.paged_decode_attention(randn(1, 3, 64), cache, tables, lens, 0.125)


def test_paged_decode_attention_opcheck():
    cache, tables, lens = paged([17, 40, 3], 16, 2, 64)
    q = randn(3, 14, 64)
    torch.library.opcheck(torch.ops.stage1.paged_decode_attention.default, (q, cache, tables, lens, 0.125))
    torch.library.opcheck(torch.ops.stage1.paged_decode_attention.default,
                          (q.bfloat16(), cache.bfloat16(), tables, lens, 0.125))


def test_paged_decode_attention_under_torch_compile():
    cache, tables, lens = paged([17, 40, 3], 16, 2, 64)
    q = randn(3, 14, 64)

    def step(q):
        return torch.ops.stage1.paged_decode_attention(q * 2, cache, tables, lens, 0.125) + 1

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(q), step(q), **FP32)


# ---------------------------------------------------------------------------------------------------- write_kv

@pytest.mark.parametrize("kv_heads, head_dim, block_size, dtype", [(2, 64, 16, torch.float32),
                                                                   (7, 128, 256, torch.bfloat16),
                                                                   (1, 64, 16, torch.bfloat16)])
def test_write_kv_matches_reference(kv_heads, head_dim, block_size, dtype):
    """k/v as the model makes them (strided views of one packed qkv tensor, fp32 into a bf16 cache too)."""
    tokens, num_blocks = 71, 5
    qkv = randn(tokens, (2 + 2) * kv_heads * head_dim)
    k = qkv[:, 2 * kv_heads * head_dim:3 * kv_heads * head_dim].view(tokens, kv_heads, head_dim)
    v = qkv[:, 3 * kv_heads * head_dim:].view(tokens, kv_heads, head_dim)
    assert not k.is_contiguous()
    slots = torch.randperm(num_blocks * block_size, generator=torch.Generator().manual_seed(0))[:tokens]
    expected = randn(2, num_blocks, block_size, kv_heads, head_dim, dtype=dtype, seed=2)
    got = expected.clone()
    write_kv_reference(expected, k, v, slots)
    torch.ops.stage1.write_kv(got, k, v, slots)
    assert torch.equal(got, expected)


def test_write_kv_skips_negative_slots_and_rejects_overflow():
    k, v = randn(6, 2, 64), randn(6, 2, 64, seed=3)
    slots = torch.tensor([3, -1, 40, -1, 0, 17])
    expected = randn(2, 4, 16, 2, 64, seed=2)
    got = expected.clone()
    keep = slots >= 0
    write_kv_reference(expected, k[keep], v[keep], slots[keep])
    torch.ops.stage1.write_kv(got, k, v, slots)
    assert torch.equal(got, expected)
    with pytest.raises(RuntimeError, match="outside the cache"):
        torch.ops.stage1.write_kv(got, k, v, slots + 64)


def test_write_kv_opcheck():
    k, v = randn(9, 2, 64), randn(9, 2, 64, seed=3)
    slots = torch.randperm(64, generator=torch.Generator().manual_seed(0))[:9]
    cache = randn(2, 4, 16, 2, 64, seed=2)
    torch.library.opcheck(torch.ops.stage1.write_kv.default, (cache, k, v, slots))
