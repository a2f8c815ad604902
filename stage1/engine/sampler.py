"""Reference sampling in plain PyTorch: temperature, top-k, top-p, min-p, then one draw per row.

Each row's draw uses its own noise: a seeded row owns a `torch.Generator`, so its token depends on its seed and
step only, never on its neighbours in the batch. The draw is an exponential race (argmax of p / E with
E ~ Exp(1)), which picks token i with probability p_i and needs no cumulative sum.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .params import SamplingParams


@dataclass
class SamplingBatch:
    """The per-row parameters of one step, as tensors on the logits' device."""

    temperature: torch.Tensor  # [rows] float32; 0 marks greedy rows
    top_k: torch.Tensor  # [rows] int64; 0 = off
    top_p: torch.Tensor  # [rows] float32
    min_p: torch.Tensor  # [rows] float32
    generators: list[torch.Generator | None]  # per row, for this reference sampler
    # Counter-based samplers (the Triton kernel) draw from (seed, step) instead: same stream after a preemption.
    seeds: torch.Tensor  # [rows] int64
    steps: torch.Tensor  # [rows] int64: tokens the row's sequence has generated so far
    all_greedy: bool
    max_logprobs: int | None  # the largest `logprobs` any row asked for

    @classmethod
    def build(cls, params: list[SamplingParams], generators: list[torch.Generator | None], device: torch.device,
              seeds: list[int] | None = None, steps: list[int] | None = None) -> "SamplingBatch":
        asked = [p.logprobs for p in params if p.logprobs is not None]
        seeds = seeds if seeds is not None else [0] * len(params)
        steps = steps if steps is not None else [0] * len(params)
        return cls(
            temperature=torch.tensor([p.temperature for p in params], dtype=torch.float32, device=device),
            top_k=torch.tensor([p.top_k for p in params], dtype=torch.int64, device=device),
            top_p=torch.tensor([p.top_p for p in params], dtype=torch.float32, device=device),
            min_p=torch.tensor([p.min_p for p in params], dtype=torch.float32, device=device),
            generators=generators,
            seeds=torch.tensor(seeds, dtype=torch.int64, device=device),
            steps=torch.tensor(steps, dtype=torch.int64, device=device),
            all_greedy=all(p.greedy for p in params),
            max_logprobs=max(asked) if asked else None,
        )


def filtered_probs(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """The distribution each non-greedy row samples from: softmax(logits / T) after top-k, top-p and min-p."""
    temperature = torch.where(batch.temperature > 0, batch.temperature, 1.0)
    logits = logits.float() / temperature[:, None]
    vocab = logits.shape[-1]
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    sorted_probs = sorted_logits.softmax(dim=-1)
    ranks = torch.arange(vocab, device=logits.device)[None, :]
    k = torch.where(batch.top_k > 0, batch.top_k, vocab)
    drop = ranks >= k[:, None]
    # top-p: keep the smallest prefix whose mass reaches p (the token that crosses p stays)
    mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
    drop |= mass_before >= batch.top_p[:, None]
    drop |= sorted_probs < batch.min_p[:, None] * sorted_probs[:, :1]
    drop[:, 0] = False  # the most likely token always survives
    sorted_probs = sorted_probs.masked_fill(drop, 0.0)
    probs = torch.zeros_like(sorted_probs).scatter_(-1, order, sorted_probs)
    return probs / probs.sum(dim=-1, keepdim=True)


def exponential_noise(rows: int, vocab: int, generators: list[torch.Generator | None],
                      device: torch.device) -> torch.Tensor:
    noise = torch.empty(rows, vocab, dtype=torch.float32, device=device)
    for row, generator in enumerate(generators):
        noise[row].exponential_(generator=generator)
    return noise


def sample(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """One token id per row of `logits` `[rows, vocab]`."""
    greedy_tokens = logits.argmax(dim=-1)
    if batch.all_greedy:
        return greedy_tokens
    probs = filtered_probs(logits, batch)
    noise = exponential_noise(*probs.shape, batch.generators, probs.device)
    sampled = (probs / noise).argmax(dim=-1)
    return torch.where(batch.temperature == 0, greedy_tokens, sampled)


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, top: int) -> tuple[torch.Tensor, torch.Tensor,
                                                                                   torch.Tensor, torch.Tensor]:
    """Log-probabilities under the model's raw distribution (before temperature and filtering, as vLLM reports):
    the chosen token's logprob and rank, and the `top` most likely ids with their logprobs."""
    logprobs = logits.float().log_softmax(dim=-1)
    chosen = logprobs.gather(-1, tokens[:, None]).squeeze(-1)
    rank = (logprobs > chosen[:, None]).sum(dim=-1) + 1
    top_values, top_ids = logprobs.topk(top, dim=-1) if top > 0 else (logprobs[:, :0], tokens[:, None][:, :0])
    return chosen, rank, top_ids, top_values
