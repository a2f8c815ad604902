"""python -m stage1.export OUT --to parquet|trl|messages: a finished run's kept rows in the form a trainer reads
(stage1/data/export.py says what each form holds). This module is the CLI only; it imports no torch."""

from __future__ import annotations

import argparse
import sys

from stage1.data.errors import DataError
from stage1.data.export import EXPORT_DIR, FORMS, export

EPILOG = f"""\
forms (each written whole to --dest, default OUT/{EXPORT_DIR}/<file>):
  parquet   every column of data.jsonl ({FORMS['parquet'][0]}; needs the hf extra: pip install 'stage1[hf]')
  trl       TRL's prompt-completion JSONL ({FORMS['trl'][0]}): {{"prompt": instruction + "\\n", "completion": response}}
  messages  chat messages JSONL ({FORMS['messages'][0]}): {{"messages": [{{"role": "user", ...}}, {{"role": "assistant", ...}}]}}
The instruction job's output (no responses) exports only --to parquet.

examples:
  python -m stage1.export out/sft --to trl
  python -m stage1.export out/sft --to parquet --dest /data/sft.parquet

exit codes: 0 done, 1 a disk error, 2 bad input or usage."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m stage1.export", epilog=EPILOG,
                                description="Export the kept rows of a finished stage1 run (its --out) for a trainer.",
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", metavar="OUT", help="the run's output directory (data.jsonl, manifest.json)")
    p.add_argument("--to", required=True, choices=tuple(FORMS), help="the form to write")
    p.add_argument("--dest", metavar="PATH", help=f"the file to write (default: OUT/{EXPORT_DIR}/<the form's file>)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        dest, count = export(args.out, args.to, args.dest)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {count} rows to {dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
