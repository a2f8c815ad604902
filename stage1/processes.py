"""Process helpers shared by the engine's tensor-parallel workers and the data-parallel shard processes."""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal


def die_with_parent(parent_pid: int) -> None:
    """Linux: the kernel kills this process when its parent ends, however it ends (no orphan holds a GPU)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() != parent_pid:  # the parent ended before the line above took effect
        os._exit(1)
