"""Rotary position embedding in Triton: one launch for all the q and k heads of a step.

Reference: `apply_rotary` in stage1/engine/attention.py (neox style: the two halves of each head rotate together,
computed in fp32, stored in the input's dtype). The PyTorch version costs about nine elementwise launches per layer
on a GPU (casts, products, sums, a concatenation); this kernel reads each element once and writes it once.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rotary_kernel(
    x_ptr, cos_ptr, sin_ptr, out_ptr, num_tokens,
    stride_xt, stride_xh, stride_ct, stride_st, stride_ot, stride_oh,
    HALF: tl.constexpr, HALF_P2: tl.constexpr, BLOCK_T: tl.constexpr,
):
    """Program (token block, head): x1' = x1 cos - x2 sin, x2' = x2 cos + x1 sin for BLOCK_T tokens of one head."""
    t = (tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
    head = tl.program_id(1)
    d = tl.arange(0, HALF_P2)
    mask = (t < num_tokens)[:, None] & (d < HALF)[None, :]
    x = x_ptr + t[:, None] * stride_xt + head * stride_xh + d[None, :]
    x1 = tl.load(x, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x + HALF, mask=mask, other=0.0).to(tl.float32)
    cos = tl.load(cos_ptr + t[:, None] * stride_ct + d[None, :], mask=mask, other=0.0)
    sin = tl.load(sin_ptr + t[:, None] * stride_st + d[None, :], mask=mask, other=0.0)
    out = out_ptr + t[:, None] * stride_ot + head * stride_oh + d[None, :]
    tl.store(out, (x1 * cos - x2 * sin).to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(out + HALF, (x2 * cos + x1 * sin).to(out_ptr.dtype.element_ty), mask=mask)


def rotary_meta(head_dim: int) -> dict:
    """Tiles of ~2K elements per half: BLOCK_T tokens of one head."""
    half_p2 = triton.next_power_of_2(head_dim // 2)
    return dict(HALF=head_dim // 2, HALF_P2=half_p2, BLOCK_T=max(1, 2048 // half_p2), num_warps=4)


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x `[tokens, heads, head_dim]` (any token and head strides) rotated by cos, sin `[tokens, 1, head_dim / 2]`
    fp32: a new contiguous tensor in x's dtype. Same result as apply_rotary(x, (cos, sin))."""
    num_tokens, heads, head_dim = x.shape
    if head_dim % 2:
        raise ValueError(f"rotary needs an even head_dim, got {head_dim}")
    for name, t in (("cos", cos), ("sin", sin)):
        if t.shape[0] != num_tokens or t.shape[-1] != head_dim // 2 or t.numel() != num_tokens * (head_dim // 2):
            raise ValueError(f"rotary: {name} must hold one row of head_dim / 2 = {head_dim // 2} angles per token "
                             f"({num_tokens} tokens), got shape {tuple(t.shape)}")
    if x.stride(-1) != 1:
        x = x.contiguous()
    cos, sin = cos.float(), sin.float()
    if cos.stride(-1) != 1 or sin.stride(-1) != 1:
        cos, sin = cos.contiguous(), sin.contiguous()
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if num_tokens == 0 or heads == 0:
        return out
    meta = rotary_meta(head_dim)
    grid = (triton.cdiv(num_tokens, meta["BLOCK_T"]), heads)
    _rotary_kernel[grid](x, cos, sin, out, num_tokens, x.stride(0), x.stride(1), cos.stride(0), sin.stride(0),
                         out.stride(0), out.stride(1), **meta)
    return out
