"""The dataset card, OUT/README.md: what the Hugging Face Hub reads (a YAML header: the configs that load the kept
rows and the rejects, size category, task category, tags, language, a license placeholder) and what a person needs
to use the data (how to load it, how it was made: model and its hashes, job, prompt style, sampling, filters and
their counts, stage1's commit, the command).

Built from the manifest alone, so `write_card(out, read_manifest(out))` rebuilds it for any finished run; written
whole (writer.replaced_whole) by every finished run and every merge, beside the manifest. The YAML is written by
hand (JSON-quoted scalars are YAML too): the card needs no YAML library.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from stage1.data.writer import CARD_FILE, DATA_FILE, REJECTS_FILE, replaced_whole

# The Hub's size categories, by the kept rows: (upper bound, label), the last has none.
SIZE_CATEGORIES = ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M"),
                   (10_000_000, "1M<n<10M"), (100_000_000, "10M<n<100M"), (1_000_000_000, "100M<n<1B"),
                   (None, "n>1B"))
REJECTS_CONFIG = "rejects"
# What each job's kept rows are, in the card's first line; its tags.
JOB_TEXT = {
    "responses": ("Instruction/response pairs: a base model's answers to instructions, written by few-shot "
                  "completion prompts (no chat template)", ["synthetic", "sft", "stage1"]),
    "instructions": ("Instructions written by a base model from few-shot completion prompts over an example pool "
                     "(no responses yet: answer them with `python -m stage1.generate --instructions data.jsonl`)",
                     ["synthetic", "instructions", "stage1"]),
}


def size_category(rows: int) -> str:
    return next(label for bound, label in SIZE_CATEGORIES if bound is None or rows < bound)


def write_card(out_dir: str | Path, manifest: dict[str, Any]) -> Path:
    path = Path(out_dir) / CARD_FILE
    with replaced_whole(path) as f:
        f.write(dataset_card(manifest).encode("utf-8"))
    return path


def dataset_card(manifest: dict[str, Any]) -> str:
    return _header(manifest) + _body(manifest)


def _q(value: Any) -> str:
    """A YAML scalar: JSON's quoting (a JSON string is a YAML double-quoted one)."""
    return json.dumps(value, ensure_ascii=False)


def _header(m: dict[str, Any]) -> str:
    job = m["identity"]["job"]
    files = m.get("files") or {"data": DATA_FILE, "rejects": REJECTS_FILE}
    lines = [
        "---",
        "license: other  # a placeholder: set this dataset's license (see the card)",
        f"pretty_name: {_q(_name(m))}",
        "language:",
        "- en",
        "task_categories:",
        "- text-generation",
        "tags:",
        *(f"- {_q(tag)}" for tag in JOB_TEXT[job][1]),
        "size_categories:",
        f"- {_q(size_category(m['counts']['kept']))}",
        "configs:",
    ]
    for config, file in (("default", files["data"]), (REJECTS_CONFIG, files["rejects"])):
        lines += [f"- config_name: {config}", "  data_files:", "  - split: train", f"    path: {_q(file)}"]
    return "\n".join(lines + ["---", ""]) + "\n"


def _name(m: dict[str, Any]) -> str:
    return Path(m.get("args", {}).get("out") or "stage1-dataset").name


def _code(value: Any) -> str:
    """A value in inline code, on one line: non-strings and strings with a line break as JSON."""
    text = value if isinstance(value, str) and "\n" not in value else json.dumps(value, ensure_ascii=False)
    return f"`{text}`" if "`" not in text else f"``{text}``"


def _table(head: tuple[str, str], rows: list[tuple[Any, Any]]) -> list[str]:
    def cell(value: Any) -> str:
        return str(value).replace("|", "\\|")  # a bar would end the cell, even inside code
    return [f"| {head[0]} | {head[1]} |", "|---|---|", *(f"| {cell(a)} | {cell(b)} |" for a, b in rows), ""]


def _body(m: dict[str, Any]) -> str:
    identity, counts, gen = m["identity"], m["counts"], m.get("generation") or {}
    model, code = m.get("model") or {}, m.get("code") or {}
    files = m.get("files") or {"data": DATA_FILE, "rejects": REJECTS_FILE}
    out = m.get("args", {}).get("out") or "OUT"
    cli = m["command"].split()[2] if m.get("command", "").startswith("python -m ") else "stage1"
    data, rejects = f"{out}/{files['data']}", f"{out}/{files['rejects']}"
    lines = [
        f"# {_name(m)}", "",
        f"{JOB_TEXT[identity['job']][0]}. Made by stage1's "
        f"`python -m {cli}` with the model `{Path(str(model.get('path', identity.get('model_path')))).name}`; every "
        "row stores the exact prompt string the model saw (`prompt`).", "",
        "**License**: `license: other` above is a placeholder. Set the license under which you publish this data, "
        "minding the terms of the model that wrote it and of the instructions' source.", "",
        "**Language**: `en` above is the language of stage1's prompts and example pool; change it if your "
        "instructions are in another.", "",
        "## Contents", "",
        *_table(("config (file)", "rows"), [
            (f"`default` ({files['data']})", f"{counts['kept']} kept"),
            (f"`{REJECTS_CONFIG}` ({files['rejects']})",
             f"{counts['rejected']} rejected, each with its `reason` and `detail`"),
        ]),
        f"{counts['instructions']} instructions, {counts['completions']} completions generated.", "",
        "## Load it", "",
        "```python",
        "from datasets import load_dataset",
        f"kept = load_dataset(\"json\", data_files={_q(data)}, split=\"train\")",
        f"rejects = load_dataset(\"json\", data_files={_q(rejects)}, split=\"train\")",
        f"kept = load_dataset({_q(out)}, split=\"train\")  # this folder: the configs above pick the files",
        "# on the Hub, once uploaded (huggingface-cli upload USER/NAME " + out + " --repo-type dataset "
        "--exclude 'shards/*'):",
        "kept = load_dataset(\"USER/NAME\", split=\"train\")",
        f"rejects = load_dataset(\"USER/NAME\", {_q(REJECTS_CONFIG)}, split=\"train\")",
        "```", "",
        f"Other forms: `python -m stage1.export {out} --to parquet|trl|messages`.", "",
        "## How it was made", "",
        f"- **Job**: `{identity['job']}` (`python -m {cli}`)",
        f"- **Model**: `{model.get('path', identity.get('model_path'))}`; config.json sha256 "
        f"`{model.get('config_sha256', identity.get('model_config_sha256'))}`, tokenizer.json sha256 "
        f"`{model.get('tokenizer_sha256', identity.get('model_tokenizer_sha256'))}`"
        + (f"; context {model['max_model_len']} tokens" if model.get("max_model_len") else ""),
        f"- **Prompt style**: `{gen.get('style', identity.get('style'))}`, generation stopped at "
        f"{_code(gen.get('stop'))} and the token ids {_code(gen.get('stop_token_ids'))}",
        "- **Sampling**: " + ", ".join(f"{k} {_code(gen[k])}" for k in ("temperature", "top_p", "top_k", "min_p",
                                                                         "max_tokens", "n") if k in gen)
        + f"; run seed {_code(gen.get('seed', identity.get('seed')))}, each row's seed "
        f"{_code(gen.get('row_seed'))}",
        f"- **Input**: {_input(m)}",
        f"- **stage1**: version {_code(code.get('stage1_version'))}, commit {_code(code.get('git_commit'))}"
        + (" (with uncommitted changes)" if code.get("git_dirty") else "")
        + f", Python {code.get('python')}, torch {code.get('torch')}",
        *_where(m),
        "",
        "### Filters and what they rejected", "",
        *_table(("reason", "rejected"), [(f"`{r}`", n) for r, n in (m.get("rejected_by_reason") or {}).items()]
                or [("(none)", 0)]),
        *_table(("finish reason", "completions"), [(f"`{r}`", n) for r, n in (m.get("finish_reasons") or {}).items()]
                or [("(none)", 0)]),
        "### Every setting that decides the rows (the run identity)", "",
        *_table(("setting", "value"), [(k, _code(v)) for k, v in identity.items()]),
        *_others(m),
        "### The command", "",
        "```bash", m.get("command", ""), "```", "",
        "The full record is `manifest.json` beside this card.", "",
    ]
    return "\n".join(lines)


# The manifest's entries the card shows above (or that say nothing of the data: status, times, hosts).
SHOWN = {"format", "status", "running_on", "created_at", "updated_at", "command", "args", "identity", "model", "code",
         "generation", "files", "sessions", "counts", "finish_reasons", "stop_reasons", "rejected_by_reason",
         "instructions_from", "merge", "merged_shards", "shard"}


def _others(m: dict[str, Any]) -> list[str]:
    """The manifest's other records (a goal, a filter's per-file counts, a judge's prompt hash: whatever a run
    records), as they are, so the card leaves nothing out that a new feature adds."""
    others = [(k, v) for k, v in m.items() if k not in SHOWN]
    if not others:
        return []
    return ["### Other records of the run", "", *(f"- **{k}**: {_code(v)}" for k, v in others), ""]


def _input(m: dict[str, Any]) -> str:
    args, identity = m.get("args", {}), m["identity"]
    if identity["job"] == "instructions":
        text = f"attempts drawn over the example pool, until {_code(args.get('count'))} were kept"
    else:
        source = args.get("instructions")
        text = "the built-in instructions" if source is None else _code(source)
        if args.get("instruction_field") not in (None, "instruction"):
            text += f", column {_code(args['instruction_field'])}"
        if args.get("instruction_split"):
            text += f", split {_code(args['instruction_split'])}"
    text += f" (sha256 of the parsed input {_code(identity.get('instructions_sha256'))})"
    made = m.get("instructions_from")
    if made:
        text += f", written by `{made.get('command')}` ({made.get('kept')} kept)"
    return text


def _where(m: dict[str, Any]) -> list[str]:
    """Where it ran: its sessions, or the shards a merge joined."""
    sessions = m.get("sessions") or []
    shards = m.get("merged_shards") or []
    if shards:
        sessions = shards
    tokens = sum(s.get("generated_tokens", 0) for s in sessions)
    wall = sum(s.get("wall_s", 0.0) for s in sessions)
    engine = next((s["engine"] for s in reversed(m.get("sessions") or []) if s.get("engine")), None)
    lines = []
    if shards:
        lines.append(f"- **Shards**: {len(shards)}, merged (the exact and near-duplicate filters ran over all of them "
                     "in input order)")
    else:
        lines.append(f"- **Sessions**: {len(sessions)} (a resumed run has one per session)")
    lines.append(f"- **Generated**: {tokens} tokens in {wall:.1f} s of wall time"
                 + ("" if engine is None else f"; engine {_code(engine)}"))
    return lines
