"""A Qwen2 GGUF converted into a Hugging Face checkpoint directory.

OUT_DIR gets config.json, generation_config.json, model.safetensors (dequantized to bf16 or fp32, transformers'
Qwen2 tensor names), tokenizer.json and tokenizer_config.json. Everything is checked before anything is written,
written into a hidden staging directory next to OUT_DIR, then renamed into place: OUT_DIR either appears complete
or not at all.

Qwen2 q/k rows need no un-permuting: llama.cpp's convert_hf_to_gguf.py permutes q/k only for its LlamaModel
(llama.cpp's interleaved rope), while Qwen2Model keeps HF's layout (NEOX rope); transformers' GGUF loader applies
its reverse permutation to llama only, likewise.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
from safetensors.torch import save_file

from .errors import GGUFImportError
from .tokenizer_build import build_tokenizer

GGUF_MAGIC = b"GGUF"
ARCHITECTURE = "qwen2"
DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp32": torch.float32, "float32": torch.float32}

# GGUF tensor names -> transformers' Qwen2ForCausalLM names
GLOBAL_TENSORS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
BLOCK_TENSORS = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}

Log = Callable[[str], None]


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def hf_name(gguf_name: str) -> str | None:
    if gguf_name in GLOBAL_TENSORS:
        return GLOBAL_TENSORS[gguf_name]
    parts = gguf_name.split(".", 2)
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in BLOCK_TENSORS:
        return f"model.layers.{int(parts[1])}.{BLOCK_TENSORS[parts[2]]}"
    return None


def expected_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    """Every tensor the HF checkpoint must hold, with its shape (rows = output features, as in nn.Linear)."""
    h, i, v = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    head_dim = h // config["num_attention_heads"]
    q, kv = config["num_attention_heads"] * head_dim, config["num_key_value_heads"] * head_dim
    shapes = {"model.embed_tokens.weight": (v, h), "model.norm.weight": (h,)}
    if not config["tie_word_embeddings"]:
        shapes["lm_head.weight"] = (v, h)
    for n in range(config["num_hidden_layers"]):
        p = f"model.layers.{n}."
        shapes |= {p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
                   p + "self_attn.q_proj.weight": (q, h), p + "self_attn.q_proj.bias": (q,),
                   p + "self_attn.k_proj.weight": (kv, h), p + "self_attn.k_proj.bias": (kv,),
                   p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.v_proj.bias": (kv,),
                   p + "self_attn.o_proj.weight": (h, q),
                   p + "mlp.gate_proj.weight": (i, h), p + "mlp.up_proj.weight": (i, h),
                   p + "mlp.down_proj.weight": (h, i)}
    return shapes


def open_gguf(path: Path) -> gguf.GGUFReader:
    """The parsed file, or a GGUFImportError saying why it is not a usable GGUF."""
    if not path.is_file():
        raise GGUFImportError(f"{path}: no such file. Pass the path of a .gguf model file.")
    size = path.stat().st_size
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != GGUF_MAGIC:
        raise GGUFImportError(f"{path}: not a GGUF file (it starts with {magic!r}, a GGUF starts with b'GGUF'). "
                              "Check that you passed the .gguf file itself and that it downloaded completely.")
    try:
        reader = gguf.GGUFReader(path)
    except Exception as e:  # noqa: BLE001 - the reader fails in many ways on a cut-off or corrupt file
        raise GGUFImportError(f"{path}: cannot parse the GGUF header, metadata or tensor table ({type(e).__name__}: "
                              f"{e}); the file ({size:,} bytes) is probably truncated or corrupt. Download it "
                              "again.") from None
    return reader


def _field(reader: gguf.GGUFReader, key: str, source: Path, default: Any = ...) -> Any:
    field = reader.fields.get(key)
    if field is None:
        if default is ...:
            raise GGUFImportError(f"{source}: required metadata key {key!r} is missing; the file was not written by "
                                  "llama.cpp's converter for a Qwen2 model, or is damaged.")
        return default
    try:
        return field.contents()
    except Exception as e:  # noqa: BLE001 - bad UTF-8, bad type tags: all mean a damaged file
        raise GGUFImportError(f"{source}: metadata key {key!r} cannot be read ({e}); the file is damaged. "
                              "Download it again.") from None


def _int(reader, key, source, default: Any = ...) -> int | None:
    value = _field(reader, key, source, default)
    if value is None and default is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise GGUFImportError(f"{source}: metadata key {key!r} is {value!r}, expected one integer (per-layer values "
                              "are not supported for qwen2).")
    return int(value)


def _float(reader, key, source) -> float:
    # GGUF stores these as float32: go through float32's shortest repr so 1e-6 comes out as 1e-06, not 9.99...e-07.
    return float(str(np.float32(_field(reader, key, source))))


def qwen2_config(reader: gguf.GGUFReader, source: Path, dtype: str) -> dict:
    """config.json in the official Qwen2 schema, from the GGUF metadata."""
    arch = _field(reader, "general.architecture", source)
    if arch != ARCHITECTURE:
        raise GGUFImportError(f"{source}: architecture is {arch!r}; only {ARCHITECTURE!r} (Qwen2 / Qwen2.5) GGUF "
                              "files can be imported. Use a Qwen2.5 GGUF, or pass a Hugging Face checkpoint "
                              "directory with --model.")
    scaling = _field(reader, f"{arch}.rope.scaling.type", source, "none")
    if scaling not in ("none", ""):
        raise GGUFImportError(f"{source}: rope scaling {scaling!r} is set; only plain rotary embeddings are "
                              "supported. Use a GGUF converted without rope scaling.")
    names = {t.name for t in reader.tensors}
    if "token_embd.weight" not in names:
        raise GGUFImportError(f"{source}: tensor 'token_embd.weight' is missing; the file is incomplete.")
    vocab_size = int(next(t for t in reader.tensors if t.name == "token_embd.weight").shape[1])
    layers = _int(reader, f"{arch}.block_count", source)
    context = _int(reader, f"{arch}.context_length", source)
    heads = _int(reader, f"{arch}.attention.head_count", source)
    config = {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "vocab_size": vocab_size,
        "hidden_size": _int(reader, f"{arch}.embedding_length", source),
        "intermediate_size": _int(reader, f"{arch}.feed_forward_length", source),
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": _int(reader, f"{arch}.attention.head_count_kv", source, heads),
        "hidden_act": "silu",
        "max_position_embeddings": context,
        "rms_norm_eps": _float(reader, f"{arch}.attention.layer_norm_rms_epsilon", source),
        "rope_theta": _float(reader, f"{arch}.rope.freq_base", source),
        "rope_scaling": None,
        "tie_word_embeddings": "output.weight" not in names,  # llama.cpp drops output.weight when tied
        "use_sliding_window": False,
        "sliding_window": context,
        "max_window_layers": layers,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "use_cache": True,
        "bos_token_id": _int(reader, "tokenizer.ggml.bos_token_id", source, None),
        "eos_token_id": _int(reader, "tokenizer.ggml.eos_token_id", source),
        "torch_dtype": "bfloat16" if DTYPES[dtype] is torch.bfloat16 else "float32",
    }
    h, kv = config["hidden_size"], config["num_key_value_heads"]
    sizes = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
             "num_key_value_heads")
    if any(config[k] <= 0 for k in sizes) or h % heads or heads % kv:
        raise GGUFImportError(f"{source}: inconsistent model shape in the metadata "
                              f"({', '.join(f'{k}={config[k]}' for k in sizes)}); the file is damaged.")
    return config


@dataclass(frozen=True)
class _Planned:
    tensor: Any  # gguf ReaderTensor
    name: str  # HF name
    shape: tuple[int, ...]


def _dequantizable(qtype: gguf.GGMLQuantizationType) -> bool:
    _, type_size = gguf.GGML_QUANT_SIZES[qtype]
    try:
        gguf.quants.dequantize(np.zeros((1, type_size), dtype=np.uint8), qtype)
        return True
    except NotImplementedError:
        return False


def plan_tensors(reader: gguf.GGUFReader, config: dict, source: Path) -> list[_Planned]:
    """Checks names, shapes and tensor types against config before anything is dequantized or written."""
    expected = expected_shapes(config)
    plan, seen = [], set()
    for t in reader.tensors:
        name = hf_name(t.name)
        if name is None or name not in expected:
            raise GGUFImportError(f"{source}: unexpected tensor {t.name!r} for a {config['num_hidden_layers']}-layer "
                                  "qwen2 model; the file is not a plain Qwen2 checkpoint (or block_count is wrong).")
        shape = tuple(int(d) for d in reversed(t.shape))  # GGUF lists dimensions innermost first
        if shape != expected[name]:
            raise GGUFImportError(f"{source}: tensor {t.name!r} has shape {list(shape)}, but the metadata implies "
                                  f"{list(expected[name])}; the file's metadata and tensors disagree.")
        seen.add(name)
        plan.append(_Planned(t, name, shape))
    missing = sorted(set(expected) - seen)
    if missing:
        to_gguf = {hf_name(g): g for g in [*GLOBAL_TENSORS, *(f"blk.{n}.{s}" for n in range(
            config["num_hidden_layers"]) for s in BLOCK_TENSORS)]}
        named = [f"{to_gguf[m]} ({m})" for m in missing[:3]]
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise GGUFImportError(f"{source}: missing tensor(s) {', '.join(named)}{more}; the file is incomplete or "
                              "not a Qwen2 checkpoint. Download or convert it again.")
    types = {p.tensor.tensor_type for p in plan}
    unsupported = sorted(q.name for q in types if not _dequantizable(q))
    if unsupported:
        users = [p.tensor.name for p in plan if p.tensor.tensor_type.name in unsupported]
        raise GGUFImportError(f"{source}: tensor type(s) {', '.join(unsupported)} (e.g. tensor {users[0]!r}) cannot be "
                              f"dequantized by gguf {gguf_version()}. Use a GGUF quantized to F32/F16/BF16, Q4_0..Q8_0 "
                              "or a K-quant (Q2_K..Q6_K), e.g. re-quantize with llama-quantize to Q8_0.")
    return plan


def gguf_version() -> str:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version("gguf")
    except PackageNotFoundError:
        return "?"


def _dequantize(p: _Planned, dtype: torch.dtype) -> torch.Tensor:
    values = gguf.quants.dequantize(p.tensor.data, p.tensor.tensor_type)
    values = np.ascontiguousarray(values, dtype=np.float32).reshape(p.shape)
    if not values.flags.writeable:  # F32 tensors come back as a view of the read-only memory map
        values = values.copy()
    return torch.from_numpy(values).to(dtype)


def _tokenizer_config(reader: gguf.GGUFReader, tokens: list[str], source: Path) -> dict:
    def token(key):
        index = _int(reader, key, source, None)
        return tokens[index] if index is not None and 0 <= index < len(tokens) else None

    config = {
        "tokenizer_class": "Qwen2Tokenizer",
        "bos_token": None,  # Qwen adds no BOS; the GGUF's add_bos_token is False too
        "eos_token": token("tokenizer.ggml.eos_token_id"),
        "pad_token": token("tokenizer.ggml.padding_token_id"),
        "unk_token": None,
        "add_bos_token": bool(_field(reader, "tokenizer.ggml.add_bos_token", source, False)),
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": _int(reader, f"{ARCHITECTURE}.context_length", source),
    }
    template = _field(reader, "tokenizer.chat_template", source, None)
    if template:
        config["chat_template"] = template
    return config


def import_gguf(gguf_path: str | Path, out_dir: str | Path, dtype: str = "bf16", log: Log = _stderr) -> Path:
    """Converts a Qwen2 GGUF into a HF checkpoint directory at out_dir (which must not exist or be empty)."""
    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    if dtype not in DTYPES:
        raise GGUFImportError(f"unknown dtype {dtype!r}: use bf16 or fp32")
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise GGUFImportError(f"{out_dir} already exists and is not an empty directory; remove it or choose "
                              "another output directory (nothing was written).")

    # Everything is read and checked first: a bad file fails before we touch the disk.
    log(f"reading {gguf_path}")
    reader = open_gguf(gguf_path)
    config = qwen2_config(reader, gguf_path, dtype)
    plan = plan_tensors(reader, config, gguf_path)
    if _field(reader, "tokenizer.ggml.model", gguf_path) != "gpt2":
        raise GGUFImportError(f"{gguf_path}: tokenizer.ggml.model is not 'gpt2' (byte-level BPE), which every Qwen2 "
                              "GGUF uses; the file is not a supported Qwen2 checkpoint.")
    tokens = _field(reader, "tokenizer.ggml.tokens", gguf_path)
    tokenizer = build_tokenizer(tokens, _field(reader, "tokenizer.ggml.token_type", gguf_path),
                                _field(reader, "tokenizer.ggml.merges", gguf_path),
                                _field(reader, "tokenizer.ggml.pre", gguf_path), source=str(gguf_path))
    generation = {"bos_token_id": config["bos_token_id"], "eos_token_id": config["eos_token_id"]}
    pad = _int(reader, "tokenizer.ggml.padding_token_id", gguf_path, None)
    if pad is not None:
        generation["pad_token_id"] = pad

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.importing-", dir=out_dir.parent))
    try:
        _chmod_default(staging, 0o777)  # mkdtemp makes it private; the result should look like any new directory
        torch_dtype = DTYPES[dtype]
        tensors = {}
        for n, p in enumerate(plan, 1):
            tensors[p.name] = _dequantize(p, torch_dtype)
            if n % 50 == 0 or n == len(plan):
                log(f"dequantized {n}/{len(plan)} tensors")
        log(f"writing {out_dir}")
        save_file(tensors, str(staging / "model.safetensors"), metadata={"format": "pt"})
        _chmod_default(staging / "model.safetensors", 0o666)
        del tensors
        _write_json(staging / "config.json", config)
        _write_json(staging / "generation_config.json", generation)
        _write_json(staging / "tokenizer_config.json", _tokenizer_config(reader, tokens, gguf_path))
        tokenizer.save(str(staging / "tokenizer.json"))
        os.rename(staging, out_dir)  # atomic; replaces out_dir only if it is an empty directory
    except BaseException as e:
        shutil.rmtree(staging, ignore_errors=True)
        if isinstance(e, OSError):
            raise GGUFImportError(f"cannot write {out_dir}: {e}. Free disk space or choose another output "
                                  "directory (nothing was left behind).") from None
        raise
    return out_dir


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def _chmod_default(path: Path, mode: int) -> None:
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, mode & ~umask)
