"""The sampler's threshold search (step 2 of launch.py's docstring): one launch per pass narrows each
searching row's bracket (lo, hi] around the survivors' cut; and the per-pivot counting that the shortcut's verify
pass shares."""

from __future__ import annotations

import triton
import triton.language as tl

from .common import (_COUNT_HI, _COUNT_LO, _HI, _INT_MAX, _INT_MIN, _K, _LO, _M, _MASS_CAP, _MASS_HI,
                     _NONE, _PASSES, _PF_MASS, _PI_COUNT, _SEARCH, STATE_F, STATE_I, _key, _unkey)

VALUE_PASSES = 4  # search passes with pivots spaced in value (while the bracket is wide)
# 4 value passes + at most 8 key passes: each key pass leaves at most ceil(width / 17) of the bracket, and 8 of them
# take 2**32 keys down to 1 (252645136, 14861479, 874205, 51424, 3025, 178, 11, 1). One launch per pass.
MAX_PASSES = 12


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
    si = state_i_ptr + row * STATE_I
    sf = state_f_ptr + row * STATE_F
    lo = tl.load(si + _LO)
    hi = tl.load(si + _HI)
    c_lo = tl.load(si + _COUNT_LO)
    c_hi = tl.load(si + _COUNT_HI)
    passes = tl.load(si + _PASSES)
    if (tl.load(si + _SEARCH) != 0) & (c_lo - c_hi > 1) & (hi - lo > 1) & (passes < MAX_PASSES):
        base = logits_ptr + row.to(tl.int64) * stride_row
        temp = tl.load(temp_ptr + row)
        t = tl.where(temp <= 0.0, 1.0, temp)
        m = tl.load(sf + _M)
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
        pi = part_i_ptr + slot * (_PI_COUNT + 3 * NT) + _PI_COUNT
        tl.store(pi + j, cnt)
        tl.store(pi + NT + j, min_above)
        tl.store(pi + 2 * NT + j, max_below)
        tl.store(part_f_ptr + slot * (_PF_MASS + NT) + _PF_MASS + j, mass)

        tl.debug_barrier()  # as in _stats_kernel
        if tl.atomic_add(ticket_ptr + row, 1, sem="acq_rel") == SPLITS - 1:
            sp = tl.arange(0, SPLITS_P2)
            valid = (sp < SPLITS)[:, None]
            at = (row * SPLITS + sp)[:, None] * (_PI_COUNT + 3 * NT) + _PI_COUNT + j[None, :]  # [SPLITS_P2, NT]
            # tokens above hi are above every pivot, tokens at or under lo under every one: their count and mass
            # are known; for the nearest keys, hi + 1 and lo stand in for them (no token lies strictly between)
            c = tl.sum(tl.load(part_i_ptr + at, mask=valid, other=0, cache_modifier=".cg"), axis=0).to(tl.int64)
            c += c_hi
            mab = tl.min(tl.load(part_i_ptr + at + NT, mask=valid, other=_INT_MAX, cache_modifier=".cg"), axis=0)
            mab = tl.minimum(mab.to(tl.int64), hi + 1)
            mbe = tl.max(tl.load(part_i_ptr + at + 2 * NT, mask=valid, other=_INT_MIN, cache_modifier=".cg"), axis=0)
            mbe = tl.maximum(mbe.to(tl.int64), lo)
            atf = (row * SPLITS + sp)[:, None] * (_PF_MASS + NT) + _PF_MASS + j[None, :]
            mm = tl.sum(tl.load(part_f_ptr + atf, mask=valid, other=0.0, cache_modifier=".cg"), axis=0)
            mm += tl.load(sf + _MASS_HI)
            ok = (c < tl.load(si + _K)) & (mm < tl.load(sf + _MASS_CAP))
            pv = piv.to(tl.int64)
            # the new bracket: the largest failing pivot and the smallest passing one, each snapped to the nearest
            # token value inside (counts and masses above them do not change, so neither does the condition)
            lo_piv = tl.max(tl.where(ok, -_NONE, pv), axis=0)
            hi_piv = tl.min(tl.where(ok, pv, _NONE), axis=0)
            at_lo = (~ok) & (pv == lo_piv)
            at_hi = ok & (pv == hi_piv)
            has_lo = lo_piv > -_NONE
            has_hi = hi_piv < _NONE
            tl.store(si + _LO, tl.where(has_lo, tl.max(tl.where(at_lo, mab, -_NONE), axis=0) - 1, lo))
            tl.store(si + _HI, tl.where(has_hi, tl.max(tl.where(at_hi, mbe, -_NONE), axis=0), hi))
            tl.store(si + _COUNT_LO, tl.where(has_lo, tl.max(tl.where(at_lo, c, -1), axis=0), c_lo))
            tl.store(si + _COUNT_HI, tl.where(has_hi, tl.max(tl.where(at_hi, c, -1), axis=0), c_hi))
            tl.store(sf + _MASS_HI, tl.where(has_hi, tl.max(tl.where(at_hi, mm, -1.0), axis=0), tl.load(sf + _MASS_HI)))
            tl.store(si + _PASSES, passes + 1)
