"""The SFT data pipeline around the engine: prompt styles and their example pool (data files), instruction readers,
post-processing filters, the crash-safe dataset writer and the run manifest; the job kinds (jobs.py), the run
description a CLI builds (run.py) and the modes that carry it out (modes.py: one process, a shard, data parallelism,
the merge). `stage1/generate.py` is the main job's CLI. Nothing here imports torch until an engine starts.
"""

from stage1.data.errors import DataError, PromptMismatchError
from stage1.data.prompts import CompletionStylePrompts, Example, Prompt, PromptStyle, load_examples, load_styles
from stage1.data.readers import Instruction, read_instructions

__all__ = [
    "CompletionStylePrompts", "DataError", "Example", "Instruction", "Prompt", "PromptMismatchError", "PromptStyle",
    "load_examples", "load_styles", "read_instructions",
]
