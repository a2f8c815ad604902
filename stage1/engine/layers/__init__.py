"""The layers that are split over tensor-parallel ranks: the model uses them as it would nn.Linear / nn.Embedding
and stays the architecture, with no parallel branches.

Each layer takes the parallel state it is built under (`distributed.current()`) and keeps it; at size 1 it is the
plain layer (the same matmul, the same result, bit for bit). Each parameter carries a
`weight_loader(param, checkpoint_slice, shard_id=None)` that reads only this rank's rows or columns of a
checkpoint tensor (anything indexable like safetensors' `PySafeSlice`: `s[a:b]` for rows, `s[:, a:b]` for
columns) and copies them where they go in the local, possibly fused, parameter.

The norm and the activation (norm.py, activation.py) are not split: every rank holds the whole hidden state. Their
kernels, like the linear layers' matmul, are installed by the loader (elementwise.py).
"""

from .activation import SiluAndMul
from .elementwise import ElementwiseKernels, use_elementwise_kernels
from .embedding import ParallelLMHead, VocabParallelEmbedding
from .linear import (ColumnParallelLinear, MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear,
                     use_linear_kernel)
from .norm import RMSNorm

__all__ = ["ColumnParallelLinear", "ElementwiseKernels", "MergedColumnParallelLinear", "ParallelLMHead",
           "QKVParallelLinear", "RMSNorm", "RowParallelLinear", "SiluAndMul", "VocabParallelEmbedding",
           "use_elementwise_kernels", "use_linear_kernel"]
