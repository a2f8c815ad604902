"""python -m stage1.report OUT: (re)builds OUT/report.html from a finished run's or merge's files (a run and a merge
write it themselves). Imports no torch: it runs wherever the files are."""

from __future__ import annotations

import argparse
import sys

from stage1.data.errors import DataError
from stage1.data.report import REPORT_FILE, write_report


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m stage1.report",
        description=f"Rebuild OUT/{REPORT_FILE}, the self-contained page of a finished stage1 run: kept and rejected "
                    "counts by reason and type, length and quality-signal histograms, duplicate clusters, "
                    "contaminated rows, samples, throughput per session and the whole manifest. The charts need "
                    "the optional `report` extra (matplotlib); without it the page has the tables alone.")
    parser.add_argument("out", help="the run's --out directory (with manifest.json, data.jsonl, rejects.jsonl)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        print(write_report(args.out))  # the page's path
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
