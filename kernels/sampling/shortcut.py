"""The sampler's race shortcut (step 1b of launch.py's docstring): two launches that draw most rows
without the threshold search, from the few tokens that can outscore the top token in the race."""

from __future__ import annotations

import triton
import triton.language as tl

from .common import (_ARGMAX, _BY_SHORTCUT, _DONE, _FRONT, _GMAX, _INT_MAX, _K, _M, _MASS_CAP, _OPEN,
                     _PF_MASS, _PI_COUNT, _SEARCH, _Z_TOP, STATE_F, STATE_I, _gumbel, _key)
from .search import _pivot_sums

_JB = tl.constexpr(16)  # candidates compared at a time in the dominance test


@triton.jit
def _candidates_kernel(
    logits_ptr, stride_row, temp_ptr, minp_ptr, seed_ptr, step_ptr,
    cand_n_ptr, cand_i_ptr, cand_x_ptr, cand_z_ptr, front_i_ptr, front_z_ptr, front_k_ptr,
    state_f_ptr, state_i_ptr, ticket_ptr, tok_ptr,
    V, CHUNK, SPLITS,
    BLOCK: tl.constexpr, CAP: tl.constexpr, NT: tl.constexpr,
):
    """The shortcut, part 1. Program (row, chunk): gathers the tokens that beat the top token's race score (the
    row's count by an atomic, at most CAP of them stored); the row's last program keeps those that no other beats
    at a value as high (the front, at most NT) for _verify_kernel, or draws at once: the top token when none beat
    it, the best of them when the row has no top-k / top-p (min-p is applied here). A row with more than CAP
    candidates or NT front tokens is left to the threshold search."""
    row = tl.program_id(0)
    split = tl.program_id(1)
    si = state_i_ptr + row * STATE_I
    sf = state_f_ptr + row * STATE_F
    if tl.load(si + _DONE) == _OPEN:
        base = logits_ptr + row.to(tl.int64) * stride_row
        temp = tl.load(temp_ptr + row)
        t = tl.where(temp <= 0.0, 1.0, temp)
        min_p = tl.load(minp_ptr + row)
        seed = tl.load(seed_ptr + row)
        step = tl.load(step_ptr + row)
        m = tl.load(sf + _M)
        z_top = tl.load(sf + _Z_TOP)
        top = tl.load(si + _ARGMAX).to(tl.int32)
        begin = split * CHUNK
        end = tl.minimum(begin + CHUNK, V)
        offs = tl.arange(0, BLOCK)
        for start in range(begin, end, BLOCK):
            idx = start + offs
            x = tl.math.div_rn(tl.load(base + idx, mask=idx < end, other=float("-inf")).to(tl.float32), t)
            # x + _GMAX < z_top: no noise can lift the token past the top one's score
            maybe = (idx < end) & (x + _GMAX >= z_top) & (tl.exp(x - m) >= min_p)
            if tl.max(maybe.to(tl.int32), axis=0) > 0:
                z = x + _gumbel(seed, step, start, BLOCK)
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
                    tl.store(si + _FRONT, nf)
                    if (nf == 0) | (tl.load(si + _SEARCH) == 0):  # nothing beats the top token, or nothing to check
                        best = tl.max(tl.where(front, cz, float("-inf")), axis=0)
                        token = tl.min(tl.where(front & (cz == best), ci, V), axis=0)
                        token = tl.where(nf == 0, top, token)
                        _finish(tok_ptr, si, row, token)


@triton.jit
def _verify_kernel(
    logits_ptr, stride_row, temp_ptr, part_f_ptr, part_i_ptr, front_i_ptr, front_z_ptr, front_k_ptr,
    state_f_ptr, state_i_ptr, ticket_ptr, tok_ptr,
    V, CHUNK, SPLITS,
    BLOCK: tl.constexpr, SBLOCK: tl.constexpr, NT: tl.constexpr, SPLITS_P2: tl.constexpr,
):
    """The shortcut, part 2. Program (row, chunk): count and mass above each front token (its scaled logit as a
    pivot); the row's last program applies the survivor condition to each and draws the best survivor by race
    score (the top token, which always survives, when none does)."""
    row = tl.program_id(0)
    split = tl.program_id(1)
    si = state_i_ptr + row * STATE_I
    sf = state_f_ptr + row * STATE_F
    nf = tl.load(si + _FRONT)
    if (tl.load(si + _DONE) == _OPEN) & (nf > 0):
        base = logits_ptr + row.to(tl.int64) * stride_row
        temp = tl.load(temp_ptr + row)
        t = tl.where(temp <= 0.0, 1.0, temp)
        j = tl.arange(0, NT)
        valid = j < nf
        piv = tl.load(front_k_ptr + row * NT + j, mask=valid, other=_INT_MAX)
        begin = split * CHUNK
        end = tl.minimum(begin + CHUNK, V)
        # only tokens above the lowest pivot are above any
        cnt, mass, _unused_min, _unused_max = _pivot_sums(base, t, tl.load(sf + _M), piv, tl.min(piv, axis=0),
                                                          _INT_MAX, begin, end, BLOCK, SBLOCK, NT, NEAREST=False,
                                                          SKIP_EMPTY=True)
        slot = row * SPLITS + split
        tl.store(part_i_ptr + slot * (_PI_COUNT + 3 * NT) + _PI_COUNT + j, cnt)
        tl.store(part_f_ptr + slot * (_PF_MASS + NT) + _PF_MASS + j, mass)
        tl.debug_barrier()  # as in _stats_kernel
        if tl.atomic_add(ticket_ptr + row, 1, sem="acq_rel") == SPLITS - 1:
            sp = tl.arange(0, SPLITS_P2)
            in_row = (sp < SPLITS)[:, None]
            at = (row * SPLITS + sp)[:, None] * (_PI_COUNT + 3 * NT) + _PI_COUNT + j[None, :]
            c = tl.sum(tl.load(part_i_ptr + at, mask=in_row, other=0, cache_modifier=".cg"), axis=0).to(tl.int64)
            atf = (row * SPLITS + sp)[:, None] * (_PF_MASS + NT) + _PF_MASS + j[None, :]
            mm = tl.sum(tl.load(part_f_ptr + atf, mask=in_row, other=0.0, cache_modifier=".cg"), axis=0)
            survives = valid & (c < tl.load(si + _K)) & (mm < tl.load(sf + _MASS_CAP))
            fz = tl.load(front_z_ptr + row * NT + j, mask=survives, other=float("-inf"))
            fi = tl.load(front_i_ptr + row * NT + j, mask=survives, other=V)
            best = tl.max(fz, axis=0)
            token = tl.min(tl.where(survives & (fz == best), fi, V), axis=0)
            token = tl.where(tl.max(survives.to(tl.int32), axis=0) > 0, token, tl.load(si + _ARGMAX).to(tl.int32))
            _finish(tok_ptr, si, row, token)


@triton.jit
def _finish(tok_ptr, si, row, token):
    """The shortcut's draw: store the token and mark the row done (and not to search)."""
    tl.store(tok_ptr + row, token.to(tl.int64))
    tl.store(si + _SEARCH, 0)
    tl.store(si + _DONE, _BY_SHORTCUT)
