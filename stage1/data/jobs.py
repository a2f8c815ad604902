"""Job kinds: what differs between the datasets stage1 makes through its one loop (plan -> engine -> judge -> write)
and what serves them all (run.py, modes.py, pipeline.py, shards, merge, resume, manifest.py).

A job kind names its CLI, reads its input, makes its prompts and rows, and lists its filters. `RESPONSES`
(`python -m stage1.generate`) prompts a base model to answer instructions; `INSTRUCTIONS`
(`python -m stage1.instructions`) prompts it to write new instructions from the example pool, until --count are kept.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from stage1.data import filters as filter_lists
from stage1.data.filters import Candidate, Filter, dedup_key, reject_reasons
from stage1.data.instruction_prompts import (InstructionPrompts, InstructionSpec, attempts,
                                             instruction_prompt_data_fingerprint, instruction_row,
                                             load_instruction_styles)
from stage1.data.prompts import CompletionStylePrompts, load_styles, pool_fingerprint
from stage1.data.readers import Instruction, instructions_fingerprint, read_instructions
from stage1.data.rows import make_row

if TYPE_CHECKING:
    from stage1.data.run import Run


@dataclass(frozen=True)
class JobKind:
    name: str  # in the run identity: an output directory of another kind holds another run
    cli: str  # the module `python -m` runs: the manifest's command, and what each data-parallel shard process runs
    read_input: Callable[[Run], list[Instruction]]  # the whole input, validated, in input order
    input_fingerprint: Callable[[Run, list[Instruction]], str]  # of what decides the input (not --limit/--count)
    styles: Callable[[], Mapping[str, Any]]  # the prompt styles it offers (--style)
    # (style, job options) -> prompt maker: .style (its stops), prompt_for(inst, seed) -> Prompt, copy_sources(prompt)
    prompts: Callable[[str, Any], Any]
    prompt_data_fingerprint: Callable[[], str]  # what its prompts are made of (styles, built-in data)
    filters: Callable[[], tuple[type[Filter], ...]]  # its filter list, in the order they run (read when a run starts)
    make_row: Callable[..., dict[str, Any]]  # (inst, prompt=..., completion=..., response=..., ...) -> row
    candidate_of_written: Callable[[dict[str, Any]], Candidate]  # a written row as the dataset filters see it
    # the job's own flags -> its options (Run.job_options); None for a job with none
    options_from_args: Callable[[argparse.Namespace], Any] = lambda args: None
    # (run) -> how many rows this process keeps before it stops (None: it goes through its whole input)
    keep_goal: Callable[[Run], int | None] = lambda run: None

    def reject_reasons(self) -> dict[str, str]:
        return reject_reasons(self.filters())


def _response_written(row: dict[str, Any]) -> Candidate:
    return Candidate(row["instruction"], row["response"], row["finish_reason"], {}, dedup_key(row["id"], row["index"]),
                     row["prompt_tokens"])


def _instruction_written(row: dict[str, Any]) -> Candidate:
    # the generated instruction is the text the filters judge; the attempt has no input text
    return Candidate("", row["instruction"], row["finish_reason"], {}, dedup_key(row["id"], row["index"]),
                     row["prompt_tokens"])


RESPONSES = JobKind(
    name="responses", cli="stage1.generate",
    read_input=lambda run: read_instructions(run.instructions, run.input_format, run.instruction_field,
                                             run.instruction_split),
    input_fingerprint=lambda run, instructions: instructions_fingerprint(instructions),
    styles=load_styles, prompts=lambda style, options: CompletionStylePrompts(style),
    prompt_data_fingerprint=pool_fingerprint, filters=lambda: filter_lists.FILTERS, make_row=make_row,
    candidate_of_written=_response_written,
)

INSTRUCTIONS = JobKind(
    name="instructions", cli="stage1.instructions",
    read_input=lambda run: attempts(run.job_options, run.settings.seed),
    input_fingerprint=lambda run, instructions: run.job_options.fingerprint(),
    styles=load_instruction_styles, prompts=InstructionPrompts,
    prompt_data_fingerprint=instruction_prompt_data_fingerprint, filters=lambda: filter_lists.INSTRUCTION_FILTERS, make_row=instruction_row,
    candidate_of_written=_instruction_written,
    options_from_args=lambda args: InstructionSpec.from_args(args),
    keep_goal=lambda run: run.job_options.share(run.shard),
)
