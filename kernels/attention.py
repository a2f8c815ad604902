"""Triton kernels for attention over the paged KV cache, and the backend that puts them behind the engine.

The backend interface, the step's context and the cache layout are in stage1/contract.py, the plain-PyTorch
references in stage1/engine/attention.py: per layer one tensor `[2, num_blocks, block_size, num_kv_heads, head_dim]`
(K at 0, V at 1); the token at position p of a sequence lives in slot
`block_table[p // block_size] * block_size + p % block_size`.

Every kernel reads K/V through the block table one token row at a time (a vector of page ids per tile), so any
block size works and a tile may span pages. Softmax is online (running max and sum, in base 2 with the scale
folded into log2(e)), accumulated in fp32 whatever the storage dtype (fp32, fp16, bf16). Query heads that share a
KV head are one tile (GQA): each K/V tile is loaded once per KV head, not once per query head.

This module needs triton; `stage1.kernels` imports it lazily. On a machine without a GPU the kernels run only
under the Triton interpreter (`TRITON_INTERPRET=1` in the environment before this module is imported).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from stage1.contract import AttentionBackend, AttentionContext

from .rotary import rotary

_LOG2E = 1.4426950408889634


def _interpreted() -> bool:
    return bool(triton.knobs.runtime.interpret)


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 storage gets true fp32 products (tf32 would lose ~3 decimal digits); 16-bit inputs ignore this.
    return "ieee" if dtype == torch.float32 else "tf32"


# ----------------------------------------------------------------------------------------------------------------
# write_kv: this step's K/V into their cache slots. Reference: write_kv_reference.
# ----------------------------------------------------------------------------------------------------------------

@triton.jit
def _write_kv_kernel(
    k_ptr, v_ptr, cache_ptr, slot_ptr, num_tokens,
    stride_kt, stride_kh, stride_kd, stride_vt, stride_vh, stride_vd,
    stride_ckv, stride_cb, stride_cs, stride_ch, stride_cd,
    KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, ROW_P2: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, BLOCK_T: tl.constexpr,
):
    """BLOCK_T tokens per program; a token's kv_heads x head_dim values are one row of the tile. Negative slots
    (padding) are skipped. Reference: write_kv_reference in stage1/engine/attention.py."""
    tok = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    tok_mask = tok < num_tokens
    slot = tl.load(slot_ptr + tok, mask=tok_mask, other=-1).to(tl.int64)
    tok_mask = tok_mask & (slot >= 0)
    col = tl.arange(0, ROW_P2)
    head, dim = col // HEAD_DIM, col % HEAD_DIM
    mask = tok_mask[:, None] & (col < KV_HEADS * HEAD_DIM)[None, :]
    tok64 = tok.to(tl.int64)
    k = tl.load(k_ptr + tok64[:, None] * stride_kt + (head * stride_kh + dim * stride_kd)[None, :], mask=mask)
    v = tl.load(v_ptr + tok64[:, None] * stride_vt + (head * stride_vh + dim * stride_vd)[None, :], mask=mask)
    dst = cache_ptr + ((slot // BLOCK_SIZE) * stride_cb + (slot % BLOCK_SIZE) * stride_cs)[:, None] \
        + (head * stride_ch + dim * stride_cd)[None, :]
    tl.store(dst, k.to(cache_ptr.dtype.element_ty), mask=mask)
    tl.store(dst + stride_ckv, v.to(cache_ptr.dtype.element_ty), mask=mask)


def write_kv_meta(kv_heads: int, head_dim: int, block_size: int) -> dict:
    """_write_kv_kernel's compile-time arguments and launch options: tiles of ~8K elements."""
    row_p2 = triton.next_power_of_2(kv_heads * head_dim)
    return dict(KV_HEADS=kv_heads, HEAD_DIM=head_dim, ROW_P2=row_p2, BLOCK_SIZE=block_size,
                BLOCK_T=max(1, min(64, 8192 // row_p2)), num_warps=4)


def write_kv(cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Stores k, v `[tokens, kv_heads, head_dim]` (any strides) at `slot_mapping` `[tokens]` in `cache`.
    Same result as write_kv_reference; slots < 0 are skipped."""
    num_tokens, kv_heads, head_dim = k.shape
    if num_tokens == 0:
        return
    meta = write_kv_meta(kv_heads, head_dim, cache.shape[2])
    grid = (triton.cdiv(num_tokens, meta["BLOCK_T"]),)
    _write_kv_kernel[grid](k, v, cache, slot_mapping, num_tokens, *k.stride(), *v.stride(), *cache.stride(), **meta)


# ----------------------------------------------------------------------------------------------------------------
# Decode: one query per sequence, split-K (flash-decoding). Reference: decode_attention_reference.
# ----------------------------------------------------------------------------------------------------------------

@triton.jit
def _decode_split_kernel(
    q_ptr, cache_ptr, block_tables_ptr, context_lens_ptr, out_ptr, mid_o_ptr, mid_lse_ptr,
    qk_scale, num_splits,
    stride_qs, stride_qh, stride_qd,
    stride_ckv, stride_cb, stride_cs, stride_ch, stride_cd,
    stride_bts, stride_btb,
    stride_os, stride_oh, stride_od,
    GROUP: tl.constexpr, GROUP_P2: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_P2: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, SINGLE_SPLIT: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Program (seq, kv_head, split): the GROUP query heads of one KV head against one chunk of the context.
    With one split it writes the normalized output; otherwise the chunk's output and log-sum-exp (base 2) go to
    mid_o `[seqs, heads, splits, HEAD_DIM]` / mid_lse `[seqs, heads, splits]` for _decode_reduce_kernel.
    Reference: decode_attention_reference in stage1/engine/attention.py."""
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    ctx_len = tl.load(context_lens_ptr + seq)
    chunk = tl.cdiv(tl.cdiv(ctx_len, num_splits), BLOCK_N) * BLOCK_N
    start = split * chunk
    end = tl.minimum(start + chunk, ctx_len)

    g = tl.arange(0, GROUP_P2)
    heads = kv_head * GROUP + g
    d = tl.arange(0, HEAD_DIM_P2)
    d_mask = d < HEAD_DIM
    q_mask = (g < GROUP)[:, None] & d_mask[None, :]
    seq64 = seq.to(tl.int64)
    q = tl.load(q_ptr + seq64 * stride_qs + heads[:, None] * stride_qh + d[None, :] * stride_qd, mask=q_mask,
                other=0.0)
    q = q.to(cache_ptr.dtype.element_ty)

    m_i = tl.full([GROUP_P2], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([GROUP_P2], dtype=tl.float32)
    acc = tl.zeros([GROUP_P2, HEAD_DIM_P2], dtype=tl.float32)
    table = block_tables_ptr + seq64 * stride_bts
    for n0 in range(start, end, BLOCK_N):
        pos = n0 + tl.arange(0, BLOCK_N)
        pos_mask = pos < end
        page = tl.load(table + (pos // BLOCK_SIZE) * stride_btb, mask=pos_mask, other=0).to(tl.int64)
        tok = page * stride_cb + (pos % BLOCK_SIZE) * stride_cs + kv_head * stride_ch  # [BLOCK_N]
        kv_mask = pos_mask[:, None] & d_mask[None, :]
        k = tl.load(cache_ptr + tok[:, None] + d[None, :] * stride_cd, mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale  # [GROUP_P2, BLOCK_N]
        s = tl.where(pos_mask[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(cache_ptr + stride_ckv + tok[:, None] + d[None, :] * stride_cd, mask=kv_mask, other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    l_safe = tl.where(l_i > 0, l_i, 1.0)
    o = acc / l_safe[:, None]
    if SINGLE_SPLIT:
        tl.store(out_ptr + seq64 * stride_os + heads[:, None] * stride_oh + d[None, :] * stride_od,
                 o.to(out_ptr.dtype.element_ty), mask=q_mask)
    else:
        row = (seq64 * tl.num_programs(1) * GROUP + heads) * num_splits + split  # [GROUP_P2]
        tl.store(mid_o_ptr + row[:, None] * HEAD_DIM_P2 + d[None, :], o, mask=q_mask)
        lse = tl.where(l_i > 0, m_i + tl.log2(l_safe), float("-inf"))
        tl.store(mid_lse_ptr + row, lse, mask=g < GROUP)


@triton.jit
def _decode_reduce_kernel(
    mid_o_ptr, mid_lse_ptr, out_ptr, num_splits,
    stride_os, stride_oh, stride_od,
    HEAD_DIM: tl.constexpr, HEAD_DIM_P2: tl.constexpr, SPLITS_P2: tl.constexpr,
):
    """Program (seq, head): merges the splits' partial outputs by their log-sum-exp weights (second half of
    decode_attention_reference's softmax)."""
    seq = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    sp = tl.arange(0, SPLITS_P2)
    sp_mask = sp < num_splits
    d = tl.arange(0, HEAD_DIM_P2)
    row = (seq * tl.num_programs(1) + head) * num_splits + sp
    lse = tl.load(mid_lse_ptr + row, mask=sp_mask, other=float("-inf"))
    top = tl.max(lse, 0)
    top = tl.where(top == float("-inf"), 0.0, top)  # empty context: every weight 0, output 0
    w = tl.exp2(lse - top)
    o = tl.load(mid_o_ptr + row[:, None] * HEAD_DIM_P2 + d[None, :], mask=sp_mask[:, None], other=0.0)
    total = tl.sum(w, 0)
    out = tl.sum(o * w[:, None], 0) / tl.where(total > 0, total, 1.0)
    tl.store(out_ptr + seq * stride_os + head * stride_oh + d * stride_od, out.to(out_ptr.dtype.element_ty),
             mask=d < HEAD_DIM)


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def decode_num_splits(num_seqs: int, num_kv_heads: int, max_context_len: int, device: torch.device) -> int:
    """How many chunks each sequence's context is cut into: enough programs to fill the GPU (two per SM), never
    chunks under 256 tokens, at most 64. Under the interpreter (every program costs ~1 ms) at most 4."""
    programs = max(1, num_seqs * num_kv_heads)
    most_useful = max(1, triton.cdiv(max_context_len, 256))
    if device.type == "cuda" and not _interpreted():
        target = 2 * _sm_count(device.index if device.index is not None else torch.cuda.current_device())
        return int(max(1, min(64, most_useful, triton.cdiv(target, programs))))
    return int(max(1, min(4, most_useful, triton.cdiv(4, programs))))


# The decode kernel's tile and launch options; `benchmarks/kernels_attention.py --sweep` times alternatives (on an
# H200 at batch 64, context 4096, 40/8 heads: 3 stages 0.294 ms against 0.354 with 2, 2026-11-28).
DECODE_CONFIG = dict(BLOCK_N=64, num_warps=4, num_stages=3)


def decode_meta(group: int, head_dim: int, block_size: int, single_split: bool, dtype: torch.dtype) -> dict:
    """_decode_split_kernel's compile-time arguments and launch options. The query heads of a group are padded to
    16 rows (tl.dot's least); K/V tiles of DECODE_CONFIG's BLOCK_N tokens (at most 32 above head_dim 128). About
    94 registers at head_dim 128 on sm_90, no spills (ptxas)."""
    head_dim_p2 = triton.next_power_of_2(head_dim)
    block_n = DECODE_CONFIG["BLOCK_N"] if head_dim_p2 <= 128 else min(32, DECODE_CONFIG["BLOCK_N"])
    return dict(GROUP=group, GROUP_P2=max(16, triton.next_power_of_2(group)), HEAD_DIM=head_dim,
                HEAD_DIM_P2=head_dim_p2, BLOCK_SIZE=block_size, BLOCK_N=block_n, SINGLE_SPLIT=single_split,
                DOT_PRECISION=_dot_precision(dtype), num_warps=DECODE_CONFIG["num_warps"],
                num_stages=DECODE_CONFIG["num_stages"])


def decode_reduce_meta(head_dim: int, num_splits: int) -> dict:
    head_dim_p2 = triton.next_power_of_2(head_dim)
    return dict(HEAD_DIM=head_dim, HEAD_DIM_P2=head_dim_p2, SPLITS_P2=triton.next_power_of_2(num_splits),
                num_warps=4 if head_dim_p2 >= 128 else 2)


def paged_decode_attention(q: torch.Tensor, cache: torch.Tensor, block_tables: torch.Tensor,
                           context_lens: torch.Tensor, scale: float, *, num_splits: int | None = None,
                           max_context_len: int | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """Attention of one query per sequence, q `[seqs, heads, head_dim]`, over its `context_lens[i]` cached tokens.
    Same result as decode_attention_reference(q, cache, block_tables, context_lens, scale).

    `max_context_len` (a host int) only sizes the split count; without it the block table's width bounds it, so
    nothing is read back from the device. `num_splits` overrides the choice (tests)."""
    num_seqs, num_heads, head_dim = q.shape
    num_kv_heads = cache.shape[3]
    block_size = cache.shape[2]
    if num_heads % num_kv_heads:
        raise ValueError(f"{num_heads} query heads do not split into {num_kv_heads} KV heads")
    group = num_heads // num_kv_heads
    if out is None:
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if num_seqs == 0:
        return out
    if max_context_len is None:
        max_context_len = block_tables.shape[1] * block_size
    if num_splits is None:
        num_splits = decode_num_splits(num_seqs, num_kv_heads, max_context_len, q.device)
    head_dim_p2 = triton.next_power_of_2(head_dim)
    single = num_splits == 1
    if single:
        mid_o = mid_lse = out  # unused
    else:
        mid_o = torch.empty(num_seqs, num_heads, num_splits, head_dim_p2, dtype=torch.float32, device=q.device)
        mid_lse = torch.empty(num_seqs, num_heads, num_splits, dtype=torch.float32, device=q.device)
    _decode_split_kernel[(num_seqs, num_kv_heads, num_splits)](
        q, cache, block_tables, context_lens, out, mid_o, mid_lse,
        scale * _LOG2E, num_splits,
        *q.stride(), *cache.stride(), *block_tables.stride(), *out.stride(),
        **decode_meta(group, head_dim, block_size, single, cache.dtype),
    )
    if not single:
        _decode_reduce_kernel[(num_seqs, num_heads)](mid_o, mid_lse, out, num_splits, *out.stride(),
                                                      **decode_reduce_meta(head_dim, num_splits))
    return out


# ----------------------------------------------------------------------------------------------------------------
# Prefill: causal attention for packed ragged prompts, cached prefix included. Reference:
# prefill_attention_reference.
# ----------------------------------------------------------------------------------------------------------------

@triton.jit
def _find_seq(cu_q_ptr, tile, num_seqs, BLOCK_Q: tl.constexpr):
    """The sequence whose query tiles hold `tile`: the last i with cu_q[i] // BLOCK_Q + i <= tile. Sequence i's
    tiles are numbered from cu_q[i] // BLOCK_Q + i, which leaves each at least cdiv(len_i, BLOCK_Q) of them."""
    lo = 0
    hi = num_seqs
    while lo < hi:
        mid = (lo + hi) // 2
        if tl.load(cu_q_ptr + mid) // BLOCK_Q + mid <= tile:
            lo = mid + 1
        else:
            hi = mid
    return lo - 1


@triton.jit
def _prefill_tile(acc, m_i, l_i, q, cache_ptr, table, stride_btb, kv_head, n0, kv_end, q_pos,
                  stride_ckv, stride_cb, stride_cs, stride_ch, stride_cd, qk_scale, d, d_mask,
                  BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
                  DOT_PRECISION: tl.constexpr):
    """One K/V tile [n0, n0 + BLOCK_N) folded into the running softmax; CAUSAL masks keys after each row's query
    position (and keys at or past kv_end)."""
    pos = n0 + tl.arange(0, BLOCK_N)
    pos_mask = pos < kv_end
    page = tl.load(table + (pos // BLOCK_SIZE) * stride_btb, mask=pos_mask, other=0).to(tl.int64)
    tok = page * stride_cb + (pos % BLOCK_SIZE) * stride_cs + kv_head * stride_ch
    kv_mask = pos_mask[:, None] & d_mask[None, :]
    k = tl.load(cache_ptr + tok[:, None] + d[None, :] * stride_cd, mask=kv_mask, other=0.0)
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale  # [BLOCK_M, BLOCK_N]
    if CAUSAL:
        s = tl.where((pos[None, :] <= q_pos[:, None]) & pos_mask[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_new = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with nothing visible yet stays at zero
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    v = tl.load(cache_ptr + stride_ckv + tok[:, None] + d[None, :] * stride_cd, mask=kv_mask, other=0.0)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    return acc, m_new, l_i


@triton.jit
def _prefill_kernel(
    q_ptr, cache_ptr, block_tables_ptr, cu_q_ptr, context_lens_ptr, out_ptr,
    qk_scale, num_seqs,
    stride_qt, stride_qh, stride_qd,
    stride_ckv, stride_cb, stride_cs, stride_ch, stride_cd,
    stride_bts, stride_btb,
    stride_ot, stride_oh, stride_od,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_P2: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Program (query tile, kv_head): BLOCK_Q consecutive queries of one sequence x the GROUP query heads of one
    KV head, as BLOCK_M = BLOCK_Q * GROUP (+ padding) rows, against keys 0 ..= each query's position, all read
    through the block table. Query j of sequence i (j < n_i = cu_q[i+1] - cu_q[i]) sits at position
    context_lens[i] - n_i + j. Reference: prefill_attention_reference in stage1/engine/attention.py."""
    tile = tl.program_id(0)
    kv_head = tl.program_id(1)
    seq = _find_seq(cu_q_ptr, tile, num_seqs, BLOCK_Q)
    q_begin = tl.load(cu_q_ptr + seq)
    q_len = tl.load(cu_q_ptr + seq + 1) - q_begin
    first = (tile - (q_begin // BLOCK_Q + seq)) * BLOCK_Q  # first query of this tile, within its sequence
    if first >= q_len:
        return
    ctx_len = tl.load(context_lens_ptr + seq)
    prefix = ctx_len - q_len

    r = tl.arange(0, BLOCK_M)
    q_idx = first + r // GROUP
    heads = kv_head * GROUP + r % GROUP
    row_mask = (r < BLOCK_Q * GROUP) & (q_idx < q_len)
    q_pos = prefix + q_idx
    d = tl.arange(0, HEAD_DIM_P2)
    d_mask = d < HEAD_DIM
    mask = row_mask[:, None] & d_mask[None, :]
    tok = (q_begin + q_idx).to(tl.int64)
    q = tl.load(q_ptr + tok[:, None] * stride_qt + heads[:, None] * stride_qh + d[None, :] * stride_qd, mask=mask,
                other=0.0)
    q = q.to(cache_ptr.dtype.element_ty)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM_P2], dtype=tl.float32)
    table = block_tables_ptr + seq.to(tl.int64) * stride_bts
    last = tl.minimum(first + BLOCK_Q, q_len) - 1
    kv_end = prefix + last + 1  # keys this tile's last query sees
    full_end = ((prefix + first + 1) // BLOCK_N) * BLOCK_N  # tiles every row sees whole: no mask
    for n0 in range(0, full_end, BLOCK_N):
        acc, m_i, l_i = _prefill_tile(acc, m_i, l_i, q, cache_ptr, table, stride_btb, kv_head, n0, kv_end,
                                      q_pos, stride_ckv, stride_cb, stride_cs, stride_ch, stride_cd, qk_scale, d,
                                      d_mask, BLOCK_SIZE, BLOCK_N, False, DOT_PRECISION)
    for n0 in range(full_end, kv_end, BLOCK_N):
        acc, m_i, l_i = _prefill_tile(acc, m_i, l_i, q, cache_ptr, table, stride_btb, kv_head, n0, kv_end,
                                      q_pos, stride_ckv, stride_cb, stride_cs, stride_ch, stride_cd, qk_scale, d,
                                      d_mask, BLOCK_SIZE, BLOCK_N, True, DOT_PRECISION)

    o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    tl.store(out_ptr + tok[:, None] * stride_ot + heads[:, None] * stride_oh + d[None, :] * stride_od,
             o.to(out_ptr.dtype.element_ty), mask=mask)


# The prefill kernel's tiles and launch options up to head_dim 128 (head_dim 256 takes 64 x 32 tiles); the
# `--sweep` of benchmarks/kernels_attention.py times alternatives (on an H200, 8 x 1024 tokens, 40/8 heads,
# head_dim 128: 0.441 ms with these against 0.604 with 128 x 64 tiles on 8 warps, 2 stages; 2026-11-28).
PREFILL_CONFIG = dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=3)
# Where those tiles spill (ptxas through tests/kernels/compile_sm90.py, 2026-12-07; spill bytes not timed on a GPU):
# on sm_80, bf16 at head_dim 128 takes 255 registers and spills 56 bytes; 8 warps over 2 stages take 190 and spill
# nothing. In fp32 (no tensor-core dot) 64-wide tiles spill 25-57 KB on sm_80 and sm_90; 32 x 32 tiles on 4 warps
# spill nothing on sm_80 and at head_dim 64, and 1.9 KB on sm_90 at head_dim 128.
PREFILL_CONFIG_SM80_HALF = dict(BLOCK_M=64, BLOCK_N=64, num_warps=8, num_stages=2)
PREFILL_CONFIG_FP32 = dict(BLOCK_M=32, BLOCK_N=32, num_warps=4, num_stages=2)


@functools.lru_cache(maxsize=None)
def device_capability(device: torch.device) -> tuple[int, int]:
    """The GPU's compute capability; (9, 0) elsewhere (the interpreter ignores launch options)."""
    return torch.cuda.get_device_capability(device) if device.type == "cuda" else (9, 0)


def prefill_meta(group: int, head_dim: int, block_size: int, dtype: torch.dtype,
                 capability: tuple[int, int] = (9, 0)) -> dict:
    """_prefill_kernel's compile-time arguments and launch options for a GPU of `capability`. BLOCK_M rows hold
    BLOCK_Q query tokens x their group of heads. bf16/fp16 on sm_90: the timed tiles above (no spills: ~240
    registers at head_dim 128, ~150 at 64; wgmma used); on sm_80 8 warps; fp32 small tiles (see above)."""
    head_dim_p2 = triton.next_power_of_2(head_dim)
    if dtype == torch.float32:
        cfg = PREFILL_CONFIG_FP32
    elif capability < (9, 0):
        cfg = PREFILL_CONFIG_SM80_HALF
    else:
        cfg = PREFILL_CONFIG
    cfg = cfg if head_dim_p2 <= 128 else dict(cfg, BLOCK_M=min(cfg["BLOCK_M"], 64), BLOCK_N=32)
    block_m = max(cfg["BLOCK_M"], triton.next_power_of_2(group))
    return dict(GROUP=group, HEAD_DIM=head_dim, HEAD_DIM_P2=head_dim_p2, BLOCK_SIZE=block_size, BLOCK_M=block_m,
                BLOCK_Q=block_m // group, BLOCK_N=cfg["BLOCK_N"], DOT_PRECISION=_dot_precision(dtype),
                num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])


def paged_prefill_attention(q: torch.Tensor, k: torch.Tensor | None, v: torch.Tensor | None, cache: torch.Tensor,
                            cu_seqlens_q: torch.Tensor, context_lens: torch.Tensor, block_tables: torch.Tensor,
                            scale: float, *, out: torch.Tensor | None = None) -> torch.Tensor:
    """Causal attention for packed ragged prompts q `[tokens, heads, head_dim]`: the queries of sequence i are the
    last `cu_seqlens_q[i+1] - cu_seqlens_q[i]` positions of its `context_lens[i]`-token context, whose K/V (this
    step's included: write them first) are all read from `cache` through `block_tables`. `k` and `v` are not read
    (kept for the backend's signature). Same result as prefill_attention_reference."""
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads, block_size = cache.shape[3], cache.shape[2]
    if num_heads % num_kv_heads:
        raise ValueError(f"{num_heads} query heads do not split into {num_kv_heads} KV heads")
    group = num_heads // num_kv_heads
    num_seqs = cu_seqlens_q.shape[0] - 1
    if out is None:
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if num_tokens == 0 or num_seqs == 0:
        return out
    meta = prefill_meta(group, head_dim, block_size, cache.dtype, device_capability(q.device))
    grid = (triton.cdiv(num_tokens, meta["BLOCK_Q"]) + num_seqs, num_kv_heads)
    _prefill_kernel[grid](
        q, cache, block_tables, cu_seqlens_q, context_lens, out,
        scale * _LOG2E, num_seqs,
        *q.stride(), *cache.stride(), *block_tables.stride(), *out.stride(),
        **meta,
    )
    return out


# ----------------------------------------------------------------------------------------------------------------
# The backend.
# ----------------------------------------------------------------------------------------------------------------

class TritonAttentionBackend(AttentionBackend):
    """Rotary (kernels/rotary.py), write_kv, prefill and decode on Triton kernels; their plain-PyTorch references
    are `stage1.engine.attention`'s."""

    name = "triton"

    def rotary(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        return rotary(x, *rope)

    def write_kv(self, cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor) -> None:
        write_kv(cache, k, v, slot_mapping)

    def prefill(self, q, k, v, cache, ctx: AttentionContext, scale: float) -> torch.Tensor:
        if cache is None or ctx.block_tables is None:
            raise ValueError("TritonAttentionBackend.prefill reads the context through the paged KV cache: pass the "
                             "layer's cache and the block tables (a prefill without a cache runs the reference)")
        cu = ctx.cu_seqlens_q
        if cu is None:
            cu = torch.tensor(ctx.cu_seqlens_q_host, dtype=torch.int32, device=q.device)
        return paged_prefill_attention(q, k, v, cache, cu, ctx.context_lens, ctx.block_tables, scale)

    def decode(self, q, cache, ctx: AttentionContext, scale: float) -> torch.Tensor:
        max_len = max(ctx.context_lens_host) if ctx.context_lens_host else None
        return paged_decode_attention(q, cache, ctx.block_tables, ctx.context_lens, scale, max_context_len=max_len)


__all__ = ["TritonAttentionBackend", "decode_meta", "decode_num_splits", "decode_reduce_meta",
           "paged_decode_attention", "paged_prefill_attention", "prefill_meta", "write_kv", "write_kv_meta"]
