"""Which kernels the norm and activation layers run: chosen once in backends.py (`Kernels.elementwise`) and
installed in the model by the loader, as the linear layers' matmul is (`use_linear_kernel`). The default is the
plain-PyTorch references beside the layers; with the native ops, stage1._C's fused kernels (native.py)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from torch import nn

from .activation import SiluAndMul, silu_and_mul_reference
from .norm import RMSNorm, fused_add_rms_norm_reference, rms_norm_reference


@dataclass(frozen=True)
class ElementwiseKernels:
    name: str = "torch"
    rms_norm: Callable = rms_norm_reference  # (x, weight, eps) -> norm(x)
    add_rms_norm: Callable = fused_add_rms_norm_reference  # (x, residual, weight, eps) -> (norm(x + r), x + r)
    silu_and_mul: Callable = silu_and_mul_reference  # (x [..., 2d]) -> silu(x[..., :d]) * x[..., d:]


def use_elementwise_kernels(model: nn.Module, kernels: ElementwiseKernels) -> None:
    for module in model.modules():
        if isinstance(module, RMSNorm):
            module.rms_norm, module.add_rms_norm = kernels.rms_norm, kernels.add_rms_norm
        elif isinstance(module, SiluAndMul):
            module.silu_and_mul = kernels.silu_and_mul
