"""Attention over the paged KV cache: the model's `PagedAttention` and the plain-PyTorch reference kernels.

The step's context and the backend interface are in `stage1/contract.py` (cache layout: one tensor per layer,
`[2, num_blocks, block_size, num_kv_heads, head_dim]`, K at index 0 and V at index 1; see kv_cache.py). The
reference functions here are the CPU path and the ground truth the Triton kernels are tested against.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from stage1.contract import AttentionBackend, AttentionContext


def apply_rotary(x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Neox-style rotary on x `[tokens, heads, head_dim]`: its two halves rotate together by each token's angles
    (rope: cos, sin `[tokens, 1, head_dim / 2]` fp32), computed in fp32 and returned in x's dtype."""
    cos, sin = rope
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)


class ReferenceAttentionBackend(AttentionBackend):
    """The plain-PyTorch reference kernels: the CPU path, and what every fast backend is tested against."""

    name = "torch"

    def rotary(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        return apply_rotary(x, rope)

    def write_kv(self, cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor) -> None:
        write_kv_reference(cache, k, v, slot_mapping)

    def prefill(self, q, k, v, cache, ctx: AttentionContext, scale: float) -> torch.Tensor:
        return prefill_attention_reference(q, k, v, cache, ctx, scale)

    def decode(self, q, cache, ctx: AttentionContext, scale: float) -> torch.Tensor:
        return decode_attention_reference(q, cache, ctx.block_tables, ctx.context_lens, scale)


class PagedAttention(nn.Module):
    """The model's view of attention: rotate q and k, store this step's K/V, then attend. Which kernels run is the
    context's."""

    def __init__(self, layer_index: int, scale: float):
        super().__init__()
        self.layer_index = layer_index
        self.scale = scale

    def forward(self, qk: torch.Tensor, v: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                ctx: AttentionContext) -> torch.Tensor:
        """qk `[tokens, heads + kv_heads, head_dim]` before rotary (overwritten), v `[tokens, kv_heads, head_dim]`;
        returns `[tokens, heads, head_dim]`."""
        backend = ctx.backend or _REFERENCE
        num_kv_heads = v.shape[1]
        if ctx.kv_cache is None:  # a prefill with no cache (tests, benchmarks): this step's K/V is the context
            q, k = backend.rotary(qk, rope).split([qk.shape[1] - num_kv_heads, num_kv_heads], dim=1)
            return _REFERENCE.prefill(q, k, v, None, ctx, self.scale)
        cache = ctx.kv_cache[self.layer_index]
        qk = backend.rotary_write_kv(qk, v, rope, cache, ctx.slot_mapping)
        q, k = qk.split([qk.shape[1] - num_kv_heads, num_kv_heads], dim=1)
        if ctx.is_prefill:
            return backend.prefill(q, k, v, cache, ctx, self.scale)
        return backend.decode(q, cache, ctx, self.scale)


def write_kv_reference(cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    num_kv_heads, head_dim = k.shape[1:]
    cache[0].view(-1, num_kv_heads, head_dim).index_copy_(0, slot_mapping, k.to(cache.dtype))
    cache[1].view(-1, num_kv_heads, head_dim).index_copy_(0, slot_mapping, v.to(cache.dtype))


def rotary_write_kv_reference(qk: torch.Tensor, v: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                              cache: torch.Tensor, slot_mapping: torch.Tensor) -> torch.Tensor:
    """apply_rotary on the q|k heads, then write_kv_reference of the k heads and v: the ground truth of
    `stage1::rotary_write_kv` (which rotates in place and skips negative slots). Returns the rotated qk."""
    qk = apply_rotary(qk, rope)
    write_kv_reference(cache, qk[:, qk.shape[1] - v.shape[1]:], v, slot_mapping)
    return qk


def gather_kv(cache: torch.Tensor, block_table: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first `length` keys and values of one sequence, `[length, kv_heads, head_dim]` each."""
    block_size = cache.shape[2]
    blocks = block_table[: (length + block_size - 1) // block_size]
    return _gather_blocks(cache[0], blocks)[:length], _gather_blocks(cache[1], blocks)[:length]


def _gather_blocks(pool: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """`pool[blocks]` as one `[..., tokens, kv_heads, head_dim]` tensor. index_select on the contiguous block
    dimension is a plain copy, several times faster on the CPU than advanced indexing."""
    out = pool.index_select(0, blocks.flatten().long())
    return out.view(*blocks.shape[:-1], -1, *pool.shape[2:])


def prefill_attention_reference(q, k, v, cache, ctx: AttentionContext, scale: float) -> torch.Tensor:
    """Causal attention for packed, ragged prompts whose queries may start after tokens already in the cache.

    q `[tokens, heads, head_dim]`, k/v `[tokens, kv_heads, head_dim]` (this step's, already written to the cache).
    """
    out = torch.empty_like(q)
    starts = ctx.cu_seqlens_q_host
    for i in range(len(starts) - 1):
        begin, end = starts[i], starts[i + 1]
        num_new, length = end - begin, ctx.context_lens_host[i]
        if num_new == length:  # nothing cached before these tokens: this step's K/V is the whole context
            ks, vs, mask = k[begin:end], v[begin:end], None
        else:
            ks, vs = gather_kv(cache, ctx.block_tables[i], length)
            # query j sits at position length - num_new + j and sees keys 0 ..= that position
            query_pos = torch.arange(length - num_new, length, device=q.device)
            mask = torch.arange(length, device=q.device)[None, :] <= query_pos[:, None]
        out[begin:end] = _sdpa(q[begin:end], ks, vs, mask, scale, causal=mask is None)
    return out


def decode_attention_reference(q, cache, block_tables, context_lens, scale: float) -> torch.Tensor:
    """One query token per sequence against its whole cached context. q `[seqs, heads, head_dim]`."""
    num_seqs, block_size = q.shape[0], cache.shape[2]
    max_len = block_tables.shape[1] * block_size
    k = _gather_blocks(cache[0], block_tables)  # [seqs, max_len, kv_heads, head_dim]
    v = _gather_blocks(cache[1], block_tables)
    mask = torch.arange(max_len, device=q.device)[None, :] < context_lens[:, None]  # [seqs, max_len]
    out = F.scaled_dot_product_attention(
        q.unsqueeze(2),  # [seqs, heads, 1, head_dim]
        k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask[:, None, None, :], scale=scale,
        enable_gqa=True,
    )
    return out.squeeze(2).reshape(num_seqs, *q.shape[1:])


def _sdpa(q, k, v, mask, scale: float, causal: bool) -> torch.Tensor:
    """SDPA for one sequence in the `[tokens, heads, head_dim]` layout. As a batch of one: with 3-d inputs torch's
    CPU dispatch takes the math path, 2.6x (180 tokens) to 4.5x (1024) slower than its flash kernel (14/2 heads)."""
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
        attn_mask=mask, is_causal=causal, scale=scale, enable_gqa=True,
    )
    return out[0].transpose(0, 1)


_REFERENCE = ReferenceAttentionBackend()
