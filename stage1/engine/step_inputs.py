"""A step's inputs, built without per-step Python work that grows with the context: the block tables as rows of
one persistent array updated with the blocks added since the last step, and (on a GPU) one preallocated pinned
staging area copied to the device with one non-blocking copy per dtype.

On a GPU the host builds step N+1's inputs while the GPU runs step N, so this is the host's share of every step:
rebuilding a 256-sequence batch's block tables from Python lists costs ~0.5 ms at 1000-token contexts, as long as
the GPU needs for the whole step of a small model.
"""

from __future__ import annotations

import numpy as np
import torch


class BlockTableRows:
    """Each sequence's block table as a row of one `[rows, max_blocks]` int32 array, kept across steps.

    A block table only grows at its end, except that a preempted sequence gives all its blocks back and starts
    again from a prefill. So a prefill step writes its sequences' rows in full and a decode step appends the
    entries added since (at most one, usually none). A row whose sequence is not in the step can be dropped at any
    time (its sequence is written in full when it comes back); rows are dropped when all are taken.
    """

    def __init__(self, max_seqs: int, max_blocks: int):
        self.table = np.zeros((2 * max_seqs, max_blocks), dtype=np.int32)
        self._row_of: dict[int, int] = {}  # seq_id -> row
        self._written = [0] * len(self.table)  # entries of each row that are current
        self._free = list(range(len(self.table) - 1, -1, -1))

    def rows(self, seqs: list, full: bool) -> np.ndarray:
        """The rows of `seqs` (sequences with `seq_id` and `block_table`), up to date; `full`: rewrite them (a
        prefill step)."""
        rows, table, written, row_of = [], self.table, self._written, self._row_of
        for seq in seqs:  # plain ints and lists here: this runs for every sequence at every step
            row = row_of.get(seq.seq_id)
            if row is None:
                row, start = self._assign(seq.seq_id, seqs), 0
            else:
                start = 0 if full else written[row]
            blocks = seq.block_table
            if len(blocks) > start:
                table[row, start:len(blocks)] = blocks[start:]
                written[row] = len(blocks)
            rows.append(row)
        return np.array(rows, dtype=np.int64)

    def _assign(self, seq_id: int, step_seqs: list) -> int:
        if not self._free:  # drop every row not in this step; those sequences are rewritten when they return
            keep = {seq.seq_id for seq in step_seqs}
            for other, row in list(self._row_of.items()):
                if other not in keep:
                    del self._row_of[other]
                    self._free.append(row)
        row = self._free.pop()
        self._row_of[seq_id] = row
        self._written[row] = 0
        return row

    def width(self, rows: np.ndarray) -> int:
        """The most blocks any of these rows holds."""
        return max(self._written[row] for row in rows.tolist())


class StagedUpload:
    """Host arrays to device tensors: on a GPU through two preallocated pinned buffers (int64 and int32 parts of a
    step), each filled with numpy and sent with one non-blocking copy into a preallocated device buffer. Two sets
    alternate, so filling step N+1's never overwrites step N's while its copy may still run. On a CPU the arrays
    are the tensors (no copy)."""

    def __init__(self, device: torch.device, int64_capacity: int, int32_capacity: int):
        self.device = device
        self.staged = device.type == "cuda"
        if not self.staged:
            return
        self._sets = []
        for _ in range(2):
            host = (torch.empty(int64_capacity, dtype=torch.int64, pin_memory=True),
                    torch.empty(int32_capacity, dtype=torch.int32, pin_memory=True))
            dev = (torch.empty(int64_capacity, dtype=torch.int64, device=device),
                   torch.empty(int32_capacity, dtype=torch.int32, device=device))
            self._sets.append((host, dev, torch.cuda.Event()))
        self._next = 0

    def upload(self, int64_arrays: list[np.ndarray], int32_arrays: list[np.ndarray]) -> list[torch.Tensor]:
        """The arrays as device tensors of the same shapes, int64 ones first."""
        if not self.staged:
            return [torch.from_numpy(a) for a in (*int64_arrays, *int32_arrays)]
        host, dev, copied = self._sets[self._next]
        self._next ^= 1
        copied.synchronize()  # this set's previous copy (two steps ago) has left the pinned buffers
        out = []
        for arrays, host_buf, dev_buf in zip((int64_arrays, int32_arrays), host, dev):
            staging = host_buf.numpy()
            if sum(a.size for a in arrays) > staging.size:
                raise RuntimeError(f"a step's inputs exceed the staging buffer ({staging.size} values)")
            views, used = [], 0
            for a in arrays:
                staging[used:used + a.size] = a.reshape(-1)
                views.append((used, a.shape))
                used += a.size
            dev_buf[:used].copy_(host_buf[:used], non_blocking=True)
            out += [dev_buf[start:start + int(np.prod(shape))].view(shape) for start, shape in views]
        copied.record(torch.cuda.current_stream(self.device))  # this device's stream, whichever is current
        return out
