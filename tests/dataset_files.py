"""What the data tests read back from a run's directory: its two data files, as bytes or as rows."""

from __future__ import annotations

import json

FILES = ("data.jsonl", "rejects.jsonl")
RUN = ("--limit", 60, "--n", 2, "--batch-size", 4)  # a run small enough to shard three ways in seconds


def files(out):
    return {name: (out / name).read_bytes() for name in FILES}


def rows(path):
    return [json.loads(line) for line in path.read_bytes().splitlines()]


# The rows' quality signals are measured from the logits, and a real engine's logits differ in their last bits with how
# requests were batched (matmul blocking, the prefix cache, TP's all-reduce order), while its fp32 tokens do not.
SIGNALS = ("mean_logprob", "min_logprob")
SIGNAL_TOLERANCE = 1e-4


def assert_same_engine_files(out, expected):
    """Two real-engine runs of one dataset that batched differently: the same rows in the same order, every field
    equal but the logprob signals (SIGNALS), which agree within SIGNAL_TOLERANCE."""
    for name in FILES:
        got, want = rows(out / name), rows(expected / name)
        assert [[kv for kv in row.items() if kv[0] not in SIGNALS] for row in got] == \
            [[kv for kv in row.items() if kv[0] not in SIGNALS] for row in want], name
        for g, w in zip(got, want):
            for key in SIGNALS:
                assert (g[key] is None) == (w[key] is None), (name, g["id"], g["index"], key)
                assert g[key] is None or abs(g[key] - w[key]) <= SIGNAL_TOLERANCE, (name, g["id"], g["index"], key)
