"""A Qwen2 / Qwen2.5 `config.json` read into a frozen dataclass, refusing what the engine cannot run."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch


class ConfigError(ValueError):
    pass


_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32,
           "bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, "half": torch.float16,
           "float": torch.float32}


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    try:
        return _DTYPES[str(name).removeprefix("torch.")]
    except KeyError:
        raise ConfigError(f"unknown dtype {name!r}: use one of bfloat16, float16, float32") from None


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    torch_dtype: torch.dtype
    eos_token_id: tuple[int, ...]

    @classmethod
    def from_dict(cls, raw: dict, source: str = "config.json") -> "ModelConfig":
        def need(key):
            if key not in raw:
                raise ConfigError(f"{source}: required field {key!r} is missing")
            return raw[key]

        model_type = raw.get("model_type")
        if model_type != "qwen2":
            raise ConfigError(f"{source}: model_type is {model_type!r}; this engine runs Qwen2 / Qwen2.5 "
                              "checkpoints (model_type 'qwen2') only")
        if raw.get("use_sliding_window"):
            raise ConfigError(f"{source}: use_sliding_window is true; sliding-window attention is not supported, "
                              "set it to false (Qwen2.5 checkpoints ship it off)")
        if raw.get("rope_scaling") or (raw.get("rope_parameters") or {}).get("rope_type", "default") != "default":
            scaling = raw.get("rope_scaling") or raw.get("rope_parameters")
            raise ConfigError(f"{source}: rope scaling {scaling!r} is not supported; only plain rotary "
                              "(rope_type 'default') is")
        if raw.get("hidden_act", "silu") != "silu":
            raise ConfigError(f"{source}: hidden_act {raw['hidden_act']!r} is not supported (Qwen2 uses 'silu')")

        # transformers 5 writes rope_parameters = {"rope_theta": ..., "rope_type": "default"}
        rope_theta = raw.get("rope_theta", (raw.get("rope_parameters") or {}).get("rope_theta"))
        if rope_theta is None:
            raise ConfigError(f"{source}: neither rope_theta nor rope_parameters.rope_theta is set")

        hidden, heads = need("hidden_size"), need("num_attention_heads")
        kv_heads = raw.get("num_key_value_heads") or heads
        head_dim = raw.get("head_dim") or hidden // heads
        if heads % kv_heads:
            raise ConfigError(f"{source}: num_attention_heads ({heads}) is not a multiple of "
                              f"num_key_value_heads ({kv_heads})")
        if head_dim * heads != hidden:
            raise ConfigError(f"{source}: head_dim {head_dim} x num_attention_heads {heads} != hidden_size {hidden}")

        dtype_name = raw.get("torch_dtype", raw.get("dtype", "bfloat16"))
        eos = raw.get("eos_token_id")
        eos = () if eos is None else tuple(eos) if isinstance(eos, list) else (eos,)
        return cls(
            vocab_size=need("vocab_size"),
            hidden_size=hidden,
            intermediate_size=need("intermediate_size"),
            num_hidden_layers=need("num_hidden_layers"),
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            head_dim=head_dim,
            rms_norm_eps=raw.get("rms_norm_eps", 1e-6),
            rope_theta=float(rope_theta),
            max_position_embeddings=raw.get("max_position_embeddings", 32768),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            torch_dtype=parse_dtype(dtype_name),
            eos_token_id=eos,
        )

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> "ModelConfig":
        model_dir = Path(model_dir)
        if not model_dir.is_dir():
            raise FileNotFoundError(f"model directory {model_dir} does not exist: pass the path of a Hugging Face "
                                    "checkpoint directory (config.json, *.safetensors, tokenizer.json)")
        path = model_dir / "config.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: {model_dir} is not a Hugging Face checkpoint directory")
        try:
            raw = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: not valid JSON ({e})") from None
        return cls.from_dict(raw, source=str(path))

    @property
    def q_size(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_key_value_heads * self.head_dim


def read_eos_token_ids(model_dir: str | Path, config: ModelConfig) -> list[int]:
    """The ids that end a base model's text: generation_config.json first, then config.json.

    Not tokenizer_config.json: Qwen2.5 base files name <|im_end|> there while the model ends with <|endoftext|>.
    """
    path = Path(model_dir) / "generation_config.json"
    if path.is_file():
        eos = json.loads(path.read_text()).get("eos_token_id")
        if eos is not None:
            return list(eos) if isinstance(eos, list) else [eos]
    return list(config.eos_token_id)
