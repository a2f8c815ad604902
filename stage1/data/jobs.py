"""Job kinds: what differs between the datasets stage1 makes through its one loop (plan -> engine -> judge -> write)
and what serves them all (run.py, modes.py, pipeline.py, shards, merge, resume, manifest.py).

A job kind names its CLI, reads its input, makes its prompts and says which reasons its rejects can give. The main
job, `RESPONSES` (`python -m stage1.generate`), prompts a base model to answer instructions; a second kind (one that
makes the model write instructions) is another `JobKind`, not another copy of the loop.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

from stage1.data.filters import reject_reasons
from stage1.data.prompts import CompletionStylePrompts, PromptStyle, load_styles, pool_fingerprint
from stage1.data.readers import Instruction, instructions_fingerprint, read_instructions


@dataclass(frozen=True)
class JobKind:
    name: str  # in the run identity: an output directory of another kind holds another run
    cli: str  # the module `python -m` runs: the manifest's command, and what each data-parallel shard process runs
    # (path, or None for the built-in set; format) -> the whole input, validated, in input order
    read_input: Callable[[str | None, str], list[Instruction]]
    input_fingerprint: Callable[[list[Instruction]], str]
    styles: Callable[[], dict[str, PromptStyle]]  # the prompt styles it offers (--style)
    prompts: Callable[[str], CompletionStylePrompts]  # a style's prompt maker: build(text, seed, type) -> Prompt
    prompt_data_fingerprint: Callable[[], str]  # what its prompts are made of (styles, example pool)
    # every reason its rejects can give, in the order its filters run -> what it means
    reject_reasons: Callable[[], Mapping[str, str]]


RESPONSES = JobKind(
    name="responses", cli="stage1.generate", read_input=read_instructions, input_fingerprint=instructions_fingerprint,
    styles=load_styles, prompts=CompletionStylePrompts, prompt_data_fingerprint=pool_fingerprint,
    reject_reasons=reject_reasons,
)
