"""Safetensors checkpoints (one file or sharded) loaded into our model for this rank, cast to the run dtype.

Hugging Face names map onto our parameters, some into a part of a fused one (q/k/v -> qkv_proj, gate/up ->
gate_up_proj). Every expected tensor must arrive exactly once with its exact shape: a missing, unexpected or
misshapen tensor is an error that names it, so nothing is ever left uninitialized.

Under tensor parallelism each rank reads only its slice of each tensor: the parameter's `weight_loader` (see
layers/) asks for rows or columns, and `CheckpointFile` reads just those bytes with positional reads. Not through
safetensors' memory map: its `get_slice` is a view of the mapped tensor, and a column slice of it faults in every
page of the tensor (rows of a few KB share pages, and the kernel maps neighbouring pages on each fault), which
stay mapped, and counted in this process's memory, until the file is closed.
"""

from __future__ import annotations

import json
import logging
import math
import os
import resource
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .config import ModelConfig
from .distributed import current
from .model import Qwen2ForCausalLM

if TYPE_CHECKING:  # backends imports memory, which imports this module: the type only, no import at run time
    from .backends import Kernels

logger = logging.getLogger("stage1")


class WeightsError(ValueError):
    pass


@dataclass(frozen=True)
class Target:
    param: str  # our parameter's name
    shard_id: str | int | None  # which part of a fused parameter ("q", "k", "v"; 0 gate, 1 up), else None
    shape: tuple[int, ...]  # the checkpoint tensor's full shape


def checkpoint_layout(config: ModelConfig) -> dict[str, Target]:
    """Every tensor a Qwen2 checkpoint must hold, with where it goes in our model."""
    h, i, q, kv = config.hidden_size, config.intermediate_size, config.q_size, config.kv_size
    layout = {"model.embed_tokens.weight": Target("embed_tokens.weight", None, (config.vocab_size, h)),
              "model.norm.weight": Target("norm.weight", None, (h,))}
    if not config.tie_word_embeddings:
        layout["lm_head.weight"] = Target("lm_head.weight", None, (config.vocab_size, h))
    for n in range(config.num_hidden_layers):
        hf, ours = f"model.layers.{n}.", f"layers.{n}."
        for kind in ("weight", "bias"):
            width = (h,) if kind == "weight" else ()
            for part, rows in (("q", q), ("k", kv), ("v", kv)):
                layout[hf + f"self_attn.{part}_proj.{kind}"] = Target(ours + f"self_attn.qkv_proj.{kind}", part,
                                                                      (rows, *width))
        layout[hf + "self_attn.o_proj.weight"] = Target(ours + "self_attn.o_proj.weight", None, (h, q))
        layout[hf + "mlp.gate_proj.weight"] = Target(ours + "mlp.gate_up_proj.weight", 0, (i, h))
        layout[hf + "mlp.up_proj.weight"] = Target(ours + "mlp.gate_up_proj.weight", 1, (i, h))
        layout[hf + "mlp.down_proj.weight"] = Target(ours + "mlp.down_proj.weight", None, (h, i))
        layout[hf + "input_layernorm.weight"] = Target(ours + "input_layernorm.weight", None, (h,))
        layout[hf + "post_attention_layernorm.weight"] = Target(ours + "post_attention_layernorm.weight", None, (h,))
    return layout


def checkpoint_files(model_dir: Path) -> dict[Path, list[str] | None]:
    """The safetensors files to read and, for a sharded checkpoint, which tensors the index puts in each."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map")
        if not isinstance(weight_map, dict):
            raise WeightsError(f"{index}: no 'weight_map' object; the sharded checkpoint's index is broken")
        files: dict[Path, list[str]] = {}
        for name, file in weight_map.items():
            files.setdefault(model_dir / file, []).append(name)
        for file in files:
            if not file.is_file():
                raise WeightsError(f"{index} names shard {file.name}, which is missing from {model_dir}")
        return files
    found = sorted(model_dir.glob("*.safetensors"))
    if not found:
        raise WeightsError(f"no *.safetensors file in {model_dir}: the engine loads safetensors checkpoints "
                           "(convert a GGUF with `python -m stage1.models import-gguf`)")
    return {f: None for f in found}


# ---- reading slices of a safetensors file ----

_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}


class CheckpointFile:
    """One safetensors file (an 8-byte header length, a JSON header of names, dtypes, shapes and byte ranges, then
    the data), read with positional reads: a slice costs its own bytes of this process's memory, nothing more.
    Counts what it reads (`bytes_read`, `largest_read`)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._fd = os.open(self.path, os.O_RDONLY)
        try:
            size = os.fstat(self._fd).st_size
            header_len = int.from_bytes(os.pread(self._fd, 8, 0), "little") if size >= 8 else -1
            if not 2 <= header_len <= size - 8:
                raise WeightsError(f"{self.path.name}: not a safetensors file (bad header length)")
            try:
                header = json.loads(os.pread(self._fd, header_len, 8))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise WeightsError(f"{self.path.name}: not a safetensors file (header: {e})") from None
        except BaseException:
            os.close(self._fd)
            raise
        header.pop("__metadata__", None)
        self._header, self._data_start, self._size = header, 8 + header_len, size
        self.bytes_read = self.largest_read = 0

    def keys(self) -> list[str]:
        return list(self._header)

    def __contains__(self, name: str) -> bool:
        return name in self._header

    def get_slice(self, name: str) -> "TensorSlice":
        entry = self._header[name]
        dtype = _DTYPES.get(entry.get("dtype"))
        if dtype is None:
            raise WeightsError(f"{self.path.name}: tensor {name!r} has dtype {entry.get('dtype')!r}, which the "
                               f"loader does not read (it reads {', '.join(_DTYPES)})")
        shape, (begin, end) = tuple(entry["shape"]), entry["data_offsets"]
        if end - begin != math.prod(shape) * dtype.itemsize or self._data_start + end > self._size:
            raise WeightsError(f"{self.path.name}: tensor {name!r}'s byte range does not match its shape "
                               f"{list(shape)} or lies past the end of the file (truncated?)")
        return TensorSlice(self, name, dtype, shape, self._data_start + begin)

    def read_into(self, out: torch.Tensor, offset: int) -> None:
        """Fills the contiguous CPU tensor `out` with the file's bytes from `offset`."""
        view = memoryview(out.reshape(-1).view(torch.uint8).numpy())
        while len(view):
            n = os.preadv(self._fd, [view], offset)
            if n <= 0:
                raise WeightsError(f"{self.path.name}: file ends early (truncated?)")
            view, offset = view[n:], offset + n

    def count(self, nbytes: int) -> None:
        self.bytes_read += nbytes
        self.largest_read = max(self.largest_read, nbytes)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> "CheckpointFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class TensorSlice:
    """A checkpoint tensor not read yet, indexed like safetensors' PySafeSlice: `s[a:b]` reads rows a..b (one
    read), `s[:, a:b]` columns a..b (one read per row), `s[:]` all of it; steps are not supported."""

    def __init__(self, file: CheckpointFile, name: str, dtype: torch.dtype, shape: tuple[int, ...], offset: int):
        self.file, self.name, self.dtype, self.shape, self.offset = file, name, dtype, shape, offset

    def get_shape(self) -> list[int]:
        return list(self.shape)

    def __getitem__(self, index) -> torch.Tensor:
        index = index if isinstance(index, tuple) else (index,)
        if len(index) > max(len(self.shape), 1) or len(index) > 2 or any(
                not isinstance(i, slice) or i.step not in (None, 1) for i in index):
            raise IndexError(f"{self.name}: only [a:b] and [:, a:b] slices are read, not {index!r}")
        dims = self.shape or (1,)
        ranges = [(i.indices(d)[0], max(i.indices(d)[0], i.indices(d)[1])) for i, d in zip(index, dims)]
        ranges += [(0, d) for d in dims[len(ranges):]]
        (r0, r1), (c0, c1) = ranges[0], ranges[1] if len(dims) > 1 else (0, 1)
        inner = math.prod(dims[2:]) * self.dtype.itemsize  # bytes per element of dim 1
        cols = dims[1] if len(dims) > 1 else 1
        out = torch.empty([b - a for a, b in ranges] if self.shape else [], dtype=self.dtype)
        if out.numel():
            if (c0, c1) == (0, cols):  # whole rows: one contiguous read
                self.file.read_into(out, self.offset + r0 * cols * inner)
            else:
                for row in range(r0, r1):
                    self.file.read_into(out[row - r0], self.offset + (row * cols + c0) * inner)
        self.file.count(out.numel() * self.dtype.itemsize)
        return out


def default_weight_loader(param: torch.Tensor, checkpoint_slice, shard_id=None) -> None:
    """A parameter every rank holds whole (the norms)."""
    full = checkpoint_slice[:]
    if full.shape != param.shape:
        raise WeightsError(f"a replicated tensor of shape {list(full.shape)} for a parameter of {list(param.shape)}")
    param.copy_(full)


# ---- the model ----


def peak_rss_bytes() -> int:
    """This process's peak resident memory: Linux's VmHWM, its own address space's (ru_maxrss would start from
    the parent's peak in a process spawned by a large one), else ru_maxrss."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB elsewhere


@dataclass(frozen=True)
class LoadReport:
    """What loading this rank's model read and held, logged (and attached to the log record as `load_report`)."""

    rank: int
    size: int
    checkpoint_bytes: int  # the checkpoint's tensors, whole
    bytes_read: int  # this rank's slices
    largest_read: int  # the largest single slice: the most the loader holds on the host at once
    param_bytes: int  # this rank's parameters, on its device
    peak_rss_before: int  # the process's peak resident memory before loading, and after
    peak_rss_after: int


def load_model(model_dir: str | Path, config: ModelConfig, dtype: torch.dtype, device: torch.device,
               kernels: Kernels | None = None) -> Qwen2ForCausalLM:
    """Builds this rank's model (the current parallel state's) with no initialization and fills every parameter
    from its slice of the checkpoint, in `dtype`; with `kernels` (backends.resolve's), the matmul weights (linear
    layers, LM head, embedding) in their `weight_dtype` (e.g. bf16 weights with fp32 activations: `dtype` fp32,
    `weight_dtype` bf16), then `kernels.install` puts them into the layers. Without, the reference kernels."""
    model_dir = Path(model_dir)
    weight_dtype = kernels.weight_dtype if kernels is not None else None
    narrow = weight_dtype is not None and weight_dtype != dtype
    rss_before = peak_rss_bytes()
    layout = checkpoint_layout(config)
    with torch.device("meta"):
        model = Qwen2ForCausalLM(config)
    meta = dict(model.named_parameters())  # with tied embeddings lm_head.weight is embed_tokens.weight, once
    stored = lambda p: weight_dtype if weight_dtype is not None and getattr(p, "matmul_weight", False) else dtype  # noqa: E731
    params = {name: torch.empty(p.shape, dtype=stored(p), device=device) for name, p in meta.items()}
    loaded: set[str] = set()
    checkpoint_bytes = bytes_read = largest_read = 0
    for file, names in checkpoint_files(model_dir).items():
        with CheckpointFile(file) as f:
            for name in names if names is not None else f.keys():
                if config.tie_word_embeddings and name == "lm_head.weight":
                    continue  # some tied checkpoints store the shared matrix twice
                target = layout.get(name)
                if target is None:
                    raise WeightsError(f"{file.name}: unexpected tensor {name!r}, which a Qwen2 model with this "
                                       "config.json does not have (is config.json from another checkpoint?)")
                if name in loaded:
                    raise WeightsError(f"{file.name}: tensor {name!r} appears twice in the checkpoint")
                if name not in f:
                    raise WeightsError(f"{file.name}: the index puts tensor {name!r} in this file, which lacks it")
                tensor = f.get_slice(name)
                shape = tuple(tensor.get_shape())
                if shape != target.shape:
                    raise WeightsError(f"{file.name}: tensor {name!r} has shape {list(shape)}, but config.json "
                                       f"implies {list(target.shape)}")
                loader = getattr(meta[target.param], "weight_loader", default_weight_loader)
                loader(params[target.param], tensor, target.shard_id)
                checkpoint_bytes += math.prod(shape) * tensor.dtype.itemsize
                loaded.add(name)
            bytes_read, largest_read = bytes_read + f.bytes_read, max(largest_read, f.largest_read)
    missing = sorted(set(layout) - loaded)
    if missing:
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise WeightsError(f"{model_dir}: checkpoint is missing tensor(s) {', '.join(missing[:5])}{more}; "
                           "the model would run with uninitialized weights")
    if config.tie_word_embeddings:
        params["lm_head.weight"] = params["embed_tokens.weight"]
    model.load_state_dict(params, assign=True, strict=True)
    del params  # the model holds them now: a prepack below then frees each plain weight as it replaces it
    if config.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight  # one Parameter, not two wrappers of the same storage
    if kernels is not None:
        kernels.install(model, dtype)
    tp = current()
    report = LoadReport(tp.rank, tp.size, checkpoint_bytes, bytes_read, largest_read,
                        sum(p.numel() * p.element_size() for p in model.parameters()), rss_before, peak_rss_bytes())
    dtypes = str(dtype).removeprefix("torch.")
    if narrow:
        dtypes += f" ({str(weight_dtype).removeprefix('torch.')} matmul weights)"
    logger.info("stage1: loaded %s for rank %d/%d: read %.3f GB of the checkpoint's %.3f GB (largest slice %.1f MB) "
                "into %.3f GB of %s parameters on %s; peak host memory (VmHWM) %.3f GB, %.3f GB before loading",
                model_dir, tp.rank, tp.size, bytes_read / 1e9, checkpoint_bytes / 1e9, largest_read / 1e6,
                report.param_bytes / 1e9, dtypes, device, report.peak_rss_after / 1e9,
                rss_before / 1e9, extra={"load_report": report})
    return model.eval()
