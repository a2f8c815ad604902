"""What the report tests share: a fake-engine answer that mixes every kind of reject and near-duplicate cluster
(the respond_mixed fixture) with rows holding HTML, and the counts a report page marks with data-* attributes."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

HOSTILE = "<script>document.title='pwned'</script><img src=x onerror=alert(1)> & <b>bold</b>"
RUN = ("--limit", 60, "--n", 2)


def with_html(respond):
    """`respond` (the fixture respond_mixed), with one answer in eight holding HTML instead (most of them kept)."""
    def answer(prompt: str, seed: int, index: int) -> str:
        if random.Random(f"html:{seed}:{index}").random() < 0.125:
            return f"An answer in markup: {HOSTILE} and more words {seed % 997} {index}."
        return respond(prompt, seed, index)
    return answer


def manifest_counts(out: Path) -> dict:
    m = json.loads((out / "manifest.json").read_text())
    return {"kept": m["counts"]["kept"], "rejected": m["counts"]["rejected"], "reasons": m["rejected_by_reason"]}


def page_counts(page: str) -> dict:
    """The counts the page marks: data-count="kept"|"rejected", data-reason-count="<reason>"."""
    marked = {kind: {name: int(value) for name, value in re.findall(rf'data-{kind}="([^"]+)">(\d+)<', page)}
              for kind in ("count", "reason-count")}
    return {"kept": marked["count"]["kept"], "rejected": marked["count"]["rejected"], "reasons": marked["reason-count"]}


def charts_expected(out: Path) -> int:
    """The histograms a page of `out` draws: prompt and generated tokens, and each quality signal its rows carry."""
    from stage1.data.report.collect import SIGNALS

    rows = [json.loads(line) for name in ("data.jsonl", "rejects.jsonl")
            for line in (out / name).read_text().splitlines()]
    return 2 + sum(any(isinstance(r.get(name), (int, float)) for r in rows) for name in SIGNALS)
