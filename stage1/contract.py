"""What the engine and the kernels agree on, in one module both import (neither imports the other's internals).

- Attention: the step's `AttentionContext` (built by the model runner, read by attention) and the
  `AttentionBackend` interface every set of attention kernels implements: the plain-PyTorch reference in
  `stage1/engine/attention.py`, the Triton kernels in `stage1/kernels/attention.py`.
- Sampling noise: the exact random numbers of the sampler's draw. The draw is an exponential race written as
  Gumbel-max (argmax of x_i + g_i over the surviving tokens, x = logits / T, g = -log(-log(U))). U is
  counter-based: Philox4x32-10 keyed by the row's 64-bit seed (low word, high word), counter (token // 4, step, 0,
  0), output word token % 4, U = (top 23 bits + 0.5) / 2**23, strictly inside (0, 1). `gumbel_noise` computes
  those numbers in PyTorch (the reference sampler uses it); the Triton sampler gets the same words from
  `tl.randint4x`, so both draw the same token from the same survivors.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass

import torch

# ---------------------------------------------------------------------------------------------------- attention


@dataclass
class AttentionContext:
    """Everything attention needs to know about one step; built by the model runner, read-only for the model."""

    is_prefill: bool
    # Per layer `[2, num_blocks, block_size, kv_heads, head_dim]`, or None to run without a cache (prefill only).
    kv_cache: list[torch.Tensor] | None
    slot_mapping: torch.Tensor | None  # [tokens]: the cache slot each new token's K/V goes to
    # [seqs, max_blocks] int32; entries past a sequence's blocks are arbitrary valid block ids (masked by context_lens)
    block_tables: torch.Tensor | None
    context_lens: torch.Tensor  # [seqs]: tokens each sequence attends to after this step (cached + new)
    # Prefill: where each sequence's new tokens start in the packed batch, [seqs + 1]; host copies for loops.
    cu_seqlens_q: torch.Tensor | None = None
    cu_seqlens_q_host: list[int] | None = None
    context_lens_host: list[int] | None = None
    backend: "AttentionBackend | None" = None  # None: the plain-PyTorch reference


class AttentionBackend(abc.ABC):
    """The kernels attention runs on. Shapes: q `[tokens, heads, head_dim]`, k/v `[tokens, kv_heads, head_dim]`,
    a layer's cache `[2, num_blocks, block_size, kv_heads, head_dim]` (K at 0, V at 1); a token at position p of a
    sequence lives in slot `block_table[p // block_size] * block_size + p % block_size`."""

    name: str

    @abc.abstractmethod
    def rotary(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """Neox rotary on x `[tokens, heads, head_dim]` by rope = (cos, sin) `[tokens, 1, head_dim / 2]` fp32."""

    @abc.abstractmethod
    def write_kv(self, cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor) -> None:
        """Stores this step's K/V in their slots."""

    def rotary_write_kv(self, qk: torch.Tensor, v: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                        cache: torch.Tensor, slot_mapping: torch.Tensor) -> torch.Tensor:
        """Rotary on qk `[tokens, heads + kv_heads, head_dim]` (q heads, then k heads), then its k heads and v
        `[tokens, kv_heads, head_dim]` stored in their slots; returns the rotated qk (qk itself, overwritten, where
        a kernel does both in one pass: the caller passes a qk it no longer needs)."""
        qk = self.rotary(qk, rope)
        self.write_kv(cache, qk[:, qk.shape[1] - v.shape[1]:], v, slot_mapping)
        return qk

    @abc.abstractmethod
    def prefill(self, q, k, v, cache, ctx: AttentionContext, scale: float) -> torch.Tensor:
        """Causal attention of packed ragged prompts whose queries may start after cached tokens (K/V already
        written)."""

    @abc.abstractmethod
    def decode(self, q, cache, ctx: AttentionContext, scale: float) -> torch.Tensor:
        """One query per sequence against its whole cached context."""


# ------------------------------------------------------------------------------------------------ sampling noise

# Philox4x32-10 (Salmon et al., SC 2011), as Random123 and triton.language.randint4x define it.
PHILOX_M0, PHILOX_M1 = 0xD2511F53, 0xCD9E8D57  # round multipliers
PHILOX_W0, PHILOX_W1 = 0x9E3779B9, 0xBB67AE85  # key increments (golden ratio, sqrt(3) - 1)
PHILOX_ROUNDS = 10
UNIFORM_BITS = 23  # U = (word >> 9 + 0.5) / 2**23
# The largest Gumbel noise a 23-bit uniform gives: -log(-log(1 - 2**-24)) = 16.64 (rounded up). No race score
# exceeds x + GUMBEL_MAX, which lets both samplers skip the noise of tokens that cannot win.
GUMBEL_MAX = 16.7

_MASK32 = 0xFFFFFFFF
_CHUNK = 1 << 16  # Philox calls per pass: the round's temporaries stay in cache


def _mulhilo32(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The high and low 32 bits of a * b for a uint32 constant and uint32 values held in int64: int64
    multiplication wraps modulo 2**64, so the product's 64 bits are exact even where it overflows the sign."""
    product = b * a
    return (product >> 32) & _MASK32, product & _MASK32


def philox4x32(counter: tuple[torch.Tensor, ...], key: tuple[torch.Tensor, torch.Tensor],
               rounds: int = PHILOX_ROUNDS) -> tuple[torch.Tensor, ...]:
    """Philox4x32 on uint32 values held in int64 tensors (broadcast together); returns the four output words."""
    c0, c1, c2, c3 = counter
    k0, k1 = key
    for _ in range(rounds):
        hi_b, lo_b = _mulhilo32(PHILOX_M1, c2)
        hi_a, lo_a = _mulhilo32(PHILOX_M0, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0, k1 = (k0 + PHILOX_W0) & _MASK32, (k1 + PHILOX_W1) & _MASK32
    return c0, c1, c2, c3


def gumbel_noise(seeds: torch.Tensor, steps: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """-log(-log(U)) in fp32 for each (seed, step, token) triple (int64 tensors of one shape), as specified above.

    Neighbouring tokens share a Philox call (4 words each): triples that follow each other with the same seed,
    step and token // 4 (as nonzero() lists a row's tokens) are computed once, in cache-sized chunks."""
    flat = [t.reshape(-1) for t in (seeds, steps, tokens)]
    counters = flat[2] >> 2
    if counters.numel() > 1:
        same = (counters[1:] == counters[:-1]) & (flat[0][1:] == flat[0][:-1]) & (flat[1][1:] == flat[1][:-1])
        first = torch.cat([torch.ones(1, dtype=torch.bool, device=same.device), ~same])
    else:
        first = torch.ones_like(counters, dtype=torch.bool)
    call = first.cumsum(0) - 1  # which Philox call each triple reads
    key_seed, key_step, key_counter = flat[0][first], flat[1][first], counters[first]
    words = torch.empty(4, key_counter.numel(), dtype=torch.int64, device=counters.device)
    for start in range(0, key_counter.numel(), _CHUNK):
        part = slice(start, start + _CHUNK)
        zero = torch.zeros_like(key_counter[part])
        out = philox4x32((key_counter[part] & _MASK32, key_step[part] & _MASK32, zero, zero),
                         (key_seed[part] & _MASK32, (key_seed[part] >> 32) & _MASK32))
        for i, word in enumerate(out):
            words[i, part] = word
    r = words[flat[2] & 3, call]
    u = ((r >> (32 - UNIFORM_BITS)).float() + 0.5) * 2.0 ** -UNIFORM_BITS
    return (-torch.log(-torch.log(u))).view(tokens.shape)
