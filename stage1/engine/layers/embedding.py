"""The token embedding and the LM head split over the vocabulary.

Each rank holds ceil(vocab / ranks) consecutive rows; the last shard is padded with zero rows when the vocabulary
does not divide, so every rank's shard has one shape (what the gather of logits needs).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..distributed import current
from .linear import MatmulLayer, copy_checked


class VocabParallelEmbedding(MatmulLayer):
    """Rows [vocab_start, vocab_end) of the embedding. A token outside them looks up zeros here, so the sum over
    the ranks (one all-reduce) is each token's own row, exactly. (Its table is a matmul weight too: the LM head's
    when tied, and stored like the others; see linear.py. `linear` is the LM head's matmul, use_linear_kernel's;
    looked-up rows are cast to `activation_dtype` when set.)"""

    looks_up_rows = True

    def __init__(self, vocab_size: int, hidden_size: int):
        super().__init__()
        self.tp = current()
        self.vocab_size, self.hidden_size = vocab_size, hidden_size
        self.rows_per_rank = -(-vocab_size // self.tp.size)
        self.vocab_start = self.tp.rank * self.rows_per_rank
        self.vocab_end = min(self.vocab_start + self.rows_per_rank, vocab_size)
        self.weight = nn.Parameter(torch.empty(self.rows_per_rank, hidden_size))
        self.weight.weight_loader = self.load_weight
        self.weight.matmul_weight = True

    def load_weight(self, param: torch.Tensor, checkpoint_slice, shard_id=None) -> None:
        rows = self.vocab_end - self.vocab_start
        copy_checked(param[:rows], checkpoint_slice[self.vocab_start:self.vocab_end], "vocabulary rows")
        param[rows:].zero_()  # padding: never looked up, and logits of 0 that rank 0 trims off

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            return self._rows(input_ids)
        mine = (input_ids >= self.vocab_start) & (input_ids < self.vocab_end)
        x = self._rows(torch.where(mine, input_ids - self.vocab_start, 0))
        return self.tp.all_reduce(x.masked_fill_(~mine.unsqueeze(-1), 0))

    def _rows(self, ids: torch.Tensor) -> torch.Tensor:
        x = F.embedding(ids, self.weight)
        return x if self.activation_dtype is None else x.to(self.activation_dtype)

    def extra_repr(self) -> str:
        return (f"vocab={self.vocab_size}, rows {self.vocab_start}..{self.vocab_end} of this rank "
                f"({self.tp.rank}/{self.tp.size}), hidden={self.hidden_size}")


class ParallelLMHead(VocabParallelEmbedding):
    """Logits = hidden @ W^T over this rank's vocabulary rows, gathered to rank 0 only (it samples): the full
    `[rows, vocab]` there, None on the other ranks. Tied embeddings: the model gives it the embedding's weight,
    the same shard."""

    looks_up_rows = False  # its own weight only multiplies (a tied one is the embedding's, which is looked up)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor | None:
        logits = self.linear(hidden, self.weight, None)
        if self.tp.size == 1:
            return logits
        logits = self.tp.gather_to_first(logits)
        if logits is None or logits.shape[-1] == self.vocab_size:
            return logits
        return logits[..., :self.vocab_size].contiguous()  # the last shard's padding
