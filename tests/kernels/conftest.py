"""Kernel tests: compiled on a GPU when there is one, else on the CPU through the Triton interpreter.

TRITON_INTERPRET is read when a kernel is defined (when stage1.kernels.attention is first imported), so it is set
here, before any test module imports the kernels. An explicit TRITON_INTERPRET in the environment wins.
"""

from __future__ import annotations

import os

import torch

os.environ.setdefault("TRITON_INTERPRET", "0" if torch.cuda.is_available() else "1")
