"""The one place that chooses which kernels run: the plain-PyTorch reference, the Triton kernels, or the native
ops of stage1._C (csrc/, optional: built by `pip install --no-build-isolation -e .` where it can be).

`auto` (`auto_kernels`) picks Triton for CUDA tensors when it is installed; on a CPU the native ops where stage1._C
is built; the reference everywhere else. Triton launched on CPU tensors only works in its interpreter
(TRITON_INTERPRET=1), which is for tests, not for speed. `native` (CPU only for now) runs decode attention, rotary +
KV writes, RMSNorm (+ residual add) and sampling (`native_sample`: the reference's tokens) through stage1._C, and
prefill attention and SiLU-and-mul (ATen's in-place ops are faster on the CPU) through the reference. On a GPU,
Triton's kernels get stage1._C's fused CUDA ops beside them wherever stage1._C was built with CUDA
(`with_native_cuda_ops`).

The linear layers' matmul (`Kernels.linear`, installed in every layer by the loader) is F.linear, except with
`native` on a CPU (`for_dtype`). In float32 it is oneDNN's (onednn.py: 2-3x MKL's sgemm here) on weights the loader
prepacked (`Kernels.prepack`). In bfloat16 the matmul weights stay bf16 in memory and `stage1::linear_bf16w`
multiplies them in fp32 (widened into oneDNN's product from a few rows of x on), and everything else
(activations, norms, KV cache) runs fp32: fp32 arithmetic at half the weight bytes, instead of torch's bf16 matmuls.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path
from dataclasses import dataclass, replace
from typing import Callable

import torch
import torch.nn.functional as F

from stage1.contract import AttentionBackend

from .attention import ReferenceAttentionBackend
from .config import ModelConfig, parse_dtype
from .kernel_check import verify
from .kernel_choices import CHOICES
from .layers import ElementwiseKernels, use_elementwise_kernels, use_linear_kernel
from .memory import available_memory, fp32_weight_bytes
from .sampler import SamplingBatch, sample

logger = logging.getLogger("stage1")


@dataclass(frozen=True)
class Kernels:
    name: str
    attention: AttentionBackend
    sample: Callable[[torch.Tensor, SamplingBatch], torch.Tensor]
    linear: Callable = F.linear  # y = linear(x, weight, bias) in every linear layer and the LM head
    weight_dtype: torch.dtype | None = None  # the matmul weights are stored in this dtype; None: the run dtype
    prepack: Callable | None = None  # the form `linear` reads each matmul weight in, made once at load
    # the norms' and the activation's kernels (installed in the layers by the loader): references or stage1._C's
    elementwise: ElementwiseKernels = ElementwiseKernels()
    # the fast kernels that failed their check on this device and were replaced by the next path (kernel_check.py)
    replaced: tuple[str, ...] = ()
    # decode steps may replay CUDA graphs: the Triton kernels on a GPU (the reference attention would gather every
    # row's full-width block table, max_model_len tokens, in each replay)
    decode_graphs: bool = False

    def install(self, model: torch.nn.Module, dtype: torch.dtype) -> None:
        """Puts these kernels into `model`'s layers, once its weights are loaded (in `dtype`, the matmul weights in
        `weight_dtype`): the matmul, on each weight put in the form it reads (`prepack`), and the norms' and the
        activation's kernels. Attention and the sampler are read from the step's context and the runner."""
        narrow = self.weight_dtype is not None and self.weight_dtype != dtype
        use_linear_kernel(model, self.linear, dtype if narrow else None, self.prepack)
        use_elementwise_kernels(model, self.elementwise)

    def for_dtype(self, dtype: torch.dtype, device: torch.device) -> tuple["Kernels", torch.dtype]:
        """These kernels as they run a model in `dtype`, and the run dtype (activations, KV cache, other
        weights). With the native kernels on a CPU, bfloat16 means bf16 matmul weights and fp32 arithmetic, and
        float32 means oneDNN's matmul on weights prepacked at load, where torch has oneDNN."""
        if self.name != "native" or device.type != "cpu":
            return self, dtype
        from . import onednn

        if dtype == torch.bfloat16:
            from .native import linear_bf16w

            logger.info("stage1: kernels native in bfloat16: linear layers and LM head keep bf16 weights, "
                        "multiplied in fp32 (stage1::linear_bf16w; from %d rows widened into oneDNN's product: "
                        "%s); activations, norms and KV cache in float32", onednn.WIDENED_MIN_ROWS,
                        "available" if onednn.onednn_available() else "unavailable in this torch")
            return replace(self, linear=linear_bf16w, weight_dtype=torch.bfloat16), torch.float32
        if dtype == torch.float32 and onednn.onednn_available():
            logger.info("stage1: kernels native in float32: linear layers and LM head through oneDNN, weights "
                        "prepacked at load (a tied LM head multiplies by the plain embedding table)")
            return replace(self, linear=onednn.linear, prepack=onednn.prepack), dtype
        return self, dtype


def resolve(choice: str, device: torch.device, dtype: str | torch.dtype,
            model: ModelConfig) -> tuple[Kernels, torch.dtype]:
    """The one decision of what runs: the kernels for `choice` on `device` (auto: `auto_kernels`), the run dtype
    (`dtype`, or `auto_dtype` for those kernels on this machine), the kernels as they run in it (`for_dtype`), and
    each fast one checked against its PyTorch reference on this device (kernel_check.verify: replaced, loudly,
    under auto; an error where it was chosen). Made before anything is loaded, so a bad choice fails at once."""
    kernels = select_kernels(choice, device)
    run_dtype = auto_dtype(model.torch_dtype, device, kernels, model) if dtype == "auto" else parse_dtype(dtype)
    kernels, run_dtype = kernels.for_dtype(run_dtype, device)
    return verify(kernels, device, run_dtype, explicit=choice != "auto"), run_dtype


def select_kernels(choice: str, device: torch.device) -> Kernels:
    if choice not in CHOICES:
        raise ValueError(f"kernels={choice!r}: use one of {', '.join(CHOICES)}")
    if choice == "auto":
        choice = auto_kernels(device)
    if choice == "torch":
        return Kernels("torch", ReferenceAttentionBackend(), sample)
    if choice == "native":
        return native_kernels(device)
    if not triton_available():
        raise ValueError("kernels='triton' needs the triton package (pip install triton), or use kernels='torch'")
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError("kernels='triton' on the CPU runs only in Triton's interpreter: set TRITON_INTERPRET=1 "
                         "before starting Python (slow, meant for tests), or use kernels='torch'")
    from stage1.kernels.attention import TritonAttentionBackend

    return with_native_cuda_ops(Kernels("triton", TritonAttentionBackend(), triton_sample,
                                        decode_graphs=device.type == "cuda"), device)


def with_native_cuda_ops(kernels: Kernels, device: torch.device) -> Kernels:
    """On a GPU, where stage1._C was built with its CUDA kernels: its fused RMSNorm (+ residual add), SiLU-and-mul
    and rotary + KV write in place of the PyTorch ops and the Triton rotary/write_kv launches they replace."""
    from .native import ELEMENTWISE, WithNativeRotaryKV, native_cuda_available

    if device.type != "cuda" or not native_cuda_available():
        return kernels
    logger.info("stage1: stage1._C has CUDA kernels: RMSNorm, SiLU-and-mul and rotary + KV write run fused")
    return replace(kernels, attention=WithNativeRotaryKV(kernels.attention), elementwise=ELEMENTWISE)


def triton_available() -> bool:
    """Whether triton is installed (its kernels still need a GPU, or TRITON_INTERPRET=1 to run on the CPU)."""
    try:
        return importlib.util.find_spec("triton") is not None
    except (ImportError, ValueError):  # ValueError: a None entry in sys.modules (blocked import)
        return False


def auto_kernels(device: torch.device) -> str:
    """Triton on a GPU where it is installed. On a CPU the native ops where stage1._C is built: their linears run
    oneDNN in fp32 (2-4x torch's MKL here) and the rows are fp32's (dtype auto, auto_dtype); on the
    main job they ran 3.3x torch in fp32 and as fast as torch's bf16 matmuls on an avx512_bf16 CPU, whose rows are
    bf16's (README, Speed). Else the reference."""
    if device.type == "cuda":
        return "triton" if triton_available() else "torch"
    if device.type == "cpu":
        from .native import native_available

        if native_available():
            return "native"
    return "torch"


def auto_dtype(checkpoint_dtype: torch.dtype, device: torch.device, kernels: Kernels,
               model: ModelConfig | None = None) -> torch.dtype:
    """The checkpoint's dtype, except half precision on a CPU. With the native kernels a CPU computes in fp32
    whatever the weights' dtype, so the rows are fp32's: a bf16 checkpoint runs with fp32 weights (oneDNN,
    prepacked) on a CPU with native bf16 where they fit (`model`'s fp32 weights within half the available memory),
    else keeps bf16 weights (Kernels.for_dtype); on the main job the first was 1.3x the second on an avx512_bf16
    VM, and where memory streams slower (the AVX2-only VMs) half the bytes should count for more. Without the
    native kernels a CPU without native bf16 runs fp32 (its bf16 matmuls are emulated), one with it the
    checkpoint's dtype."""
    if device.type != "cpu" or checkpoint_dtype == torch.float32:
        return checkpoint_dtype
    if kernels.name == "native":
        if checkpoint_dtype != torch.bfloat16:
            return torch.float32
        if cpu_has_native_bf16() and model is not None and 2 * fp32_weight_bytes(model) <= available_memory():
            logger.info("stage1: dtype auto: float32 weights for the native kernels (%.1f GB, within half of the "
                        "available memory); pass dtype='bfloat16' to keep bf16 weights", fp32_weight_bytes(model) / 1e9)
            return torch.float32
        return torch.bfloat16
    if not cpu_has_native_bf16():
        logger.info("stage1: this CPU has no native bf16 (avx512_bf16/AMX): running in float32; "
                    "pass dtype='bfloat16' to force it")
        return torch.float32
    return checkpoint_dtype


def cpu_has_native_bf16() -> bool:
    """avx512_bf16 or AMX: without them torch's bf16 matmuls on the CPU run an emulated path many times slower
    than fp32 (0.2 vs 1.8 GB/s of weights measured on an AVX2-only EPYC)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def native_kernels(device: torch.device) -> Kernels:
    from .native import NativeAttentionBackend, cpu_isa, native_available, native_error, native_sample

    if not native_available():
        raise ValueError(f"kernels='native': {native_error()}; or use kernels='torch'")
    if device.type != "cpu":
        raise ValueError(f"kernels='native' has CPU kernels only so far (device {device}): use kernels='triton' "
                         f"or 'torch'")
    from .native import CPU_ELEMENTWISE

    logger.info("stage1: kernels native (stage1._C, CPU kernels %s): decode attention, rotary + KV writes, RMSNorm and "
                "sampling native, prefill attention and SiLU-and-mul through the PyTorch reference", cpu_isa())
    return Kernels("native", NativeAttentionBackend(), native_sample, elementwise=CPU_ELEMENTWISE)


def triton_sample(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """The Triton sampler behind the reference's signature (a module-level function: the tensor-parallel
    workers receive the kernel choice pickled)."""
    from stage1.kernels.sampling import fused_sample

    if batch.all_greedy:  # one argmax launch instead of the sampler's passes
        return logits.argmax(dim=-1)
    return fused_sample(logits, batch.temperature, batch.top_k, batch.top_p, batch.min_p, batch.seeds, batch.steps,
                        max_top_k=batch.max_top_k)
