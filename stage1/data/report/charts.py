"""The report's charts: matplotlib (the optional `report` extra) draws each as SVG, embedded in the page as a data
URI (an <img>, so the charts' own element ids never meet each other or the page's). Without matplotlib, `available`
is False and the page shows its tables alone, saying which extra adds the charts.

The SVG is deterministic: no date in its metadata and a fixed salt for its element ids, so a rebuilt page is
byte-identical. matplotlib is imported here only (lazily), without pyplot, so no global backend is chosen.
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Mapping, Sequence

EXTRA = "report"
INSTALL_HINT = f"pip install 'stage1[{EXTRA}]' (in a checkout: pip install -e '.[{EXTRA}]'), which adds matplotlib"
BINS = 30
COLORS = {"kept": "#2b7bba", "rejected": "#d9534f"}
_RC = {"svg.hashsalt": "stage1-report", "svg.fonttype": "none", "font.size": 9}


def available() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def histogram(title: str, xlabel: str, series: Mapping[str, Sequence[float]]) -> str:
    """An <img> of the series' histograms over shared bins (kept and rejected overlaid as outlines)."""
    import matplotlib
    import numpy as np
    from matplotlib.figure import Figure

    present = {name: np.asarray(values, dtype=float) for name, values in series.items() if len(values)}
    edges = np.histogram_bin_edges(np.concatenate(list(present.values())), bins=BINS)
    with matplotlib.rc_context(_RC):
        fig = Figure(figsize=(5.6, 2.6))
        ax = fig.add_subplot()
        for name, values in present.items():
            counts, _ = np.histogram(values, bins=edges)
            ax.stairs(counts, edges, label=f"{name} ({len(values)})", color=COLORS.get(name), linewidth=1.4,
                      fill=len(present) == 1, alpha=0.9)
        ax.set_title(title)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("rows")
        ax.legend(frameon=False)
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="svg", metadata={"Date": None})
    encoded = base64.b64encode(buf.getvalue()).decode("ascii")
    return f'<img class="chart" alt="{html.escape(title)}" src="data:image/svg+xml;base64,{encoded}">'
