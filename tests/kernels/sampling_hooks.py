"""Test-only entry points into the fused sampler (kernels/sampling/), built from its own Triton helpers.

`many_draws` draws thousands of tokens per row in one interpreted launch: the production passes find the row's
survivors (what the draw pass races among is in the row's state afterwards), then `_draws_kernel` runs the draw
pass's race for many steps at once ([DRAWS, BLOCK] tiles of noise). Each of those tokens is the one a
fused_sample call with that step draws: test_many_draws_equal_separate_calls checks it. `kernel_noise` is the
kernel's own Gumbel noise for a row (the interpreter's logs can differ from PyTorch's in the last bit).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from stage1.kernels.sampling.common import (_ARGMAX, _M, STATE_F, STATE_I, _gumbel, _gumbel_at, _key,
                                            _survivor_cut)
from stage1.kernels.sampling.launch import _Run, _sample


@triton.jit
def _draws_kernel(
    logits_ptr, stride_row, temp_ptr, minp_ptr, seed_ptr, step_ptr, state_f_ptr, state_i_ptr, tok_ptr,
    V, first, n_draws,
    BLOCK: tl.constexpr, DRAWS: tl.constexpr,
):
    """Program (row): tokens first .. first + DRAWS - 1 of the row's n_draws, drawn for steps step + first ..
    from the survivors its state records (the race of kernels/sampling/draw.py; greedy rows take the argmax)."""
    row = tl.program_id(0)
    base = logits_ptr + row.to(tl.int64) * stride_row
    si = state_i_ptr + row * STATE_I
    temp = tl.load(temp_ptr + row)
    greedy = temp <= 0.0
    t = tl.where(greedy, 1.0, temp)
    min_p = tl.load(minp_ptr + row)
    seed = tl.load(seed_ptr + row)
    steps = tl.load(step_ptr + row) + first + tl.arange(0, DRAWS).to(tl.int64)
    cut = _survivor_cut(si)
    m = tl.load(state_f_ptr + row * STATE_F + _M)
    offs = tl.arange(0, BLOCK)
    b_val = tl.full([DRAWS, BLOCK], float("-inf"), tl.float32)
    b_idx = tl.zeros([DRAWS, BLOCK], tl.int32)
    for start in range(0, V, BLOCK):
        idx = start + offs
        mask = idx < V
        x = tl.math.div_rn(tl.load(base + idx, mask=mask, other=float("-inf")).to(tl.float32), t)
        keep = mask & (_key(x) > cut) & (tl.exp(x - m) >= min_p)
        score = tl.where(keep[None, :], x[None, :] + _gumbel_at(seed, steps[:, None], idx[None, :]), float("-inf"))
        better = score > b_val
        b_val = tl.where(better, score, b_val)
        b_idx = tl.where(better, idx[None, :], b_idx)
    best = tl.max(b_val, axis=1)
    drawn = tl.min(tl.where(b_val == best[:, None], b_idx, V), axis=1)
    argmax = tl.load(si + _ARGMAX)
    token = tl.where(greedy, argmax, tl.where(best == float("-inf"), argmax, drawn))
    tl.store(tok_ptr + row * n_draws + first + tl.arange(0, DRAWS), token.to(tl.int64))


def many_draws(logits: torch.Tensor, rows: dict, draws: int) -> tuple[torch.Tensor, _Run]:
    """`draws` (a power of two) tokens per row, for steps step .. step + draws - 1: int64 [rows, draws], and the
    run of the production passes that found the survivors (every filtered row searched: the shortcut draws one
    token, not a survivor set)."""
    if draws < 1 or draws & (draws - 1):
        raise ValueError(f"many_draws: draws must be a power of two, got {draws}")
    args = [rows[name] for name in ("temperature", "top_k", "top_p", "min_p", "seeds", "steps")]
    run = _sample(logits, *args, SHORTCUT=False)
    n, vocab = logits.shape
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    # [DRAWS, BLOCK] tiles: large under the interpreter (numpy), register-sized on a GPU
    block = min(8192, max(16, triton.next_power_of_2(vocab))) if not logits.is_cuda else 256
    group = min(draws, max(1, (1 << 20) // block)) if not logits.is_cuda else min(draws, 16)
    tokens = torch.empty(n, draws, dtype=torch.int64, device=logits.device)
    temperature, _, _, min_p, seeds, steps = [torch.as_tensor(a, device=logits.device) for a in args]
    for first in range(0, draws if n else 0, group):
        _draws_kernel[(n,)](logits, logits.stride(0), temperature.float().contiguous(), min_p.float().contiguous(),
                            seeds.long().contiguous(), steps.long().contiguous(), run.state_f, run.state_i, tokens,
                            vocab, first, draws, BLOCK=block, DRAWS=group, num_warps=4)
    return tokens, run


@triton.jit
def _noise_kernel(seed_ptr, step_ptr, out_ptr, V, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    start = tl.program_id(1) * BLOCK
    idx = start + tl.arange(0, BLOCK)
    noise = _gumbel(tl.load(seed_ptr + row), tl.load(step_ptr + row), start, BLOCK)
    tl.store(out_ptr + row * V + idx, noise, mask=idx < V)


def kernel_noise(seeds: torch.Tensor, steps: torch.Tensor, vocab: int) -> torch.Tensor:
    """The noise the kernel adds to each token's scaled logit in the race, fp32 [rows, vocab], for per-row int64
    seeds and steps (the production helper `_gumbel`, as the shortcut and the draw pass call it)."""
    block = 1024
    out = torch.empty(len(seeds), vocab, dtype=torch.float32, device=seeds.device)
    _noise_kernel[(len(seeds), triton.cdiv(vocab, block))](seeds.long().contiguous(), steps.long().contiguous(), out,
                                                           vocab, BLOCK=block)
    return out
