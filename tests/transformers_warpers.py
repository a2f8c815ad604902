"""What transformers keeps: its own warper classes, in the order its `generate` builds them (temperature -> top-k ->
top-p -> min-p, generation/utils.py), as the yardstick for our three samplers (the reference, the native op and the
Triton kernel). Shared by tests/engine, tests/native and tests/kernels.
"""

from __future__ import annotations

import itertools

import torch
from transformers.generation.logits_process import (LogitsProcessorList, MinPLogitsWarper, TemperatureLogitsWarper,
                                                    TopKLogitsWarper, TopPLogitsWarper)

# temperature, top_k (None: above the vocabulary), top_p (1e-4: near 0), min_p: every combination
TEMPERATURES = (0.6, 1.0, 1.7)
TOP_KS = (0, 1, 20, None)
TOP_PS = (1.0, 0.9, 0.5, 1e-4)
MIN_PS = (0.0, 0.05, 0.3)
COMBOS = list(itertools.product(TEMPERATURES, TOP_KS, TOP_PS, MIN_PS))


def warpers(temperature: float, top_k: int, top_p: float, min_p: float) -> LogitsProcessorList:
    """The list transformers' generate makes from these settings (each warper only where its setting is on)."""
    chain = LogitsProcessorList()
    if temperature != 1.0:
        chain.append(TemperatureLogitsWarper(temperature))
    if top_k > 0:
        chain.append(TopKLogitsWarper(top_k=top_k))
    if top_p < 1.0:
        chain.append(TopPLogitsWarper(top_p=top_p))
    if min_p > 0:
        chain.append(MinPLogitsWarper(min_p=min_p))
    return chain


def transformers_survivors(logits: torch.Tensor, params: list[tuple[float, int, float, float]]) -> torch.Tensor:
    """bool [rows, vocab]: the tokens transformers may sample from, row by row with that row's settings."""
    rows = [warpers(*p)(None, logits[r:r + 1].float().clone()) > float("-inf") for r, p in enumerate(params)]
    return torch.cat(rows)


def combo_params(vocab: int) -> list[tuple[float, int, float, float]]:
    """COMBOS with top_k None made concrete: above the vocabulary."""
    return [(t, vocab + 5 if k is None else k, p, m) for t, k, p, m in COMBOS]


def mass_margin(logits: torch.Tensor, params: list[tuple[float, int, float, float]]) -> torch.Tensor:
    """Per row, how close (in renormalized mass) any token's top-p decision sits to top_p, in float64: where it is
    under ~1e-6, fp32 rounding may decide either way, in transformers as in ours. inf where top-p is off."""
    out = torch.full((len(params),), float("inf"), dtype=torch.float64)
    for r, (t, k, p, _) in enumerate(params):
        if p >= 1.0:
            continue
        x = logits[r].double() / t
        if 0 < k < x.numel():
            x = torch.where(x >= x.topk(k).values[-1], x, float("-inf"))
        probs = x.softmax(-1).sort(descending=True).values
        out[r] = ((probs.cumsum(-1) - probs) - p).abs().min()
    return out


def logits_for(kind: str, rows: int, vocab: int, seed: int) -> torch.Tensor:
    """Continuous logits ("normal": no ties; "peaked": a few likely tokens, as an LLM's) or "ties": exact ties at
    every rank (logits on a grid), where top-k must keep every token tied with the k-th."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, vocab, generator=g, dtype=torch.float64)
    if kind == "normal":
        return (x * 2).float()
    if kind == "peaked":
        peaks = torch.randint(0, vocab, (rows, 12), generator=g)
        return (x * 1.5).scatter_add_(1, peaks, 3 + 5 * torch.rand(rows, 12, generator=g, dtype=torch.float64)).float()
    if kind == "ties":
        return ((x * 2).round() / 2).float()
    raise ValueError(kind)
