"""The report of a finished run (or merge): OUT/report.html, one self-contained page a person opens in a browser.
collect.py reads the run's files one row at a time, charts.py draws the histograms (matplotlib, the optional
`report` extra), page.py builds the HTML. `write_report` is what a run, a merge and `python -m stage1.report OUT` call.
"""

from __future__ import annotations

from pathlib import Path

from stage1.data.errors import DataError
from stage1.data.manifest import MANIFEST_FILE, read_manifest
from stage1.data.writer import REPORT_FILE, replaced_whole



def write_report(out_dir: str | Path) -> Path:
    """Builds OUT/report.html from OUT's manifest and rows (atomically: the old page or the new one) and returns
    its path. The page depends on the files alone, so a rebuild is byte-identical."""
    from stage1.data.report.collect import collect
    from stage1.data.report.page import render

    out_dir = Path(out_dir)
    manifest = finished_manifest(out_dir)
    page = render(collect(out_dir, manifest))
    path = out_dir / REPORT_FILE
    with replaced_whole(path) as f:
        f.write(page.encode("utf-8"))
    return path


def finished_manifest(out_dir: Path) -> dict:
    """OUT's manifest, of a finished run or merge; otherwise a DataError saying what OUT is instead."""
    if not out_dir.is_dir():
        raise DataError(f"{out_dir}: no such directory; pass the --out directory of a stage1 run")
    try:
        manifest = read_manifest(out_dir)
    except DataError:
        raise DataError(f"{out_dir / MANIFEST_FILE}: not a valid manifest, so {out_dir} is not a stage1 run's "
                        "output (or its manifest was damaged)") from None
    if manifest is None:
        raise DataError(f"{out_dir}: no {MANIFEST_FILE}, so it is not a stage1 run's output; pass the --out "
                        "directory of a run")
    if manifest.get("status") != "complete":
        raise DataError(f"{out_dir}: its run is not finished (status {manifest.get('status')!r}); finish it with "
                        "the run's command and --resume, which writes the report")
    return manifest
