"""The one place that chooses which kernels run: the plain-PyTorch reference or the Triton kernels.

`auto` picks Triton for CUDA tensors when it is installed, and the reference everywhere else: Triton launched on
CPU tensors only works in its interpreter (TRITON_INTERPRET=1), which is for tests, not for speed.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable

import torch

from stage1.kernels import triton_available

from stage1.contract import AttentionBackend

from .attention import ReferenceAttentionBackend
from .sampler import SamplingBatch, sample

CHOICES = ("auto", "torch", "triton")


@dataclass(frozen=True)
class Kernels:
    name: str
    attention: AttentionBackend
    sample: Callable[[torch.Tensor, SamplingBatch], torch.Tensor]


def select_kernels(choice: str, device: torch.device) -> Kernels:
    if choice not in CHOICES:
        raise ValueError(f"kernels={choice!r}: use one of {', '.join(CHOICES)}")
    if choice == "auto":
        choice = "triton" if device.type == "cuda" and triton_available() else "torch"
    if choice == "torch":
        return Kernels("torch", ReferenceAttentionBackend(), sample)
    if not triton_available():
        raise ValueError("kernels='triton' needs the triton package (pip install triton), or use kernels='torch'")
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError("kernels='triton' on the CPU runs only in Triton's interpreter: set TRITON_INTERPRET=1 "
                         "before starting Python (slow, meant for tests), or use kernels='torch'")
    from stage1.kernels.attention import TritonAttentionBackend

    return Kernels("triton", TritonAttentionBackend(), triton_sample)


def triton_sample(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """The Triton sampler behind the reference's signature (a module-level function: the tensor-parallel
    workers receive the kernel choice pickled)."""
    from stage1.kernels.sampling import fused_sample

    if batch.all_greedy:  # one argmax launch instead of the sampler's passes
        return logits.argmax(dim=-1)
    return fused_sample(logits, batch.temperature, batch.top_k, batch.top_p, batch.min_p, batch.seeds, batch.steps)
