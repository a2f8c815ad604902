"""What every job's CLI does with a parsed command line: build the run, carry it out, and turn each kind of failure
into one line on stderr and its exit code (0 done, 1 the run stopped, 2 bad input or usage, 130 interrupted)."""

from __future__ import annotations

import argparse
import sys

from stage1.data.engine import EngineFactory
from stage1.data.errors import DataError, PromptMismatchError, ShardFailedError
from stage1.data.jobs import JobKind
from stage1.data.modes import execute
from stage1.data.run import build_run


def run_cli(job: JobKind, parser: argparse.ArgumentParser, argv: list[str] | None, llm_factory: EngineFactory) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    try:
        return execute(build_run(job, args, argv), llm_factory)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (PromptMismatchError, ShardFailedError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except OSError as e:  # disk full, permissions: the run stops where it was, its rows intact
        if args.merge:  # the merge writes beside OUT's files and renames them in only once whole (merge.py)
            print(f"error: {e}; the merge left OUT's files and the shards as they were: fix this and rerun the "
                  "same --merge command", file=sys.stderr)
        else:
            print(f"error: {e}; rows written so far are intact, fix this and rerun with --resume", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted: the rows written so far are intact; rerun with --resume to continue", file=sys.stderr)
        return 130
    except RuntimeError as e:
        # a tensor-parallel worker that died; its module is loaded only where an engine ran (never in a merge)
        workers = sys.modules.get("stage1.engine.tp_workers")
        if workers is None or not isinstance(e, workers.WorkerDiedError):
            raise
        print(f"error: {e}; rows written so far are intact, rerun with --resume", file=sys.stderr)
        return 1
