"""The Qwen-2.5 decoder: embedding, N pre-norm blocks (GQA attention with rotary, SwiGLU MLP), final norm, LM head.

It takes packed token ids (all sequences of a step back to back, no padding), their positions and an attention
context; it knows shapes and math, not requests. The KV cache and the attention kernel live behind
`PagedAttention` (attention.py). Under tensor parallelism the layers in layers/ hold this rank's share (its query and
KV heads, MLP channels, vocabulary rows) and communicate themselves; the model is built under the parallel
state of the rank that runs it (distributed.py) and reads the same either way. The residual stream runs beside
the hidden states from block to block, so each norm adds it in the same pass (layers/norm.py).
"""

from __future__ import annotations

import torch
from torch import nn

from .attention import AttentionContext, PagedAttention
from .config import ModelConfig
from .distributed import check_tensor_parallel_size, current
from .layers import (MergedColumnParallelLinear, ParallelLMHead, QKVParallelLinear, RMSNorm, RowParallelLinear,
                     SiluAndMul, VocabParallelEmbedding)


class RotaryEmbedding(nn.Module):
    """Neox-style rotary: the head is split in two halves that rotate together by position-dependent angles.

    One fp32 table for the whole model, built on first use on the device of the positions (so it is neither
    cast to the run dtype nor materialized on the meta device while weights load); each step looks up its
    positions once and every layer reuses the result.
    """

    def __init__(self, head_dim: int, theta: float, max_positions: int):
        super().__init__()
        self.head_dim, self.theta, self.max_positions = head_dim, theta, max_positions
        self._table: torch.Tensor | None = None  # [max_positions, 2, head_dim / 2]: cos, sin

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self._table is None or self._table.device != positions.device:
            exponents = torch.arange(0, self.head_dim, 2, dtype=torch.float32, device=positions.device) / self.head_dim
            inv_freq = 1.0 / self.theta ** exponents
            freqs = torch.outer(torch.arange(self.max_positions, dtype=torch.float32, device=positions.device), inv_freq)
            self._table = torch.stack((freqs.cos(), freqs.sin()), dim=1)
        cos, sin = self._table[positions].unsqueeze(2).unbind(1)  # each [tokens, 1, head_dim / 2]
        return cos, sin


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer_index: int):
        super().__init__()
        self.head_dim = config.head_dim
        # q, k and v projections fused into one matmul (with bias); the output projection has no bias.
        self.qkv_proj = QKVParallelLinear(config.hidden_size, self.head_dim, config.num_attention_heads,
                                          config.num_key_value_heads, bias=True)
        self.o_proj = RowParallelLinear(config.q_size, config.hidden_size, bias=False)
        # this rank's heads (all of them without tensor parallelism)
        self.num_heads, self.num_kv_heads = self.qkv_proj.num_heads, self.qkv_proj.num_kv_heads
        self.q_size, self.kv_size = self.qkv_proj.q_size, self.qkv_proj.kv_size
        self.attn = PagedAttention(layer_index, self.head_dim ** -0.5)

    def forward(self, rope: tuple[torch.Tensor, torch.Tensor], x: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        qk, v = self.qkv_proj(x).split([self.q_size + self.kv_size, self.kv_size], dim=-1)
        # q and k heads lie side by side: attention rotates them together and stores k and v
        qk = qk.view(-1, self.num_heads + self.num_kv_heads, self.head_dim)
        o = self.attn(qk, v.view(-1, self.num_kv_heads, self.head_dim), rope, ctx)
        return self.o_proj(o.reshape(-1, self.q_size))


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)), gate and up fused into one matmul."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.gate_up_proj = MergedColumnParallelLinear(config.hidden_size, [config.intermediate_size] * 2, bias=False)
        self.down_proj = RowParallelLinear(config.intermediate_size, config.hidden_size, bias=False)
        self.act_fn = SiluAndMul()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_up_proj(x)))


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_index: int):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, layer_index)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, rope: tuple[torch.Tensor, torch.Tensor], x: torch.Tensor, residual: torch.Tensor | None,
                ctx: AttentionContext) -> tuple[torch.Tensor, torch.Tensor]:
        """(this block's MLP output, the residual stream before it is added); residual None: x starts it."""
        if residual is None:
            x, residual = self.input_layernorm(x), x
        else:
            x, residual = self.input_layernorm(x, residual)
        x = self.self_attn(rope, x, ctx)
        x, residual = self.post_attention_layernorm(x, residual)
        return self.mlp(x), residual


class Qwen2ForCausalLM(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        check_tensor_parallel_size(config, current().size)  # a size that does not split the heads: say which do
        self.config = config
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary = RotaryEmbedding(config.head_dim, config.rope_theta, config.max_position_embeddings)
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        """Hidden states of every packed token, [tokens, hidden]."""
        x = self.embed_tokens(input_ids)
        rope = self.rotary(positions)
        residual = None
        for layer in self.layers:
            x, residual = layer(rope, x, residual, ctx)
        x, _ = self.norm(x, residual)
        return x

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor | None:
        """Logits of the given rows, [rows, vocab], on rank 0; None on the other ranks (their shards went to it)."""
        return self.lm_head(hidden)
