"""Crash-safe JSONL output: data.jsonl (kept rows) and rejects.jsonl (rows with a reason).

Each batch of rows (the pipeline's, in input order) goes to each file as one append of whole lines, then fsync, so a
kill loses at most the rows not yet written.
A line cut short by a crash (no final newline) is the only damage possible; `repair_truncated_tail` drops it on resume.
A file written whole instead (the merge's, the manifest) goes through `replaced_whole`: the old file or the new one.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO

from stage1.data.errors import DataError

DATA_FILE = "data.jsonl"
REJECTS_FILE = "rejects.jsonl"
# written from the manifest and rows when a run (or merge) finishes: the dataset card (card.py), the report
CARD_FILE = "README.md"
REPORT_FILE = "report.html"


def dumps_line(row: dict[str, Any]) -> bytes:
    """One row as one line. JSON escapes newlines, so a row never spans lines."""
    try:
        return (json.dumps(row, ensure_ascii=False) + "\n").encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate in the text: keep it, escaped, rather than fail the run
        return (json.dumps(row, ensure_ascii=True) + "\n").encode("ascii")


def repair_truncated_tail(path: str | Path) -> int:
    """Cuts a trailing partial line (left by a kill mid-write) off the file; returns the bytes dropped."""
    path = Path(path)
    if not path.is_file():
        return 0
    with open(path, "rb+") as f:
        size = f.seek(0, os.SEEK_END)
        if size == 0:
            return 0
        f.seek(size - 1)
        if f.read(1) == b"\n":
            return 0
        # Scan back for the last newline in blocks; rows are small, files can be large.
        pos = size
        keep = 0
        while pos > 0:
            start = max(0, pos - (1 << 16))
            f.seek(start)
            block = f.read(pos - start)
            i = block.rfind(b"\n")
            if i >= 0:
                keep = start + i + 1
                break
            pos = start
        f.truncate(keep)
        f.flush()
        os.fsync(f.fileno())
        return size - keep


def iter_jsonl(path: str | Path) -> Iterator[dict[str, Any]]:
    """The rows of a file we wrote (missing file: none), one at a time. A bad complete line means someone else
    touched the file."""
    path = Path(path)
    if not path.is_file():
        return
    with open(path, "rb") as f:
        for n, line in enumerate(f, 1):
            if not line.endswith(b"\n"):
                return  # a partial tail: not a row (repair_truncated_tail removes it before we append)
            try:
                row = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError):
                raise DataError(f"{path}:{n}: not a valid JSON row, so this file was not written by a clean run; "
                                "move it away or pass --overwrite") from None
            yield row


@contextmanager
def replaced_whole(path: str | Path) -> Iterator[BinaryIO]:
    """A binary file for the new content of `path`: written beside it, fsynced and renamed onto it when the block
    ends, so a kill leaves the old file or the new one, never a part; on an error the old file stays and the
    temporary one is removed."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


class DatasetWriter:
    """Appends rows to data.jsonl and rejects.jsonl in `out_dir`, one chunk at a time."""

    def __init__(self, out_dir: str | Path):
        self.out_dir = Path(out_dir)
        self.data_path = self.out_dir / DATA_FILE
        self.rejects_path = self.out_dir / REJECTS_FILE
        self._fds: dict[Path, int] = {}
        self.repaired_bytes = 0  # what repair_truncated_tail cut off when opening

    def __enter__(self) -> DatasetWriter:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        for path in (self.data_path, self.rejects_path):
            self.repaired_bytes += repair_truncated_tail(path)
            self._fds[path] = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        return self

    def __exit__(self, *exc) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def write_chunk(self, kept: Iterable[dict[str, Any]], rejected: Iterable[dict[str, Any]]) -> None:
        # Data first, then rejects: a kill between the two leaves rejects behind, which resume regenerates.
        for path, rows in ((self.data_path, kept), (self.rejects_path, rejected)):
            data = b"".join(dumps_line(r) for r in rows)
            if data:
                _write_all(self._fds[path], data)
                os.fsync(self._fds[path])
