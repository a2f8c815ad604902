"""The real Qwen2.5-Coder-0.5B-Instruct, fetched and imported into the cache (marker real_model): config, tensors,
weights equal to an independent dequantization of the GGUF, and sensible greedy code from transformers."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors import safe_open

from stage1.engine.tokenizer import Tokenizer
from stage1.models.gguf_import import hf_name

pytestmark = pytest.mark.real_model


def test_config(real_model_dir):
    config = json.loads((real_model_dir / "config.json").read_text())
    assert config["architectures"] == ["Qwen2ForCausalLM"] and config["model_type"] == "qwen2"
    assert (config["num_hidden_layers"], config["hidden_size"], config["intermediate_size"]) == (24, 896, 4864)
    assert (config["num_attention_heads"], config["num_key_value_heads"]) == (14, 2)
    assert config["vocab_size"] == 151936
    assert config["tie_word_embeddings"] is False  # this GGUF ships its own output.weight
    assert config["rope_theta"] == 1_000_000.0 and config["rms_norm_eps"] == 1e-6
    assert config["max_position_embeddings"] == 32768 and config["use_sliding_window"] is False
    assert config["torch_dtype"] == "bfloat16"
    assert (config["bos_token_id"], config["eos_token_id"]) == (151643, 151645)
    generation = json.loads((real_model_dir / "generation_config.json").read_text())
    assert generation["eos_token_id"] == 151645
    assert Tokenizer(real_model_dir).vocab_size == 151936


def test_tensors(real_model_dir):
    with safe_open(str(real_model_dir / "model.safetensors"), framework="pt") as f:
        names = set(f.keys())
        shapes = {n: tuple(f.get_slice(n).get_shape()) for n in names}
        dtypes = {f.get_slice(n).get_dtype() for n in names}
    assert len(names) == 3 + 24 * 12 and dtypes == {"BF16"}
    assert shapes["model.embed_tokens.weight"] == shapes["lm_head.weight"] == (151936, 896)
    assert shapes["model.layers.23.self_attn.q_proj.weight"] == (896, 896)
    assert shapes["model.layers.23.self_attn.k_proj.weight"] == (128, 896)
    assert shapes["model.layers.0.self_attn.v_proj.bias"] == (128,)
    assert shapes["model.layers.0.mlp.down_proj.weight"] == (896, 4864)
    assert sum(torch.Size(s).numel() for s in shapes.values()) == 630_167_424


def q5_0_reference(raw: np.ndarray) -> torch.Tensor:
    """ggml's Q5_0, written out: blocks of 32 values = fp16 scale d, 32 high bits qh, 16 bytes of low nibbles;
    value j = ((low nibble j) | (bit j of qh) << 4) - 16, times d. (transformers' torch dequantizer lacks Q5_0.)"""
    b = torch.from_numpy(np.array(raw)).reshape(-1, 22)
    d = b[:, :2].contiguous().view(torch.float16).float()
    high = ((b[:, 2:6, None] >> torch.arange(8, dtype=torch.uint8)) & 1).reshape(-1, 32)
    low = torch.cat([b[:, 6:22] & 0xF, b[:, 6:22] >> 4], dim=1)
    return ((low | (high << 4)).float() - 16) * d


def test_weights_equal_an_independent_dequantization(real_model_dir, real_gguf_path):
    """Every tensor equals the GGUF's raw blocks dequantized by code other than gguf-py's (transformers' torch
    kernels for Q4_K/Q6_K/Q8_0, the reference above for Q5_0) and rounded to bf16: bit for bit."""
    dequant = pytest.importorskip("transformers.integrations.gguf.dequant")
    from gguf import GGMLQuantizationType as Q
    from gguf import GGUFReader

    reader = GGUFReader(real_gguf_path)
    types = set()
    with safe_open(str(real_model_dir / "model.safetensors"), framework="pt") as f:
        for t in reader.tensors:
            shape = tuple(int(n) for n in reversed(t.shape))
            if t.tensor_type == Q.F32:
                ref = torch.from_numpy(np.array(t.data))
            elif t.tensor_type == Q.Q5_0:
                ref = q5_0_reference(t.data)
            else:
                ref = dequant.dequantize(torch.from_numpy(np.array(t.data)).reshape(-1), int(t.tensor_type))
            ours = f.get_tensor(hf_name(t.name))
            assert torch.equal(ours, ref.reshape(shape).to(torch.bfloat16)), t.name
            types.add(t.tensor_type.name)
    assert types == {"F32", "Q4_K", "Q5_0", "Q6_K", "Q8_0"}


def test_transformers_greedy_continuation_is_code(real_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(real_model_dir, dtype=torch.float32).eval()
    tok = Tokenizer(real_model_dir)
    prompt = "def fibonacci(n):"
    ids = torch.tensor([tok.encode(prompt)])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=32, do_sample=False,
                             pad_token_id=151643)
    text = tok.decode(out[0, ids.shape[1]:].tolist())
    # a function body: indented lines that test n and return something (wrong weights give noise or repetition)
    lines = text.split("\n")
    assert lines[0].strip() == "" and all(line.startswith("    ") for line in lines[1:] if line), text
    assert "if n" in text and "return" in text, text
