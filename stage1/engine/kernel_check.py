"""Kernels that check themselves where they run: before an engine uses a fast kernel (Triton, stage1._C's native or
CUDA ops) on a device and build it has not seen, each one runs on small inputs beside its plain-PyTorch reference.

A kernel that raises (a compile error, a missing op) or disagrees is replaced by the next path (the CUDA ops ->
the Triton kernels they front -> the reference), with one warning line naming it and the mismatch; with an explicit
`kernels="native"` or `"triton"` it is an error naming the kernel instead. `Kernels.replaced` lists what was
replaced (LLM.engine_info, the main job's manifest). Verdicts are cached on disk per (device, build, kernels,
dtype) under $STAGE1_CACHE or ~/.cache/stage1 (`kernel-checks/`), so later starts pay nothing; a cached failure is
replaced again, with its warning, without running it.

The checks compare what the engine consumes: an attention backend's rotary + KV write (outputs and the cache),
prefill and decode outputs; the sampler's tokens (every sampler draws the reference's token from the same
survivors); the norms, the activation and the matmul within a tolerance that fp32 or bf16 rounding meets and a
wrong kernel does not.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from stage1.contract import AttentionBackend, AttentionContext

from .attention import ReferenceAttentionBackend
from .layers import ElementwiseKernels
from .sampler import SamplingBatch, sample
from .params import SamplingParams

logger = logging.getLogger("stage1")

CHECKS_VERSION = 1  # bump when a check changes: older verdicts are then not reused


class KernelCheckError(ValueError):
    """An explicitly chosen kernel failed its check on this device."""


@dataclass(frozen=True)
class Verdict:
    kernel: str  # e.g. "stage1::rms_norm", "triton paged_decode_attention"
    ok: bool
    detail: str = ""  # the mismatch or the exception, one line


# ------------------------------------------------------------------------------------------------- the checks

def tolerance(dtype: torch.dtype) -> float:
    return 2e-2 if dtype in (torch.bfloat16, torch.float16) else 2e-3


def compare(kernel: str, got: torch.Tensor, want: torch.Tensor, tol: float) -> Verdict:
    got, want = got.float().cpu(), want.float().cpu()
    if got.shape != want.shape:
        return Verdict(kernel, False, f"shape {tuple(got.shape)}, the reference's {tuple(want.shape)}")
    if not torch.isfinite(got).all():
        return Verdict(kernel, False, "non-finite values")
    error = (got - want).abs().max().item() if got.numel() else 0.0
    scale = max(want.abs().max().item() if want.numel() else 0.0, 1.0)
    if error > tol * scale:
        return Verdict(kernel, False, f"max abs error {error:.3g} > {tol * scale:.3g}")
    return Verdict(kernel, True)


def _guarded(kernel: str, run: Callable[[], Verdict]) -> Verdict:
    try:
        return run()
    except Exception as exc:  # noqa: BLE001 - a kernel that cannot run here (compile error, missing op) is replaced
        return Verdict(kernel, False, _raised(exc))


def _raised(exc: Exception) -> str:
    first_line = (str(exc).strip().splitlines() or [""])[0][:200]
    return f"raised {type(exc).__name__}: {first_line}"


def _attention_label(labels: dict[str, str]) -> str:
    """An attention backend that raised: which of its kernels did is in the exception."""
    return f"{labels['rotary_write_kv']} / {labels['prefill']} / {labels['decode']}"


def _attention_case(device: torch.device, dtype: torch.dtype, generator: torch.Generator):
    """Two sequences (19 and 6 prompt tokens) over a paged cache of 8 blocks of 16 tokens, 4 query / 2 KV heads of
    64: the step's tensors, the prefill and decode contexts, and rope."""
    heads, kv_heads, head_dim, block, blocks = 4, 2, 64, 16, 8
    lens = [19, 6]
    tables = torch.tensor([[3, 5], [6, 1]], dtype=torch.int32)
    slots = torch.tensor([int(tables[s, p // block]) * block + p % block for s, n in enumerate(lens)
                          for p in range(n)])

    def randn(*shape):
        return torch.randn(*shape, generator=generator).to(device=device, dtype=dtype)

    tokens = sum(lens)
    positions = torch.cat([torch.arange(n) for n in lens]).float()
    inv_freq = 1.0 / 10000 ** (torch.arange(0, head_dim, 2).float() / head_dim)
    angles = positions[:, None] * inv_freq[None, :]
    rope = (angles.cos()[:, None, :].to(device), angles.sin()[:, None, :].to(device))
    prefill = dict(qk=randn(tokens, heads + kv_heads, head_dim), v=randn(tokens, kv_heads, head_dim), rope=rope,
                   slots=slots.to(device),
                   ctx=AttentionContext(is_prefill=True, kv_cache=None, slot_mapping=slots.to(device),
                                        block_tables=tables.to(device),
                                        context_lens=torch.tensor(lens, dtype=torch.int32, device=device),
                                        cu_seqlens_q=torch.tensor([0, lens[0], tokens], dtype=torch.int32,
                                                                  device=device),
                                        cu_seqlens_q_host=[0, lens[0], tokens], context_lens_host=list(lens)))
    decode_lens = [n + 1 for n in lens]
    decode = dict(q=randn(2, heads, head_dim),
                  ctx=AttentionContext(is_prefill=False, kv_cache=None, slot_mapping=None,
                                       block_tables=tables.to(device),
                                       context_lens=torch.tensor(decode_lens, dtype=torch.int32, device=device),
                                       context_lens_host=decode_lens))
    cache = torch.zeros(2, blocks, block, kv_heads, head_dim, dtype=dtype, device=device)
    return heads, prefill, decode, cache


def check_attention(backend: AttentionBackend, labels: dict[str, str], device: torch.device,
                    dtype: torch.dtype) -> list[Verdict]:
    """rotary + KV write, prefill and decode of `backend` against the reference, on the same inputs."""
    reference = ReferenceAttentionBackend()
    heads, prefill, decode, cache = _attention_case(device, dtype, torch.Generator().manual_seed(0))
    tol = tolerance(dtype)
    scale = 64 ** -0.5
    runs = {}
    for name, impl in (("ours", backend), ("reference", reference)):
        c = cache.clone()
        qk = impl.rotary_write_kv(prefill["qk"].clone(), prefill["v"], prefill["rope"], c, prefill["slots"])
        q, k = qk[:, :heads], qk[:, heads:]
        ctx = replace(prefill["ctx"], kv_cache=[c], backend=impl)
        runs[name] = (qk, c, impl.prefill(q, k, prefill["v"], c, ctx, scale),
                      impl.decode(decode["q"], c, replace(decode["ctx"], kv_cache=[c], backend=impl), scale))
    verdicts = []
    for index, part in enumerate(("rotary_write_kv", "rotary_write_kv", "prefill", "decode")):
        if index == 1:  # the cache the write left
            verdict = compare(labels[part], runs["ours"][1], runs["reference"][1], tol)
        else:
            verdict = compare(labels[part], runs["ours"][index], runs["reference"][index], tol)
        if not verdict.ok:
            verdicts.append(verdict)
    return verdicts or [Verdict(labels[p], True) for p in ("rotary_write_kv", "prefill", "decode")]


def check_sampler(sampler: Callable, label: str, device: torch.device) -> Verdict:
    """The reference's tokens on rows that are greedy, temperature-only, top-k, top-p, min-p and all together."""
    generator = torch.Generator().manual_seed(1)
    vocab = 1000
    logits = (torch.randn(12, vocab, generator=generator) * 3).to(device)
    params = [SamplingParams(max_tokens=1, **kw) for kw in (
        dict(temperature=0), dict(temperature=1.0), dict(temperature=0.7, top_k=20), dict(temperature=0.9, top_p=0.9),
        dict(temperature=1.2, min_p=0.05), dict(temperature=0.8, top_k=50, top_p=0.8, min_p=0.02))] * 2
    batch = SamplingBatch.build(params, device, seeds=list(range(100, 112)), steps=[3] * 12)
    want = sample(logits.cpu(), SamplingBatch.build(params, torch.device("cpu"), seeds=list(range(100, 112)),
                                                    steps=[3] * 12))
    got = sampler(logits, batch).cpu()
    if not torch.equal(got, want):
        rows = (got != want).nonzero().flatten().tolist()
        return Verdict(label, False, f"drew other tokens than the reference in rows {rows} of 12")
    return Verdict(label, True)


def check_elementwise(kernels: ElementwiseKernels, labels: dict[str, str], device: torch.device,
                      dtype: torch.dtype) -> list[Verdict]:
    reference = ElementwiseKernels()
    generator = torch.Generator().manual_seed(2)
    x = torch.randn(5, 96, generator=generator).to(device=device, dtype=dtype)
    r = torch.randn(5, 96, generator=generator).to(device=device, dtype=dtype)
    w = (1 + 0.1 * torch.randn(96, generator=generator)).to(device=device, dtype=dtype)
    gate_up = torch.randn(5, 192, generator=generator).to(device=device, dtype=dtype)
    tol = tolerance(dtype)
    verdicts = []
    if kernels.rms_norm is not reference.rms_norm:
        verdicts.append(_guarded(labels["rms_norm"], lambda: compare(
            labels["rms_norm"], kernels.rms_norm(x.clone(), w, 1e-6), reference.rms_norm(x, w, 1e-6), tol)))
    if kernels.add_rms_norm is not reference.add_rms_norm:
        def add_rms_norm() -> Verdict:
            got = kernels.add_rms_norm(x.clone(), r.clone(), w, 1e-6)
            want = reference.add_rms_norm(x, r, w, 1e-6)
            return next((v for v in (compare(labels["add_rms_norm"], g, e, tol) for g, e in zip(got, want))
                         if not v.ok), Verdict(labels["add_rms_norm"], True))
        verdicts.append(_guarded(labels["add_rms_norm"], add_rms_norm))
    if kernels.silu_and_mul is not reference.silu_and_mul:
        verdicts.append(_guarded(labels["silu_and_mul"], lambda: compare(
            labels["silu_and_mul"], kernels.silu_and_mul(gate_up.clone()), reference.silu_and_mul(gate_up), tol)))
    return verdicts


def check_linear(linear: Callable, prepack: Callable | None, reference: Callable, label: str,
                 weight_dtype: torch.dtype, device: torch.device, dtype: torch.dtype) -> Verdict:
    """One row (a decode step) and 37 (a prefill), with a bias: the product the layers get."""
    generator = torch.Generator().manual_seed(3)
    weight = (torch.randn(80, 64, generator=generator) / 8).to(device=device, dtype=weight_dtype)
    bias = torch.randn(80, generator=generator).to(device=device, dtype=dtype)
    packed = prepack(weight) if prepack is not None else weight
    for rows in (1, 37):
        x = torch.randn(rows, 64, generator=generator).to(device=device, dtype=dtype)
        verdict = compare(label, linear(x, packed, bias), reference(x, weight, bias), tolerance(dtype))
        if not verdict.ok:
            return verdict
    return Verdict(label, True)


# ------------------------------------------------------------------------------------- run, replace, remember

def verify(kernels, device: torch.device, dtype: torch.dtype, explicit: bool):
    """`kernels` (backends.Kernels) with every fast kernel that fails its check on this device replaced by the next
    path, and `replaced` naming them; an error naming the kernel where `explicit` (kernels="native"/"triton")."""
    if kernels.name == "torch":
        return kernels
    cache = _VerdictCache(device, kernels, dtype)
    verdicts = cache.load()
    if verdicts is None:
        verdicts = _run_checks(kernels, device, dtype)
        cache.store(verdicts)
    failed = [v for v in verdicts if not v.ok]
    if not failed:
        return kernels
    if explicit:
        first = failed[0]
        raise KernelCheckError(f"kernels={kernels.name!r}: {first.kernel} does not match its PyTorch reference on "
                               f"{describe_device(device)} ({first.detail}); use kernels='auto', which replaces "
                               f"it, or kernels='torch'")
    for v in failed:
        logger.warning("stage1: kernel check: %s does not match its PyTorch reference on %s (%s): replaced by "
                       "the next path", v.kernel, describe_device(device), v.detail)
    return _replace_failed(kernels, {v.kernel for v in failed})


def _labels(kernels) -> dict[str, str]:
    """The name each checked kernel goes by in messages: the op or the Triton kernel."""
    from . import native, onednn

    attention = kernels.attention
    names: dict[str, str] = {}
    if isinstance(attention, native.NativeAttentionBackend):
        names.update(rotary_write_kv="stage1::rotary_write_kv", prefill="native prefill (the reference)",
                     decode="stage1::paged_decode_attention")
    elif isinstance(attention, native.WithNativeRotaryKV):
        names.update(rotary_write_kv="stage1::rotary_write_kv (CUDA)", prefill="triton paged_prefill_attention",
                     decode="triton paged_decode_attention")
    else:
        names.update(rotary_write_kv=f"{attention.name} rotary + write_kv",
                     prefill=f"{attention.name} paged_prefill_attention",
                     decode=f"{attention.name} paged_decode_attention")
    ops = {native.rms_norm: "stage1::rms_norm", native.fused_add_rms_norm: "stage1::fused_add_rms_norm",
           native.silu_and_mul: "stage1::silu_and_mul", native.native_sample: "stage1::sample",
           native.linear_bf16w: "stage1::linear_bf16w", onednn.linear: "oneDNN linear (prepacked)"}
    elementwise = kernels.elementwise
    names.update(rms_norm=ops.get(elementwise.rms_norm, "rms_norm"),
                 add_rms_norm=ops.get(elementwise.add_rms_norm, "add_rms_norm"),
                 silu_and_mul=ops.get(elementwise.silu_and_mul, "silu_and_mul"),
                 sample=ops.get(kernels.sample, f"{kernels.name} sampler"),
                 linear=ops.get(kernels.linear, "linear"))
    return names


def _linear_reference(kernels) -> Callable:
    from .native import linear_bf16w_reference

    return linear_bf16w_reference if kernels.weight_dtype == torch.bfloat16 else F.linear


def _run_checks(kernels, device: torch.device, dtype: torch.dtype) -> list[Verdict]:
    labels = _labels(kernels)
    verdicts: list[Verdict] = []
    if not isinstance(kernels.attention, ReferenceAttentionBackend):
        try:
            verdicts += check_attention(kernels.attention, labels, device, dtype)
        except Exception as exc:  # noqa: BLE001 - a kernel that cannot run here (compile error, missing op)
            verdicts.append(Verdict(_attention_label(labels), False, _raised(exc)))
    if kernels.sample is not sample:
        verdicts.append(_guarded(labels["sample"], lambda: check_sampler(kernels.sample, labels["sample"], device)))
    verdicts += check_elementwise(kernels.elementwise, labels, device, dtype)
    if kernels.linear is not F.linear:
        weight_dtype = kernels.weight_dtype or dtype
        verdicts.append(_guarded(labels["linear"], lambda: check_linear(
            kernels.linear, kernels.prepack, _linear_reference(kernels), labels["linear"], weight_dtype, device,
            dtype)))
    return verdicts


def _replace_failed(kernels, failed: set[str]):
    """The next path for each failed kernel: the fused CUDA rotary -> the Triton backend it fronts; any other
    attention kernel -> the reference backend; the sampler, norms, activation, matmul -> their references."""
    from .native import WithNativeRotaryKV

    labels = _labels(kernels)
    reference_elementwise = ElementwiseKernels()
    changes: dict = {}
    attention = kernels.attention
    attention_failed = [labels[p] for p in ("rotary_write_kv", "prefill", "decode") if labels[p] in failed]
    attention_failed += [name for name in failed if name == _attention_label(labels)]
    if attention_failed:
        only_fused_rotary = attention_failed == [labels["rotary_write_kv"]] and isinstance(attention,
                                                                                          WithNativeRotaryKV)
        changes["attention"] = attention.inner if only_fused_rotary else ReferenceAttentionBackend()
        if not only_fused_rotary:  # the graphs need the Triton attention (backends.Kernels.decode_graphs)
            changes["decode_graphs"] = False
    if labels["sample"] in failed:
        changes["sample"] = sample
    elementwise = {field: getattr(reference_elementwise, field) for field in ("rms_norm", "add_rms_norm",
                                                                               "silu_and_mul")
                   if labels[field] in failed}
    if elementwise:
        changes["elementwise"] = replace(kernels.elementwise, **elementwise)
    if labels["linear"] in failed:
        changes.update(linear=_linear_reference(kernels), prepack=None)
    return replace(kernels, **changes, replaced=tuple(sorted(failed)))


def describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return f"{props.name} (sm_{props.major}{props.minor})"
    return f"{platform.processor() or platform.machine()} CPU"


def device_identity(device: torch.device) -> dict:
    """What a verdict holds for: the device and the builds of everything that compiles or dispatches a kernel."""
    identity: dict = {"torch": torch.__version__, "device_type": device.type}
    try:
        import triton

        identity["triton"] = triton.__version__
    except ImportError:
        identity["triton"] = None
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        identity.update(gpu=props.name, capability=f"{props.major}.{props.minor}", cuda=torch.version.cuda,
                        driver=_driver_version())
    else:
        identity.update(cpu=_cpu_model(), flags=_cpu_flags())
    from .native import _load

    module = _load()[0]
    if module is not None and getattr(module, "__file__", None):
        stat = os.stat(module.__file__)
        identity["stage1._C"] = [stat.st_size, int(stat.st_mtime), module.cpu_isa(),
                                 getattr(module, "build_info", dict)()]
    return identity


def _driver_version() -> str | None:
    try:
        return Path("/proc/driver/nvidia/version").read_text().splitlines()[0]
    except (OSError, IndexError):
        return None


def _cpuinfo() -> str:
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""


def _cpu_model() -> str:
    for line in _cpuinfo().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _cpu_flags() -> str:
    """The vector-ISA flags the native kernels and torch's dispatch depend on."""
    for line in _cpuinfo().splitlines():
        if line.startswith("flags"):
            wanted = ("avx", "fma", "amx", "f16c", "sse4_2")
            return " ".join(sorted(f for f in line.split(":", 1)[1].split() if f.startswith(wanted)))
    return ""


class _VerdictCache:
    """kernel-checks/<sha256 of the identity>.json under the stage1 cache: the verdicts of one (device, build,
    kernels, dtype). A file that cannot be read or written only means the checks run again."""

    def __init__(self, device: torch.device, kernels, dtype: torch.dtype):
        from stage1.models.fetch import cache_root

        identity = device_identity(device)
        identity.update(checks=CHECKS_VERSION, kernels=kernels.name, labels=_labels(kernels), dtype=str(dtype),
                        weight_dtype=str(kernels.weight_dtype))
        self.identity = identity
        digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:32]
        self.path = cache_root() / "kernel-checks" / f"{digest}.json"

    def load(self) -> list[Verdict] | None:
        try:
            data = json.loads(self.path.read_text())
            return [Verdict(**v) for v in data["verdicts"]] if data.get("identity") == self.identity else None
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def store(self, verdicts: list[Verdict]) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps({"identity": self.identity,
                                       "verdicts": [v.__dict__ for v in verdicts]}, indent=1))
            tmp.replace(self.path)
        except OSError as exc:
            logger.info("stage1: kernel check verdicts not cached (%s)", exc)
