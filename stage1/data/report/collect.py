"""What the report shows of a finished run, gathered from its files one row at a time: counts (by reason, by type,
by finish reason), the numbers its histograms are drawn from, and bounded samples (rows per type and per reason,
the largest duplicate clusters with the kept row each repeats, contaminated rows). A dataset of any size is read
in constant memory apart from one float per row and histogram, and one counter per duplicated kept row.

Every choice is deterministic (no clock, no random state): the sample of a group is the rows whose keys hash
lowest, so rebuilding the report gives the same page.
"""

from __future__ import annotations

import heapq
import re
from array import array
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stage1.data.filters import dedup_key
from stage1.data.hashing import sha256_text
from stage1.data.rows import generated_field
from stage1.data.writer import DATA_FILE, REJECTS_FILE, iter_jsonl

SAMPLES_PER_GROUP = 3  # rows shown per type (kept) and per reason (rejected)
MAX_CLUSTERS = 12  # duplicate clusters shown, the largest first
MAX_CLUSTER_MEMBERS = 6  # duplicates shown beside the row they repeat
MAX_CONTAMINATED = 30  # contaminated rows shown, in file order
MAX_TEXT_CHARS = 2000  # of a text shown in the page; the rest is counted, not shown
SIGNALS = ("mean_logprob", "min_logprob", "judge_score")  # the rows' quality signals, when they carry them
# their detail ends "with <id>#<index>" (near) or "as <id>#<index>" (exact): filters.dedup_key
DUPLICATE_REASONS = ("exact_duplicate", "near_duplicate")
CONTAMINATED = "contaminated"
_REPEATS_RE = re.compile(r" (?:with|as) (.+#(?:-?\d+|None))$")
_JACCARD_RE = re.compile(r"Jaccard ([0-9.]+)")


@dataclass
class Split:
    """One number per row, kept and rejected apart: what a histogram is drawn from."""
    kept: array = field(default_factory=lambda: array("d"))
    rejected: array = field(default_factory=lambda: array("d"))

    def add(self, value: Any, kept: bool) -> None:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            (self.kept if kept else self.rejected).append(float(value))

    def __len__(self) -> int:
        return len(self.kept) + len(self.rejected)


@dataclass
class Shown:
    """A row as the page shows it: its key, its texts (instruction, then the generated one) cut to a readable
    length, and what else names it."""
    key: str
    type: str
    texts: dict[str, str]
    reason: str | None = None
    detail: str | None = None
    signals: dict[str, float] = field(default_factory=dict)


@dataclass
class Cluster:
    """A kept row and the rejected rows that repeat it (exact or near duplicates)."""
    key: str
    size: int  # all its duplicates, shown or not
    kept: Shown | None = None  # None: not in data.jsonl (a file edited by hand)
    members: list[tuple[Shown, float | None]] = field(default_factory=list)  # (duplicate, its estimated Jaccard)


class Sample:
    """The `size` rows of each group whose keys hash lowest: a fixed, evenly spread sample, one row at a time."""

    def __init__(self, size: int = SAMPLES_PER_GROUP):
        self.size = size
        self._heaps: dict[str, list[tuple[int, str, Shown]]] = defaultdict(list)

    def offer(self, group: str, row: Shown) -> None:
        rank = -int(sha256_text(row.key)[:16], 16)  # a max-heap of the lowest hashes: the root is the one to drop
        heap = self._heaps[group]
        if len(heap) < self.size:
            heapq.heappush(heap, (rank, row.key, row))
        elif rank > heap[0][0]:
            heapq.heapreplace(heap, (rank, row.key, row))

    def groups(self) -> dict[str, list[Shown]]:
        return {g: [row for _, _, row in sorted(heap, reverse=True)] for g, heap in sorted(self._heaps.items())}


@dataclass
class ReportData:
    manifest: dict[str, Any]
    generated: str = "response"  # the field holding the generated text (rows.generated_field)
    kept: int = 0
    rejected: int = 0
    by_reason: Counter = field(default_factory=Counter)
    by_type: dict[str, Counter] = field(default_factory=lambda: defaultdict(Counter))  # type -> kept/rejected
    finish_reasons: dict[str, Counter] = field(default_factory=lambda: defaultdict(Counter))
    lengths: dict[str, Split] = field(default_factory=dict)  # prompt_tokens, <generated>_tokens
    signals: dict[str, Split] = field(default_factory=lambda: {name: Split() for name in SIGNALS})
    kept_samples: Sample = field(default_factory=Sample)  # by type
    rejected_samples: Sample = field(default_factory=Sample)  # by reason
    clusters: list[Cluster] = field(default_factory=list)
    duplicated_rows: int = 0  # rejected as a duplicate of a kept row
    contaminated: list[Shown] = field(default_factory=list)


def collect(out_dir: str | Path, manifest: dict[str, Any]) -> ReportData:
    """Reads OUT's rejects.jsonl, data.jsonl, then (for the clusters' members only) rejects.jsonl again."""
    out_dir = Path(out_dir)
    data = ReportData(manifest)
    cluster_sizes: Counter[str] = Counter()
    for row in iter_jsonl(out_dir / REJECTS_FILE):
        shown = _add(data, row, kept=False)
        data.rejected_samples.offer(row["reason"], shown)
        if row["reason"] in DUPLICATE_REASONS and (repeated := repeated_key(row)):
            cluster_sizes[repeated] += 1
        if row["reason"] == CONTAMINATED and len(data.contaminated) < MAX_CONTAMINATED:
            data.contaminated.append(shown)
    data.duplicated_rows = sum(cluster_sizes.values())
    # the largest first; equal sizes in the order their first duplicate came (Counter keeps insertion order)
    data.clusters = [Cluster(key, size) for key, size in sorted(cluster_sizes.items(), key=lambda kv: -kv[1])
                     ][:MAX_CLUSTERS]
    by_key = {c.key: c for c in data.clusters}
    for row in iter_jsonl(out_dir / DATA_FILE):
        shown = _add(data, row, kept=True)
        data.kept_samples.offer(shown.type, shown)
        if shown.key in by_key:
            by_key[shown.key].kept = shown
    if by_key:
        for row in _duplicates(out_dir):
            cluster = by_key.get(repeated_key(row))
            if cluster is not None and len(cluster.members) < MAX_CLUSTER_MEMBERS:
                cluster.members.append((_shown(row, data.generated), jaccard_of(row)))
    return data


def _duplicates(out_dir: Path) -> Iterator[dict[str, Any]]:
    return (row for row in iter_jsonl(out_dir / REJECTS_FILE) if row["reason"] in DUPLICATE_REASONS)


def _add(data: ReportData, row: dict[str, Any], *, kept: bool) -> Shown:
    """Counts one row and returns it as the page would show it."""
    generated = generated_field(row)
    if generated is not None:
        data.generated = generated
    shown = _shown(row, data.generated)
    outcome = "kept" if kept else "rejected"
    if kept:
        data.kept += 1
    else:
        data.rejected += 1
        data.by_reason[row["reason"]] += 1
    data.by_type[shown.type][outcome] += 1
    if row.get("index") is not None:  # a completion (index None: a prompt never sent)
        data.finish_reasons[str(row.get("finish_reason"))][outcome] += 1
    for name in ("prompt_tokens", f"{data.generated}_tokens"):
        data.lengths.setdefault(name, Split()).add(row.get(name), kept)
    for name, split in data.signals.items():
        split.add(row.get(name), kept)
    return shown


def _shown(row: dict[str, Any], generated: str) -> Shown:
    texts = {name: clipped(row.get(name)) for name in dict.fromkeys(("instruction", generated))}
    signals = {name: row[name] for name in SIGNALS if isinstance(row.get(name), (int, float))}
    return Shown(dedup_key(row["id"], row.get("index")), str(row.get("type") or "(none)"), texts, row.get("reason"),
                 row.get("detail"), signals)


def clipped(text: Any) -> str:
    text = "" if text is None else str(text)
    if len(text) <= MAX_TEXT_CHARS:
        return text
    return f"{text[:MAX_TEXT_CHARS]} [... {len(text) - MAX_TEXT_CHARS} more characters]"


def repeated_key(row: dict[str, Any]) -> str | None:
    """The kept row a duplicate repeats, as its detail names it (filters.dedup_key)."""
    m = _REPEATS_RE.search(row.get("detail") or "")
    return m.group(1) if m else None


def jaccard_of(row: dict[str, Any]) -> float | None:
    """The estimated Jaccard a near-duplicate's detail gives; None for an exact duplicate."""
    m = _JACCARD_RE.search(row.get("detail") or "")
    return float(m.group(1)) if m else None
