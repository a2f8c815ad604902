"""fp32 matmuls on the CPU through oneDNN, the maintained library inside torch (its `mkldnn` ops), for the native
kernels (backends.py).

torch's F.linear on the CPU calls MKL's sgemm, which on the AMD EPYC VMs we build on reaches 90-190 GFLOP/s at the
0.5B model's shapes; oneDNN's inner product on the same shapes and threads reached 280-440 (M = 32-512) and 2-6x
MKL at M = 2-16, at the same fp32 accuracy (fp32 products and sums; only the order of the sums differs). So:

- `prepack(weight)`: the weight reordered once, at load, into oneDNN's blocked layout (an opaque mkldnn tensor of
  the same shape); `linear` then multiplies by it without reordering per call.
- `linear(x, weight, bias)`: y = x W^T (+ b) in fp32; W prepacked or a plain [N, K] tensor (a tied LM head, whose
  matrix is also the embedding table, stays plain: the lookup needs it).
- `linear_widened(x, weight, bias)`: bf16 W (kept in bf16 in memory), widened exactly to fp32 a few MB at a time
  into a reused scratch that stays in cache, each slice multiplied by oneDNN. The widening is paid once per weight
  element per call, so this wins over stage1::linear_bf16w (which widens in registers) once x has a few rows
  (`WIDENED_MIN_ROWS`); at batch 1-3 the weight bytes decide and the native kernel stays.

Figures: benchmarks/kernels_native.py (the linear rows) and README, Speed. The reference for all three is
F.linear on the fp32 weight (`linear_bf16w_reference` for the widened one).
"""

from __future__ import annotations

import functools

import torch

# The batch size oneDNN is told to pack for: the layout it picks served M = 1-512 within a few percent of packing
# for each M (measured at M = 1, 32 and 512, gate_up 896 -> 9728).
PREPACK_ROWS = 32
# x rows from which the widened oneDNN product beats stage1::linear_bf16w (which keeps one 3-row tile streaming
# the bf16 weight below that): 1.1-1.7x at M = 4, 2.4-2.6x at 32, 2.1x at 512 (0.5B shapes, 2-core EPYC).
WIDENED_MIN_ROWS = 4
# fp32 bytes of weight widened per oneDNN call: 4 MB measured best of 1, 4 and 16 (1 MB pays the call too often).
WIDENED_SLICE_BYTES = 4 << 20


@functools.cache
def onednn_available() -> bool:
    """torch built with oneDNN (mkldnn) and its inner-product ops present (torch.ops.mkldnn is torch-internal:
    checked once, so a torch without them falls back to F.linear instead of failing mid-run)."""
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        weight = torch.ops.mkldnn._reorder_linear_weight(torch.ones(8, 8), PREPACK_ROWS)
        y = torch.ops.mkldnn._linear_pointwise(torch.ones(2, 8), weight, None, "none", [], "")
    except (AttributeError, RuntimeError):
        return False
    return bool((y == 8).all())


def prepack(weight: torch.Tensor) -> torch.Tensor:
    """`weight` [N, K] fp32 in oneDNN's blocked layout for `linear` (made once, at load)."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(), PREPACK_ROWS)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x W^T (+ b), fp32: x [..., K], W [N, K] prepacked (`prepack`) or plain, b [N]."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


def linear_widened(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x W^T (+ b) for a bf16 W [N, K] and fp32 x [M, K]: W widened (exactly) to fp32 a slice of rows at a
    time, each slice's columns of y computed by oneDNN; fp32 out [M, N]."""
    (m, k), n = x.shape, weight.shape[0]
    rows = min(n, max(16, WIDENED_SLICE_BYTES // (4 * k) // 16 * 16))
    y = torch.empty(m, n, dtype=torch.float32)
    scratch = torch.empty(rows, k, dtype=torch.float32)
    for start in range(0, n, rows):
        stop = min(start + rows, n)
        widened = scratch[:stop - start]
        widened.copy_(weight[start:stop])
        y[:, start:stop] = linear(x, widened, None if bias is None else bias[start:stop])
    return y
