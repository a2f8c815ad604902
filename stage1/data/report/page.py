"""The report page: one self-contained HTML file (inline CSS, charts as data URIs, no script, no font or file from
elsewhere; its Content-Security-Policy forbids loading anything but those) built from collect.ReportData.

Every text from the run is escaped here, in `cell`/`esc`: rows hold model output, which is untrusted HTML. The
counts the page shows carry data-* attributes (data-count="kept"|"rejected", data-reason-count="<reason>",
data-type-count="<type>"), which the browser test reads.
"""

from __future__ import annotations

import html
import json
from collections.abc import Iterable, Sequence
from typing import Any

from stage1.data.jobs import INSTRUCTIONS, RESPONSES
from stage1.data.report import charts
from stage1.data.report.collect import (CONTAMINATED, MAX_CLUSTER_MEMBERS, MAX_CLUSTERS, MAX_CONTAMINATED,
                                        SAMPLES_PER_GROUP, Cluster, ReportData, Shown, Split)

CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"
STYLE = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 24px auto; max-width: 1200px; padding: 0 16px; color: #222; }
h1 { font-size: 22px; } h2 { font-size: 18px; margin-top: 32px; border-bottom: 1px solid #ddd; }
h3 { font-size: 15px; margin-bottom: 4px; }
table { border-collapse: collapse; margin: 8px 0; } th, td { border: 1px solid #ddd; padding: 3px 8px;
  text-align: left; vertical-align: top; } td.n { text-align: right; font-variant-numeric: tabular-nums; }
th { background: #f4f4f4; } .muted { color: #777; } .note { background: #fff8e1; padding: 8px 12px; }
.charts { display: flex; flex-wrap: wrap; gap: 8px; } img.chart { width: 560px; max-width: 100%; }
.cluster { display: flex; gap: 8px; overflow-x: auto; padding-bottom: 6px; }
.card { flex: 0 0 320px; border: 1px solid #ccc; border-radius: 4px; padding: 6px 8px; background: #fafafa; }
.card.kept { border-color: #2b7bba; background: #eef5fb; } .card .head { font-size: 12px; color: #555; }
pre, .text { white-space: pre-wrap; word-break: break-word; font: 12px/1.4 ui-monospace, monospace; margin: 4px 0; }
pre.config { background: #f7f7f7; padding: 8px; max-height: 600px; overflow: auto; }
"""


class Html(str):
    """Markup built here, inserted as is (anything else is escaped)."""


def esc(value: Any) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def cell(value: Any) -> str:
    return value if isinstance(value, Html) else esc(value)


def table(head: Sequence[str], rows: Iterable[Sequence[Any]]) -> Html:
    """A table; a cell that is a number is right-aligned, one that is Html (a <td ...> included) goes in as is."""
    out = ["<table><tr>", *(f"<th>{esc(h)}</th>" for h in head), "</tr>"]
    for row in rows:
        out.append("<tr>")
        for value in row:
            if isinstance(value, Html) and value.startswith("<td"):
                out.append(value)
            elif isinstance(value, (int, float)) and not isinstance(value, bool):
                out.append(f'<td class="n">{esc(value)}</td>')
            else:
                out.append(f"<td>{cell(value)}</td>")
        out.append("</tr>")
    out.append("</table>")
    return Html("".join(out))


def counted(attribute: str, name: str, value: int) -> Html:
    """A count cell the browser test reads: <td data-ATTRIBUTE="name">value</td>."""
    return Html(f'<td class="n" data-{attribute}="{esc(name)}">{value}</td>')


def render(data: ReportData) -> str:
    manifest = data.manifest
    title = f"stage1 report: {manifest.get('args', {}).get('out') or manifest.get('command', '')}"
    sections = [
        _overview(data), _counts(data), _finish_reasons(data), _lengths(data), _signals(data), _clusters(data),
        _contaminated(data), _samples(data), _throughput(manifest), _configuration(manifest),
    ]
    return "\n".join([
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        f'<meta http-equiv="Content-Security-Policy" content="{CSP}">', '<link rel="icon" href="data:,">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{esc(title)}</title><style>{STYLE}</style></head><body>", f"<h1>{esc(title)}</h1>",
        *sections, "</body></html>", ""])


def _overview(data: ReportData) -> str:
    m = data.manifest
    facts = [("command", m.get("command")), ("status", m.get("status")), ("created", m.get("created_at")),
             ("updated", m.get("updated_at")), ("job", (m.get("identity") or {}).get("job", "responses")),
             ("model", (m.get("model") or {}).get("path")), ("style", (m.get("generation") or {}).get("style")),
             ("commit", (m.get("code") or {}).get("git_commit"))]
    if "merged_shards" in m:
        facts.append(("merged shards", len(m["merged_shards"])))
    note = "" if charts.available() else (
        f'<p class="note" data-charts="missing">The charts need the optional <code>{charts.EXTRA}</code> extra: '
        f"{esc(charts.INSTALL_HINT)}. Every figure is in the tables below.</p>")
    return note + table(("", ""), ((k, v) for k, v in facts if v is not None))


def _counts(data: ReportData) -> str:
    total = data.kept + data.rejected
    described = _reasons_described(data.manifest)
    reasons = sorted(data.by_reason.items(), key=lambda kv: (-kv[1], kv[0]))
    types = sorted(data.by_type.items(), key=lambda kv: (-sum(kv[1].values()), kv[0]))
    return "".join([
        "<h2>Kept and rejected</h2>",
        table(("rows", "kept", "rejected"), [(total, counted("count", "kept", data.kept),
                                              counted("count", "rejected", data.rejected))]),
        "<h3>Rejected, by reason</h3>",
        table(("reason", "rows", "share of rejects", "the filter rejects"),
              [(r, counted("reason-count", r, n), _share(n, data.rejected), described.get(r, ""))
               for r, n in reasons]) if reasons else "<p>No row was rejected.</p>",
        "<h3>By type</h3>",
        table(("type", "kept", "rejected", "kept share"),
              [(t, counted("type-count", t, c["kept"]), c["rejected"], _share(c["kept"], c["kept"] + c["rejected"]))
               for t, c in types]),
    ])


def _reasons_described(manifest: dict[str, Any]) -> dict[str, str]:
    """What each reject reason of the run's job means (its filter list); a reason no filter gives reads ''."""
    job = {kind.name: kind for kind in (RESPONSES, INSTRUCTIONS)}.get((manifest.get("identity") or {}).get("job"))
    return (job or RESPONSES).reject_reasons()


def _finish_reasons(data: ReportData) -> str:
    rows = sorted(data.finish_reasons.items(), key=lambda kv: (-sum(kv[1].values()), kv[0]))
    return "<h2>Finish reasons</h2>" + table(("finish reason", "kept", "rejected"),
                                              [(r, c["kept"], c["rejected"]) for r, c in rows])


def _lengths(data: ReportData) -> str:
    return "<h2>Lengths (tokens)</h2>" + _histograms(data.lengths, "tokens")


def _signals(data: ReportData) -> str:
    present = {name: split for name, split in data.signals.items() if len(split)}
    if not present:
        return ("<h2>Quality signals</h2><p class=\"muted\">The rows carry no quality signals "
                f"({', '.join(data.signals)}).</p>")
    return "<h2>Quality signals</h2>" + _histograms(present, "value")


def _histograms(splits: dict[str, Split], unit: str) -> str:
    images = [charts.histogram(name, unit, {"kept": s.kept, "rejected": s.rejected})
              for name, s in splits.items() if len(s)] if charts.available() else []
    summary = [(name, outcome, *_summary(values)) for name, s in splits.items()
               for outcome, values in (("kept", s.kept), ("rejected", s.rejected))]
    return (f'<div class="charts">{"".join(images)}</div>' +
            table(("field", "rows", "count", "mean", "min", "p10", "median", "p90", "max"), summary))


def _summary(values: Sequence[float]) -> tuple:
    if not len(values):
        return 0, "", "", "", "", "", ""
    import numpy as np
    v = np.asarray(values, dtype=float)
    p10, p50, p90 = np.percentile(v, [10, 50, 90])
    return (len(v), *(_fmt(x) for x in (v.mean(), v.min(), p10, p50, p90, v.max())))


def _clusters(data: ReportData) -> str:
    head = (f"<h2>Duplicate clusters</h2><p>{data.duplicated_rows} rows were rejected as exact or near duplicates of a "
            f"kept row. The {MAX_CLUSTERS} largest clusters (up to {MAX_CLUSTER_MEMBERS} duplicates each), the kept "
            f"row first, each near duplicate with the estimated Jaccard of its {esc(data.generated)}'s word shingles "
            "against it:</p>")
    if not data.clusters:
        return head + "<p>No duplicates.</p>"
    return head + "".join(_cluster(c) for c in data.clusters)


def _cluster(cluster: Cluster) -> str:
    kept = _card(cluster.kept, "kept row", "kept") if cluster.kept else (
        f'<div class="card kept"><div class="head">kept row {esc(cluster.key)}: not in data.jsonl</div></div>')
    members = [_card(row, "exact duplicate" if j is None else f"estimated Jaccard {j:.2f}", "")
               for row, j in cluster.members]
    more = cluster.size - len(cluster.members)
    tail = f'<p class="muted">... and {more} more duplicates of it.</p>' if more > 0 else ""
    return (f"<h3>{esc(cluster.key)}: {cluster.size} duplicate{'s' if cluster.size != 1 else ''}</h3>"
            f'<div class="cluster">{kept}{"".join(members)}</div>{tail}')


def _card(row: Shown, label: str, kind: str) -> str:
    texts = "".join(f'<div class="head">{esc(name)}</div><div class="text">{esc(text)}</div>'
                    for name, text in row.texts.items())
    return (f'<div class="card {kind}"><div class="head"><b>{esc(label)}</b> &middot; {esc(row.key)} &middot; '
            f"{esc(row.type)}</div>{texts}</div>")


def _contaminated(data: ReportData) -> str:
    n = data.by_reason.get(CONTAMINATED, 0)
    head = "<h2>Contaminated rows</h2>"
    if not n:
        return head + "<p>No row was rejected as contaminated (decontamination off, or nothing matched).</p>"
    shown = f"the first {len(data.contaminated)} of them" if n > len(data.contaminated) else "all of them"
    return (head + f"<p>{n} rows share text with an eval set ({shown}, at most {MAX_CONTAMINATED}); the detail names "
            "the eval file, its line and the matched text.</p>"
            + table(("row", "matched eval text", *_text_names(data)),
                    [(r.key, Html(f'<div class="text">{esc(r.detail)}</div>'), *_texts(r))
                     for r in data.contaminated]))


def _samples(data: ReportData) -> str:
    kept = data.kept_samples.groups()
    rejected = data.rejected_samples.groups()
    out = [f"<h2>Samples</h2><p>Up to {SAMPLES_PER_GROUP} rows per group, the same ones at every rebuild (those whose "
           "keys hash lowest).</p><h3>Kept, by type</h3>"]
    out.append(table(("type", "row", *_text_names(data), *_signal_names(data)),
                     [(t, r.key, *_texts(r), *_signal_values(data, r)) for t, rows in kept.items() for r in rows]))
    if rejected:
        out.append("<h3>Rejected, by reason</h3>")
        out.append(table(("reason", "detail", "row", *_text_names(data)),
                         [(reason, r.detail, r.key, *_texts(r)) for reason, rows in rejected.items() for r in rows]))
    return "".join(out)


def _text_names(data: ReportData) -> tuple[str, ...]:
    return tuple(dict.fromkeys(("instruction", data.generated)))


def _texts(row: Shown) -> list[Html]:
    return [Html(f'<div class="text">{esc(text)}</div>') for text in row.texts.values()]


def _signal_names(data: ReportData) -> tuple[str, ...]:
    return tuple(name for name, split in data.signals.items() if len(split))


def _signal_values(data: ReportData, row: Shown) -> list[str]:
    return [_fmt(row.signals[name]) if name in row.signals else "" for name in _signal_names(data)]


def _throughput(manifest: dict[str, Any]) -> str:
    out = ["<h2>Throughput</h2>"]
    sessions = manifest.get("sessions") or []
    if sessions:
        out.append(table(
            ("session", "started", "host", "resumed", "engine", "wall s", "generating s", "prompt tokens",
             "of them cached", "generated tokens", "generated tokens/s"),
            [(i + 1, s.get("started_at"), s.get("host"), s.get("resumed"),
              ", ".join(f"{k} {v}" for k, v in (s.get("engine") or {}).items()), s.get("wall_s"),
              s.get("generate_seconds"), s.get("prompt_tokens"), s.get("prompt_tokens_cached"),
              s.get("generated_tokens"), s.get("tokens_per_s")) for i, s in enumerate(sessions)]))
    shards = manifest.get("merged_shards") or []
    if shards:
        out.append(table(("shard", "kept", "rejected", "hosts", "sessions", "wall s", "generated tokens",
                          "generated tokens/s"),
                         [(s.get("name"), s.get("kept"), s.get("rejected"), ", ".join(s.get("hosts") or []),
                           s.get("sessions"), s.get("wall_s"), s.get("generated_tokens"), s.get("tokens_per_s"))
                          for s in shards]))
        merge = manifest.get("merge") or {}
        out.append(f"<p>The merge: {esc(merge.get('wall_s'))} s on {esc(merge.get('host'))}; its dataset-wide filters "
                   f"rejected {esc(merge.get('dataset_filter_rejected'))} rows.</p>")
    if not sessions and not shards:
        out.append('<p class="muted">The manifest records no session.</p>')
    return "".join(out)


def _configuration(manifest: dict[str, Any]) -> str:
    return ("<h2>Configuration</h2><p>The whole manifest (manifest.json):</p>"
            f'<pre class="config">{esc(json.dumps(manifest, indent=2, ensure_ascii=False))}</pre>')


def _share(part: int, whole: int) -> str:
    return f"{100 * part / whole:.1f}%" if whole else ""


def _fmt(x: float) -> str:
    return f"{x:.4g}"
