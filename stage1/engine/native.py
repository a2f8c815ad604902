"""The native ops (`stage1._C`, built from csrc/ by setup.py when it can be), the attention backend and the
sampler on them.

`stage1._C` is optional: importing it registers `torch.ops.stage1.*` (paged_decode_attention, write_kv,
linear_bf16w, sample, gumbel_noise, and the fused ops below; CPU and Meta kernels). `native_available()` says
whether it loaded, and `native_error()` why not. `NativeAttentionBackend` runs decode and the cache writes
through those ops on CPU tensors it supports (fp32/bf16 cache, head_dim a multiple of 8 up to 256) and the
plain-PyTorch reference everywhere else (prefill, other dtypes/devices).

`linear_bf16w` (`torch.ops.stage1.linear_bf16w`: bf16 weights widened to fp32 in registers, fp32 sums) is the
linear layers' matmul when the native kernels run a bf16 model on a CPU (backends.py); its plain-PyTorch
reference is `linear_bf16w_reference`.

The fused elementwise ops (csrc/fused_ops.cpp; CUDA kernels in csrc/cuda/ where stage1._C was built against a CUDA
torch, `native_cuda_available()`): `rms_norm` and `fused_add_rms_norm` (references in layers/norm.py),
`silu_and_mul` (layers/activation.py), installed in the layers as `ELEMENTWISE`; and `rotary_write_kv` (reference
`rotary_write_kv_reference`, attention.py), the attention backends' fused rotary + KV write: the native backend's
on the CPU, and `WithNativeRotaryKV` puts it in front of another backend's kernels on a GPU.

`native_sample` (`torch.ops.stage1.sample`) is the native kernels' sampler: the same tokens as the reference
`stage1.engine.sampler.sample` (same survivors, same Philox noise, same tie rule; csrc/cpu/sampler_kernel.h says
where fp32 rounding could part them), without sorting the vocabulary.
"""

from __future__ import annotations

import functools

import torch

from stage1.contract import AttentionBackend, AttentionContext

from .attention import apply_rotary, decode_attention_reference, prefill_attention_reference, write_kv_reference
from .layers import ElementwiseKernels
from .layers.activation import silu_and_mul_reference
from .onednn import WIDENED_MIN_ROWS, linear_widened, onednn_available
from .sampler import SamplingBatch, sample

_CACHE_DTYPES = (torch.float32, torch.bfloat16)


@functools.cache
def _load():
    """(module, None) once stage1._C is imported, else (None, the reason)."""
    try:
        from stage1 import _C
    except ImportError as exc:
        return None, f"stage1._C is not built ({exc}); reinstall with `pip install --no-build-isolation -e .`"
    return _C, None


def native_available() -> bool:
    return _load()[0] is not None


def native_error() -> str | None:
    return _load()[1]


def cpu_isa() -> str | None:
    """The CPU kernel set the native ops run ('avx2' or 'scalar'), None when the module is not built."""
    module = _load()[0]
    return None if module is None else module.cpu_isa()


@functools.cache
def native_cuda_available() -> bool:
    """Whether stage1._C has its CUDA kernels (built against a CUDA torch, csrc/cuda/); asked once."""
    return native_available() and torch._C._dispatch_has_kernel_for_dispatch_key("stage1::silu_and_mul", "CUDA")


def linear_bf16w(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x W^T (+ b): x fp32 [..., K], W bf16 [N, K] as stored (nn.Linear's layout), b fp32 [N]; fp32 out.
    From a few rows of x on, the weight widened a slice at a time into oneDNN's fp32 product (onednn.py), which
    then runs 1.1-3x faster than the op's own kernel; below, stage1::linear_bf16w, which reads half the bytes."""
    x2 = x.reshape(-1, x.shape[-1])
    if x2.shape[0] >= WIDENED_MIN_ROWS and onednn_available():
        y = linear_widened(x2, weight, bias)
    else:
        y = torch.ops.stage1.linear_bf16w(x2, weight, bias)
    return y.view(*x.shape[:-1], weight.shape[0])


def linear_bf16w_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """The same product in plain PyTorch: the weight widened to fp32 (exact), then an fp32 matmul."""
    y = x @ weight.float().T
    return y if bias is None else y + bias


# ------------------------------------------------------------------------------------ fused elementwise ops

def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """weight * rms_norm(x) (rms_norm_reference), one pass."""
    return torch.ops.stage1.rms_norm(x.contiguous(), weight, eps)


def fused_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                       eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(norm(x + residual), x + residual) in x's and residual's memory (fused_add_rms_norm_reference), one pass."""
    if not (x.is_contiguous() and residual.is_contiguous()):
        x, residual = x.contiguous(), residual.contiguous()
    torch.ops.stage1.fused_add_rms_norm(x, residual, weight, eps)
    return x, residual


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """silu(x[..., :d]) * x[..., d:] into a new tensor (silu_and_mul_reference), one pass."""
    return torch.ops.stage1.silu_and_mul(x)


# module-level functions: the kernel choice is pickled to the tensor-parallel workers (where unpickling the native
# attention backend that always comes with these loads the ops)
ELEMENTWISE = ElementwiseKernels("native", rms_norm, fused_add_rms_norm, silu_and_mul)
# On the CPU the activation stays ATen's in-place silu and mul: the op's separate output measured 0.74-0.85x of it
# at M = 1-512 (benchmarks/kernels_native.py --fused-only, 2026-12-02); its one pass is for the GPU.
CPU_ELEMENTWISE = ElementwiseKernels("native", rms_norm, fused_add_rms_norm, silu_and_mul_reference)


def rotary_write_kv(qk: torch.Tensor, v: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], cache: torch.Tensor,
                    slot_mapping: torch.Tensor) -> torch.Tensor:
    """qk rotated in place, its k heads and v stored in their slots (negative slots skipped); returns qk."""
    cos, sin = rope
    torch.ops.stage1.rotary_write_kv(qk, v, cos, sin, cache, slot_mapping)
    return qk


def _fused_rotary_fits(qk: torch.Tensor, v: torch.Tensor, cache: torch.Tensor) -> bool:
    on_device = qk.device.type == "cpu" or (qk.device.type == "cuda" and native_cuda_available())
    return on_device and qk.dtype == v.dtype == cache.dtype and qk.stride(-1) == 1 and v.stride(-1) == 1 \
        and cache.stride(-1) == 1


def native_sample(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """One token id per row of `logits` [rows, vocab], as `stage1.engine.sampler.sample` draws it, through
    stage1::sample on CPU tensors (logits widened to fp32 first) and the reference elsewhere. A module-level
    function: the tensor-parallel workers receive the kernel choice pickled."""
    if logits.device.type != "cpu":
        return sample(logits, batch)
    _load()  # registers the ops (a no-op once loaded)
    return torch.ops.stage1.sample(logits.float(), batch.temperature, batch.top_k, batch.top_p, batch.min_p,
                                   batch.seeds, batch.steps)


def _supported(cache: torch.Tensor) -> bool:
    return cache.device.type == "cpu" and cache.dtype in _CACHE_DTYPES and cache.shape[-1] % 8 == 0 \
        and cache.shape[-1] <= 256


class NativeAttentionBackend(AttentionBackend):
    """Decode attention and KV writes through stage1._C's CPU ops; prefill and rotary through the reference."""

    name = "native"

    def __init__(self):
        if not native_available():
            raise ValueError(f"kernels='native': {native_error()}")

    def __reduce__(self):  # unpickled in a tensor-parallel worker: __init__ loads the ops there too
        return (NativeAttentionBackend, ())

    def rotary(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        return apply_rotary(x, rope)

    def write_kv(self, cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor) -> None:
        if cache.device.type == "cpu":
            torch.ops.stage1.write_kv(cache, k, v, slot_mapping)
        else:
            write_kv_reference(cache, k, v, slot_mapping)

    def rotary_write_kv(self, qk, v, rope, cache, slot_mapping) -> torch.Tensor:
        if _fused_rotary_fits(qk, v, cache):
            return rotary_write_kv(qk, v, rope, cache, slot_mapping)
        return super().rotary_write_kv(qk, v, rope, cache, slot_mapping)

    def prefill(self, q, k, v, cache, ctx: AttentionContext, scale: float) -> torch.Tensor:
        return prefill_attention_reference(q, k, v, cache, ctx, scale)

    def decode(self, q, cache, ctx: AttentionContext, scale: float) -> torch.Tensor:
        if not _supported(cache):
            return decode_attention_reference(q, cache, ctx.block_tables, ctx.context_lens, scale)
        return torch.ops.stage1.paged_decode_attention(q, cache, ctx.block_tables, ctx.context_lens, scale)


class WithNativeRotaryKV(AttentionBackend):
    """Another backend's kernels (the Triton ones on a GPU) with rotary + KV write fused in stage1::rotary_write_kv
    where it fits; the name stays the other backend's."""

    def __init__(self, inner: AttentionBackend):
        if not native_available():
            raise ValueError(f"kernels='native': {native_error()}")
        self.inner = inner
        self.name = inner.name

    def __reduce__(self):  # a tensor-parallel worker loads the ops again
        return (WithNativeRotaryKV, (self.inner,))

    def rotary(self, x, rope):
        return self.inner.rotary(x, rope)

    def write_kv(self, cache, k, v, slot_mapping) -> None:
        self.inner.write_kv(cache, k, v, slot_mapping)

    def rotary_write_kv(self, qk, v, rope, cache, slot_mapping) -> torch.Tensor:
        if _fused_rotary_fits(qk, v, cache):
            return rotary_write_kv(qk, v, rope, cache, slot_mapping)
        return self.inner.rotary_write_kv(qk, v, rope, cache, slot_mapping)

    def prefill(self, q, k, v, cache, ctx: AttentionContext, scale: float) -> torch.Tensor:
        return self.inner.prefill(q, k, v, cache, ctx, scale)

    def decode(self, q, cache, ctx: AttentionContext, scale: float) -> torch.Tensor:
        return self.inner.decode(q, cache, ctx, scale)
