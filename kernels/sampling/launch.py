"""Fused sampling in Triton: temperature, top-k, top-p, min-p and one draw per row, without sorting the vocabulary.

`fused_sample(logits, temperature, top_k, top_p, min_p, seeds, steps)` draws from the same distribution as the
reference `stage1.engine.sampler.filtered_probs` (softmax(logits / T), then top-k, top-p, min-p; the most likely
token always survives) and returns argmax for greedy rows (T == 0). Tests and benchmarks call its launcher,
`_sample`, which takes config overrides and also returns each row's final state (search passes, survivor cut,
which rows the shortcut drew).

Each row is cut into SPLITS chunks, one program per (row, chunk), so that a batch of 256 rows (or a single row)
streams the logits with the whole GPU. A pass is one launch; in each, the program that finishes last for a row (an
atomic ticket) merges the chunks' partial results and updates the row's state for the next launch (both laid out
in kernels/sampling/common.py). Each pass has its module; no sort:

1. Statistics (`_stats_kernel`, stats.py): online max / sum-exp of x = logits / T, the raw argmax (first
   index on ties, like torch.argmax) and the smallest x. Greedy rows take the argmax; with FUSE on, a row with no
   filter on (only a temperature) also runs its draw here. Both are then done.
   The merge also scores the top token in the race of step 3 (x_top + its noise): the shortcut's bound.
1b. Race shortcut (`_candidates_kernel`, `_verify_kernel`, shortcut.py; SHORTCUT): the draw of step 3
   picks the best race score among the survivors, and the top token always survives, so the winner is the top
   token or one that outscores it (an equal score outscores a higher index: the race's ties go to the lower one).
   Candidates are those tokens (noise is only needed where x + 16.7 reaches the bound); a candidate that a token
   at least as likely outscores can never win (whenever it survives, so does that one). The rest, the front, is
   usually a handful of tokens: one more pass counts the tokens and mass above each of them (the pivots of step 2,
   given), and the best front token that meets the survivor condition wins. So an LLM-like row takes 3 launches
   and no search. Rows with more than CAP candidates or NT front tokens (flat distributions) go on to:
2. Threshold search (`_search_kernel`, search.py; MAX_PASSES launches, rows already done return at once),
   only for rows with top-k or top-p on. Both keep a prefix of the sorted distribution: a token of scaled logit v
   survives iff
       count(x > v) < k   and   mass(x > v) < top_p * sum_k      (mass: sum of exp(x - max))
   where sum_k is the mass of top-k's survivors (every token tied with the k-th included; the row's sum without
   top-k): top-p measures its share over them, as transformers' warpers run (temperature -> top-k -> top-p ->
   min-p). Where a row has top-k on, the host finds its k-th value first (one torch.topk, `_top_k_share`).
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
3. Draw (`_draw_kernel`, draw.py): exponential race (Gumbel-max) among survivors, argmax of
   x_i - log(E_i), E_i = -log(U_i) ~ Exp(1), which picks token i with probability proportional to exp(x_i). Min-p
   (p_i >= min_p * p_max, i.e. exp(x_i - max) >= min_p) is applied here as a direct threshold. The best of each
   chunk, then of the row.

Randomness is counter-based: U_i comes from Philox4x32-10 keyed by the row's 64-bit seed with counter
(i // 4, step) (output i % 4; the spec is stage1.contract's), so a row's token depends only on its logits,
parameters, seed and step: never on its neighbours, its batch position, the batch size or the split count, and a
recomputed (preempted) sequence draws the same token. The reference sampler (stage1.engine.sampler) computes the
same numbers in PyTorch (up to the last bit of the logs), so both draw the same token from the same survivors.

Tie rule: tokens whose scaled logit equals the value at the cut all survive (the condition depends on the value
only), where the reference keeps whichever tied tokens its sort puts first; with continuous logits the two agree
exactly, up to fp32 rounding of the mass sums right at the top-p boundary. top_p = 1 is off: the reference's
cumsum can reach 1.0 early and drop a tail carrying ~1e-7 of the mass, this kernel keeps it.
NaN logits are not supported.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import triton

from .common import (_BY_SHORTCUT, _DONE, _INT_MIN, _LO, _PASSES, _PF_MASS, _PI_COUNT, _SEARCH, STATE_F,
                     STATE_I)
from .draw import _draw_kernel
from .search import MAX_PASSES, VALUE_PASSES, _search_kernel
from .shortcut import _candidates_kernel, _verify_kernel
from .stats import _stats_kernel

KERNELS = (_stats_kernel, _candidates_kernel, _verify_kernel, _search_kernel, _draw_kernel)  # in launch order

# Compiled (GPU) launch parameters: BLOCK tokens per read, SBLOCK per step and NT pivots in the search's per-pivot
# work (NT x SBLOCK accumulators: registers), how many programs per SM the row splits aim for, and FUSE: whether
# rows with only a temperature draw during the statistics pass (more registers in that kernel, below, yet faster in
# one H200 sweep at 256 x 152k, before the shortcut: 1.27 against 1.44 ms with top-k 50 + top-p 0.9, 2.34 against
# 2.31 with top-p 0.95, 0.69 against 1.46 with a temperature only; results/h200-2026-11-28-b/sweep_sampling.txt).
# SHORTCUT: whether rows try the race shortcut (stats, candidates, verify) before the threshold search; CAP: the
# candidates a row may gather for it; SYNC: whether the host asks the GPU, after the shortcut, if any row is left
# for the search (one sync; without it the 13 search and draw launches always go out, and return at once).
# FUSE is off with the shortcut on: the shortcut draws temperature-only rows in its second launch, and FUSE's race
# code takes the statistics kernel from 80 to 189 registers (fp32 logits, sm_90), one block per SM instead of 3,
# for every row. SYNC is off on a GPU: its read-back would make the host wait for the step's forward, and with async
# scheduling the host must prepare the next step meanwhile (model_runner.py); the search launches of rows already
# drawn return at once. These defaults are reasoned, not timed: no GPU has run the shortcut yet (--sweep compares).
# `python benchmarks/kernels_sampling.py --sweep` compares alternatives on a GPU.
GPU_CONFIG = dict(BLOCK=2048, SBLOCK=256, NT=16, PROGRAMS_PER_SM=8, FUSE=False, SHORTCUT=True, CAP=128, SYNC=False,
                  num_warps=8)


# Under the interpreter (tests): block sizes follow the vocabulary; FUSE on saves interpreted passes, SYNC skips
# the search launches when the shortcut drew every row.
INTERPRETER_CONFIG = dict(NT=16, FUSE=True, SHORTCUT=True, CAP=64, SYNC=True, num_warps=4)


def fused_sample(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
                 min_p: torch.Tensor, seeds: torch.Tensor, steps: torch.Tensor,
                 max_top_k: int | None = None) -> torch.Tensor:
    """One token per row of `logits` [rows, vocab] (fp32/bf16/fp16): int64 tokens [rows].

    Per-row tensors (on the logits' device): temperature fp32 (0 = greedy: argmax, first index on ties), top_k
    integer (0, or >= vocab: off), top_p fp32 in (0, 1] (1: off), min_p fp32 in [0, 1] (0: off), seeds int64 (the
    Philox key), steps int64 (tokens the sequence has generated so far; the Philox counter's high word, < 2**32).
    `max_top_k`: the largest top_k of any row (0: none), as the host knows it; None reads it from `top_k` (a sync).
    """
    return _sample(logits, temperature, top_k, top_p, min_p, seeds, steps, max_top_k=max_top_k).tokens


class _Run(NamedTuple):
    """What one `_sample` call did, for tests and benchmarks: the tokens, each row's state after the last launch
    (fp32 [rows, STATE_F] and int64 [rows, STATE_I], slots in common.py) and how many candidates the
    shortcut gathered per row (0 where it did not run)."""

    tokens: torch.Tensor
    state_f: torch.Tensor
    state_i: torch.Tensor
    candidates: torch.Tensor

    @property
    def cut(self) -> torch.Tensor:
        """The draw's survivor bound per row (as _survivor_cut reads it): survivors are `float_key(logits / T) >
        cut` and min-p; the smallest int32 where the row needed no search or the shortcut drew it."""
        lo = self.state_i[:, _LO.value]
        return torch.where(self.state_i[:, _SEARCH.value] != 0, lo, _INT_MIN.value)

    @property
    def passes(self) -> torch.Tensor:
        """Threshold-search passes per row."""
        return self.state_i[:, _PASSES.value]

    @property
    def shortcut_drew(self) -> torch.Tensor:
        """Where the race shortcut drew the token (bool)."""
        return self.state_i[:, _DONE.value] == _BY_SHORTCUT.value


def _sample(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
            min_p: torch.Tensor, seeds: torch.Tensor, steps: torch.Tensor, splits: int | None = None,
            max_top_k: int | None = None, **overrides) -> _Run:
    """fused_sample's launches, and its entry point for tests and benchmarks: `splits` sets how many chunks each
    row is cut into, `overrides` replace entries of the config (GPU_CONFIG or INTERPRETER_CONFIG, e.g.
    SHORTCUT=False sends every filtered row to the threshold search). The tokens depend on neither."""
    if logits.dim() != 2:
        raise ValueError(f"fused_sample: logits must be [rows, vocab], got {tuple(logits.shape)}")
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
    if max_top_k is None:
        max_top_k = int(top_k.max()) if rows else 0
    share = _top_k_share(logits, temperature, top_k, max_top_k) if 0 < max_top_k else None
    cfg = _config(logits, splits, overrides)
    splits, nt = cfg["SPLITS"], cfg["NT"]
    cap = cfg["CAP"] if cfg["SHORTCUT"] else 0
    # scratch, in three allocations (a GPU call's host time counts): one ticket counter per row and launch and the
    # shortcut's candidate counts (zeroed), the chunks' partial results, the race winners, each row's state between
    # launches, the shortcut's candidates and fronts
    tickets, cand_n, part_i, race_i, cand_i, front_i, front_k = _scratch(
        torch.int32, device, (MAX_PASSES + 4) * rows, rows, rows * splits * (_PI_COUNT.value + 3 * nt),
        rows * splits, rows * cap, rows * nt, rows * nt, zeroed=2)
    t_stats, t_candidates, t_verify, t_draw, *t_search = tickets.view(MAX_PASSES + 4, rows)
    part_f, race_v, state_f, cand_x, cand_z, front_z = _scratch(
        torch.float32, device, rows * splits * (_PF_MASS.value + nt), rows * splits, rows * STATE_F.value,
        rows * cap, rows * cap, rows * nt)
    state_i = torch.empty(rows * STATE_I.value, dtype=torch.int64, device=device)
    tokens = torch.empty(rows, dtype=torch.int64, device=device)
    run = _Run(tokens, state_f.view(rows, STATE_F.value), state_i.view(rows, STATE_I.value), cand_n)
    if not rows:
        return run

    grid = (rows, splits)
    row_args = (logits, logits.stride(0), temperature)
    shape = dict(V=vocab, CHUNK=cfg["CHUNK"], SPLITS=splits)
    common = dict(BLOCK=cfg["BLOCK"], SPLITS_P2=triton.next_power_of_2(splits), num_warps=cfg["num_warps"])
    _stats_kernel[grid](*row_args, top_k, top_p, min_p, seeds, steps, temperature if share is None else share,
                        part_f, part_i, race_v, race_i, state_f, state_i, t_stats, tokens, **shape, NT=nt,
                        FUSE=cfg["FUSE"], HAS_SHARE=share is not None, **common)
    if cfg["SHORTCUT"]:
        _candidates_kernel[grid](*row_args, min_p, seeds, steps, cand_n, cand_i, cand_x, cand_z, front_i, front_z,
                                 front_k, state_f, state_i, t_candidates, tokens, **shape, CAP=cap, NT=nt,
                                 BLOCK=cfg["BLOCK"], num_warps=cfg["num_warps"])
        _verify_kernel[grid](*row_args, part_f, part_i, front_i, front_z, front_k, state_f, state_i, t_verify, tokens,
                             **shape, SBLOCK=cfg["SBLOCK"], NT=nt, **common)
        if cfg["SYNC"] and bool((run.state_i[:, _DONE.value] != 0).all()):
            return run  # the shortcut drew every row
    # Every pass is launched; rows that are done return at once. Asking the GPU whether any row still searched (a
    # sync after the statistics and after every 3 passes) measured slower on an H200 at 256 x 152k with top-k 50 +
    # top-p 0.9: 1.68 ms with FUSE on (results/h200-2026-11-28-c), against 1.27 with FUSE on and 1.15-1.44 with it
    # off without the checks (-b): the syncs leave the GPU idle while kernels are launched.
    for ticket in t_search:
        _search_kernel[grid](*row_args, part_f, part_i, state_f, state_i, ticket, **shape, SBLOCK=cfg["SBLOCK"],
                             NT=nt, VALUE_PASSES=VALUE_PASSES, MAX_PASSES=MAX_PASSES, **common)
    _draw_kernel[grid](*row_args, min_p, seeds, steps, race_v, race_i, state_f, state_i, t_draw, tokens, **shape,
                       **common)
    return run


def _top_k_share(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor,
                 max_top_k: int) -> torch.Tensor:
    """Per row, the share of softmax(logits / T)'s mass that top-k keeps (every token tied with the k-th included;
    1 where top-k is off): top-p's mass is measured over top-k's survivors, as transformers' warpers apply them.
    Plain torch (one topk) for the rows' k-th values; the kernels then search the cut as before."""
    vocab = logits.shape[-1]
    k = torch.where((top_k > 0) & (top_k < vocab), top_k, vocab)
    x = logits.float() / torch.where(temperature > 0, temperature, 1.0)[:, None]
    kth = x.topk(min(max_top_k, vocab), dim=-1).values.gather(-1, (k.clamp(max=max_top_k) - 1)[:, None])
    e = (x - x.max(dim=-1, keepdim=True).values).exp()
    share = (e * (x >= kth)).sum(dim=-1) / e.sum(dim=-1)
    return torch.where(k < vocab, share, 1.0).contiguous()


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _config(logits: torch.Tensor, splits: int | None, overrides: dict) -> dict:
    """The launch configuration: the device's, with `overrides`, and the chunks each row is cut into."""
    rows, vocab = logits.shape
    unknown = set(overrides) - set(GPU_CONFIG)
    if unknown:
        raise ValueError(f"fused_sample: no config entry {sorted(unknown)}")
    if logits.is_cuda:
        cfg = dict(GPU_CONFIG, **overrides)
        if splits is None:
            sms = _sm_count(logits.device.index if logits.device.index is not None else torch.cuda.current_device())
            splits = triton.cdiv(cfg["PROGRAMS_PER_SM"] * sms, max(rows, 1))
    else:
        # Triton interpreter (numpy underneath): few, large chunks, one per row unless a test asks for more
        block = min(8192, max(16, triton.next_power_of_2(triton.cdiv(vocab, splits or 1))))
        cfg = {**INTERPRETER_CONFIG, "BLOCK": block, "SBLOCK": min(4096, block), **overrides}
        splits = splits or 1
    # chunks of whole blocks (a multiple of 4 tokens, as the noise needs), none of them empty
    chunk = triton.cdiv(triton.cdiv(vocab, max(1, min(splits, triton.cdiv(vocab, cfg["BLOCK"])))),
                        cfg["BLOCK"]) * cfg["BLOCK"]
    cfg.update(CHUNK=chunk, SPLITS=triton.cdiv(vocab, chunk))
    return cfg


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
