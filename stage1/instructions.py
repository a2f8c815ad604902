"""python -m stage1.instructions: new instructions from a BASE model itself, by few-shot completion prompts over the
example pool, until --count are kept; the input of `python -m stage1.generate --instructions OUT/data.jsonl`.

The same run machinery as stage1.generate (stage1/data: the run description, streaming loop, shards and merge,
--resume, manifest); this module is the CLI only, and imports no torch before the engine starts.
"""

from __future__ import annotations

import argparse
import sys
import textwrap

from stage1.data.cli import run_cli
from stage1.data.engine import EngineFactory, load_llm
from stage1.data.filters import INSTRUCTION_NEAR_DUP_THRESHOLD, POOL_COPY_THRESHOLD
from stage1.data.instruction_prompts import DEFAULT_ATTEMPTS_PER_KEPT, DEFAULT_INSTRUCTION_STYLE
from stage1.data.jobs import INSTRUCTIONS
from stage1.data.prompts import load_examples
from stage1.data.run import add_engine_and_parallel_flags, add_input_output_flags
from stage1.data.settings import GenerationConfig, add_decontamination_flags, add_sampling_flags
from stage1.data.writer import DATA_FILE, REJECTS_FILE

DEFAULT_OUT = "out/stage1-instructions"
# Diversity over precision: the filters remove what a hotter sampler gets wrong, and cheaply (instructions are short).
SAMPLING_DEFAULTS = {"temperature": 1.0, "top_p": 0.95, "max_tokens": 64}

DESCRIPTION = f"""\
Write new instructions with a BASE model: each request is a few-shot completion prompt (a header line, 4-6 typed
examples from the pool, then the start of a new entry of a chosen type, and topic with --topics) with no chat template.
The model's continuation up to the next entry is a new instruction. Types are drawn evenly over --types. Every row
stores the exact prompt the engine tokenized, its example ids, type, topic, seed and sampling.

One process generates until --count instructions are kept (or --max-attempts requests were made, which it reports).
With shards (--dp, --num-shards, a SLURM array) each keeps its share and the merge removes duplicates across shards:
its summary says how many remain. --resume with a larger --count adds to the same dataset, leaving its rows as they are.

{textwrap.fill(f"Output (in --out): {DATA_FILE} (one row per kept instruction), {REJECTS_FILE} (each rejected one "
                f"with its reason: {', '.join(INSTRUCTIONS.reject_reasons())}), manifest.json.", width=116)}"""

EPILOG = """\
examples:
  python -m stage1.instructions --count 1000 --out out/instr
  python -m stage1.instructions --count 2000 --out out/instr --resume        # tops up to 2000, same first rows
  python -m stage1.instructions --count 100000 --out out/instr --dp 8 --topics topics.txt
  python -m stage1.generate --instructions out/instr/data.jsonl --out out/sft   # then answer them

exit codes: 0 done, 1 the run stopped (engine/prompt mismatch, disk error), 2 bad input or usage, 130 interrupted."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"python -m {INSTRUCTIONS.cli}", description=DESCRIPTION, epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_input_output_flags(p, default_out=DEFAULT_OUT, input_help=None)
    d = GenerationConfig()
    job = p.add_argument_group("instructions")
    job.add_argument("--count", type=int, default=100, metavar="N",
                     help="instructions to keep (default: %(default)s)")
    job.add_argument("--max-attempts", type=int, metavar="N",
                     help=f"the cap on requests over the whole run (default: {DEFAULT_ATTEMPTS_PER_KEPT} x --count "
                          "+ 100)")
    types = sorted({ex.type for ex in load_examples()})
    job.add_argument("--examples", metavar="FILE",
                     help='the example pool, JSONL of {"id", "type", "prompt"} (default: the built-in '
                          f"{len(load_examples())} examples of {len(types)} types)")
    job.add_argument("--types", metavar="LIST",
                     help=f"comma-separated types to draw evenly (default: all of the pool's: {','.join(types)})")
    job.add_argument("--topics", metavar="FILE", help="a topic per line, drawn evenly, one per request")

    gen = p.add_argument_group("generation")
    gen.add_argument("--style", choices=sorted(INSTRUCTIONS.styles()), default=DEFAULT_INSTRUCTION_STYLE,
                     help="prompt style (stage1/data/instruction_styles.json; default: %(default)s)")
    add_sampling_flags(gen)
    p.set_defaults(**SAMPLING_DEFAULTS)
    gen.add_argument("--seed", type=int, default=d.seed, metavar="S",
                     help="run seed; attempt ids and row seeds derive from it (default: %(default)s)")
    gen.add_argument("--batch-size", type=int, default=d.batch_size, metavar="N",
                     help="rows are saved each time N more attempts are judged (default: %(default)s)")

    flt = p.add_argument_group("filters")
    flt.add_argument("--allow-run-on", action="store_true", help="keep instructions that hit --max-tokens")
    flt.add_argument("--no-near-dedup", action="store_true", help="turn off the MinHash near-duplicate filter")
    flt.add_argument("--near-dup-threshold", type=float, default=INSTRUCTION_NEAR_DUP_THRESHOLD, metavar="J",
                     help="estimated Jaccard (word 2-grams) from which an instruction is a near-duplicate of one kept "
                          "before it (default: %(default)s)")
    flt.add_argument("--copy-threshold", type=float, default=POOL_COPY_THRESHOLD, metavar="J",
                     help="estimated Jaccard (word 2-grams) from which an instruction copies a pool example (default: "
                          "%(default)s)")
    add_decontamination_flags(flt)
    add_engine_and_parallel_flags(p)
    return p


def main(argv: list[str] | None = None, llm_factory: EngineFactory | None = None) -> int:
    """`llm_factory(model_dir, engine_options)` makes the engine (tests pass a fake one); default: stage1.LLM."""
    return run_cli(INSTRUCTIONS, build_parser(), argv, llm_factory or load_llm)


if __name__ == "__main__":
    sys.exit(main())
