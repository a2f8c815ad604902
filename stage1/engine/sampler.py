"""Reference sampling in plain PyTorch: temperature, top-k, top-p, min-p, then one draw per row.

The draw is an exponential race written as Gumbel-max: argmax over the surviving tokens of x_i + g_i, with
x = logits / T and g_i = -log(-log(U_i)), which picks token i with probability proportional to exp(x_i) and needs
no cumulative sum. U_i is counter-based, as `stage1/contract.py` specifies (Philox4x32-10 keyed by the row's seed
at (token, step): the numbers `tl.randint4x` gives the Triton sampler). So a row's token depends on its logits,
parameters, seed and step only: never on its neighbours, and not on which sampler ran: the Triton kernel draws the
same token from the same survivors.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import ClassVar

import numpy as np
import torch

from stage1.contract import GUMBEL_MAX, gumbel_noise

from .params import SamplingParams


@dataclass
class SamplingBatch:
    """The per-row parameters of one step: host arrays as the model runner prepares them (`of`; it stages them to
    the device in one copy per dtype), tensors on the logits' device as the samplers read them (`build`, `to`). The
    flags are what the host knows of all rows, so the device is never asked."""

    temperature: torch.Tensor | np.ndarray  # [rows] float32; 0 marks greedy rows
    top_k: torch.Tensor | np.ndarray  # [rows] int64; 0 = off
    top_p: torch.Tensor | np.ndarray  # [rows] float32
    min_p: torch.Tensor | np.ndarray  # [rows] float32
    seeds: torch.Tensor | np.ndarray  # [rows] int64: the Philox key
    steps: torch.Tensor | np.ndarray  # [rows] int64: tokens the row's sequence has generated (the counter's high word)
    all_greedy: bool
    max_logprobs: int | None  # the largest `logprobs` any row asked for
    max_top_k: int = 0  # the largest top_k any row asked for (0: top-k off everywhere)

    ARRAYS: ClassVar[tuple[str, ...]] = ("temperature", "top_k", "top_p", "min_p", "seeds", "steps")

    @classmethod
    def of(cls, params: list[SamplingParams], seeds=None, steps=None) -> "SamplingBatch":
        """The rows as host arrays. `seeds` and `steps` (sequences of ints or int64 arrays) default to the row index
        and 0: rows with the same seed and step draw the same noise. Rows usually share a few SamplingParams objects
        (one per request, often one for all): each distinct one is read once, then spread to its rows."""
        rows = len(params)
        if params and params.count(params[0]) == rows:  # one for all (a C loop, identity first)
            unique, index = [params[0]], np.zeros(rows, dtype=np.int64)
        else:
            first_seen: dict[int, tuple[int, SamplingParams]] = {}
            index = np.array([first_seen.setdefault(id(p), (len(first_seen), p))[0] for p in params], dtype=np.int64)
            unique = [p for _, p in first_seen.values()]
        asked = [p.logprobs for p in unique if p.logprobs is not None]

        def per_row(field: str, dtype) -> np.ndarray:
            return np.array([getattr(p, field) for p in unique], dtype=dtype)[index]

        return cls(
            temperature=per_row("temperature", np.float32), top_k=per_row("top_k", np.int64),
            top_p=per_row("top_p", np.float32), min_p=per_row("min_p", np.float32),
            seeds=np.arange(rows, dtype=np.int64) if seeds is None else np.asarray(seeds, dtype=np.int64),
            steps=np.zeros(rows, dtype=np.int64) if steps is None else np.asarray(steps, dtype=np.int64),
            all_greedy=all(p.greedy for p in unique), max_logprobs=max(asked) if asked else None,
            max_top_k=max((p.top_k for p in unique), default=0))

    @classmethod
    def build(cls, params: list[SamplingParams], device: torch.device, seeds=None, steps=None) -> "SamplingBatch":
        """`of(params, seeds, steps)` as tensors on `device`."""
        return cls.of(params, seeds, steps).to(device)

    def to(self, device: torch.device) -> "SamplingBatch":
        return replace(self, **{name: torch.from_numpy(getattr(self, name)).to(device) for name in self.ARRAYS})

    def arrays(self) -> tuple:
        """The per-row arrays (or tensors), in ARRAYS' order."""
        return tuple(getattr(self, name) for name in self.ARRAYS)


def filtered_probs(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """The distribution each non-greedy row samples from, as transformers' warpers make it, in their order:
    temperature (softmax(logits / T)), top-k (the k most likely, and every token tied with the k-th), top-p (the
    smallest prefix of the top-k survivors, sorted, whose mass, renormalized over them, reaches top_p; the token
    that crosses it included), min-p (p >= min_p * p_max; the ratio to the max does not change with the
    renormalization, so the full softmax decides it). The most likely token always survives.

    vLLM differs: it applies min-p before top-p, so its top-p mass is measured over min-p's survivors."""
    temperature = torch.where(batch.temperature > 0, batch.temperature, 1.0)
    probs = (logits.float() / temperature[:, None]).softmax(dim=-1)
    vocab = probs.shape[-1]
    k = torch.where(batch.top_k > 0, batch.top_k, vocab).clamp(max=vocab)
    keep = probs >= batch.min_p[:, None] * probs.max(dim=-1, keepdim=True).values  # min-p keeps the max
    cut = (k < vocab) | (batch.top_p < 1)  # rows whose top-k / top-p keep a prefix of the sorted distribution
    if cut.any():
        # The prefix usually ends within the most likely few hundred tokens: find it among the top
        # _PREFIX_CANDIDATES (torch.topk), and sort the whole row only where it reaches further.
        prefix, reached = _prefix_keep(probs, k, batch.top_p, min(vocab, _PREFIX_CANDIDATES))
        far = cut & ~reached
        if far.any():
            prefix[far] = _prefix_keep(probs[far], k[far], batch.top_p[far], vocab)[0]
        keep &= prefix | ~cut[:, None]
    probs = probs * keep
    return probs / probs.sum(dim=-1, keepdim=True)


_PREFIX_CANDIDATES = 1024


def _prefix_keep(probs: torch.Tensor, k: torch.Tensor, top_p: torch.Tensor,
                 candidates: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k, then top-p over its survivors, among each row's `candidates` most likely tokens (in torch.topk's
    order): the tokens kept and whether the prefix certainly ends within the candidates.

    Top-k keeps the ranks whose p is at least the k-th's (ties with it included, as transformers' TopKLogitsWarper
    keeps every score >= the k-th). Top-p keeps rank r while the mass before it is under top_p times the top-k
    survivors' mass (their renormalized distribution, as TopPLogitsWarper sees it after top-k); without top-k that
    mass is 1 and top_p is compared as it is, so those rows keep exactly what they always kept. Among probabilities
    tied right at the top-p cut, the first in torch.topk's order survive (transformers' own sort also picks some)."""
    vocab = probs.shape[-1]
    top, order = probs.topk(candidates, dim=-1)
    cumsum = top.cumsum(dim=-1)
    mass_before = cumsum - top
    top_k_on = k < vocab
    kth = top.gather(-1, (k.clamp(max=candidates) - 1)[:, None])  # the k-th's p, where k <= candidates
    in_top_k = top >= kth  # a prefix of the ranks: ties with the k-th included
    kept_by_k = in_top_k.sum(dim=-1)
    survivors_mass = cumsum.gather(-1, (kept_by_k - 1)[:, None]).squeeze(-1)
    cap = torch.where(top_p >= 1, float("inf"), torch.where(top_k_on, top_p * survivors_mass, top_p))  # 1: off
    drop = ~in_top_k | (mass_before >= cap[:, None])
    drop[:, 0] = False
    keep = torch.zeros_like(probs, dtype=torch.bool).scatter_(-1, order, ~drop)
    # Certain: every token is a candidate; or top-k's ties end inside the candidates (k <= candidates and the last
    # candidate is not tied with the k-th) and, for top-p, the cut lies inside them too.
    k_inside = ~top_k_on | ((k <= candidates) & ~in_top_k[:, -1])
    p_inside = (top_p >= 1) | (top_k_on & k_inside) | (top.sum(dim=-1) >= top_p)
    reached = (candidates >= vocab) | (k_inside & p_inside)
    return keep, reached


def sample(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """One token id per row of `logits` `[rows, vocab]`."""
    greedy_tokens = logits.argmax(dim=-1)
    if batch.all_greedy:
        return greedy_tokens
    x = logits.float() / torch.where(batch.temperature > 0, batch.temperature, 1.0)[:, None]
    x = torch.where(filtered_probs(logits, batch) > 0, x, float("-inf"))  # the survivors' scaled logits
    # The winner scores at least the best score among the row's 64 largest x; a token whose x plus the largest
    # possible noise falls short of that cannot win, so only the others get noise (Philox is costly on a CPU).
    top_x, top_tokens = x.topk(min(64, x.shape[-1]), dim=-1)
    top_rows = torch.arange(x.shape[0], device=x.device)[:, None].expand_as(top_tokens)
    top_scores = top_x + gumbel_noise(batch.seeds[top_rows], batch.steps[top_rows], top_tokens)
    floor = top_scores.max(dim=-1, keepdim=True).values - GUMBEL_MAX
    rows, tokens = (x > floor).nonzero(as_tuple=True)
    scores = torch.full_like(x, float("-inf"))
    scores[rows, tokens] = x[rows, tokens] + gumbel_noise(batch.seeds[rows], batch.steps[rows], tokens)
    sampled = scores.argmax(dim=-1)  # the first index on ties, as the kernel
    return torch.where(batch.temperature == 0, greedy_tokens, sampled)


# On a CPU, token_logprobs works on this many logits at a time (4 MB of fp32: a few rows of a 152k vocabulary), so
# its temporaries stay in cache: a whole decode batch's (124 x 151,936 floats, 75 MB, fresh pages every step) made
# logprobs=0 cost a fifth of the default model's decode time (benchmarks/logprob_cost.py).
LOGPROB_CHUNK_ELEMENTS = 1 << 20


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, top: int) -> tuple[torch.Tensor, torch.Tensor,
                                                                                   torch.Tensor, torch.Tensor]:
    """Log-probabilities under the model's raw distribution (before temperature and filtering, as vLLM reports):
    the chosen token's logprob and rank, and the `top` most likely ids with their logprobs. From the logits
    themselves: a logprob is its logit less the row's logsumexp, the rank 1 + the logits above the chosen one; the
    vocabulary-wide log_softmax is never formed (on a CPU, rows a few at a time: LOGPROB_CHUNK_ELEMENTS)."""
    chosen_logits = logits.gather(-1, tokens[:, None]).float()
    rows = logits.shape[0] if logits.is_cuda else max(1, LOGPROB_CHUNK_ELEMENTS // logits.shape[-1])
    parts = list(zip(logits.split(rows), chosen_logits.split(rows)))
    lse = torch.cat([torch.logsumexp(part.float(), dim=-1) for part, _ in parts])
    rank = torch.cat([(part.float() > chosen).sum(dim=-1) for part, chosen in parts]) + 1
    if top > 0:
        top_logits, top_ids = logits.topk(top, dim=-1)
        top_values = top_logits.float() - lse[:, None]
    else:
        top_ids, top_values = tokens[:, None][:, :0], chosen_logits[:, :0]
    return chosen_logits.squeeze(-1) - lse, rank, top_ids, top_values
