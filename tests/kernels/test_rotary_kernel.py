"""The rotary kernel (kernels/rotary.py) against apply_rotary (stage1/engine/attention.py)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from stage1.engine.attention import apply_rotary  # noqa: E402
from stage1.engine.model import RotaryEmbedding  # noqa: E402
from stage1.kernels.rotary import rotary  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.parametrize("tokens, heads, kv_heads, head_dim, dtype", [
    (1, 4, 1, 64, torch.float32), (17, 14, 2, 64, torch.float32), (70, 40, 8, 128, torch.float32),
    (33, 28, 4, 128, torch.float16), (33, 28, 4, 128, torch.bfloat16),
])
def test_rotary_matches_the_reference(tokens, heads, kv_heads, head_dim, dtype):
    g = torch.Generator().manual_seed(tokens)
    # the q|k slice of a fused qkv output, as the model passes it: rows strided by the v columns after it
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * head_dim, generator=g).to(dtype).to(DEVICE)
    qk = qkv[:, :(heads + kv_heads) * head_dim].view(tokens, heads + kv_heads, head_dim)
    positions = torch.randint(0, 30_000, (tokens,), generator=g).to(DEVICE)
    rope = RotaryEmbedding(head_dim, 1_000_000.0, 32_768)(positions)
    got, expected = rotary(qk, *rope), apply_rotary(qk, rope)
    assert got.dtype == dtype and got.shape == qk.shape and got.is_contiguous()
    if dtype == torch.float32:
        torch.testing.assert_close(got, expected, atol=2e-6, rtol=2e-6)  # fused multiply-adds may round once less
    else:  # one rounding to 16 bits from (nearly) the same fp32 value
        torch.testing.assert_close(got.float(), expected.float(), atol=1e-2, rtol=1e-2)
        # the triton 3.7 interpreter truncates fp32 -> bf16 where a GPU rounds to nearest: on the CPU bf16 agrees to
        # one unit in the last place only
        if dtype == torch.float16 or DEVICE.type == "cuda":
            assert (got == expected).float().mean() > 0.99


def test_rotary_empty_and_odd_inputs():
    rope = RotaryEmbedding(64, 10_000.0, 128)(torch.arange(3, device=DEVICE))
    empty = torch.zeros(0, 2, 64, device=DEVICE)
    assert rotary(empty, *RotaryEmbedding(64, 10_000.0, 128)(torch.arange(0, device=DEVICE))).shape == (0, 2, 64)
    x = torch.randn(3, 2, 64, device=DEVICE)
    # a non-contiguous last dimension is copied first, not misread
    wide = torch.randn(3, 2, 128, device=DEVICE)[..., ::2]
    torch.testing.assert_close(rotary(wide, *rope), apply_rotary(wide, rope), atol=2e-6, rtol=2e-6)
    with pytest.raises(ValueError, match="even head_dim"):
        rotary(x[..., :63], *rope)
    with pytest.raises(ValueError, match="one row of head_dim / 2 = 32 angles per token"):
        rotary(x[:2], *rope)  # angles for 3 tokens, 2 tokens: a kernel would read past the end
