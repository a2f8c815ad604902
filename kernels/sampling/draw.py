"""The sampler's last pass (step 3 of launch.py's docstring): the exponential race among each open row's
survivors."""

from __future__ import annotations

import triton
import triton.language as tl

from .common import (_ARGMAX, _DONE, _M, _OPEN, STATE_F, STATE_I, _merge_race, _race, _store_chunk_winner,
                     _survivor_cut)


@triton.jit
def _draw_kernel(
    logits_ptr, stride_row, temp_ptr, minp_ptr, seed_ptr, step_ptr,
    race_v_ptr, race_i_ptr, state_f_ptr, state_i_ptr, ticket_ptr, tok_ptr,
    V, CHUNK, SPLITS,
    BLOCK: tl.constexpr, SPLITS_P2: tl.constexpr,
):
    """Program (row, chunk): the race among the chunk's survivors; the row's last program picks the winner.
    Rows already drawn (greedy, and with FUSE temperature-only, in _stats_kernel; others by the shortcut) return."""
    row = tl.program_id(0)
    split = tl.program_id(1)
    si = state_i_ptr + row * STATE_I
    if tl.load(si + _DONE) == _OPEN:  # open rows are sampled (greedy ones are done): T > 0
        base = logits_ptr + row.to(tl.int64) * stride_row
        t = tl.load(temp_ptr + row)
        min_p = tl.load(minp_ptr + row)
        seed = tl.load(seed_ptr + row)
        step = tl.load(step_ptr + row)
        cut = _survivor_cut(si)
        m = tl.load(state_f_ptr + row * STATE_F + _M)
        begin = split * CHUNK
        end = tl.minimum(begin + CHUNK, V)
        offs = tl.arange(0, BLOCK)
        b_val = tl.full([BLOCK], float("-inf"), tl.float32)
        b_idx = tl.zeros([BLOCK], tl.int32)
        for start in range(begin, end, BLOCK):
            idx = start + offs
            mask = idx < end
            x = tl.math.div_rn(tl.load(base + idx, mask=mask, other=float("-inf")).to(tl.float32), t)
            xb = x.to(tl.int32, bitcast=True)
            keep = mask & ((xb ^ ((xb >> 31) & 0x7FFFFFFF)) > cut) & (tl.exp(x - m) >= min_p)
            if tl.max(keep.to(tl.int32), axis=0) > 0:  # the noise only where something survives
                b_val, b_idx = _race(b_val, b_idx, keep, x, idx, seed, step, start, BLOCK)
        _store_chunk_winner(race_v_ptr, race_i_ptr, row * SPLITS + split, b_val, b_idx, V)
        tl.debug_barrier()  # as in _stats_kernel
        if tl.atomic_add(ticket_ptr + row, 1, sem="acq_rel") == SPLITS - 1:
            best, drawn = _merge_race(race_v_ptr, race_i_ptr, row, SPLITS, V, SPLITS_P2)
            token = tl.where(best == float("-inf"), tl.load(si + _ARGMAX), drawn)
            tl.store(tok_ptr + row, token.to(tl.int64))
