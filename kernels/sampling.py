"""Fused sampling in Triton: temperature, top-k, top-p, min-p and one draw per row, without sorting the vocabulary.

`fused_sample(logits, temperature, top_k, top_p, min_p, seeds, steps, want_logprobs)` draws from the same
distribution as the reference `stage1.engine.sampler.filtered_probs` (softmax(logits / T), then top-k, top-p,
min-p; the most likely token always survives) and returns argmax for greedy rows (T == 0).

One program per row; every pass streams the row in chunks (no sort, no scratch memory):

1. Statistics: online max / sum-exp of x = logits / T, the raw argmax (first index on ties, like torch.argmax),
   the smallest x and, for logprobs, the log-sum-exp of the raw logits. A row with no filter on (only a
   temperature) also runs its draw here: one pass in all. Greedy rows stop here.
2. Threshold search, only for rows with top-k or top-p on. Both keep a prefix of the sorted distribution: a token
   of scaled logit v survives iff
       count(x > v) < k   and   mass(x > v) < top_p * sum        (mass: sum of exp(x - max))
   and both sides only grow as v falls, so the survivors are {x >= cut}. Each pass compares every element with NT
   pivots at once and accumulates, per pivot, the count and mass above it and the nearest token values above and
   below it; the bracket (lo, hi] (lo fails the condition, hi meets it) then shrinks to the pivots around the
   change, snapped to the nearest token values inside. Pivots are spaced evenly in value while the bracket is wide
   and in the order-preserving int32 key of the fp32 bits after, so the search is exact and bounded (at most
   4 + 8 passes; hi = lo + 1 in keys); it usually stops after 2-5 passes at Qwen's 152k vocabulary, as soon as
   the bracket holds a single token value (those tokens survive: what lies above them is what lies above hi).
   Survivors: key(x) > lo. On a GPU, chunks with nothing inside the bracket skip the per-pivot work (SKIP).
3. Draw: exponential race (Gumbel-max) among survivors, argmax of x_i - log(E_i), E_i = -log(U_i) ~ Exp(1),
   which picks token i with probability proportional to exp(x_i). Min-p (p_i >= min_p * p_max, i.e.
   exp(x_i - max) >= min_p) is applied here as a direct threshold.

Randomness is counter-based: U_i comes from Philox4x32-10 keyed by the row's 64-bit seed with counter
(i // 4, step) (output i % 4), so a row's token depends only on its logits, parameters, seed and step: never on
its neighbours, its batch position or the batch size, and a recomputed (preempted) sequence draws the same token.

Tie rule: tokens whose scaled logit equals the value at the cut all survive (the condition depends on the value
only), where the reference keeps whichever tied tokens its sort puts first; with continuous logits the two agree
exactly, up to fp32 rounding of the mass sums right at the top-p boundary. top_p = 1 is off: the reference's
cumsum can reach 1.0 early and drop a tail carrying ~1e-7 of the mass, this kernel keeps it.
Tokens more than 110 below the maximum scaled logit have probability exactly 0 in fp32: the search may drop them
from the survivors (they could never be drawn anyway). NaN logits are not supported.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_NEG_BIG = tl.constexpr(-3.0e38)  # a finite -inf for running maxima: exp(m_old - m_new) never sees inf - inf
_FLOOR = tl.constexpr(110.0)  # exp(-110) underflows to 0 in fp32: tokens this far below the max can never be drawn


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
        r = tl.reshape(tl.join(tl.join(r0, r2), tl.join(r1, r3)), [1, BLOCK])
    else:
        idx = (start + tl.arange(0, BLOCK))[None, :]
        steps = step + tl.arange(0, DRAWS).to(tl.int64)[:, None]
        r0, r1, r2, r3 = tl.randint4x(seed, (steps << 32) | (idx >> 2).to(tl.int64))
        lane = idx & 3
        r = tl.where(lane == 0, r0, tl.where(lane == 1, r1, tl.where(lane == 2, r2, r3)))
    u = ((r.to(tl.uint32, bitcast=True) >> 9).to(tl.float32) + 0.5) * 1.1920928955078125e-07
    return -tl.log(-tl.log(u))


@triton.jit
def _fused_sample_kernel(
    logits_ptr, stride_row, temp_ptr, topk_ptr, topp_ptr, minp_ptr, seed_ptr, step_ptr,
    tok_ptr, logprob_ptr, debug_ptr, V,
    BLOCK: tl.constexpr, SBLOCK: tl.constexpr, NT: tl.constexpr, SKIP: tl.constexpr, DRAWS: tl.constexpr,
    VALUE_PASSES: tl.constexpr, MAX_PASSES: tl.constexpr, WANT_LP: tl.constexpr, DEBUG: tl.constexpr,
):
    # keys: order-preserving int32 images of fp32 values, key = bits ^ ((bits >> 31) & 0x7FFFFFFF) (written
    # inline: nested jit calls are slow under the interpreter)
    row = tl.program_id(0)
    base = logits_ptr + row.to(tl.int64) * stride_row
    temp = tl.load(temp_ptr + row)
    greedy = temp <= 0.0
    t = tl.where(greedy, 1.0, temp)
    k = tl.load(topk_ptr + row).to(tl.int64)
    k = tl.where((k <= 0) | (k > V), V, k)
    top_p = tl.load(topp_ptr + row)
    min_p = tl.load(minp_ptr + row)
    seed = tl.load(seed_ptr + row)
    step = tl.load(step_ptr + row)
    p_off = top_p >= 1.0
    need = (~greedy) & ((k < V) | (~p_off))  # a threshold search is needed
    fuse = (~greedy) & (~need) & (min_p <= 0.0)  # nothing to filter: draw during the first pass

    # ---- pass 1: statistics (and the draw itself when nothing is filtered) ----------------------------------
    offs = tl.arange(0, BLOCK)
    m_vec = tl.full([BLOCK], _NEG_BIG, tl.float32)
    s_vec = tl.zeros([BLOCK], tl.float32)
    xmin_vec = tl.full([BLOCK], float("inf"), tl.float32)
    a_val = tl.full([BLOCK], float("-inf"), tl.float32)
    a_idx = tl.zeros([BLOCK], tl.int32)
    r_s = tl.zeros([BLOCK], tl.float32)
    r_m = tl.full([BLOCK], _NEG_BIG, tl.float32)
    b_val = tl.full([DRAWS, BLOCK], float("-inf"), tl.float32)  # the race: best score per lane (and draw)
    b_idx = tl.zeros([DRAWS, BLOCK], tl.int32)
    for start in range(0, V, BLOCK):
        idx = start + offs
        mask = idx < V
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
        if fuse:
            score = tl.where(mask[None, :], x[None, :] + _gumbel(seed, step, start, BLOCK, DRAWS), float("-inf"))
            better2 = score > b_val
            b_val = tl.where(better2, score, b_val)
            b_idx = tl.where(better2, idx[None, :], b_idx)
    m = tl.max(m_vec, axis=0)
    s = tl.sum(s_vec * tl.exp(m_vec - m), axis=0)
    xmin = tl.min(xmin_vec, axis=0)
    amax = tl.max(a_val, axis=0)
    argmax = tl.min(tl.where(a_val == amax, a_idx, V), axis=0)
    # reduce the race so far (fused rows) and the raw log-sum-exp now: fewer registers live through the search
    f_best = tl.max(b_val, axis=1)
    f_tok = tl.min(tl.where(b_val == f_best[:, None], b_idx, V), axis=1)
    if WANT_LP:
        rm = tl.max(r_m, axis=0)
        lse = rm + tl.log(tl.sum(r_s * tl.exp(r_m - rm), axis=0))

    # ---- passes 2..: threshold search for top-k / top-p ----------------------------------------------------
    mass_cap = tl.where(p_off, float("inf"), top_p * s)  # top_p = 1: off (no rounding of the mass can cut)
    floor_v = m - _FLOOR
    floor_v = tl.where(min_p > 0.0, tl.maximum(floor_v, m + tl.log(tl.maximum(min_p, 1e-30)) - 0.01), floor_v)
    bits = tl.maximum(floor_v, xmin).to(tl.int32, bitcast=True)
    lo = (bits ^ ((bits >> 31) & 0x7FFFFFFF)).to(tl.int64) - 1  # candidates: keys > lo (lo fails, once searched)
    bits = m.to(tl.int32, bitcast=True)
    hi = (bits ^ ((bits >> 31) & 0x7FFFFFFF)).to(tl.int64)  # passes: nothing is above the max
    c_lo = tl.full((), 0, tl.int64) + V  # count above lo (a placeholder > c_hi + 1 forces a first pass)
    c_hi = tl.full((), 0, tl.int64)  # count above hi
    passes = tl.full((), 0, tl.int32)
    j = tl.arange(0, NT)
    soffs = tl.arange(0, SBLOCK)
    while need & (c_lo - c_hi > 1) & (hi - lo > 1) & (passes < MAX_PASSES):
        # pivots: the first pass includes lo itself (does everything above the floor survive?); later passes
        # split (lo, hi) into NT + 1 equal parts, in value while the bracket is wide, then in key
        num = tl.where(passes == 0, j, j + 1).to(tl.int64)
        den = tl.where(passes == 0, NT, NT + 1).to(tl.int64)
        by_key = lo + (hi - lo) * num // den
        lo32 = lo.to(tl.int32)
        hi32 = hi.to(tl.int32)
        lo_v = (lo32 ^ ((lo32 >> 31) & 0x7FFFFFFF)).to(tl.float32, bitcast=True)
        hi_v = (hi32 ^ ((hi32 >> 31) & 0x7FFFFFFF)).to(tl.float32, bitcast=True)
        bits_p = (lo_v + (hi_v - lo_v) * (num.to(tl.float32) / den.to(tl.float32))).to(tl.int32, bitcast=True)
        by_val = (bits_p ^ ((bits_p >> 31) & 0x7FFFFFFF)).to(tl.int64)
        by_val = tl.minimum(tl.maximum(by_val, lo), hi)
        use_key = (passes >= VALUE_PASSES) | (hi - lo <= (1 << 24))
        piv = tl.where(use_key, by_key, by_val).to(tl.int32)
        cnt = tl.zeros([NT, SBLOCK], tl.int32)  # per pivot: count above it
        mass = tl.zeros([NT, SBLOCK], tl.float32)  # mass (exp(x - m)) above it
        min_above = tl.full([NT, SBLOCK], 2147483647, tl.int32)  # smallest key above it
        max_below = tl.full([NT, SBLOCK], -2147483648, tl.int32)  # largest key at or below it
        # SKIP: elements outside (lo, hi] are above every pivot (> hi) or below every one (<= lo); they go to
        # per-lane sums, and a chunk with nothing inside the bracket skips the per-pivot work
        cnt_hi = tl.zeros([SBLOCK], tl.int32)
        mass_hi = tl.zeros([SBLOCK], tl.float32)
        min_hi = tl.full([SBLOCK], 2147483647, tl.int32)
        max_lo = tl.full([SBLOCK], -2147483648, tl.int32)
        for start in range(0, V, SBLOCK):
            idx = start + soffs
            mask = idx < V
            x = tl.math.div_rn(tl.load(base + idx, mask=mask, other=float("-inf")).to(tl.float32), t)
            e = tl.exp(x - m)
            xb = x.to(tl.int32, bitcast=True)
            key = tl.where(mask, xb ^ ((xb >> 31) & 0x7FFFFFFF), -2147483648)
            if SKIP:
                above_hi = key > hi32
                inside = (key > lo32) & (~above_hi)
                cnt_hi += above_hi.to(tl.int32)
                mass_hi += tl.where(above_hi, e, 0.0)
                min_hi = tl.minimum(min_hi, tl.where(above_hi, key, 2147483647))
                max_lo = tl.maximum(max_lo, tl.where(key <= lo32, key, -2147483648))
                if tl.max(inside.to(tl.int32), axis=0) > 0:
                    above = (key[None, :] > piv[:, None]) & inside[None, :]
                    below = (key[None, :] <= piv[:, None]) & inside[None, :]
                    cnt += above.to(tl.int32)
                    mass += tl.where(above, e[None, :], 0.0)
                    min_above = tl.minimum(min_above, tl.where(above, key[None, :], 2147483647))
                    max_below = tl.maximum(max_below, tl.where(below, key[None, :], -2147483648))
            else:
                above = key[None, :] > piv[:, None]
                cnt += above.to(tl.int32)
                mass += tl.where(above, e[None, :], 0.0)
                min_above = tl.minimum(min_above, tl.where(above, key[None, :], 2147483647))
                max_below = tl.maximum(max_below, tl.where(above, -2147483648, key[None, :]))
        c = tl.sum(cnt, axis=1).to(tl.int64)
        mm = tl.sum(mass, axis=1)
        mab = tl.min(min_above, axis=1).to(tl.int64)
        mbe = tl.max(max_below, axis=1).to(tl.int64)
        if SKIP:
            c += tl.sum(cnt_hi, axis=0)
            mm += tl.sum(mass_hi, axis=0)
            mab = tl.minimum(mab, tl.min(min_hi, axis=0))
            mbe = tl.maximum(mbe, tl.max(max_lo, axis=0))
        ok = (c < k) & (mm < mass_cap)
        pv = piv.to(tl.int64)
        # the new bracket: the largest failing pivot and the smallest passing one, each snapped to the nearest
        # token value inside (counts and masses above them do not change, so neither does the condition)
        lo_piv = tl.max(tl.where(ok, -(1 << 40), pv), axis=0)  # -(1 << 40): no pivot failed
        hi_piv = tl.min(tl.where(ok, pv, 1 << 40), axis=0)  # 1 << 40: every pivot failed
        at_lo = (~ok) & (pv == lo_piv)
        at_hi = ok & (pv == hi_piv)
        has_lo = lo_piv > -(1 << 40)
        has_hi = hi_piv < (1 << 40)
        lo = tl.where(has_lo, tl.max(tl.where(at_lo, mab, -(1 << 40)), axis=0) - 1, lo)
        hi = tl.where(has_hi, tl.max(tl.where(at_hi, mbe, -(1 << 40)), axis=0), hi)
        c_lo = tl.where(has_lo, tl.max(tl.where(at_lo, c, -1), axis=0), c_lo)
        c_hi = tl.where(has_hi, tl.max(tl.where(at_hi, c, -1), axis=0), c_hi)
        passes += 1
    cut = tl.where(need, lo, -2147483648).to(tl.int32)  # survivors: key(x) > cut (and min-p)

    # ---- last pass: exponential race among survivors (Gumbel-max) -------------------------------------------
    b_val = tl.full([DRAWS, BLOCK], float("-inf"), tl.float32)
    b_idx = tl.zeros([DRAWS, BLOCK], tl.int32)
    draw_end = tl.where(greedy | fuse, 0, V)
    for start in range(0, draw_end, BLOCK):
        idx = start + offs
        mask = idx < V
        x = tl.math.div_rn(tl.load(base + idx, mask=mask, other=float("-inf")).to(tl.float32), t)
        xb = x.to(tl.int32, bitcast=True)
        keep = mask & ((xb ^ ((xb >> 31) & 0x7FFFFFFF)) > cut) & (tl.exp(x - m) >= min_p)
        if (not SKIP) or (tl.max(keep.to(tl.int32), axis=0) > 0):
            score = tl.where(keep[None, :], x[None, :] + _gumbel(seed, step, start, BLOCK, DRAWS), float("-inf"))
            better2 = score > b_val
            b_val = tl.where(better2, score, b_val)
            b_idx = tl.where(better2, idx[None, :], b_idx)
    best = tl.max(b_val, axis=1)
    drawn = tl.min(tl.where(b_val == best[:, None], b_idx, V), axis=1)
    best = tl.where(fuse, f_best, best)
    drawn = tl.where(fuse, f_tok, drawn)
    token = tl.where(greedy, argmax, tl.where(best == float("-inf"), argmax, drawn))  # [DRAWS]
    outs = row * DRAWS + tl.arange(0, DRAWS)
    tl.store(tok_ptr + outs, token.to(tl.int64))
    if WANT_LP:
        chosen = tl.load(base + token).to(tl.float32)
        tl.store(logprob_ptr + outs, chosen - lse)
    if DEBUG:  # for tests: the survivor cut (key) and how many search passes ran
        tl.store(debug_ptr + 2 * row, cut.to(tl.int64))
        tl.store(debug_ptr + 2 * row + 1, passes.to(tl.int64))


# Compiled (GPU) launch parameters: BLOCK elements per chunk in the first and last passes, SBLOCK per chunk and NT
# pivots in the search passes (NT x SBLOCK accumulators: registers), SKIP the per-chunk test that skips pivot work
# for chunks with nothing inside the search bracket. Not yet tuned on a GPU (no timings so far): these compile
# for sm_90 (ptxas: 128 registers, no spills); `python benchmarks/kernels_sampling.py --sweep` compares
# alternatives on a GPU.
GPU_CONFIG = dict(BLOCK=2048, SBLOCK=256, NT=16, SKIP=True, num_warps=16)


def _config(logits: torch.Tensor, draws: int) -> dict:
    """Block sizes. `draws` > 1 (the tests' hook) works on [draws, BLOCK] tiles: they are kept small."""
    vocab = logits.shape[-1]
    if logits.is_cuda:
        if draws > 1:
            return dict(GPU_CONFIG, BLOCK=256, num_warps=8, group=min(draws, 16))
        return dict(GPU_CONFIG, group=1)
    # Triton interpreter (numpy underneath): few, large chunks; SKIP's per-chunk reductions only cost time here
    block = min(8192, max(16, triton.next_power_of_2(vocab)))
    return dict(BLOCK=block, SBLOCK=min(4096, block), NT=16, SKIP=False, num_warps=4,
                group=min(draws, max(1, (1 << 20) // block)))


def fused_sample(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
                 min_p: torch.Tensor, seeds: torch.Tensor, steps: torch.Tensor, want_logprobs: bool = False, *,
                 _draws: int = 1, _debug: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One token per row of `logits` [rows, vocab] (fp32/bf16/fp16), and optionally its raw logprob.

    Per-row tensors (on the logits' device): temperature fp32 (0 = greedy: argmax, first index on ties), top_k
    integer (0, or >= vocab: off), top_p fp32 in (0, 1] (1: off), min_p fp32 in [0, 1] (0: off), seeds int64 (the
    Philox key), steps int64 (tokens the sequence has generated so far; the Philox counter's high word, < 2**32).
    Returns int64 tokens [rows] and, when `want_logprobs`, fp32 log_softmax(logits)[row, token] (the raw,
    unscaled distribution, as `token_logprobs` reports), else None.

    Test hooks: `_draws` = D > 1 (a power of two) draws D tokens per row, for steps step .. step + D - 1, from one
    threshold search (tokens [rows, D], each the token a call with that step would draw); `_debug`, an int64
    [rows, 2] tensor, receives each row's survivor cut (survivors: `float_key(logits / T) > cut` and min-p) and
    the number of search passes.
    """
    if logits.dim() != 2:
        raise ValueError(f"fused_sample: logits must be [rows, vocab], got {tuple(logits.shape)}")
    if _draws < 1 or _draws & (_draws - 1):
        raise ValueError(f"fused_sample: _draws must be a power of two, got {_draws}")
    rows, vocab = logits.shape
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
    cfg = _config(logits, _draws)
    group = cfg["group"]
    tokens = torch.empty(_draws // group, rows, group, dtype=torch.int64, device=device)
    logprobs = torch.empty(_draws // group, rows, group, dtype=torch.float32, device=device) if want_logprobs else None
    for i in range(_draws // group if rows else 0):  # one launch, except for the tests' many draws
        _fused_sample_kernel[(rows,)](
            logits, logits.stride(0), temperature, top_k, top_p, min_p, seeds, steps + i * group, tokens[i],
            tokens if logprobs is None else logprobs[i], tokens if _debug is None else _debug, vocab,
            BLOCK=cfg["BLOCK"], SBLOCK=cfg["SBLOCK"], NT=cfg["NT"], SKIP=cfg["SKIP"], DRAWS=group,
            VALUE_PASSES=4, MAX_PASSES=16, WANT_LP=want_logprobs, DEBUG=_debug is not None,
            num_warps=cfg["num_warps"],
        )
    tokens = tokens.permute(1, 0, 2).reshape(rows, _draws)
    logprobs = None if logprobs is None else logprobs.permute(1, 0, 2).reshape(rows, _draws)
    if _draws == 1:
        tokens = tokens[:, 0]
        logprobs = None if logprobs is None else logprobs[:, 0]
    return tokens, logprobs


def float_key(x: torch.Tensor) -> torch.Tensor:
    """The kernel's order-preserving int32 key of fp32 values (for tests and debugging)."""
    bits = x.float().contiguous().view(torch.int32)
    return bits ^ ((bits >> 31) & 0x7FFFFFFF)
