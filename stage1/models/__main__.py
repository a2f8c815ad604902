"""python -m stage1.models {import-gguf FILE OUT_DIR [--dtype bf16|fp32] | fetch [--cache-dir DIR]}

Progress goes to stderr; the last stdout line is the model directory, so `$(python -m stage1.models fetch)` works.
A ModelError is printed as one line without a traceback, exit status 2.
"""

from __future__ import annotations

import argparse
import sys

from .errors import ModelError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stage1.models",
                                     description="Import a Qwen2 GGUF, or fetch the default model, as a HF directory.")
    sub = parser.add_subparsers(dest="command", required=True)
    imp = sub.add_parser("import-gguf", help="convert a Qwen2 GGUF file into a Hugging Face model directory")
    imp.add_argument("file", help="the .gguf file")
    imp.add_argument("out_dir", help="the directory to create (must not exist, or be empty)")
    imp.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16", help="weight dtype (default bf16)")
    fetch = sub.add_parser("fetch", help="download (once) and import the default model; prints its directory")
    fetch.add_argument("--cache-dir", help="cache root (default $STAGE1_CACHE or ~/.cache/stage1)")
    args = parser.parse_args(argv)

    try:
        if args.command == "import-gguf":
            from .gguf_import import import_gguf
            out = import_gguf(args.file, args.out_dir, dtype=args.dtype)
        else:
            from .fetch import default_model_dir
            out = default_model_dir(fetch=True, cache_dir=args.cache_dir)
    except ModelError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
