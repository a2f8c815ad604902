"""What the data tests read back from a run's directory: its two data files, as bytes or as rows."""

from __future__ import annotations

import json

FILES = ("data.jsonl", "rejects.jsonl")
RUN = ("--limit", 60, "--n", 2, "--batch-size", 4)  # a run small enough to shard three ways in seconds


def files(out):
    return {name: (out / name).read_bytes() for name in FILES}


def rows(path):
    return [json.loads(line) for line in path.read_bytes().splitlines()]
