"""The sampler's first pass (step 1 of launch.py's docstring): the rows' statistics, their initial state,
and the draws that need nothing more (greedy rows; with FUSE, rows with only a temperature)."""

from __future__ import annotations

import triton
import triton.language as tl

from .common import (_ARGMAX, _BY_STATS, _COUNT_HI, _COUNT_LO, _DONE, _FLOOR, _FRONT, _HI, _K, _LO, _M,
                     _MASS_CAP, _MASS_HI, _NEG_BIG, _OPEN, _PASSES, _PF_AMAX, _PF_M, _PF_MASS, _PF_S,
                     _PF_XMIN, _PI_ARGMAX, _PI_COUNT, _S, _SEARCH, _Z_TOP, STATE_F, STATE_I, _gumbel_at,
                     _key, _merge_race, _race, _row_params, _store_chunk_winner)


@triton.jit
def _stats_kernel(
    logits_ptr, stride_row, temp_ptr, topk_ptr, topp_ptr, minp_ptr, seed_ptr, step_ptr, share_ptr,
    part_f_ptr, part_i_ptr, race_v_ptr, race_i_ptr, state_f_ptr, state_i_ptr, ticket_ptr, tok_ptr,
    V, CHUNK, SPLITS,
    BLOCK: tl.constexpr, NT: tl.constexpr, SPLITS_P2: tl.constexpr, FUSE: tl.constexpr, HAS_SHARE: tl.constexpr,
):
    """Program (row, chunk): pass 1 over the chunk; the row's last program merges the chunks, sets up the row's
    state (the search bracket, the shortcut's bound) and finishes greedy and, with FUSE, unfiltered rows."""
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
    b_val = tl.full([BLOCK], float("-inf"), tl.float32)  # the race: best score per lane
    b_idx = tl.zeros([BLOCK], tl.int32)
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
        if FUSE:  # (compiled out when off: the noise's registers would cost the other rows occupancy)
            if fuse:
                b_val, b_idx = _race(b_val, b_idx, mask, x, idx, seed, step, start, BLOCK)
    m_p = tl.max(m_vec, axis=0)
    amax_p = tl.max(a_val, axis=0)
    slot = row * SPLITS + split
    pf = part_f_ptr + slot * (_PF_MASS + NT)
    tl.store(pf + _PF_M, m_p)
    tl.store(pf + _PF_S, tl.sum(s_vec * tl.exp(m_vec - m_p), axis=0))
    tl.store(pf + _PF_XMIN, tl.min(xmin_vec, axis=0))
    tl.store(pf + _PF_AMAX, amax_p)
    tl.store(part_i_ptr + slot * (_PI_COUNT + 3 * NT) + _PI_ARGMAX,
             tl.min(tl.where(a_val == amax_p, a_idx, V), axis=0))
    _store_chunk_winner(race_v_ptr, race_i_ptr, slot, b_val, b_idx, V)

    # the row's last program to finish merges: the barrier orders all this program's stores before the ticket, and
    # the ticket's acquire/release makes every chunk's stores visible to the last one
    tl.debug_barrier()
    if tl.atomic_add(ticket_ptr + row, 1, sem="acq_rel") == SPLITS - 1:
        sp = tl.arange(0, SPLITS_P2)
        valid = sp < SPLITS
        pfs = part_f_ptr + (row * SPLITS + sp) * (_PF_MASS + NT)
        pm = tl.load(pfs + _PF_M, mask=valid, other=_NEG_BIG, cache_modifier=".cg")
        m = tl.max(pm, axis=0)
        s = tl.sum(tl.load(pfs + _PF_S, mask=valid, other=0.0, cache_modifier=".cg") * tl.exp(pm - m), axis=0)
        xmin = tl.min(tl.load(pfs + _PF_XMIN, mask=valid, other=float("inf"), cache_modifier=".cg"), axis=0)
        pa = tl.load(pfs + _PF_AMAX, mask=valid, other=float("-inf"), cache_modifier=".cg")
        pai = tl.load(part_i_ptr + (row * SPLITS + sp) * (_PI_COUNT + 3 * NT) + _PI_ARGMAX, mask=valid, other=V,
                      cache_modifier=".cg")
        argmax = tl.min(tl.where(pa == tl.max(pa, axis=0), pai, V), axis=0)
        # the bracket's floor: nothing under it can survive (see launch.py's docstring)
        floor_v = m - _FLOOR
        floor_v = tl.where(min_p > 0.0, tl.maximum(floor_v, m + tl.log(tl.maximum(min_p, 1e-30)) - 0.01), floor_v)
        mass_floor = m + tl.log(tl.maximum((1.0 - top_p) * s / V, 1e-37)) - 0.1
        floor_v = tl.where(p_off, floor_v, tl.maximum(floor_v, mass_floor))
        sf = state_f_ptr + row * STATE_F
        tl.store(sf + _M, m)
        tl.store(sf + _S, s)
        tl.store(sf + _MASS_HI, 0.0)  # nothing is above the max
        # top-p's mass is measured over top-k's survivors (share_ptr: their share of the row's mass, 1 without
        # top-k); top_p = 1: off (no rounding can cut)
        cap = top_p * s
        if HAS_SHARE:
            cap = cap * tl.load(share_ptr + row)
        tl.store(sf + _MASS_CAP, tl.where(p_off, float("inf"), cap))
        si = state_i_ptr + row * STATE_I
        tl.store(si + _LO, _key(tl.maximum(floor_v, xmin)).to(tl.int64) - 1)  # keys > lo are candidates
        tl.store(si + _HI, _key(m).to(tl.int64))  # the max passes
        tl.store(si + _COUNT_LO, V)  # a placeholder > count above hi + 1 forces a first pass
        tl.store(si + _COUNT_HI, 0)
        tl.store(si + _PASSES, 0)
        tl.store(si + _K, k)
        tl.store(si + _ARGMAX, argmax)
        tl.store(si + _SEARCH, need.to(tl.int64))
        tl.store(si + _DONE, tl.where(greedy | fuse, _BY_STATS, _OPEN).to(tl.int64))
        tl.store(si + _FRONT, -1)  # no shortcut front (yet)
        # the top token always survives: the winner's race score is at least its score (the shortcut's bound)
        top = argmax + tl.zeros([1], tl.int32)
        z_top = tl.math.div_rn(tl.load(base + top).to(tl.float32), t) + _gumbel_at(seed, step, top)
        tl.store(sf + _Z_TOP, tl.sum(z_top, axis=0))
        if greedy | fuse:
            f_best, f_tok = _merge_race(race_v_ptr, race_i_ptr, row, SPLITS, V, SPLITS_P2)
            token = tl.where(greedy, argmax, tl.where(f_best == float("-inf"), argmax, f_tok))
            tl.store(tok_ptr + row, token.to(tl.int64))
