"""Fused sampling in Triton: temperature, top-k, top-p, min-p and one draw per row, without sorting the vocabulary.

`fused_sample(logits, temperature, top_k, top_p, min_p, seeds, steps, want_logprobs)` draws from the same
distribution as the reference `stage1.engine.sampler.filtered_probs` (softmax(logits / T), then top-k, top-p,
min-p; the most likely token always survives) and returns argmax for greedy rows (T == 0).

Each row is cut into SPLITS chunks, one program per (row, chunk), so that a batch of 256 rows (or a single row)
streams the logits with the whole GPU. A pass is one launch; in each, the program that finishes last for a row (an
atomic ticket) merges the chunks' partial results and updates the row's state for the next launch. No sort:

1. Statistics (`_stats_kernel`): online max / sum-exp of x = logits / T, the raw argmax (first index on ties, like
   torch.argmax), the smallest x and, for logprobs, the log-sum-exp of the raw logits. Greedy rows take the argmax;
   a row with no filter on (only a temperature) also runs its draw here. Both are then done.
   The merge also scores the top token in the race of step 3 (x_top + its noise): the shortcut's bound.
1b. Race shortcut (`_candidates_kernel`, `_verify_kernel`; SHORTCUT): the draw of step 3 picks the best race score
   among the survivors, and the top token always survives, so the winner is the top token or one that outscores
   it. Candidates are those tokens (noise is only needed where x + 16.7 reaches the bound); a candidate that a
   token at least as likely outscores can never win (whenever it survives, so does that one). The rest, the front,
   is usually a handful of tokens: one more pass counts the tokens and mass above each of them (the pivots of
   step 2, given), and the best front token that meets the survivor condition wins. So an LLM-like row takes 3
   launches and no search. Rows with more than CAP candidates or NT front tokens (flat distributions) go on to:
2. Threshold search (`_search_kernel`, MAX_PASSES launches; rows already done return at once), only for rows
   with top-k or top-p on. Both keep a prefix of the sorted distribution: a token of scaled logit v survives iff
       count(x > v) < k   and   mass(x > v) < top_p * sum        (mass: sum of exp(x - max))
   and both sides only grow as v falls, so the survivors are {x >= cut}. The cut lies in a bracket (lo, hi] (lo
   fails the condition, hi meets it); each pass compares the tokens inside the bracket with NT pivots at once and
   accumulates, per pivot, the count and mass above it and the nearest token values above and below it (tokens
   above hi add the counts and mass already known from the pass that set hi). The bracket then shrinks to the
   pivots around the change, snapped to the nearest token values inside. Pivots are spaced evenly in value while
   the bracket is wide and in the order-preserving int32 key of the fp32 bits after, so the search is exact and
   bounded (4 value passes, then at most 8 in keys; hi = lo + 1); at Qwen's 152k vocabulary it usually stops
   after 2-5, once the bracket holds a single token value (those tokens survive). The bracket starts at a floor
   no survivor can be under: 110 below the max (exp underflows), min-p's threshold, and for top-p the value under
   which even all V tokens together hold less than the (1 - top_p) share of the mass. Chunks with no token inside
   the bracket cost one read.
3. Draw (`_draw_kernel`): exponential race (Gumbel-max) among survivors, argmax of x_i - log(E_i), E_i = -log(U_i)
   ~ Exp(1), which picks token i with probability proportional to exp(x_i). Min-p (p_i >= min_p * p_max, i.e.
   exp(x_i - max) >= min_p) is applied here as a direct threshold. The best of each chunk, then of the row.

Randomness is counter-based: U_i comes from Philox4x32-10 keyed by the row's 64-bit seed with counter
(i // 4, step) (output i % 4), so a row's token depends only on its logits, parameters, seed and step: never on
its neighbours, its batch position, the batch size or the split count, and a recomputed (preempted) sequence draws
the same token. The reference sampler (stage1.engine.sampler) computes the same numbers in PyTorch, so both draw
the same token from the same survivors.

Tie rule: tokens whose scaled logit equals the value at the cut all survive (the condition depends on the value
only), where the reference keeps whichever tied tokens its sort puts first; with continuous logits the two agree
exactly, up to fp32 rounding of the mass sums right at the top-p boundary. top_p = 1 is off: the reference's
cumsum can reach 1.0 early and drop a tail carrying ~1e-7 of the mass, this kernel keeps it.
NaN logits are not supported.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from stage1.contract import GUMBEL_MAX

_NEG_BIG = tl.constexpr(-3.0e38)  # a finite -inf for running maxima: exp(m_old - m_new) never sees inf - inf
_FLOOR = tl.constexpr(110.0)  # exp(-110) underflows to 0 in fp32: tokens this far below the max can never be drawn
_INT_MAX = tl.constexpr(2147483647)
_INT_MIN = tl.constexpr(-2147483648)
_NONE = tl.constexpr(1 << 40)  # "no pivot" marker in the int64 bracket arithmetic

VALUE_PASSES = 4  # search passes with pivots spaced in value (while the bracket is wide)
# 4 value passes + at most 8 key passes: each key pass leaves at most ceil(width / 17) of the bracket, and 8 of them
# take 2**32 keys down to 1 (252645136, 14861479, 874205, 51424, 3025, 178, 11, 1). One launch per pass.
MAX_PASSES = 12

# Per-row state between launches: floats (m, s, lse, mass above hi, mass cap) and int64s (lo, hi, count above lo,
# count above hi, passes, k, argmax, search needed).
# Per-row state between launches: floats (m, s, lse, mass above hi, mass cap, the top token's race score) and
# int64s (lo, hi, count above lo, count above hi, passes, k, argmax, search needed, done, front size). done: 0 while
# the row is open, 1 when the statistics pass drew it (greedy, temperature only), 2 when the shortcut did (below).
_SF, _SI = tl.constexpr(6), tl.constexpr(10)
_GMAX = tl.constexpr(GUMBEL_MAX)  # the largest Gumbel noise a 23-bit uniform gives: no score exceeds x + _GMAX
_JB = tl.constexpr(16)  # candidates compared at a time in the shortcut's dominance test


@triton.jit
def _gumbel(seed, step, start, BLOCK: tl.constexpr, DRAWS: tl.constexpr):
    """Gumbel noise -log(E), E = -log(U) ~ Exp(1), for tokens start .. start + BLOCK - 1 (start % 4 == 0) and
    steps step .. step + DRAWS - 1: a [DRAWS, BLOCK] tile.

    The contract: Philox4x32-10 keyed by the 64-bit seed, with counter (token // 4, step), gives the uniforms of
    four neighbouring tokens, token 4n + q taking output q; U = (top 23 bits + 0.5) / 2**23, strictly inside
    (0, 1). DRAWS == 1 (sampling) spends one Philox call per 4 tokens; DRAWS > 1 (tests: many draws from one
    row) computes the same numbers generically."""
    if DRAWS == 1:
        n = (start // 4 + tl.arange(0, BLOCK // 4)).to(tl.int64)
        r0, r1, r2, r3 = tl.randint4x(seed, (step << 32) | n)
        return _noise_of(tl.reshape(tl.join(tl.join(r0, r2), tl.join(r1, r3)), [1, BLOCK]))
    else:
        return _gumbel_at(seed, step + tl.arange(0, DRAWS).to(tl.int64)[:, None],
                          (start + tl.arange(0, BLOCK))[None, :])


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
def _race(b_val, b_idx, keep, x, idx, seed, step, start, BLOCK: tl.constexpr, DRAWS: tl.constexpr):
    """One block of the exponential race: each lane (and draw) keeps its best score x + noise among the tokens it
    has seen that `keep` allows, and that token's index."""
    score = tl.where(keep[None, :], x[None, :] + _gumbel(seed, step, start, BLOCK, DRAWS), float("-inf"))
    better = score > b_val
    return tl.where(better, score, b_val), tl.where(better, idx[None, :], b_idx)


@triton.jit
def _row_params(temp_ptr, topk_ptr, topp_ptr, minp_ptr, row, V, FUSE: tl.constexpr):
    """A row's parameters and which path it takes: greedy, a threshold search (`need`), or neither with no min-p
    either (`fuse`: drawn during the statistics pass, when FUSE is on; else in the draw pass like the others)."""
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
def _key(x):
    """Order-preserving int32 image of fp32 values (scalars here; inner loops write it inline, since nested jit
    calls are slow under the interpreter)."""
    b = x.to(tl.int32, bitcast=True)
    return b ^ ((b >> 31) & 0x7FFFFFFF)


@triton.jit
def _unkey(key32):
    return (key32 ^ ((key32 >> 31) & 0x7FFFFFFF)).to(tl.float32, bitcast=True)


@triton.jit
def _merge_race(race_v_ptr, race_i_ptr, row, SPLITS, V, SPLITS_P2: tl.constexpr, DRAWS: tl.constexpr):
    """The chunks' race winners [SPLITS, DRAWS] of one row -> the row's winner per draw (the first index on ties,
    as within a chunk)."""
    sp = tl.arange(0, SPLITS_P2)
    dr = tl.arange(0, DRAWS)
    at = (row * SPLITS + sp)[:, None] * DRAWS + dr[None, :]
    valid = (sp < SPLITS)[:, None]
    v = tl.load(race_v_ptr + at, mask=valid, other=float("-inf"), cache_modifier=".cg")
    i = tl.load(race_i_ptr + at, mask=valid, other=V, cache_modifier=".cg")
    best = tl.max(v, axis=0)
    return best, tl.min(tl.where(v == best[None, :], i, V), axis=0)


@triton.jit
def _stats_kernel(
    logits_ptr, stride_row, temp_ptr, topk_ptr, topp_ptr, minp_ptr, seed_ptr, step_ptr,
    part_f_ptr, part_i_ptr, race_v_ptr, race_i_ptr, state_f_ptr, state_i_ptr, ticket_ptr, tok_ptr, logprob_ptr,
    V, CHUNK, SPLITS,
    BLOCK: tl.constexpr, NT: tl.constexpr, SPLITS_P2: tl.constexpr, DRAWS: tl.constexpr, WANT_LP: tl.constexpr,
    FUSE: tl.constexpr,
):
    """Program (row, chunk): pass 1 over the chunk; the row's last program merges the chunks and sets up the
    search bracket, and finishes greedy and unfiltered rows."""
    row = tl.program_id(0)
    split = tl.program_id(1)
    base = logits_ptr + row.to(tl.int64) * stride_row
    greedy, t, k, top_p, min_p, p_off, need, fuse = _row_params(temp_ptr, topk_ptr, topp_ptr, minp_ptr, row, V, FUSE)
    seed = tl.load(seed_ptr + row)
    step = tl.load(step_ptr + row)
    begin = split * CHUNK
    end = tl.minimum(begin + CHUNK, V)

    offs = tl.arange(0, BLOCK)
    m_vec = tl.full([BLOCK], _NEG_BIG, tl.float32)
    s_vec = tl.zeros([BLOCK], tl.float32)
    xmin_vec = tl.full([BLOCK], float("inf"), tl.float32)
    a_val = tl.full([BLOCK], float("-inf"), tl.float32)
    a_idx = tl.zeros([BLOCK], tl.int32) + begin
    r_s = tl.zeros([BLOCK], tl.float32)
    r_m = tl.full([BLOCK], _NEG_BIG, tl.float32)
    b_val = tl.full([DRAWS, BLOCK], float("-inf"), tl.float32)  # the race: best score per lane (and draw)
    b_idx = tl.zeros([DRAWS, BLOCK], tl.int32)
    for start in range(begin, end, BLOCK):
        idx = start + offs
        mask = idx < end
        raw = tl.load(base + idx, mask=mask, other=float("-inf")).to(tl.float32)
        better = raw > a_val
        a_val = tl.where(better, raw, a_val)
        a_idx = tl.where(better, idx, a_idx)
        x = tl.math.div_rn(raw, t)
        m_new = tl.maximum(m_vec, x)
        s_vec = s_vec * tl.exp(m_vec - m_new) + tl.exp(x - m_new)
        m_vec = m_new
        xmin_vec = tl.minimum(xmin_vec, tl.where(mask, x, float("inf")))
        if WANT_LP:
            r_new = tl.maximum(r_m, raw)
            r_s = r_s * tl.exp(r_m - r_new) + tl.exp(raw - r_new)
            r_m = r_new
        if FUSE:  # (compiled out when off: the noise's registers would cost the other rows occupancy)
            if fuse:
                b_val, b_idx = _race(b_val, b_idx, mask, x, idx, seed, step, start, BLOCK, DRAWS)
    m_p = tl.max(m_vec, axis=0)
    amax_p = tl.max(a_val, axis=0)
    r_mp = tl.max(r_m, axis=0)
    slot = row * SPLITS + split
    pf = part_f_ptr + slot * (6 + NT)
    tl.store(pf, m_p)
    tl.store(pf + 1, tl.sum(s_vec * tl.exp(m_vec - m_p), axis=0))
    tl.store(pf + 2, tl.min(xmin_vec, axis=0))
    tl.store(pf + 3, amax_p)
    tl.store(pf + 4, r_mp)
    tl.store(pf + 5, tl.sum(r_s * tl.exp(r_m - r_mp), axis=0))
    tl.store(part_i_ptr + slot * (1 + 3 * NT), tl.min(tl.where(a_val == amax_p, a_idx, V), axis=0))
    best = tl.max(b_val, axis=1)
    dr = tl.arange(0, DRAWS)
    tl.store(race_v_ptr + slot * DRAWS + dr, best)
    tl.store(race_i_ptr + slot * DRAWS + dr, tl.min(tl.where(b_val == best[:, None], b_idx, V), axis=1))

    # the row's last program to finish merges: the barrier orders all this program's stores before the ticket, and
    # the ticket's acquire/release makes every chunk's stores visible to the last one
    tl.debug_barrier()
    if tl.atomic_add(ticket_ptr + row, 1, sem="acq_rel") == SPLITS - 1:
        sp = tl.arange(0, SPLITS_P2)
        valid = sp < SPLITS
        pfs = part_f_ptr + (row * SPLITS + sp) * (6 + NT)
        pm = tl.load(pfs, mask=valid, other=_NEG_BIG, cache_modifier=".cg")
        m = tl.max(pm, axis=0)
        s = tl.sum(tl.load(pfs + 1, mask=valid, other=0.0, cache_modifier=".cg") * tl.exp(pm - m), axis=0)
        xmin = tl.min(tl.load(pfs + 2, mask=valid, other=float("inf"), cache_modifier=".cg"), axis=0)
        pa = tl.load(pfs + 3, mask=valid, other=float("-inf"), cache_modifier=".cg")
        pai = tl.load(part_i_ptr + (row * SPLITS + sp) * (1 + 3 * NT), mask=valid, other=V, cache_modifier=".cg")
        argmax = tl.min(tl.where(pa == tl.max(pa, axis=0), pai, V), axis=0)
        lse = 0.0
        if WANT_LP:
            prm = tl.load(pfs + 4, mask=valid, other=_NEG_BIG, cache_modifier=".cg")
            rm = tl.max(prm, axis=0)
            prs = tl.load(pfs + 5, mask=valid, other=0.0, cache_modifier=".cg")
            lse = rm + tl.log(tl.sum(prs * tl.exp(prm - rm), axis=0))
        # the bracket's floor: nothing under it can survive (see the module docstring)
        floor_v = m - _FLOOR
        floor_v = tl.where(min_p > 0.0, tl.maximum(floor_v, m + tl.log(tl.maximum(min_p, 1e-30)) - 0.01), floor_v)
        mass_floor = m + tl.log(tl.maximum((1.0 - top_p) * s / V, 1e-37)) - 0.1
        floor_v = tl.where(p_off, floor_v, tl.maximum(floor_v, mass_floor))
        sf = state_f_ptr + row * _SF
        tl.store(sf, m)
        tl.store(sf + 1, s)
        tl.store(sf + 2, lse)
        tl.store(sf + 3, 0.0)  # mass above hi: nothing is above the max
        tl.store(sf + 4, tl.where(p_off, float("inf"), top_p * s))  # top_p = 1: off (no rounding can cut)
        si = state_i_ptr + row * _SI
        tl.store(si, _key(tl.maximum(floor_v, xmin)).to(tl.int64) - 1)  # lo: keys > lo are candidates
        tl.store(si + 1, _key(m).to(tl.int64))  # hi: passes
        tl.store(si + 2, V)  # count above lo: a placeholder > count above hi + 1 forces a first pass
        tl.store(si + 3, 0)
        tl.store(si + 4, 0)
        tl.store(si + 5, k)
        tl.store(si + 6, argmax)
        tl.store(si + 7, need.to(tl.int64))
        tl.store(si + 8, (greedy | fuse).to(tl.int64))
        tl.store(si + 9, -1)  # no shortcut front (yet)
        # the top token always survives: the winner's race score is at least its score (the shortcut's bound)
        top = argmax + tl.zeros([1], tl.int32)
        z_top = tl.math.div_rn(tl.load(base + top).to(tl.float32), t) + _gumbel_at(seed, step, top)
        tl.store(sf + 5, tl.sum(z_top, axis=0))
        if greedy | fuse:
            f_best, f_tok = _merge_race(race_v_ptr, race_i_ptr, row, SPLITS, V, SPLITS_P2, DRAWS)
            token = tl.where(greedy, argmax, tl.where(f_best == float("-inf"), argmax, f_tok))
            tl.store(tok_ptr + row * DRAWS + dr, token.to(tl.int64))
            if WANT_LP:
                tl.store(logprob_ptr + row * DRAWS + dr, tl.load(base + token).to(tl.float32) - lse)


@triton.jit
def _pivot_sums(base, t, m, piv, lo32, hi32, begin, end, BLOCK: tl.constexpr, SBLOCK: tl.constexpr,
                NT: tl.constexpr, NEAREST: tl.constexpr, SKIP_EMPTY: tl.constexpr):
    """Per pivot (int32 keys [NT]), over the chunk's tokens whose key lies in (lo32, hi32]: how many lie above it
    and their mass exp(x - m), and with NEAREST the smallest key above it and the largest at or under it.

    One wide read finds whether any token of a block lies inside; only then the per-pivot work, SBLOCK tokens at a
    time (re-read from cache), and with SKIP_EMPTY only for the SBLOCKs that hold such a token (worth its extra
    reduction when few tokens are inside)."""
    offs = tl.arange(0, BLOCK)
    soffs = tl.arange(0, SBLOCK)
    cnt = tl.zeros([NT, SBLOCK], tl.int32)
    mass = tl.zeros([NT, SBLOCK], tl.float32)
    min_above = tl.full([NT, SBLOCK], _INT_MAX, tl.int32)
    max_below = tl.full([NT, SBLOCK], _INT_MIN, tl.int32)
    for start in range(begin, end, BLOCK):
        idx = start + offs
        xb = tl.math.div_rn(tl.load(base + idx, mask=idx < end, other=float("-inf")).to(tl.float32),
                            t).to(tl.int32, bitcast=True)
        key = xb ^ ((xb >> 31) & 0x7FFFFFFF)
        inside = (idx < end) & (key > lo32) & (key <= hi32)
        if tl.max(inside.to(tl.int32), axis=0) > 0:
            for sub in range(start, start + BLOCK, SBLOCK):
                sidx = sub + soffs
                smask = sidx < end
                x = tl.math.div_rn(tl.load(base + sidx, mask=smask, other=float("-inf")).to(tl.float32), t)
                sb = x.to(tl.int32, bitcast=True)
                skey = sb ^ ((sb >> 31) & 0x7FFFFFFF)
                sin = smask & (skey > lo32) & (skey <= hi32)
                if SKIP_EMPTY:
                    if tl.max(sin.to(tl.int32), axis=0) > 0:
                        cnt, mass, min_above, max_below = _accumulate(cnt, mass, min_above, max_below, skey,
                                                                      tl.exp(x - m), sin, piv, NEAREST)
                else:
                    cnt, mass, min_above, max_below = _accumulate(cnt, mass, min_above, max_below, skey,
                                                                  tl.exp(x - m), sin, piv, NEAREST)
    return tl.sum(cnt, axis=1), tl.sum(mass, axis=1), tl.min(min_above, axis=1), tl.max(max_below, axis=1)


@triton.jit
def _accumulate(cnt, mass, min_above, max_below, skey, e, sin, piv, NEAREST: tl.constexpr):
    above = (skey[None, :] > piv[:, None]) & sin[None, :]
    cnt += above.to(tl.int32)
    mass += tl.where(above, e[None, :], 0.0)
    if NEAREST:
        below = (skey[None, :] <= piv[:, None]) & sin[None, :]
        min_above = tl.minimum(min_above, tl.where(above, skey[None, :], _INT_MAX))
        max_below = tl.maximum(max_below, tl.where(below, skey[None, :], _INT_MIN))
    return cnt, mass, min_above, max_below


@triton.jit
def _search_kernel(
    logits_ptr, stride_row, temp_ptr, part_f_ptr, part_i_ptr, state_f_ptr, state_i_ptr, ticket_ptr,
    V, CHUNK, SPLITS,
    BLOCK: tl.constexpr, SBLOCK: tl.constexpr, NT: tl.constexpr, SPLITS_P2: tl.constexpr,
    VALUE_PASSES: tl.constexpr, MAX_PASSES: tl.constexpr,
):
    """Program (row, chunk): one threshold-search pass over the chunk; the row's last program narrows the
    bracket. Rows whose search is over (or never started) return at once."""
    row = tl.program_id(0)
    split = tl.program_id(1)
    si = state_i_ptr + row * _SI
    sf = state_f_ptr + row * _SF
    lo = tl.load(si)
    hi = tl.load(si + 1)
    c_lo = tl.load(si + 2)
    c_hi = tl.load(si + 3)
    passes = tl.load(si + 4)
    if (tl.load(si + 7) != 0) & (c_lo - c_hi > 1) & (hi - lo > 1) & (passes < MAX_PASSES):
        base = logits_ptr + row.to(tl.int64) * stride_row
        temp = tl.load(temp_ptr + row)
        t = tl.where(temp <= 0.0, 1.0, temp)
        m = tl.load(sf)
        # pivots: the first pass includes lo itself (does everything above the floor survive?); later passes
        # split (lo, hi) into NT + 1 equal parts, in value while the bracket is wide, then in key
        j = tl.arange(0, NT)
        num = tl.where(passes == 0, j, j + 1).to(tl.int64)
        den = tl.where(passes == 0, NT, NT + 1).to(tl.int64)
        by_key = lo + (hi - lo) * num // den
        lo32 = lo.to(tl.int32)
        hi32 = hi.to(tl.int32)
        lo_v = _unkey(lo32)
        hi_v = _unkey(hi32)
        by_val = _key(lo_v + (hi_v - lo_v) * (num.to(tl.float32) / den.to(tl.float32))).to(tl.int64)
        by_val = tl.minimum(tl.maximum(by_val, lo), hi)
        use_key = (passes >= VALUE_PASSES) | (hi - lo <= (1 << 24))
        piv = tl.where(use_key, by_key, by_val).to(tl.int32)

        begin = split * CHUNK
        end = tl.minimum(begin + CHUNK, V)
        cnt, mass, min_above, max_below = _pivot_sums(base, t, m, piv, lo32, hi32, begin, end, BLOCK, SBLOCK, NT,
                                                      NEAREST=True, SKIP_EMPTY=False)
        slot = row * SPLITS + split
        pi = part_i_ptr + slot * (1 + 3 * NT) + 1
        tl.store(pi + j, cnt)
        tl.store(pi + NT + j, min_above)
        tl.store(pi + 2 * NT + j, max_below)
        tl.store(part_f_ptr + slot * (6 + NT) + 6 + j, mass)

        tl.debug_barrier()  # as in _stats_kernel
        if tl.atomic_add(ticket_ptr + row, 1, sem="acq_rel") == SPLITS - 1:
            sp = tl.arange(0, SPLITS_P2)
            valid = (sp < SPLITS)[:, None]
            at = (row * SPLITS + sp)[:, None] * (1 + 3 * NT) + 1 + j[None, :]  # [SPLITS_P2, NT]
            # tokens above hi are above every pivot, tokens at or under lo under every one: their count and mass
            # are known; for the nearest keys, hi + 1 and lo stand in for them (no token lies strictly between)
            c = tl.sum(tl.load(part_i_ptr + at, mask=valid, other=0, cache_modifier=".cg"), axis=0).to(tl.int64)
            c += c_hi
            mab = tl.min(tl.load(part_i_ptr + at + NT, mask=valid, other=_INT_MAX, cache_modifier=".cg"), axis=0)
            mab = tl.minimum(mab.to(tl.int64), hi + 1)
            mbe = tl.max(tl.load(part_i_ptr + at + 2 * NT, mask=valid, other=_INT_MIN, cache_modifier=".cg"), axis=0)
            mbe = tl.maximum(mbe.to(tl.int64), lo)
            atf = (row * SPLITS + sp)[:, None] * (6 + NT) + 6 + j[None, :]
            mm = tl.sum(tl.load(part_f_ptr + atf, mask=valid, other=0.0, cache_modifier=".cg"), axis=0)
            mm += tl.load(sf + 3)
            ok = (c < tl.load(si + 5)) & (mm < tl.load(sf + 4))
            pv = piv.to(tl.int64)
            # the new bracket: the largest failing pivot and the smallest passing one, each snapped to the nearest
            # token value inside (counts and masses above them do not change, so neither does the condition)
            lo_piv = tl.max(tl.where(ok, -_NONE, pv), axis=0)
            hi_piv = tl.min(tl.where(ok, pv, _NONE), axis=0)
            at_lo = (~ok) & (pv == lo_piv)
            at_hi = ok & (pv == hi_piv)
            has_lo = lo_piv > -_NONE
            has_hi = hi_piv < _NONE
            tl.store(si, tl.where(has_lo, tl.max(tl.where(at_lo, mab, -_NONE), axis=0) - 1, lo))
            tl.store(si + 1, tl.where(has_hi, tl.max(tl.where(at_hi, mbe, -_NONE), axis=0), hi))
            tl.store(si + 2, tl.where(has_lo, tl.max(tl.where(at_lo, c, -1), axis=0), c_lo))
            tl.store(si + 3, tl.where(has_hi, tl.max(tl.where(at_hi, c, -1), axis=0), c_hi))
            tl.store(sf + 3, tl.where(has_hi, tl.max(tl.where(at_hi, mm, -1.0), axis=0), tl.load(sf + 3)))
            tl.store(si + 4, passes + 1)


@triton.jit
def _candidates_kernel(
    logits_ptr, stride_row, temp_ptr, minp_ptr, seed_ptr, step_ptr,
    cand_n_ptr, cand_i_ptr, cand_x_ptr, cand_z_ptr, front_i_ptr, front_z_ptr, front_k_ptr,
    state_f_ptr, state_i_ptr, ticket_ptr, tok_ptr, logprob_ptr,
    V, CHUNK, SPLITS,
    BLOCK: tl.constexpr, CAP: tl.constexpr, NT: tl.constexpr, WANT_LP: tl.constexpr,
):
    """The shortcut, part 1. Program (row, chunk): gathers the tokens that beat the top token's race score (the
    row's count by an atomic, at most CAP of them stored); the row's last program keeps those that no other beats
    at a value as high (the front, at most NT) for _verify_kernel, or draws at once: the top token when none beat
    it, the best of them when the row has no top-k / top-p (min-p is applied here). A row with more than CAP
    candidates or NT front tokens is left to the threshold search."""
    row = tl.program_id(0)
    split = tl.program_id(1)
    si = state_i_ptr + row * _SI
    sf = state_f_ptr + row * _SF
    if tl.load(si + 8) == 0:
        base = logits_ptr + row.to(tl.int64) * stride_row
        temp = tl.load(temp_ptr + row)
        t = tl.where(temp <= 0.0, 1.0, temp)
        min_p = tl.load(minp_ptr + row)
        seed = tl.load(seed_ptr + row)
        step = tl.load(step_ptr + row)
        m = tl.load(sf)
        z_top = tl.load(sf + 5)
        top = tl.load(si + 6).to(tl.int32)
        begin = split * CHUNK
        end = tl.minimum(begin + CHUNK, V)
        offs = tl.arange(0, BLOCK)
        for start in range(begin, end, BLOCK):
            idx = start + offs
            x = tl.math.div_rn(tl.load(base + idx, mask=idx < end, other=float("-inf")).to(tl.float32), t)
            # x + _GMAX < z_top: no noise can lift the token past the top one's score
            maybe = (idx < end) & (x + _GMAX >= z_top) & (tl.exp(x - m) >= min_p)
            if tl.max(maybe.to(tl.int32), axis=0) > 0:
                z = x + tl.reshape(_gumbel(seed, step, start, BLOCK, 1), [BLOCK])
                wins = (maybe & ((z > z_top) | ((z == z_top) & (idx < top)))).to(tl.int32)
                n = tl.sum(wins, axis=0)
                if n > 0:
                    # slots by an atomic: the order differs from run to run, the set does not, and the front
                    # below depends only on the set
                    pos = tl.atomic_add(cand_n_ptr + row, n) + tl.cumsum(wins, axis=0) - 1
                    keep = (wins != 0) & (pos < CAP)
                    dst = row * CAP + pos
                    tl.store(cand_i_ptr + dst, idx, mask=keep)
                    tl.store(cand_x_ptr + dst, x, mask=keep)
                    tl.store(cand_z_ptr + dst, z, mask=keep)
        tl.debug_barrier()  # as in _stats_kernel
        if tl.atomic_add(ticket_ptr + row, 1, sem="acq_rel") == SPLITS - 1:
            n = tl.atomic_add(cand_n_ptr + row, 0)
            if n <= CAP:
                # candidate i is pruned when another, j, has x_j >= x_i and beats it (higher score, or the same
                # and a lower index): whenever i survives, so does j. The winner is never pruned.
                c = tl.arange(0, CAP)
                valid = c < n
                at = row * CAP + c
                ci = tl.load(cand_i_ptr + at, mask=valid, other=V, cache_modifier=".cg")
                cx = tl.load(cand_x_ptr + at, mask=valid, other=float("-inf"), cache_modifier=".cg")
                cz = tl.load(cand_z_ptr + at, mask=valid, other=float("-inf"), cache_modifier=".cg")
                pruned = tl.zeros([CAP], tl.int32)
                for jb in range(0, CAP, _JB):
                    jj = jb + tl.arange(0, _JB)
                    jv = jj < n
                    ji = tl.load(cand_i_ptr + row * CAP + jj, mask=jv, other=V, cache_modifier=".cg")
                    jx = tl.load(cand_x_ptr + row * CAP + jj, mask=jv, other=float("-inf"), cache_modifier=".cg")
                    jz = tl.load(cand_z_ptr + row * CAP + jj, mask=jv, other=float("-inf"), cache_modifier=".cg")
                    beats = (jz[None, :] > cz[:, None]) | ((jz[None, :] == cz[:, None]) & (ji[None, :] < ci[:, None]))
                    beats &= (jx[None, :] >= cx[:, None]) & jv[None, :]
                    pruned = tl.maximum(pruned, tl.max(beats.to(tl.int32), axis=1))
                front = valid & (pruned == 0)
                nf = tl.sum(front.to(tl.int32), axis=0)
                if nf <= NT:
                    slot = row * NT + tl.cumsum(front.to(tl.int32), axis=0) - 1
                    tl.store(front_i_ptr + slot, ci, mask=front)
                    tl.store(front_z_ptr + slot, cz, mask=front)
                    tl.store(front_k_ptr + slot, _key(cx), mask=front)
                    tl.store(si + 9, nf)
                    if (nf == 0) | (tl.load(si + 7) == 0):  # nothing beats the top token, or nothing to check
                        best = tl.max(tl.where(front, cz, float("-inf")), axis=0)
                        token = tl.min(tl.where(front & (cz == best), ci, V), axis=0)
                        token = tl.where(nf == 0, top, token)
                        _finish(base, tok_ptr, logprob_ptr, sf, si, row, token, WANT_LP)


@triton.jit
def _verify_kernel(
    logits_ptr, stride_row, temp_ptr, part_f_ptr, part_i_ptr, front_i_ptr, front_z_ptr, front_k_ptr,
    state_f_ptr, state_i_ptr, ticket_ptr, tok_ptr, logprob_ptr,
    V, CHUNK, SPLITS,
    BLOCK: tl.constexpr, SBLOCK: tl.constexpr, NT: tl.constexpr, SPLITS_P2: tl.constexpr,
    WANT_LP: tl.constexpr,
):
    """The shortcut, part 2. Program (row, chunk): count and mass above each front token (its scaled logit as a
    pivot); the row's last program applies the survivor condition to each and draws the best survivor by race
    score (the top token, which always survives, when none does)."""
    row = tl.program_id(0)
    split = tl.program_id(1)
    si = state_i_ptr + row * _SI
    sf = state_f_ptr + row * _SF
    nf = tl.load(si + 9)
    if (tl.load(si + 8) == 0) & (nf > 0):
        base = logits_ptr + row.to(tl.int64) * stride_row
        temp = tl.load(temp_ptr + row)
        t = tl.where(temp <= 0.0, 1.0, temp)
        j = tl.arange(0, NT)
        valid = j < nf
        piv = tl.load(front_k_ptr + row * NT + j, mask=valid, other=_INT_MAX)
        begin = split * CHUNK
        end = tl.minimum(begin + CHUNK, V)
        # only tokens above the lowest pivot are above any
        cnt, mass, _unused_min, _unused_max = _pivot_sums(base, t, tl.load(sf), piv, tl.min(piv, axis=0), _INT_MAX,
                                                          begin, end, BLOCK, SBLOCK, NT, NEAREST=False,
                                                          SKIP_EMPTY=True)
        slot = row * SPLITS + split
        tl.store(part_i_ptr + slot * (1 + 3 * NT) + 1 + j, cnt)
        tl.store(part_f_ptr + slot * (6 + NT) + 6 + j, mass)
        tl.debug_barrier()  # as in _stats_kernel
        if tl.atomic_add(ticket_ptr + row, 1, sem="acq_rel") == SPLITS - 1:
            sp = tl.arange(0, SPLITS_P2)
            in_row = (sp < SPLITS)[:, None]
            at = (row * SPLITS + sp)[:, None] * (1 + 3 * NT) + 1 + j[None, :]
            c = tl.sum(tl.load(part_i_ptr + at, mask=in_row, other=0, cache_modifier=".cg"), axis=0).to(tl.int64)
            atf = (row * SPLITS + sp)[:, None] * (6 + NT) + 6 + j[None, :]
            mm = tl.sum(tl.load(part_f_ptr + atf, mask=in_row, other=0.0, cache_modifier=".cg"), axis=0)
            survives = valid & (c < tl.load(si + 5)) & (mm < tl.load(sf + 4))
            fz = tl.load(front_z_ptr + row * NT + j, mask=survives, other=float("-inf"))
            fi = tl.load(front_i_ptr + row * NT + j, mask=survives, other=V)
            best = tl.max(fz, axis=0)
            token = tl.min(tl.where(survives & (fz == best), fi, V), axis=0)
            token = tl.where(tl.max(survives.to(tl.int32), axis=0) > 0, token, tl.load(si + 6).to(tl.int32))
            _finish(base, tok_ptr, logprob_ptr, sf, si, row, token, WANT_LP)


@triton.jit
def _finish(base, tok_ptr, logprob_ptr, sf, si, row, token, WANT_LP: tl.constexpr):
    """The shortcut's draw: store the token (and its raw logprob) and mark the row done (and not to search)."""
    tl.store(tok_ptr + row, token.to(tl.int64))
    if WANT_LP:
        tl.store(logprob_ptr + row, tl.load(base + token).to(tl.float32) - tl.load(sf + 2))
    tl.store(si + 7, 0)
    tl.store(si + 8, 2)


@triton.jit
def _draw_kernel(
    logits_ptr, stride_row, temp_ptr, topk_ptr, topp_ptr, minp_ptr, seed_ptr, step_ptr,
    race_v_ptr, race_i_ptr, state_f_ptr, state_i_ptr, ticket_ptr, tok_ptr, logprob_ptr, debug_ptr,
    V, CHUNK, SPLITS,
    BLOCK: tl.constexpr, SPLITS_P2: tl.constexpr, DRAWS: tl.constexpr, WANT_LP: tl.constexpr,
    DEBUG: tl.constexpr,
):
    """Program (row, chunk): the race among the chunk's survivors; the row's last program picks the winner.
    Rows already drawn (greedy, and with FUSE temperature-only, in _stats_kernel; others by the shortcut) return."""
    row = tl.program_id(0)
    split = tl.program_id(1)
    # rows the statistics pass or the shortcut drew are done (state); the parameters give the rest their filters
    _greedy, t, _k, _top_p, min_p, _p_off, need, _fuse = _row_params(temp_ptr, topk_ptr, topp_ptr, minp_ptr, row, V,
                                                                     False)
    si = state_i_ptr + row * _SI
    cut = tl.where(need, tl.load(si), _INT_MIN).to(tl.int32)  # survivors: key(x) > cut (and min-p)
    done = tl.load(si + 8)
    if DEBUG:  # for tests: the survivor cut (key), how many search passes ran, and whether the shortcut drew
        if split == 0:
            tl.store(debug_ptr + 3 * row, cut.to(tl.int64))
            tl.store(debug_ptr + 3 * row + 1, tl.load(si + 4))
            tl.store(debug_ptr + 3 * row + 2, (done == 2).to(tl.int64))
    if done == 0:
        base = logits_ptr + row.to(tl.int64) * stride_row
        seed = tl.load(seed_ptr + row)
        step = tl.load(step_ptr + row)
        m = tl.load(state_f_ptr + row * _SF)
        begin = split * CHUNK
        end = tl.minimum(begin + CHUNK, V)
        offs = tl.arange(0, BLOCK)
        b_val = tl.full([DRAWS, BLOCK], float("-inf"), tl.float32)
        b_idx = tl.zeros([DRAWS, BLOCK], tl.int32)
        for start in range(begin, end, BLOCK):
            idx = start + offs
            mask = idx < end
            x = tl.math.div_rn(tl.load(base + idx, mask=mask, other=float("-inf")).to(tl.float32), t)
            xb = x.to(tl.int32, bitcast=True)
            keep = mask & ((xb ^ ((xb >> 31) & 0x7FFFFFFF)) > cut) & (tl.exp(x - m) >= min_p)
            if tl.max(keep.to(tl.int32), axis=0) > 0:  # the noise only where something survives
                b_val, b_idx = _race(b_val, b_idx, keep, x, idx, seed, step, start, BLOCK, DRAWS)
        best = tl.max(b_val, axis=1)
        dr = tl.arange(0, DRAWS)
        slot = row * SPLITS + split
        tl.store(race_v_ptr + slot * DRAWS + dr, best)
        tl.store(race_i_ptr + slot * DRAWS + dr, tl.min(tl.where(b_val == best[:, None], b_idx, V), axis=1))
        tl.debug_barrier()  # as in _stats_kernel
        if tl.atomic_add(ticket_ptr + row, 1, sem="acq_rel") == SPLITS - 1:
            best, drawn = _merge_race(race_v_ptr, race_i_ptr, row, SPLITS, V, SPLITS_P2, DRAWS)
            token = tl.where(best == float("-inf"), tl.load(si + 6), drawn)
            tl.store(tok_ptr + row * DRAWS + dr, token.to(tl.int64))
            if WANT_LP:
                lse = tl.load(state_f_ptr + row * _SF + 2)
                tl.store(logprob_ptr + row * DRAWS + dr, tl.load(base + token).to(tl.float32) - lse)


# Compiled (GPU) launch parameters: BLOCK tokens per read, SBLOCK per step and NT pivots in the search's per-pivot
# work (NT x SBLOCK accumulators: registers), how many programs per SM the row splits aim for, and FUSE: whether
# rows with only a temperature draw during the statistics pass (223 registers in that kernel instead of 78, yet
# faster in one H200 sweep at 256 x 152k: 1.27 against 1.44 ms with top-k 50 + top-p 0.9, 2.34 against 2.31 with
# top-p 0.95, 0.69 against 1.46 with a temperature only; benchmarks/results/h200-2026-11-28-b/sweep_sampling.txt).
# SHORTCUT: whether rows try the race shortcut (stats, candidates, verify) before the threshold search; CAP: the
# candidates a row may gather for it; SYNC: whether the host asks the GPU, after the shortcut, if any row is left
# for the search (one sync; without it the 13 search and draw launches always go out, and return at once).
# FUSE is off with the shortcut on: the shortcut draws temperature-only rows in its second launch, and FUSE's race
# code takes the statistics kernel from 80 to 189 registers (fp32 logits, sm_90), one block per SM instead of 3,
# for every row. These defaults are reasoned, not timed: no GPU has run the shortcut yet (--sweep compares).
# `python benchmarks/kernels_sampling.py --sweep` compares alternatives on a GPU.
GPU_CONFIG = dict(BLOCK=2048, SBLOCK=256, NT=16, PROGRAMS_PER_SM=8, FUSE=False, SHORTCUT=True, CAP=128, SYNC=True,
                  num_warps=8)


# Under the interpreter (tests): block sizes follow the vocabulary; FUSE on saves interpreted passes, SYNC skips
# the search launches when the shortcut drew every row.
INTERPRETER_CONFIG = dict(NT=16, FUSE=True, SHORTCUT=True, CAP=64, SYNC=True, num_warps=4)


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _config(logits: torch.Tensor, draws: int, splits: int | None) -> dict:
    """Block sizes and the number of chunks per row. `draws` > 1 (the tests' hook) works on [draws, BLOCK] tiles:
    they are kept small."""
    rows, vocab = logits.shape
    if logits.is_cuda:
        cfg = dict(GPU_CONFIG, group=1)
        if draws > 1:
            cfg.update(BLOCK=256, group=min(draws, 16))
        if splits is None:
            sms = _sm_count(logits.device.index if logits.device.index is not None else torch.cuda.current_device())
            splits = triton.cdiv(cfg["PROGRAMS_PER_SM"] * sms, max(rows, 1))
    else:
        # Triton interpreter (numpy underneath): few, large chunks, one per row unless a test asks for more
        block = min(8192, max(16, triton.next_power_of_2(triton.cdiv(vocab, splits or 1))))
        cfg = dict(INTERPRETER_CONFIG, BLOCK=block, SBLOCK=min(4096, block),
                   group=min(draws, max(1, (1 << 20) // block)))
        splits = splits or 1
    # chunks of whole blocks (a multiple of 4 tokens, as the noise needs), none of them empty
    chunk = triton.cdiv(triton.cdiv(vocab, max(1, min(splits, triton.cdiv(vocab, cfg["BLOCK"])))),
                        cfg["BLOCK"]) * cfg["BLOCK"]
    cfg.update(CHUNK=chunk, SPLITS=triton.cdiv(vocab, chunk))
    return cfg


def fused_sample(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
                 min_p: torch.Tensor, seeds: torch.Tensor, steps: torch.Tensor, want_logprobs: bool = False, *,
                 _draws: int = 1, _splits: int | None = None, _shortcut: bool | None = None,
                 _debug: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One token per row of `logits` [rows, vocab] (fp32/bf16/fp16), and optionally its raw logprob.

    Per-row tensors (on the logits' device): temperature fp32 (0 = greedy: argmax, first index on ties), top_k
    integer (0, or >= vocab: off), top_p fp32 in (0, 1] (1: off), min_p fp32 in [0, 1] (0: off), seeds int64 (the
    Philox key), steps int64 (tokens the sequence has generated so far; the Philox counter's high word, < 2**32).
    Returns int64 tokens [rows] and, when `want_logprobs`, fp32 log_softmax(logits)[row, token] (the raw,
    unscaled distribution, as `token_logprobs` reports), else None.

    Test hooks: `_draws` = D > 1 (a power of two) draws D tokens per row, for steps step .. step + D - 1, from one
    threshold search (tokens [rows, D], each the token a call with that step would draw); `_splits` sets how many
    chunks each row is cut into (the result must not depend on it); `_shortcut=False` sends every row to the
    threshold search (the config's SHORTCUT otherwise; `_draws` > 1 always searches); `_debug`, an int64 [rows, 3]
    tensor, receives each row's survivor cut (survivors: `float_key(logits / T) > cut` and min-p; searched rows
    only), the number of search passes, and 1 where the shortcut drew the token.
    """
    if logits.dim() != 2:
        raise ValueError(f"fused_sample: logits must be [rows, vocab], got {tuple(logits.shape)}")
    if _draws < 1 or _draws & (_draws - 1):
        raise ValueError(f"fused_sample: _draws must be a power of two, got {_draws}")
    rows, vocab = logits.shape
    if _debug is not None and (_debug.shape != (rows, 3) or _debug.dtype != torch.int64):
        raise ValueError(f"fused_sample: _debug must be an int64 [{rows}, 3] tensor (cut, passes, shortcut), got "
                         f"{_debug.dtype} {tuple(_debug.shape)}")
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    device = logits.device

    def per_row(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        t = torch.as_tensor(t, device=device).to(dtype).contiguous()
        if t.shape != (rows,):
            raise ValueError(f"fused_sample: per-row tensors must have shape ({rows},), got {tuple(t.shape)}")
        return t

    temperature = per_row(temperature, torch.float32)
    top_k = per_row(top_k, torch.int64)
    top_p = per_row(top_p, torch.float32)
    min_p = per_row(min_p, torch.float32)
    seeds = per_row(seeds, torch.int64)
    steps = per_row(steps, torch.int64)
    cfg = _config(logits, _draws, _splits)
    group, splits, nt = cfg["group"], cfg["SPLITS"], cfg["NT"]
    shortcut = cfg["SHORTCUT"] if _shortcut is None else _shortcut
    shortcut = shortcut and group == 1  # the tests' many draws per row search once for all of them
    tokens = torch.empty(_draws // group, rows, group, dtype=torch.int64, device=device)
    logprobs = torch.empty(_draws // group, rows, group, dtype=torch.float32, device=device) if want_logprobs else None
    if rows:
        # scratch, in three allocations (a GPU call's host time counts): one ticket counter per row and launch and
        # the shortcut's candidate counts (zeroed), the chunks' partial results, the race winners, each row's state
        # between launches, the shortcut's candidates and fronts
        cap = cfg["CAP"] if shortcut else 0
        tickets, cand_n, part_i, race_i, cand_i, front_i, front_k = _scratch(
            torch.int32, device, (_draws // group) * (MAX_PASSES + 4) * rows, rows, rows * splits * (1 + 3 * nt),
            rows * splits * group, rows * cap, rows * nt, rows * nt, zeroed=2)
        tickets = tickets.view(_draws // group, MAX_PASSES + 4, rows)
        part_f, race_v, state_f, cand_x, cand_z, front_z = _scratch(
            torch.float32, device, rows * splits * (6 + nt), rows * splits * group, rows * _SF, rows * cap,
            rows * cap, rows * nt)
        state_i = torch.empty(rows * _SI, dtype=torch.int64, device=device)
    grid = (rows, splits)
    shape = dict(V=vocab, CHUNK=cfg["CHUNK"], SPLITS=splits)
    common = dict(BLOCK=cfg["BLOCK"], SPLITS_P2=triton.next_power_of_2(splits), num_warps=cfg["num_warps"])
    for i in range(_draws // group if rows else 0):  # one round, except for the tests' many draws
        lp = tokens if logprobs is None else logprobs[i]
        step_i = steps + i * group
        _stats_kernel[grid](logits, logits.stride(0), temperature, top_k, top_p, min_p, seeds, step_i, part_f,
                            part_i, race_v, race_i, state_f, state_i, tickets[i, 0], tokens[i], lp, **shape,
                            NT=nt, DRAWS=group, WANT_LP=want_logprobs, FUSE=cfg["FUSE"], **common)
        if shortcut:
            _candidates_kernel[grid](logits, logits.stride(0), temperature, min_p, seeds, step_i, cand_n, cand_i,
                                     cand_x, cand_z, front_i, front_z, front_k, state_f, state_i,
                                     tickets[i, MAX_PASSES + 2], tokens[i], lp, **shape, CAP=cfg["CAP"], NT=nt,
                                     WANT_LP=want_logprobs, BLOCK=cfg["BLOCK"], num_warps=cfg["num_warps"])
            _verify_kernel[grid](logits, logits.stride(0), temperature, part_f, part_i, front_i, front_z, front_k,
                                 state_f, state_i, tickets[i, MAX_PASSES + 3], tokens[i], lp, **shape,
                                 SBLOCK=cfg["SBLOCK"], NT=nt, WANT_LP=want_logprobs, **common)
            if cfg["SYNC"] and _debug is None and bool((state_i.view(rows, _SI)[:, 8] != 0).all()):
                continue  # the shortcut drew every row
        # Every pass is launched; rows that are done return at once. Asking the GPU whether any row still searched
        # (a sync after the statistics and after every 3 passes) measured slower on an H200 at 256 x 152k with
        # top-k 50 + top-p 0.9: 1.68 ms with FUSE on (results/h200-2026-11-28-c), against 1.27 with FUSE on and
        # 1.15-1.44 with it off without the checks (-b): the syncs leave the GPU idle while kernels are launched.
        for p in range(MAX_PASSES):
            _search_kernel[grid](logits, logits.stride(0), temperature, part_f, part_i, state_f, state_i,
                                 tickets[i, 1 + p], **shape, SBLOCK=cfg["SBLOCK"], NT=nt,
                                 VALUE_PASSES=VALUE_PASSES, MAX_PASSES=MAX_PASSES, **common)
        _draw_kernel[grid](logits, logits.stride(0), temperature, top_k, top_p, min_p, seeds, step_i, race_v,
                           race_i, state_f, state_i, tickets[i, MAX_PASSES + 1], tokens[i], lp,
                           tokens if _debug is None else _debug, **shape, DRAWS=group, WANT_LP=want_logprobs,
                           DEBUG=_debug is not None, **common)
    tokens = tokens.permute(1, 0, 2).reshape(rows, _draws)
    logprobs = None if logprobs is None else logprobs.permute(1, 0, 2).reshape(rows, _draws)
    if _draws == 1:
        tokens = tokens[:, 0]
        logprobs = None if logprobs is None else logprobs[:, 0]
    return tokens, logprobs


def _scratch(dtype: torch.dtype, device: torch.device, *sizes: int, zeroed: int = 0) -> list[torch.Tensor]:
    """Flat views of `sizes` elements carved from one allocation, each starting 128 bytes apart at least (the
    kernels are compiled for 16-byte-aligned pointers); the first `zeroed` of them zero-filled in one fill."""
    padded = [triton.cdiv(n, 32) * 32 for n in sizes]
    buffer = torch.empty(max(sum(padded), 1), dtype=dtype, device=device)
    if zeroed:
        buffer[:sum(padded[:zeroed])].zero_()
    starts = [sum(padded[:i]) for i in range(len(sizes))]
    return [buffer[start:start + n] for start, n in zip(starts, sizes)]


def float_key(x: torch.Tensor) -> torch.Tensor:
    """The kernel's order-preserving int32 key of fp32 values (for tests and debugging)."""
    bits = x.float().contiguous().view(torch.int32)
    return bits ^ ((bits >> 31) & 0x7FFFFFFF)
