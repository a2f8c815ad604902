"""The paged-attention reference and the block manager, against plain attention on contiguous tensors."""

from __future__ import annotations

import pytest
import torch

from stage1.engine.attention import (AttentionContext, decode_attention_reference, prefill_attention_reference,
                                     write_kv_reference)
from stage1.engine.config import ModelConfig
from stage1.engine.kv_cache import BlockManager, bytes_per_block, num_blocks_for_budget, slot_index


def naive_attention(q, k, v, first_query_pos, scale):
    """q [n, H, D] at positions first_query_pos.., k/v [L, Hkv, D]; causal; GQA by repeating KV heads."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    scores = torch.einsum("nhd,lhd->hnl", q, k) * scale
    pos = torch.arange(first_query_pos, first_query_pos + q.shape[0])
    scores = scores.masked_fill(torch.arange(k.shape[0])[None, :] > pos[:, None], float("-inf"))
    return torch.einsum("hnl,lhd->nhd", scores.softmax(-1), v)


def paged(lengths, block_size, kv_heads, head_dim, seed=0):
    """Random K/V for sequences of `lengths`, written into a shuffled block pool; returns cache, tables, kv."""
    g = torch.Generator().manual_seed(seed)
    blocks = BlockManager(sum((n + block_size - 1) // block_size for n in lengths) + 3, block_size)
    blocks._free = type(blocks._free)(torch.randperm(blocks.num_blocks, generator=g).tolist())  # scattered blocks
    cache = torch.zeros(2, blocks.num_blocks, block_size, kv_heads, head_dim)
    tables, kvs = [], []
    for n in lengths:
        table: list[int] = []
        blocks.allocate(table, n)
        k, v = torch.randn(n, kv_heads, head_dim, generator=g), torch.randn(n, kv_heads, head_dim, generator=g)
        write_kv_reference(cache, k, v, torch.tensor([slot_index(table, p, block_size) for p in range(n)]))
        tables.append(table)
        kvs.append((k, v))
    width = max(map(len, tables))
    block_tables = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32)
    return cache, block_tables, kvs


@pytest.mark.parametrize("block_size", [16, 256])
@pytest.mark.parametrize("heads, kv_heads", [(4, 4), (4, 2), (7, 1)])
def test_decode_reference_matches_naive(block_size, heads, kv_heads):
    lengths = [1, 15, 16, 17, 300]
    cache, tables, kvs = paged(lengths, block_size, kv_heads, 64)
    q = torch.randn(len(lengths), heads, 64)
    out = decode_attention_reference(q, cache, tables, torch.tensor(lengths), 0.125)
    for i, (k, v) in enumerate(kvs):
        expected = naive_attention(q[i:i + 1], k, v, lengths[i] - 1, 0.125)
        torch.testing.assert_close(out[i:i + 1], expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("heads, kv_heads", [(4, 2), (7, 1)])
def test_prefill_reference_with_cached_prefix(heads, kv_heads):
    """Ragged packed prompts; some have tokens already cached before their queries (chunked prefill)."""
    lengths, new = [20, 5, 40], [20, 2, 13]  # total context, new tokens this step
    cache, tables, kvs = paged(lengths, 16, kv_heads, 64)
    qs = [torch.randn(n, heads, 64) for n in new]
    cu = [0]
    for n in new:
        cu.append(cu[-1] + n)
    ctx = AttentionContext(is_prefill=True, kv_cache=[cache], slot_mapping=None, block_tables=tables,
                           context_lens=torch.tensor(lengths), cu_seqlens_q_host=cu, context_lens_host=lengths)
    new_k = torch.cat([k[-n:] for (k, _), n in zip(kvs, new)])
    new_v = torch.cat([v[-n:] for (_, v), n in zip(kvs, new)])
    out = prefill_attention_reference(torch.cat(qs), new_k, new_v, cache, ctx, 0.125)
    for i, (k, v) in enumerate(kvs):
        expected = naive_attention(qs[i], k, v, lengths[i] - new[i], 0.125)
        torch.testing.assert_close(out[cu[i]:cu[i + 1]], expected, atol=1e-5, rtol=1e-5)


def test_block_manager_allocates_grows_and_frees():
    blocks = BlockManager(4, 16)
    a, b = [], []
    blocks.allocate(a, 17)  # two blocks
    assert len(a) == 2 and blocks.num_free_blocks == 2
    assert blocks.can_allocate(a, 32) and not blocks.can_allocate(b, 49)
    blocks.allocate(a, 32)  # still two blocks
    assert len(a) == 2
    blocks.allocate(b, 20)
    assert blocks.num_free_blocks == 0 and set(a).isdisjoint(b)
    with pytest.raises(RuntimeError, match="out of blocks"):
        blocks.allocate(a, 33)
    blocks.free(a)
    assert a == [] and blocks.num_free_blocks == 2


def test_prefix_cache_shares_full_blocks_of_equal_prefixes():
    blocks = BlockManager(6, 4)
    a_tokens = list(range(10))  # blocks [0..3], [4..7], then 2 tokens
    a, a_ids = [], []
    blocks.allocate(a, 10)
    blocks.register(a, a_tokens, a_ids, 10)  # two full blocks registered, the partial one not
    assert len(a_ids) == 2
    # the same first 8 tokens: both full blocks are shared, and referenced twice
    b_tokens = list(range(8)) + [99, 98, 97]
    b = []
    b_ids = blocks.match_prefix(b, b_tokens, len(b_tokens) - 1)
    assert b == a[:2] and b_ids == a_ids and blocks.num_free_blocks == 3
    # a prefix that differs inside the second block shares only the first; one that differs in the first nothing
    c = []
    assert len(blocks.match_prefix(c, [0, 1, 2, 3, 4, 5, 0, 7, 8], 8)) == 1 and c == a[:1]
    assert blocks.match_prefix([], [1, 1, 2, 3, 4], 4) == []
    # at most max_tokens: a prompt of exactly two cached blocks keeps its last token to compute
    d = []
    assert len(blocks.match_prefix(d, list(range(8)), 7)) == 1
    for table in (b, c, d):
        blocks.free(table)
    # a's blocks outlive a: nobody holds them, yet they keep their K/V and can be found again
    a_blocks = list(a)
    blocks.free(a)
    assert blocks.num_free_blocks == 6
    e = []
    assert blocks.match_prefix(e, a_tokens, 9) == a_ids and e == a_blocks[:2] and blocks.num_free_blocks == 4
    blocks.free(e)


def test_prefix_cache_reuses_idle_blocks_last_and_forgets_them():
    blocks = BlockManager(3, 2)
    a, ids = [], []
    blocks.allocate(a, 4)
    blocks.register(a, [5, 6, 7, 8], ids, 4)
    cached = list(a)
    blocks.free(a)
    other = []
    blocks.allocate(other, 2)  # the never-registered block goes first
    assert other[0] not in cached and blocks.num_free_blocks == 2
    blocks.allocate(other, 4)  # then the least recently used cached block: its prefix is forgotten
    assert other[1] == cached[0]
    assert blocks.match_prefix([], [5, 6, 7, 8, 9], 4) == []  # the chain starts with the evicted block
    blocks.free(other)


def test_prefix_cache_registers_one_block_per_content():
    """Two sequences that computed the same prefix in the same step: the first registers it, the second goes on
    from the first's prefix id (so its later blocks chain to the cached prefix) and frees its own copy."""
    blocks = BlockManager(8, 2)
    tokens = [1, 2, 3, 4, 5]
    a, b, a_ids, b_ids = [], [], [], []
    blocks.allocate(a, 5)
    blocks.allocate(b, 5)
    blocks.register(a, tokens, a_ids, 4)
    blocks.register(b, tokens, b_ids, 4)
    assert a_ids == b_ids
    tokens_b = tokens + [6]
    blocks.register(b, tokens_b, b_ids, 6)  # b's third block, chained to a's registered prefix
    a_blocks, b_blocks = list(a), list(b)
    blocks.free(a)
    blocks.free(b)
    found = []
    assert len(blocks.match_prefix(found, tokens_b + [7], 6)) == 3 and found == a_blocks[:2] + b_blocks[2:3]
    assert blocks.num_free_blocks == 5
    blocks.free(found)
    assert blocks.num_free_blocks == 8
    off = BlockManager(4, 2, prefix_caching=False)
    t, t_ids = [], []
    off.allocate(t, 4)
    off.register(t, [1, 2, 3, 4], t_ids, 4)
    assert t_ids == [] and off.match_prefix([], [1, 2, 3, 4, 5], 4) == []


def test_pool_sized_from_memory_budget():
    config = ModelConfig.from_dict({"model_type": "qwen2", "vocab_size": 10, "hidden_size": 896,
                                    "intermediate_size": 4864, "num_hidden_layers": 24, "num_attention_heads": 14,
                                    "num_key_value_heads": 2, "rope_theta": 1e6})
    # Qwen2.5-0.5B: 24 layers x 2 KV heads x 64 x (K, V) x 2 bytes = 12 KiB per token in bf16
    assert bytes_per_block(config, 16, torch.bfloat16) == 16 * 12 * 1024
    assert num_blocks_for_budget(config, 16, torch.bfloat16, 1 << 30) == (1 << 30) // (16 * 12 * 1024)
