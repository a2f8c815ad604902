"""The Triton attention kernels (kernels/attention.py) against the plain-PyTorch references in
stage1/engine/attention.py, and both against naive attention on contiguous tensors.

On the CPU these run in the Triton interpreter (see conftest.py), where each program instance costs about a
millisecond: the shapes are small and the parameter lists cover every GQA ratio (1, 2, 7), head size (64, 128),
block size (16, 256) and context length (1, 15, 16, 17, 1000) without taking their cross product.

bf16 is tested on a GPU only: the Triton 3.7 interpreter computes tl.dot on bf16 inputs wrongly (fp16 and fp32
are fine), so an interpreted bf16 run would test the interpreter, not the kernels.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("triton")

from stage1.engine.attention import (AttentionContext, PagedAttention, ReferenceAttentionBackend,  # noqa: E402
                                     apply_rotary, decode_attention_reference, prefill_attention_reference,
                                     write_kv_reference)
from stage1.engine.kv_cache import BlockManager, slot_index  # noqa: E402
from stage1.kernels.attention import (TritonAttentionBackend, paged_decode_attention,  # noqa: E402
                                      paged_prefill_attention, write_kv)

INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
DEVICE = "cuda" if torch.cuda.is_available() and not INTERPRETED else "cpu"
if DEVICE == "cpu" and not INTERPRETED:
    pytest.skip("Triton kernels need a GPU or TRITON_INTERPRET=1", allow_module_level=True)

FP32 = dict(atol=1e-5, rtol=1e-5)
FP16 = dict(atol=3e-3, rtol=1e-2)


def naive_attention(q, k, v, first_query_pos, scale):
    """q [n, H, D] at positions first_query_pos.., k/v [L, Hkv, D]; causal; GQA by repeating KV heads; fp32."""
    q, k, v = q.float(), k.float(), v.float()
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    scores = torch.einsum("nhd,lhd->hnl", q, k) * scale
    pos = torch.arange(first_query_pos, first_query_pos + q.shape[0], device=q.device)
    scores = scores.masked_fill(torch.arange(k.shape[0], device=q.device)[None, :] > pos[:, None], float("-inf"))
    return torch.einsum("hnl,lhd->nhd", scores.softmax(-1), v)


def paged(lengths, block_size, kv_heads, head_dim, dtype=torch.float32, seed=0):
    """Random K/V for sequences of `lengths` in a shuffled block pool whose unused slots hold large garbage (a
    kernel that reads past a context or through a table's padding gets a visibly wrong answer).
    Returns cache, block tables (int32, padded with 0), per-sequence (k, v), per-sequence slot lists."""
    g = torch.Generator().manual_seed(seed)
    blocks = BlockManager(sum((n + block_size - 1) // block_size for n in lengths) + 3, block_size)
    blocks._free = type(blocks._free)(torch.randperm(blocks.num_blocks, generator=g).tolist())  # scattered blocks
    cache = 30 * torch.randn(2, blocks.num_blocks, block_size, kv_heads, head_dim, generator=g)
    tables, kvs, slots = [], [], []
    for n in lengths:
        table: list[int] = []
        blocks.allocate(table, n)
        k, v = torch.randn(n, kv_heads, head_dim, generator=g), torch.randn(n, kv_heads, head_dim, generator=g)
        slot = [slot_index(table, p, block_size) for p in range(n)]
        write_kv_reference(cache, k, v, torch.tensor(slot))
        tables.append(table)
        kvs.append((k.to(dtype).to(DEVICE), v.to(dtype).to(DEVICE)))
        slots.append(slot)
    width = max(map(len, tables))
    block_tables = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32, device=DEVICE)
    return cache.to(dtype).to(DEVICE), block_tables, kvs, slots


def cumulative(ns):
    cu = [0]
    for n in ns:
        cu.append(cu[-1] + n)
    return cu


def randn(*shape, dtype=torch.float32, seed=1):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype).to(DEVICE)


# ---------------------------------------------------------------------------------------------------- write_kv

@pytest.mark.parametrize("kv_heads, head_dim, block_size, dtype", [(2, 64, 16, torch.float32),
                                                                   (7, 128, 256, torch.float16)])
def test_write_kv_matches_reference(kv_heads, head_dim, block_size, dtype):
    """k/v as the model makes them (strided views of one packed qkv tensor, fp32 into a 16-bit cache too)."""
    tokens, num_blocks = 70, 5
    qkv = randn(tokens, (2 + 2) * kv_heads * head_dim)
    k = qkv[:, 2 * kv_heads * head_dim:3 * kv_heads * head_dim].view(tokens, kv_heads, head_dim)
    v = qkv[:, 3 * kv_heads * head_dim:].view(tokens, kv_heads, head_dim)
    assert not k.is_contiguous()
    slots = torch.randperm(num_blocks * block_size, generator=torch.Generator().manual_seed(0))[:tokens].to(DEVICE)
    expected = randn(2, num_blocks, block_size, kv_heads, head_dim, dtype=dtype, seed=2)
    got = expected.clone()
    write_kv_reference(expected, k, v, slots)
    write_kv(got, k, v, slots)
    assert torch.equal(got, expected)


def test_write_kv_skips_negative_slots():
    k, v = randn(6, 2, 64), randn(6, 2, 64, seed=3)
    slots = torch.tensor([3, -1, 40, -1, 0, 17], device=DEVICE)
    expected = randn(2, 4, 16, 2, 64, seed=2)
    got = expected.clone()
    keep = slots >= 0
    write_kv_reference(expected, k[keep], v[keep], slots[keep])
    write_kv(got, k, v, slots)
    assert torch.equal(got, expected)


# ------------------------------------------------------------------------------------------------------ decode

LENGTHS = [17, 1000, 1, 16, 15]  # ragged, unsorted: a block's edges (15, 16, 17) and a long context


@pytest.mark.parametrize("heads, kv_heads, head_dim, block_size, num_splits", [
    (4, 4, 64, 16, 1),  # GQA 1, one split: the kernel writes the output itself
    (4, 2, 128, 256, 3),  # GQA 2, split-K: three chunks then the reduce kernel
    (7, 1, 64, 256, None),  # GQA 7, the split count the backend would choose
    (14, 2, 128, 16, 7),  # GQA 7 on two KV heads; more splits than short contexts have tiles (empty splits)
])
def test_decode_matches_reference(heads, kv_heads, head_dim, block_size, num_splits):
    cache, tables, kvs, _ = paged(LENGTHS, block_size, kv_heads, head_dim)
    lens = torch.tensor(LENGTHS, dtype=torch.int32, device=DEVICE)
    q = randn(len(LENGTHS), heads, head_dim)
    scale = head_dim ** -0.5
    out = paged_decode_attention(q, cache, tables, lens, scale, num_splits=num_splits)
    torch.testing.assert_close(out, decode_attention_reference(q, cache, tables, lens, scale), **FP32)
    for i, (k, v) in enumerate(kvs):
        torch.testing.assert_close(out[i:i + 1], naive_attention(q[i:i + 1], k, v, LENGTHS[i] - 1, scale), **FP32)


def test_decode_fp16_and_strided_query():
    """fp16 storage (fp32 accumulation), and q as a strided view of a packed qkv row, as the model passes it."""
    heads, kv_heads, head_dim = 8, 2, 128
    cache, tables, kvs, _ = paged(LENGTHS, 16, kv_heads, head_dim, dtype=torch.float16)
    lens = torch.tensor(LENGTHS, dtype=torch.int32, device=DEVICE)
    qkv = randn(len(LENGTHS), (heads + 2 * kv_heads) * head_dim, dtype=torch.float16)
    q = qkv[:, :heads * head_dim].view(len(LENGTHS), heads, head_dim)
    out = paged_decode_attention(q, cache, tables, lens, head_dim ** -0.5, num_splits=2)
    assert out.dtype == torch.float16
    for i, (k, v) in enumerate(kvs):
        expected = naive_attention(q[i:i + 1], k, v, LENGTHS[i] - 1, head_dim ** -0.5)
        torch.testing.assert_close(out[i:i + 1].float(), expected, **FP16)


def test_decode_split_count_does_not_change_the_result():
    cache, tables, _, _ = paged([300, 40], 16, 2, 64)
    lens = torch.tensor([300, 40], dtype=torch.int32, device=DEVICE)
    q = randn(2, 4, 64)
    one = paged_decode_attention(q, cache, tables, lens, 0.125, num_splits=1)
    for splits in (2, 5):
        torch.testing.assert_close(paged_decode_attention(q, cache, tables, lens, 0.125, num_splits=splits), one,
                                   **FP32)


# ----------------------------------------------------------------------------------------------------- prefill

def prefill_case(lengths, new, heads, kv_heads, head_dim, block_size, dtype=torch.float32):
    """q for the last new[i] positions of each context, packed; the context's K/V already in the cache."""
    cache, tables, kvs, _ = paged(lengths, block_size, kv_heads, head_dim, dtype=dtype)
    qs = [randn(n, heads, head_dim, dtype=dtype, seed=10 + i) for i, n in enumerate(new)]
    cu = cumulative(new)
    ctx = AttentionContext(is_prefill=True, kv_cache=[cache], slot_mapping=None, block_tables=tables,
                           context_lens=torch.tensor(lengths, dtype=torch.int32, device=DEVICE),
                           cu_seqlens_q=torch.tensor(cu, dtype=torch.int32, device=DEVICE),
                           cu_seqlens_q_host=cu, context_lens_host=lengths)
    new_k = torch.cat([k[len(k) - n:] for (k, _), n in zip(kvs, new)])
    new_v = torch.cat([v[len(v) - n:] for (_, v), n in zip(kvs, new)])
    return torch.cat(qs), new_k, new_v, cache, ctx, kvs


@pytest.mark.parametrize("heads, kv_heads, head_dim, block_size, lengths, new", [
    # GQA 1: fresh prompts of every edge length in one ragged batch
    (2, 2, 64, 16, [1, 15, 16, 17, 1000], [1, 15, 16, 17, 1000]),
    # GQA 2: cached prefixes (chunked prefill / recompute) beside a fresh prompt; a 256-token page
    (4, 2, 128, 256, [17, 1000, 16, 15, 1], [9, 300, 1, 15, 1]),
    # GQA 7, head_dim 64, 256-token pages: the query tile holds 18 queries x 7 heads
    (7, 1, 64, 256, [1000, 15, 17], [200, 14, 17]),
    # GQA 7 on two KV heads, head_dim 128, 16-token pages; a query tile starts at position 958 = 15 * 64 - 2, so
    # the key tile [896, 960) must be causally masked for it (the unmasked loop must stop before that tile)
    (14, 2, 128, 16, [16, 1, 1000, 17], [16, 1, 78, 5]),
])
def test_prefill_matches_reference(heads, kv_heads, head_dim, block_size, lengths, new):
    q, k, v, cache, ctx, kvs = prefill_case(lengths, new, heads, kv_heads, head_dim, block_size)
    scale = head_dim ** -0.5
    out = paged_prefill_attention(q, k, v, cache, ctx.cu_seqlens_q, ctx.context_lens, ctx.block_tables, scale)
    torch.testing.assert_close(out, prefill_attention_reference(q, k, v, cache, ctx, scale), **FP32)
    cu = ctx.cu_seqlens_q_host
    for i, (ks, vs) in enumerate(kvs):
        expected = naive_attention(q[cu[i]:cu[i + 1]], ks, vs, lengths[i] - new[i], scale)
        torch.testing.assert_close(out[cu[i]:cu[i + 1]], expected, **FP32)


def test_prefill_fp16():
    lengths, new = [40, 130, 3], [40, 50, 2]
    q, k, v, cache, ctx, kvs = prefill_case(lengths, new, 8, 2, 64, 16, dtype=torch.float16)
    out = paged_prefill_attention(q, k, v, cache, ctx.cu_seqlens_q, ctx.context_lens, ctx.block_tables, 0.125)
    assert out.dtype == torch.float16
    cu = ctx.cu_seqlens_q_host
    for i, (ks, vs) in enumerate(kvs):
        expected = naive_attention(q[cu[i]:cu[i + 1]], ks, vs, lengths[i] - new[i], 0.125)
        torch.testing.assert_close(out[cu[i]:cu[i + 1]].float(), expected, **FP16)


# ----------------------------------------------------------------------------------------------------- backend

def test_backend_steps_match_the_reference_backend():
    """Through PagedAttention as the model calls it: a prefill step (one fresh prompt, one with a cached prefix)
    that writes K/V, then a decode step, each compared with the reference backend on a copy of the cache."""
    heads, kv_heads, head_dim, block_size = 4, 2, 64, 16
    lengths, new = [21, 40], [21, 12]
    q, k, v, cache, ctx, _ = prefill_case(lengths, new, heads, kv_heads, head_dim, block_size)
    tables = ctx.block_tables.tolist()
    ctx.slot_mapping = torch.tensor([slot_index(tables[i], p, block_size) for i in range(2)
                                     for p in range(lengths[i] - new[i], lengths[i])], device=DEVICE)
    attn = PagedAttention(0, head_dim ** -0.5)
    k, v = 2 * k, v - 1  # different from what the cache holds: the step must write them
    qk, rope = torch.cat([q, k], dim=1), rope_of(len(q), head_dim)  # attention rotates q and k itself
    ref_cache = cache.clone()
    got = attn(qk.clone(), v, rope, ctx_with(ctx, [cache], TritonAttentionBackend()))
    expected = attn(qk.clone(), v, rope, ctx_with(ctx, [ref_cache], ReferenceAttentionBackend()))
    torch.testing.assert_close(got, expected, **FP32)
    assert torch.equal(cache, ref_cache)

    # decode: one more token per sequence (both still inside their last block)
    lens = [n + 1 for n in lengths]
    dq, dk, dv = randn(2, heads, head_dim, seed=5), randn(2, kv_heads, head_dim, seed=6), randn(2, kv_heads,
                                                                                               head_dim, seed=7)
    dctx = AttentionContext(is_prefill=False, kv_cache=None, block_tables=ctx.block_tables,
                            slot_mapping=torch.tensor([slot_index(tables[i], lens[i] - 1, block_size)
                                                       for i in range(2)], device=DEVICE),
                            context_lens=torch.tensor(lens, dtype=torch.int32, device=DEVICE),
                            context_lens_host=lens)
    dqk, rope = torch.cat([dq, dk], dim=1), rope_of(2, head_dim, first=40)
    got = attn(dqk.clone(), dv, rope, ctx_with(dctx, [cache], TritonAttentionBackend()))
    expected = attn(dqk.clone(), dv, rope, ctx_with(dctx, [ref_cache], ReferenceAttentionBackend()))
    torch.testing.assert_close(got, expected, **FP32)
    assert torch.equal(cache, ref_cache)


def rope_of(tokens: int, head_dim: int, first: int = 0):
    from stage1.engine.model import RotaryEmbedding

    return RotaryEmbedding(head_dim, 10_000.0, 2048)(torch.arange(first, first + tokens, device=DEVICE))


def ctx_with(ctx: AttentionContext, kv_cache, backend) -> AttentionContext:
    return AttentionContext(**{**ctx.__dict__, "kv_cache": kv_cache, "backend": backend})


def test_prefill_without_cache_runs_the_reference_whatever_the_backend():
    lengths = [5, 9]
    q, k, v, _, ctx, _ = prefill_case(lengths, lengths, 4, 2, 64, 16)
    attn = PagedAttention(0, 0.125)
    rope = rope_of(len(q), 64)
    out = attn(torch.cat([q, k], dim=1), v, rope, ctx_with(ctx, None, TritonAttentionBackend()))
    q, k = apply_rotary(q, rope), apply_rotary(k, rope)
    torch.testing.assert_close(out, ReferenceAttentionBackend().prefill(q, k, v, None, ctx, 0.125), **FP32)
    with pytest.raises(ValueError, match="paged KV cache"):
        TritonAttentionBackend().prefill(q, k, v, None, ctx, 0.125)


# ---------------------------------------------------------------------------------------------- bf16 and import

@pytest.mark.skipif(DEVICE != "cuda", reason="bf16 needs a compiled GPU run: the Triton 3.7 interpreter computes "
                                             "tl.dot on bf16 inputs wrongly")
def test_bf16_decode_and_prefill_on_gpu():
    lengths, new = [1000, 17, 1], [100, 17, 1]
    q, k, v, cache, ctx, kvs = prefill_case(lengths, new, 14, 2, 128, 16, dtype=torch.bfloat16)
    out = paged_prefill_attention(q, k, v, cache, ctx.cu_seqlens_q, ctx.context_lens, ctx.block_tables, 0.1)
    cu = ctx.cu_seqlens_q_host
    tol = dict(atol=2e-2, rtol=2e-2)
    for i, (ks, vs) in enumerate(kvs):
        expected = naive_attention(q[cu[i]:cu[i + 1]], ks, vs, lengths[i] - new[i], 0.1)
        torch.testing.assert_close(out[cu[i]:cu[i + 1]].float(), expected, **tol)
    dq = randn(3, 14, 128, dtype=torch.bfloat16)
    out = paged_decode_attention(dq, cache, ctx.block_tables, ctx.context_lens, 0.1)
    for i, (ks, vs) in enumerate(kvs):
        torch.testing.assert_close(out[i:i + 1].float(), naive_attention(dq[i:i + 1], ks, vs, lengths[i] - 1, 0.1),
                                   **tol)


def test_kernels_compile_for_hopper_without_spills():
    """The compiled path, which the interpreter never runs: every kernel, as the wrappers configure it for
    Qwen2.5's shapes, compiles for sm_90 through Triton and its bundled ptxas, with no register spills."""
    import triton
    from pathlib import Path

    if not (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas").exists():
        pytest.skip("this triton has no bundled ptxas")
    script = Path(__file__).with_name("compile_sm90.py")
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stdout + result.stderr


def test_kernels_package_imports_without_triton():
    code = ("import sys; sys.modules['triton'] = None\n"
            "import stage1.kernels\n"
            "from stage1.engine.backends import triton_available\n"
            "assert not triton_available()\n"
            "try:\n    import stage1.kernels.attention\nexcept ImportError:\n    pass\n"
            "else:\n    raise SystemExit('imported the kernels without triton')\n")
    subprocess.run([sys.executable, "-c", code], check=True)
