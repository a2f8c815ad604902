"""python -m stage1.generate: turn instructions into an SFT dataset by prompting a BASE model with few-shot,
completion-style prompts, storing exactly the prompt the model saw.

Writes <out>/data.jsonl (kept rows), <out>/rejects.jsonl (filtered rows, each with its reason) and <out>/manifest.json
(model, code version, arguments, counts). See --help. This module is the CLI only: its flags make one run description
(stage1/data/run.py), which stage1/data/modes.py carries out; neither imports torch before the engine starts.
"""

from __future__ import annotations

import argparse
import sys
import textwrap

from stage1.data.engine import EngineFactory, load_llm
from stage1.data.cli import run_cli
from stage1.data.jobs import RESPONSES
from stage1.data.run import add_engine_and_parallel_flags, add_input_output_flags
from stage1.data.readers import read_instructions
from stage1.data.filters import SELECT_CHOICES
from stage1.data.judge import load_judge_styles
from stage1.data.settings import GenerationConfig, add_decontamination_flags, add_sampling_flags
from stage1.data.writer import DATA_FILE, REJECTS_FILE

DEFAULT_OUT = "out/stage1-sft"

DESCRIPTION = f"""\
Generate a supervised fine-tuning (SFT) dataset from a list of instructions with a BASE model.

Each instruction becomes a few-shot, completion-style prompt (a header line and 3-4 example prompt/completion pairs
drawn from a built-in pool, then the instruction), with no chat template and no special tokens. The model's
continuation up to the next blank line is the response. Every row stores the exact prompt the engine tokenized.

{textwrap.fill(f"Output (in --out): {DATA_FILE} (one row per kept completion), {REJECTS_FILE} (every filtered "
                f"completion with its reason: {', '.join(RESPONSES.reject_reasons())}), manifest.json (model, code "
                "version, arguments, counts, tokens/s).", width=116)}

Instructions stream through the engine: new ones enter as others finish (up to --max-num-seqs sequences at once),
and rows are written in input order, every --batch-size instructions. A run is reproducible: each row's seed is
derived from --seed and the row's id, so the same arguments give the same data file whatever --batch-size and
--max-num-seqs, and --resume after a crash, a kill or Ctrl-C finishes it exactly as an uninterrupted run (the rows on
disk say what is done; a line cut short by a kill is dropped).

Progress goes to stderr: a bar on a terminal, one line a minute otherwise (a SLURM log), counting the instructions the
engine has finished. The manifest's sessions report the tail: decode steps that ran below half of --max-num-seqs while
more instructions waited than slots were free (the engine could have been fuller), and their share of the time."""

EPILOG = """\
examples:
  python -m stage1.generate                                   # built-in instructions, default model
  python -m stage1.generate --model ~/models/Qwen2.5-0.5B --limit 20 --out /tmp/try
  python -m stage1.generate --instructions mine.jsonl --n 4 --style qa --out out/mine
  python -m stage1.generate --instructions mine.jsonl --n 4 --style qa --out out/mine --resume
  python -m stage1.generate --instructions mine.jsonl --decontaminate evals/gsm8k.jsonl evals/mmlu.parquet

many processes (README: "Many GPUs and nodes"):
  python -m stage1.generate --instructions mine.jsonl --out out/mine --dp 8     # 8 engines on this node, merged
  python -m stage1.generate --instructions mine.jsonl --out out/mine --tp 2 --dp 4 --resume
  python -m stage1.generate --instructions mine.jsonl --out out/mine --num-shards 16 --shard-index 3
  python -m stage1.generate --instructions mine.jsonl --out out/mine --merge   # once all 16 are complete
  python -m stage1.launch slurm --array 16 --gpus-per-task 1 -- --instructions mine.jsonl --out out/mine

instruction files:
  .jsonl / .ndjson: one JSON object per line with "instruction" (required), "id", "type", "source" (optional);
                    other fields are copied into every output row.
  .parquet / .pq, a directory saved by datasets' save_to_disk: the columns as JSONL's fields (a null id, type or
                    source counts as absent); --instruction-split picks a split of a DatasetDict (needs the hf extra:
                    pip install 'stage1[hf]').
  anything else:    plain text, one instruction per line (blank lines ignored); ids are hashes of the text.
  --instruction-field NAME reads the instructions from another field or column than "instruction".

output for trainers and the Hub: OUT/README.md is the dataset card (the Hub's YAML, how it was made);
  python -m stage1.export OUT --to parquet|trl|messages writes the kept rows in those forms.

exit codes: 0 done, 1 the run stopped (engine/prompt mismatch, disk error), 2 bad input or usage, 130 interrupted."""


def _builtin_summary() -> str:
    builtin = read_instructions(None)
    return f"{len(builtin)} instructions of {len({i.type for i in builtin})} types"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"python -m {RESPONSES.cli}", description=DESCRIPTION, epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_input_output_flags(p, default_out=DEFAULT_OUT, input_help="instructions: JSONL, plain text, parquet, or a "
                                                                   "`datasets` directory (save_to_disk) (default: the "
                                                                   f"built-in set, {_builtin_summary()})")
    d = GenerationConfig()
    gen = p.add_argument_group("generation")
    gen.add_argument("--style", choices=sorted(RESPONSES.styles()), default=d.style,
                     help="prompt style: completion (header + prompt/completion examples, the default) or qa "
                          "(Q: ... / A: ... pairs)")
    add_sampling_flags(gen)  # --temperature, --top-p, ...: one per sampling field of GenerationConfig
    gen.add_argument("--seed", type=int, default=d.seed, metavar="S",
                     help="run seed; row seeds derive from it (default: %(default)s)")
    gen.add_argument("--batch-size", type=int, default=d.batch_size, metavar="N",
                     help="rows are saved (appended and fsynced, in input order) each time N more instructions are "
                          "done; a kill loses at most those in memory (default: %(default)s)")

    flt = p.add_argument_group("filters")
    flt.add_argument("--allow-run-on", action="store_true",
                     help="keep completions that hit --max-tokens instead of rejecting them")
    flt.add_argument("--no-near-dedup", action="store_true", help="turn off the MinHash near-duplicate filter")
    flt.add_argument("--near-dup-threshold", type=float, default=d.near_dup_threshold, metavar="J",
                     help="estimated Jaccard similarity above which a response is a near-duplicate (default: "
                          "%(default)s)")
    flt.add_argument("--copy-threshold", type=float, default=d.copy_threshold, metavar="F",
                     help="ROUGE-L F above which a response copies one of its few-shot examples (default: "
                          "%(default)s)")
    add_decontamination_flags(flt)
    flt.add_argument("--select", choices=SELECT_CHOICES, default=d.select,
                     help="which of an instruction's --n completions to keep: all that pass the filters, or "
                          "best-logprob: the one with the highest mean token logprob among those that pass the row "
                          "filters, the others rejected as not_selected (before the dedup) (default: %(default)s)")
    flt.add_argument("--judge", action="store_true",
                     help="rate each completion the selection kept with the same model: a few-shot rating prompt "
                          "(--judge-style), read as the expected 1-5 score over the next token's digits, no sampling; "
                          "rows get judge_score and judge_prompt_sha256")
    flt.add_argument("--judge-style", choices=sorted(load_judge_styles()), default=d.judge_style,
                     help="the rating prompt (stage1/data/judge_styles.json) (default: %(default)s)")
    flt.add_argument("--min-judge-score", type=float, metavar="X",
                     help="reject rows whose judge score is below X, or that have none (low_judge_score, before the "
                          "dedup); implies --judge")
    add_engine_and_parallel_flags(p)
    return p


def main(argv: list[str] | None = None, llm_factory: EngineFactory | None = None) -> int:
    """`llm_factory(model_dir, engine_options)` makes the engine (tests pass a fake one); default: stage1.LLM."""
    return run_cli(RESPONSES, build_parser(), argv, llm_factory or load_llm)


if __name__ == "__main__":
    sys.exit(main())
