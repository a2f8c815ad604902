"""Tiny Qwen2 GGUF files written with gguf.GGUFWriter, for the stage1.models tests.

The tiny files follow llama.cpp's qwen2 layout (tensor names, metadata keys, a gpt2/qwen2 tokenizer) with random
weights, so import tests run in well under a second and need no download. The names below are written out
literally, not taken from stage1.models, so a wrong mapping there cannot hide itself.
"""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
from gguf import GGMLQuantizationType as Q

# llama.cpp's GGUF names for transformers' Qwen2 names
GLOBAL = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
          "lm_head.weight": "output.weight"}
BLOCK = {"input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
         "self_attn.q_proj.weight": "attn_q.weight", "self_attn.q_proj.bias": "attn_q.bias",
         "self_attn.k_proj.weight": "attn_k.weight", "self_attn.k_proj.bias": "attn_k.bias",
         "self_attn.v_proj.weight": "attn_v.weight", "self_attn.v_proj.bias": "attn_v.bias",
         "self_attn.o_proj.weight": "attn_output.weight", "mlp.gate_proj.weight": "ffn_gate.weight",
         "mlp.up_proj.weight": "ffn_up.weight", "mlp.down_proj.weight": "ffn_down.weight"}

# Storage type per GGUF tensor suffix: the 2D weights cover Q8_0, F32, F16 and BF16; norms and biases are F32
# as llama.cpp writes them.
TENSOR_TYPES = {"attn_v.weight": Q.F32, "attn_output.weight": Q.F16, "ffn_gate.weight": Q.BF16}
DEFAULT_2D_TYPE = Q.Q8_0

CONTROL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|fim_prefix|>"]
USER_DEFINED_TOKENS = ["<tool_call>"]
TOKENIZER_TRAINING_TEXT = [
    "The quick brown fox jumps over the lazy dog. It's what we'd do; they're here and we've seen it.",
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n",
    "for (int i = 0; i < 100; i++) {\n\tsum += values[i];\n}\r\n",
    "Numbers: 3.14159, 2,718, 1000000 and 42. 日本語のテキストと中文文本。 Emoji 😀🎉 and café naïve.",
]


def gguf_name(hf_name: str) -> str:
    if hf_name in GLOBAL:
        return GLOBAL[hf_name]
    _, _, layer, rest = hf_name.split(".", 3)  # model.layers.N.rest
    return f"blk.{layer}.{BLOCK[rest]}"


def tiny_tokenizer_vocab(size_multiple: int = 64) -> tuple[list[str], list[int], list[str]]:
    """(tokens, token types, merges) of a small byte-level BPE trained with Qwen2's split, laid out like Qwen's
    GGUF: BPE tokens first, then control tokens, a user-defined token, and [PADn] fillers (type UNUSED)."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers

    from stage1.models.tokenizer_build import QWEN2_SPLIT_REGEX

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT_REGEX), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    trainer = trainers.BpeTrainer(vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(TOKENIZER_TRAINING_TEXT * 3, trainer)
    model = json.loads(tok.to_str())["model"]
    tokens = [t for t, _ in sorted(model["vocab"].items(), key=lambda kv: kv[1])]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    types = [gguf.TokenType.NORMAL] * len(tokens)
    tokens += CONTROL_TOKENS + USER_DEFINED_TOKENS
    types += [gguf.TokenType.CONTROL] * len(CONTROL_TOKENS) + [gguf.TokenType.USER_DEFINED] * len(USER_DEFINED_TOKENS)
    while len(tokens) % size_multiple:
        tokens.append(f"[PAD{len(tokens)}]")
        types.append(gguf.TokenType.UNUSED)
    return tokens, [int(t) for t in types], merges


def write_tiny_gguf(path: Path, *, arch: str = "qwen2", layers: int = 2, hidden: int = 64, heads: int = 4,
                    kv_heads: int = 2, intermediate: int = 128, tied: bool = False, seed: int = 0,
                    drop: tuple[str, ...] = (), types: dict[str, Q] | None = None,
                    rope_scaling: str | None = None) -> dict[str, np.ndarray]:
    """Writes a random Qwen2 GGUF; returns the original fp32 weights by HF name (before quantization).

    `drop` leaves GGUF tensors out; `types` overrides storage types by GGUF suffix (e.g. {"ffn_down.weight":
    Q.Q8_K}, written as random bytes when gguf cannot quantize to it).
    """
    tokens, token_types, merges = tiny_tokenizer_vocab()
    vocab, head_dim = len(tokens), hidden // heads
    rng = np.random.default_rng(seed)
    shapes = {"model.embed_tokens.weight": (vocab, hidden), "model.norm.weight": (hidden,)}
    if not tied:
        shapes["lm_head.weight"] = (vocab, hidden)
    for n in range(layers):
        p = f"model.layers.{n}."
        shapes |= {p + "input_layernorm.weight": (hidden,), p + "post_attention_layernorm.weight": (hidden,),
                   p + "self_attn.q_proj.weight": (heads * head_dim, hidden),
                   p + "self_attn.q_proj.bias": (heads * head_dim,),
                   p + "self_attn.k_proj.weight": (kv_heads * head_dim, hidden),
                   p + "self_attn.k_proj.bias": (kv_heads * head_dim,),
                   p + "self_attn.v_proj.weight": (kv_heads * head_dim, hidden),
                   p + "self_attn.v_proj.bias": (kv_heads * head_dim,),
                   p + "self_attn.o_proj.weight": (hidden, heads * head_dim),
                   p + "mlp.gate_proj.weight": (intermediate, hidden), p + "mlp.up_proj.weight": (intermediate, hidden),
                   p + "mlp.down_proj.weight": (hidden, intermediate)}
    weights = {}
    for name, shape in shapes.items():
        w = rng.normal(0.0, 0.5, size=shape).astype(np.float32)
        if name.endswith("norm.weight"):
            w = 1.0 + 0.1 * w
        weights[name] = w

    writer = gguf.GGUFWriter(path, arch)
    writer.add_block_count(layers)
    writer.add_context_length(4096)
    writer.add_embedding_length(hidden)
    writer.add_feed_forward_length(intermediate)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_freq_base(1_000_000.0)
    writer.add_layer_norm_rms_eps(1e-6)
    if rope_scaling:
        writer.add_rope_scaling_type(gguf.RopeScalingType(rope_scaling))
        writer.add_rope_scaling_factor(4.0)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("qwen2")
    writer.add_token_list(tokens)
    writer.add_token_types(token_types)
    writer.add_token_merges(merges)
    writer.add_bos_token_id(tokens.index("<|endoftext|>"))
    writer.add_eos_token_id(tokens.index("<|im_end|>"))
    writer.add_pad_token_id(tokens.index("<|endoftext|>"))
    writer.add_add_bos_token(False)

    all_types = {**TENSOR_TYPES, **(types or {})}
    for name, w in weights.items():
        gname = gguf_name(name)
        if gname in drop:
            continue
        suffix = gname.split(".", 2)[-1] if gname.startswith("blk.") else gname
        qtype = Q.F32 if w.ndim == 1 else all_types.get(suffix, DEFAULT_2D_TYPE)
        if qtype == Q.F32:
            writer.add_tensor(gname, w)
        elif qtype == Q.F16:
            writer.add_tensor(gname, w.astype(np.float16))
        else:
            try:
                data = gguf.quants.quantize(w, qtype)
            except NotImplementedError:  # a type gguf cannot write: random bytes of the right size will do
                block, type_size = gguf.GGML_QUANT_SIZES[qtype]
                data = rng.integers(0, 256, size=(w.shape[0], w.shape[1] // block * type_size), dtype=np.uint8)
            writer.add_tensor(gname, data, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return {k: v for k, v in weights.items() if gguf_name(k) not in drop}
