"""What the sampler's passes (stats.py, shortcut.py, search.py, draw.py, launched by launch.py) share: the per-row
state they hand each other between launches, the layout of the chunks' partial results, the noise and the race.

Offsets are constexpr globals (Triton reads only constexpr globals): a kernel addresses a slot as `si + _LO`; the
host reads them as `_LO.value`.
"""

from __future__ import annotations

import triton
import triton.language as tl

from stage1.contract import GUMBEL_MAX

_NEG_BIG = tl.constexpr(-3.0e38)  # a finite -inf for running maxima: exp(m_old - m_new) never sees inf - inf
_FLOOR = tl.constexpr(110.0)  # exp(-110) underflows to 0 in fp32: tokens this far below the max can never be drawn
_INT_MAX = tl.constexpr(2147483647)
_INT_MIN = tl.constexpr(-2147483648)
_NONE = tl.constexpr(1 << 40)  # "no pivot" marker in the int64 bracket arithmetic
_GMAX = tl.constexpr(GUMBEL_MAX)  # the largest Gumbel noise a 23-bit uniform gives: no score exceeds x + _GMAX

# Per-row state between launches: fp32 [rows, STATE_F] and int64 [rows, STATE_I]; x is the scaled logit
# logits / T. Written by the statistics pass, then each pass reads and updates what it needs.
_M = tl.constexpr(0)  # max x
_S = tl.constexpr(1)  # sum of exp(x - max)
_MASS_HI = tl.constexpr(2)  # search: the mass above hi
_MASS_CAP = tl.constexpr(3)  # top_p * sum: a survivor has less mass above it (inf: top-p off)
_Z_TOP = tl.constexpr(4)  # the top token's race score, which the winner's is at least (the shortcut's bound)
STATE_F = tl.constexpr(5)

_LO = tl.constexpr(0)  # search bracket (lo, hi] in int32 keys; after the search, survivors are key(x) > lo
_HI = tl.constexpr(1)
_COUNT_LO = tl.constexpr(2)  # tokens above lo
_COUNT_HI = tl.constexpr(3)  # tokens above hi
_PASSES = tl.constexpr(4)  # search passes run
_K = tl.constexpr(5)  # top-k (the vocabulary when off)
_ARGMAX = tl.constexpr(6)  # the most likely token (first index on ties), which always survives
_SEARCH = tl.constexpr(7)  # 1 while the row needs the threshold search (top-k or top-p on, not drawn yet)
_DONE = tl.constexpr(8)  # _OPEN, or who drew the row's token
_FRONT = tl.constexpr(9)  # the shortcut's front size (-1: none, the row overflowed CAP or NT)
STATE_I = tl.constexpr(10)

_OPEN = tl.constexpr(0)
_BY_STATS = tl.constexpr(1)  # greedy, or temperature only with FUSE on
_BY_SHORTCUT = tl.constexpr(2)

# The chunks' partial results, one slot per (row, chunk) = row * SPLITS + chunk: fp32 [_PF_MASS + NT] and int32
# [_PI_COUNT + 3 * NT] per slot. The statistics pass writes the headers; a search or verify pass writes, per pivot
# j, the mass (_PF_MASS + j) and count (_PI_COUNT + j) above it and, searching, the nearest keys above
# (_PI_COUNT + NT + j) and at or under it (_PI_COUNT + 2 * NT + j).
_PF_M = tl.constexpr(0)  # max x in the chunk
_PF_S = tl.constexpr(1)  # sum of exp(x - chunk max)
_PF_XMIN = tl.constexpr(2)  # min x
_PF_AMAX = tl.constexpr(3)  # max raw logit
_PF_MASS = tl.constexpr(4)
_PI_ARGMAX = tl.constexpr(0)  # its index (first on ties)
_PI_COUNT = tl.constexpr(1)


@triton.jit
def _gumbel(seed, step, start, BLOCK: tl.constexpr):
    """Gumbel noise -log(E), E = -log(U) ~ Exp(1), for tokens start .. start + BLOCK - 1 (start % 4 == 0).

    The contract (stage1.contract): Philox4x32-10 keyed by the 64-bit seed, with counter (token // 4, step), gives
    the uniforms of four neighbouring tokens, token 4n + q taking output q; U = (top 23 bits + 0.5) / 2**23,
    strictly inside (0, 1). One Philox call per 4 tokens."""
    n = (start // 4 + tl.arange(0, BLOCK // 4)).to(tl.int64)
    r0, r1, r2, r3 = tl.randint4x(seed, (step << 32) | n)
    return _noise_of(tl.reshape(tl.join(tl.join(r0, r2), tl.join(r1, r3)), [BLOCK]))


@triton.jit
def _gumbel_at(seed, step, idx):
    """The same noise for any tokens `idx` (and steps, broadcast with them): one Philox call per token."""
    r0, r1, r2, r3 = tl.randint4x(seed, (step << 32) | (idx >> 2).to(tl.int64))
    lane = idx & 3
    return _noise_of(tl.where(lane == 0, r0, tl.where(lane == 1, r1, tl.where(lane == 2, r2, r3))))


@triton.jit
def _noise_of(r):
    """Philox words -> U (top 23 bits) -> -log(-log(U))."""
    u = ((r.to(tl.uint32, bitcast=True) >> 9).to(tl.float32) + 0.5) * 1.1920928955078125e-07
    return -tl.log(-tl.log(u))


@triton.jit
def _race(b_val, b_idx, keep, x, idx, seed, step, start, BLOCK: tl.constexpr):
    """One block of the exponential race: each lane keeps its best score x + noise among the tokens it has seen
    that `keep` allows, and that token's index."""
    score = tl.where(keep, x + _gumbel(seed, step, start, BLOCK), float("-inf"))
    better = score > b_val
    return tl.where(better, score, b_val), tl.where(better, idx, b_idx)


@triton.jit
def _store_chunk_winner(race_v_ptr, race_i_ptr, slot, b_val, b_idx, V):
    """The chunk's race winner (the first index on ties) into its slot, for _merge_race."""
    best = tl.max(b_val, axis=0)
    tl.store(race_v_ptr + slot, best)
    tl.store(race_i_ptr + slot, tl.min(tl.where(b_val == best, b_idx, V), axis=0))


@triton.jit
def _merge_race(race_v_ptr, race_i_ptr, row, SPLITS, V, SPLITS_P2: tl.constexpr):
    """The chunks' race winners of one row -> the row's best score and its token (the first index on ties, as
    within a chunk)."""
    sp = tl.arange(0, SPLITS_P2)
    at = row * SPLITS + sp
    valid = sp < SPLITS
    v = tl.load(race_v_ptr + at, mask=valid, other=float("-inf"), cache_modifier=".cg")
    i = tl.load(race_i_ptr + at, mask=valid, other=V, cache_modifier=".cg")
    best = tl.max(v, axis=0)
    return best, tl.min(tl.where(v == best, i, V), axis=0)


@triton.jit
def _row_params(temp_ptr, topk_ptr, topp_ptr, minp_ptr, row, V, FUSE: tl.constexpr):
    """A row's parameters and which path it takes: greedy, a threshold search (`need`), or neither with no min-p
    either (`fuse`: drawn during the statistics pass, when FUSE is on; else later like the others)."""
    temp = tl.load(temp_ptr + row)
    greedy = temp <= 0.0
    t = tl.where(greedy, 1.0, temp)
    k = tl.load(topk_ptr + row).to(tl.int64)
    k = tl.where((k <= 0) | (k > V), V, k)
    top_p = tl.load(topp_ptr + row)
    min_p = tl.load(minp_ptr + row)
    p_off = top_p >= 1.0
    need = (~greedy) & ((k < V) | (~p_off))
    fuse = (~greedy) & (~need) & (min_p <= 0.0) & FUSE
    return greedy, t, k, top_p, min_p, p_off, need, fuse


@triton.jit
def _survivor_cut(si):
    """The draw's bound from a row's state (`si`: its int64 state): survivors are key(x) > cut (and min-p); no
    bound where the row needs no search."""
    return tl.where(tl.load(si + _SEARCH) != 0, tl.load(si + _LO), _INT_MIN).to(tl.int32)


@triton.jit
def _key(x):
    """Order-preserving int32 image of fp32 values (scalars here; inner loops write it inline, since nested jit
    calls are slow under the interpreter)."""
    b = x.to(tl.int32, bitcast=True)
    return b ^ ((b >> 31) & 0x7FFFFFFF)


@triton.jit
def _unkey(key32):
    return (key32 ^ ((key32 >> 31) & 0x7FFFFFFF)).to(tl.float32, bitcast=True)
