"""Tiny random Qwen2 checkpoints written as real Hugging Face directories (safetensors + config + tokenizer.json).

transformers builds and saves them (it is a test-only dependency), so each file is exactly what a user's
checkpoint would hold; the engine then loads them like any other.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Here are examples of prompts and their completions:",
    "What is 2+2? The answer is 4.",
    "Write a short sentence about winter: Snow blankets the quiet landscape in pristine white.",
    "def add(a, b):\n    return a + b\n",
    "Photosynthesis is the process by which plants convert sunlight into energy.",
    "Gravity is the force that pulls objects toward each other. 0123456789",
    "Über café naïve résumé 日本語 中文 😀 ✓",
]
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

# name -> shape; covers query/KV head ratios 1, 2 and 7, head_dim 64 and 128, tied and untied, one file or sharded
SHAPES = {
    "gqa1-d64-tied": dict(heads=4, kv_heads=4, head_dim=64, tied=True),
    "gqa2-d128-untied": dict(heads=4, kv_heads=2, head_dim=128, tied=False),
    "gqa7-d64-sharded": dict(heads=7, kv_heads=1, head_dim=64, tied=False, shard=True),
}


def write_tokenizer(out_dir: Path, vocab_size: int = 400) -> int:
    """A byte-level BPE tokenizer in the Qwen2 style, trained on a small corpus. Returns its vocab size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS * 4, trainer)
    tok.save(str(out_dir / "tokenizer.json"))
    return tok.get_vocab_size()


def make_tiny_checkpoint(out_dir: Path, *, heads: int = 4, kv_heads: int = 2, head_dim: int = 32, layers: int = 2,
                         intermediate: int = 128, vocab: int = 512, tied: bool = False, shard: bool = False,
                         seed: int = 0, max_position_embeddings: int = 1024, init_std: float = 0.1,
                         dtype: torch.dtype = torch.float32) -> Path:
    """Writes a random Qwen2 checkpoint to `out_dir` and returns it.

    `dtype`: the stored tensors' (and config.json's torch_dtype). Weights use a larger spread than a real init (`init_std`) so that logits have clear winners: greedy
    comparisons against transformers then test the arithmetic, not ties broken by rounding.
    """
    from transformers import Qwen2Config, Qwen2ForCausalLM

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    special = {t: i for i, t in enumerate(SPECIAL_TOKENS)}  # the trainer puts them first
    config = Qwen2Config(
        vocab_size=vocab, hidden_size=heads * head_dim, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim,
        max_position_embeddings=max_position_embeddings, rms_norm_eps=1e-6, rope_theta=1_000_000.0,
        tie_word_embeddings=tied, initializer_range=init_std, use_sliding_window=False,
        bos_token_id=special["<|endoftext|>"], eos_token_id=special["<|endoftext|>"],
    )
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config).to(torch.float32)
    with torch.no_grad():  # biases are zero-initialized; make them matter
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.normal_(0, init_std)
            for norm in (layer.input_layernorm, layer.post_attention_layernorm):
                norm.weight.uniform_(0.5, 1.5)
    model.to(dtype).save_pretrained(out_dir, max_shard_size="200KB" if shard else "10GB")  # bf16: config says so
    write_tokenizer(out_dir)
    (out_dir / "generation_config.json").write_text(json.dumps({"eos_token_id": special["<|endoftext|>"]}))
    return out_dir


CHAIN_TEXT = " The quick brown fox jumps over the lazy dog."  # 19 tokens of the tiny tokenizer, none repeated


def make_chain_checkpoint(out_dir: Path, text: str = CHAIN_TEXT) -> Path:
    """A tiny Qwen2 whose greedy continuation of any prompt is `text`, then <|endoftext|>: every prompt gets the same
    answer (a duplicate of every other, for the dataset-wide filters), from the real engine.

    Its attention and MLP outputs are zero, so the residual stream at a position is its token's embedding and the
    next token depends on the current one alone; the LM head maps each token of `text` to the next (the last to
    <|endoftext|>) and every other token (a prompt's last) to the first."""
    from safetensors.torch import load_file, save_file
    from tokenizers import Tokenizer

    out_dir = make_tiny_checkpoint(out_dir, heads=2, kv_heads=1, head_dim=64, layers=1)
    chain = Tokenizer.from_file(str(out_dir / "tokenizer.json")).encode(text).ids
    assert len(set(chain)) == len(chain), f"{text!r}: a token repeats, so the next token is not a function of it"
    path = out_dir / "model.safetensors"
    w = load_file(path)
    for name in w:
        if name.endswith(("o_proj.weight", "down_proj.weight")):
            w[name].zero_()
    embed = w["model.embed_tokens.weight"]
    others = torch.ones(embed.shape[0], dtype=torch.bool)
    others[chain] = False
    embed[others] = embed[others][0]  # every token outside the chain looks the same to the head

    def final_hidden(token: int) -> torch.Tensor:
        e = embed[token]
        return e * torch.rsqrt(e.pow(2).mean() + 1e-6) * w["model.norm.weight"]

    head = torch.zeros_like(w["lm_head.weight"])
    eos = SPECIAL_TOKENS.index("<|endoftext|>")
    head[chain[0]] = final_hidden(int(others.nonzero()[0]))
    for token, following in zip(chain, [*chain[1:], eos]):
        head[following] = final_hidden(token)
    w["lm_head.weight"] = head
    save_file(w, path, metadata={"format": "pt"})
    return out_dir
