"""A finished run's kept rows (data.jsonl) in the forms trainers read:

- `parquet`: every column, through `datasets` (the `hf` extra), so `load_dataset("parquet", ...)` gives back the rows
  of `load_dataset("json", ...)`; a column whose values mix types (`stop_reason`: a stop string or a stop token id)
  is an Arrow JSON column, which `datasets` decodes back to the values.
- `trl`: TRL's standard prompt-completion form, JSONL `{"prompt": instruction + "\\n", "completion": response}`.
  The newline that ends the instruction in the generation prompt belongs to the prompt: TRL tokenizes the prompt
  alone and the pair together and trains on the tokens past the prompt's, and for Qwen's tokenizer a prompt ending
  in a newline is a token boundary, while a newline starting the completion merges with a final "?" or "." into one
  token ("?\\n"), so the prompt's tokens would not start the pair's (56 of the example pool's 60 pairs:
  tests/real_model/test_real_model_trl_boundary.py). TRL's own example puts its separating space in the completion
  (" blue."), where a space before a word is a boundary; a newline after punctuation is not. TRL appends the EOS.
- `messages`: the conversational form, `{"messages": [{"role": "user", ...}, {"role": "assistant", ...}]}`, for a
  chat template.

The instruction job's output has no responses, so `trl` and `messages` refuse it (one line naming what to do);
`parquet` takes it. Each file is written whole (writer.replaced_whole); torch is never imported.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

from stage1.data.errors import DataError
from stage1.data.manifest import MANIFEST_FILE, read_manifest
from stage1.data.optional import HF_EXTRA, require
from stage1.data.writer import DATA_FILE, dumps_line, iter_jsonl, replaced_whole

EXPORT_DIR = "export"  # OUT/export/<form's file> unless --dest says otherwise
PROMPT_END = "\n"  # what ends the instruction in a `trl` prompt (see the module docstring)


def trl_row(row: dict[str, Any]) -> dict[str, str]:
    return {"prompt": row["instruction"] + PROMPT_END, "completion": row["response"]}


def messages_row(row: dict[str, Any]) -> dict[str, list[dict[str, str]]]:
    return {"messages": [{"role": "user", "content": row["instruction"]},
                         {"role": "assistant", "content": row["response"]}]}


def _write_jsonl(form: Callable[[dict[str, Any]], dict[str, Any]]) -> Callable[[Path, BinaryIO], int]:
    def write(data: Path, f: BinaryIO) -> int:
        count = 0
        for row in iter_jsonl(data):
            f.write(dumps_line(form(row)))
            count += 1
        return count
    return write


def _write_parquet(data: Path, f: BinaryIO) -> int:
    datasets = require("datasets", HF_EXTRA, "the parquet export")
    datasets.disable_progress_bars()  # one short step each: a bar says nothing
    with tempfile.TemporaryDirectory() as cache:  # the Arrow copy datasets makes of the JSONL, gone afterwards
        try:
            rows = datasets.Dataset.from_json(str(data), cache_dir=cache)
        except Exception as e:  # noqa: BLE001 - datasets' errors have no common base; any of them: one line
            raise DataError(f"{data}: datasets could not read it ({type(e).__name__}: {e}); if its input carried "
                            "fields whose types differ from row to row, make them agree") from None
        rows.to_parquet(f)
        return rows.num_rows


# form -> (its default file name, its writer, whether it needs responses)
FORMS: dict[str, tuple[str, Callable[[Path, BinaryIO], int], bool]] = {
    "parquet": ("data.parquet", _write_parquet, False),
    "trl": ("trl.jsonl", _write_jsonl(trl_row), True),
    "messages": ("messages.jsonl", _write_jsonl(messages_row), True),
}


def export(out_dir: str | Path, form: str, dest: str | Path | None = None) -> tuple[Path, int]:
    """Writes the kept rows of the finished run in `out_dir` in `form` to `dest` (default OUT/export/<file>);
    returns where and how many rows."""
    out = Path(out_dir)
    manifest = read_manifest(out)
    if manifest is None:
        raise DataError(f"{out}: no {MANIFEST_FILE}, so no stage1 run's output; pass the --out of a finished run")
    if manifest.get("status") != "complete":
        raise DataError(f"{out}: its run is not finished (status {manifest.get('status')!r}); finish it with "
                        "--resume (or --merge its shards) first")
    file_name, write, needs_responses = FORMS[form]
    job = manifest.get("identity", {}).get("job")
    if needs_responses and job != "responses":
        raise DataError(f"{out} holds the {job} job's output: instructions without responses, so there is nothing "
                        f"to put in a {form} pair; answer them (python -m stage1.generate --instructions "
                        f"{out / DATA_FILE} --out DIR) and export that, or export this one --to parquet")
    data = out / (manifest.get("files") or {}).get("data", DATA_FILE)
    if not data.is_file() or data.stat().st_size == 0:
        raise DataError(f"{data}: no kept rows to export")
    dest = Path(dest) if dest is not None else out / EXPORT_DIR / file_name
    dest.parent.mkdir(parents=True, exist_ok=True)
    with replaced_whole(dest) as f:
        count = write(data, f)
    return dest, count
