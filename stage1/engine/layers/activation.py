"""SwiGLU's gate: silu(gate) * up on the fused gate|up projection's output `[..., 2 * d]`.

`silu_and_mul_reference` is the plain-PyTorch kernel (the default, and the ground truth of `stage1::silu_and_mul`,
csrc/fused_ops.cpp and csrc/cuda/fused_ops.cuh); `use_elementwise_kernels` (elementwise.py) installs another.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def silu_and_mul_reference(x: torch.Tensor) -> torch.Tensor:
    """silu(x[..., :d]) * x[..., d:], in x's dtype (rounded after the silu, as the two ops are). Overwrites x's gate
    half: on the CPU these elementwise passes cost as much memory traffic as a matmul's weights."""
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate, inplace=True).mul_(up)


class SiluAndMul(nn.Module):
    silu_and_mul = staticmethod(silu_and_mul_reference)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.silu_and_mul(x)
