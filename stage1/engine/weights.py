"""Safetensors checkpoints (one file or sharded) loaded into our model, memory-mapped and cast to the run dtype.

Hugging Face names map onto our parameters, some into a slice of a fused one (q/k/v -> qkv_proj, gate/up ->
gate_up_proj). Every expected tensor must arrive exactly once with its exact shape: a missing, unexpected or
misshapen tensor is an error that names it, so nothing is ever left uninitialized.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from .config import ModelConfig
from .model import Qwen2ForCausalLM


class WeightsError(ValueError):
    pass


@dataclass(frozen=True)
class Target:
    param: str  # our parameter's name
    offset: int  # first row of the slice along dim 0
    shape: tuple[int, ...]


def checkpoint_layout(config: ModelConfig) -> dict[str, Target]:
    """Every tensor a Qwen2 checkpoint must hold, with where it goes in our model."""
    h, i, q, kv = config.hidden_size, config.intermediate_size, config.q_size, config.kv_size
    layout = {"model.embed_tokens.weight": Target("embed_tokens.weight", 0, (config.vocab_size, h)),
              "model.norm.weight": Target("norm.weight", 0, (h,))}
    if not config.tie_word_embeddings:
        layout["lm_head.weight"] = Target("lm_head.weight", 0, (config.vocab_size, h))
    for n in range(config.num_hidden_layers):
        hf, ours = f"model.layers.{n}.", f"layers.{n}."
        for kind in ("weight", "bias"):
            width = (h,) if kind == "weight" else ()
            layout[hf + f"self_attn.q_proj.{kind}"] = Target(ours + f"self_attn.qkv_proj.{kind}", 0, (q, *width))
            layout[hf + f"self_attn.k_proj.{kind}"] = Target(ours + f"self_attn.qkv_proj.{kind}", q, (kv, *width))
            layout[hf + f"self_attn.v_proj.{kind}"] = Target(ours + f"self_attn.qkv_proj.{kind}", q + kv,
                                                             (kv, *width))
        layout[hf + "self_attn.o_proj.weight"] = Target(ours + "self_attn.o_proj.weight", 0, (h, q))
        layout[hf + "mlp.gate_proj.weight"] = Target(ours + "mlp.gate_up_proj.weight", 0, (i, h))
        layout[hf + "mlp.up_proj.weight"] = Target(ours + "mlp.gate_up_proj.weight", i, (i, h))
        layout[hf + "mlp.down_proj.weight"] = Target(ours + "mlp.down_proj.weight", 0, (h, i))
        layout[hf + "input_layernorm.weight"] = Target(ours + "input_layernorm.weight", 0, (h,))
        layout[hf + "post_attention_layernorm.weight"] = Target(ours + "post_attention_layernorm.weight", 0, (h,))
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


def load_model(model_dir: str | Path, config: ModelConfig, dtype: torch.dtype,
               device: torch.device) -> Qwen2ForCausalLM:
    """Builds the model with no initialization and fills every parameter from the checkpoint."""
    model_dir = Path(model_dir)
    layout = checkpoint_layout(config)
    with torch.device("meta"):
        model = Qwen2ForCausalLM(config)
    params = {name: torch.empty(p.shape, dtype=dtype, device=device) for name, p in model.named_parameters()}
    loaded: set[str] = set()
    for file, names in checkpoint_files(model_dir).items():
        with safe_open(str(file), framework="pt", device="cpu") as f:
            for name in names if names is not None else f.keys():
                if config.tie_word_embeddings and name == "lm_head.weight":
                    continue  # some tied checkpoints store the shared matrix twice
                target = layout.get(name)
                if target is None:
                    raise WeightsError(f"{file.name}: unexpected tensor {name!r}, which a Qwen2 model with this "
                                       "config.json does not have (is config.json from another checkpoint?)")
                if name in loaded:
                    raise WeightsError(f"{file.name}: tensor {name!r} appears twice in the checkpoint")
                tensor = f.get_slice(name)
                shape = tuple(tensor.get_shape())
                if shape != target.shape:
                    raise WeightsError(f"{file.name}: tensor {name!r} has shape {list(shape)}, but config.json "
                                       f"implies {list(target.shape)}")
                dest = params[target.param]
                dest[target.offset:target.offset + shape[0]].copy_(f.get_tensor(name))
                loaded.add(name)
    missing = sorted(set(layout) - loaded)
    if missing:
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise WeightsError(f"{model_dir}: checkpoint is missing tensor(s) {', '.join(missing[:5])}{more}; "
                           "the model would run with uninitialized weights")
    if config.tie_word_embeddings:
        params["lm_head.weight"] = params["embed_tokens.weight"]
    model.load_state_dict(params, assign=True, strict=True)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight  # one Parameter, not two wrappers of the same storage
    return model.eval()
