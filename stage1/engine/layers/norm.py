"""RMSNorm, with the residual add of a pre-norm block fused into it.

The decoder carries its residual stream beside the hidden states (as vLLM does): `norm(x, residual)` is
`residual <- x + residual; x <- norm(residual)` in one pass, returning both; `norm(x)` is the plain norm (the first
block's input, where the embedding starts the stream). The math is Qwen2's: normalize in fp32, cast back to the run
dtype, then scale by the weight in that dtype; the residual sum is rounded to the run dtype as `x + attn(x)` is.

`rms_norm_reference` / `fused_add_rms_norm_reference` are the plain-PyTorch kernels (the default, and the ground
truth of `stage1::rms_norm` / `stage1::fused_add_rms_norm`, csrc/fused_ops.cpp and csrc/cuda/fused_ops.cuh);
`use_elementwise_kernels` (elementwise.py) installs another pair, as backends.py chose.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # F.rms_norm is x * rsqrt(mean(x^2) + eps) in one op where torch has a fused kernel
    return weight * F.rms_norm(x.float(), (x.shape[-1],), eps=eps).to(x.dtype)


def fused_add_rms_norm_reference(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(norm(x + residual), x + residual). A fused kernel may return its inputs, overwritten: the caller passes
    tensors it no longer needs."""
    residual = x + residual
    return rms_norm_reference(residual, weight, eps), residual


class RMSNorm(nn.Module):
    rms_norm = staticmethod(rms_norm_reference)
    add_rms_norm = staticmethod(fused_add_rms_norm_reference)

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """norm(x); with `residual`: (norm(x + residual), x + residual), reusing x's and residual's memory."""
        if residual is None:
            return self.rms_norm(x, self.weight, self.eps)
        return self.add_rms_norm(x, residual, self.weight, self.eps)
