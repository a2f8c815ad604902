"""Linear layers split over the tensor-parallel ranks (the Megatron scheme).

Column-parallel: the output features are split, each rank computes its slice of y and nothing is communicated;
the next layer consumes the slice as it is (attention heads, MLP channels). Row-parallel: the input features are
split (the slice a column-parallel layer left), each rank computes a partial y and one all-reduce sums them. A
block then costs two all-reduces: after o_proj and after down_proj.

A weight is `[out_features, in_features]` as in nn.Linear, so column shards are rows of the checkpoint tensor
(dim 0) and row-parallel shards are its columns (dim 1).

Every layer that multiplies by a weight matrix (these, and the LM head: a `MatmulLayer`) calls
`self.linear(x, weight, bias)`: F.linear unless `use_linear_kernel` installs another, which the engine does once
after building the model with the function backends.py chose (`Kernels.linear`; e.g. the native bf16-weight
kernel, whose weights are stored in bf16 while the activations stay fp32). Their weights carry
`matmul_weight = True`, so the loader can store them in the kernel's weight dtype. (embedding.py builds on this
module; this one knows the embedding only as a MatmulLayer whose weight is also looked up by rows.)
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..distributed import current, first_kv_head, kv_heads_per_rank


def divide(n: int, size: int, what: str) -> int:
    if n % size:
        raise ValueError(f"{what} ({n}) does not split over {size} tensor-parallel ranks")
    return n // size


def copy_checked(dest: torch.Tensor, src: torch.Tensor, what: str) -> None:
    """dest <- src, cast to dest's dtype and device; a shape mismatch is an error (copy_ would broadcast)."""
    if dest.shape != src.shape:
        raise ValueError(f"{what}: this rank's slice has shape {list(src.shape)}, the parameter expects "
                         f"{list(dest.shape)}")
    dest.copy_(src)


LinearFn = Callable[[torch.Tensor, torch.Tensor, "torch.Tensor | None"], torch.Tensor]


class MatmulLayer(nn.Module):
    """A layer whose `weight` a matmul reads, through `self.linear(x, weight, bias)`: what use_linear_kernel
    replaces. `looks_up_rows`: the weight is an embedding table, also read by rows (F.embedding), so it is never
    prepacked, and the rows looked up are cast to `activation_dtype` when that is set."""

    linear: LinearFn = staticmethod(F.linear)
    looks_up_rows = False
    activation_dtype: torch.dtype | None = None


def use_linear_kernel(model: nn.Module, linear: LinearFn, activation_dtype: torch.dtype | None = None,
                      prepack: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
    """Makes every layer of `model` that multiplies by a weight matrix call `linear(x, weight, bias)`; with
    `activation_dtype`, the embedding casts what it looks up to it (its table may be stored narrower, as the
    matmul weights are). With `prepack`, each weight only a matmul reads is replaced by `prepack(weight)`, the
    form `linear` wants (e.g. oneDNN's blocked layout), once; an embedding table stays as it is, so a tied LM head
    multiplies by the plain table."""
    layers = [m for m in model.modules() if isinstance(m, MatmulLayer)]
    looked_up = {id(m.weight) for m in layers if m.looks_up_rows}
    for module in layers:
        module.linear = linear
        if prepack is not None and id(module.weight) not in looked_up:
            module.weight = nn.Parameter(prepack(module.weight.data), requires_grad=False)
        if module.looks_up_rows:
            module.activation_dtype = activation_dtype


class _ParallelLinear(MatmulLayer):
    """y = x W^T (+ b) with this rank's W `[out_features, in_features]`. No initialization: the loader fills it."""

    def __init__(self, in_features: int, out_features: int, bias: bool):
        super().__init__()
        self.tp = current()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.weight.weight_loader = self.load_weight
        self.weight.matmul_weight = True
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features))
            self.bias.weight_loader = self.load_bias
        else:
            self.register_parameter("bias", None)

    def load_weight(self, param: torch.Tensor, checkpoint_slice, shard_id=None) -> None:
        raise NotImplementedError

    def load_bias(self, param: torch.Tensor, checkpoint_slice, shard_id=None) -> None:
        raise NotImplementedError

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"rank={self.tp.rank}/{self.tp.size}")


class ColumnParallelLinear(_ParallelLinear):
    """Output features split over the ranks; the local output is made of parts (q, k, v; gate, up), each one a
    checkpoint tensor of its own, and each part is sliced on its own (slicing the fused tensor as a whole would
    hand rank 0 all of q and rank 1 all of k and v).

    `parts`: shard id -> (first row of the part in the local weight, first checkpoint row this rank keeps, rows).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = False):
        local = divide(out_features, current().size, "output features")
        self._init_parts(in_features, {None: (0, current().rank * local, local)}, bias)

    def _init_parts(self, in_features: int, parts: dict, bias: bool) -> None:
        super().__init__(in_features, sum(rows for _, _, rows in parts.values()), bias)
        self.parts = parts

    def load_weight(self, param: torch.Tensor, checkpoint_slice, shard_id=None) -> None:
        offset, start, rows = self.parts[shard_id]
        copy_checked(param[offset:offset + rows], checkpoint_slice[start:start + rows], f"part {shard_id!r}")

    load_bias = load_weight  # a bias is split like its weight's rows

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x, self.weight, self.bias)


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel outputs fused into one matmul (gate and up): each rank holds its slice of every
    part, in part order, so `chunk(len(parts))` of the local output splits it back. Shard ids: 0, 1, ..."""

    def __init__(self, in_features: int, output_sizes: list[int], bias: bool = False):
        tp, parts, offset = current(), {}, 0
        for i, size in enumerate(output_sizes):
            local = divide(size, tp.size, f"output features of part {i}")
            parts[i] = (offset, tp.rank * local, local)
            offset += local
        self._init_parts(in_features, parts, bias)


class QKVParallelLinear(ColumnParallelLinear):
    """q, k and v projections fused: this rank's query heads, then its KV heads' k, then their v.

    Query heads are sharded. KV heads are sharded too while there are at least as many as ranks; with more ranks
    than KV heads every rank keeps the one KV head its query heads use (rank // (ranks / KV heads)), so a KV
    head is replicated on ranks / KV heads ranks. `num_heads`, `num_kv_heads`, `q_size`, `kv_size` are this
    rank's. Shard ids: "q", "k", "v".
    """

    def __init__(self, hidden_size: int, head_dim: int, num_heads: int, num_kv_heads: int, bias: bool = True):
        tp = current()
        heads, kv_heads = divide(num_heads, tp.size, "attention heads"), kv_heads_per_rank(num_kv_heads, tp.size)
        q_size, kv_size = heads * head_dim, kv_heads * head_dim
        kv_start = first_kv_head(tp.rank, num_kv_heads, tp.size) * head_dim
        self._init_parts(hidden_size, {"q": (0, tp.rank * q_size, q_size), "k": (q_size, kv_start, kv_size),
                                       "v": (q_size + kv_size, kv_start, kv_size)}, bias)
        self.num_heads, self.num_kv_heads, self.head_dim = heads, kv_heads, head_dim
        self.q_size, self.kv_size = q_size, kv_size


class RowParallelLinear(_ParallelLinear):
    """Input features split over the ranks (the slice the column-parallel layer before it produced): each rank's
    partial product, then one all-reduce. A bias is added once, by rank 0, so the sum holds it once."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False):
        tp = current()
        local = divide(in_features, tp.size, "input features")
        super().__init__(local, out_features, bias)
        self.input_start = tp.rank * local

    def load_weight(self, param: torch.Tensor, checkpoint_slice, shard_id=None) -> None:
        copy_checked(param, checkpoint_slice[:, self.input_start:self.input_start + self.in_features], "columns")

    def load_bias(self, param: torch.Tensor, checkpoint_slice, shard_id=None) -> None:
        copy_checked(param, checkpoint_slice[:], "bias")  # replicated

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.linear(x, self.weight, self.bias if self.tp.rank == 0 else None)
        return self.tp.all_reduce(y)
