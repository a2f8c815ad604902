"""Instructions in: JSONL (`instruction` required; `id`, `type`, `source` optional; other fields carried through), plain
text (one instruction per line), a parquet file or a `datasets` directory written by `save_to_disk` (the columns read
as JSONL's fields; a null `id`, `type` or `source` is an absent one), or the built-in set. `field` names another
column (or JSON field) than `instruction` to take the instructions from. All input is read and validated before
anything is generated, so a bad line never leaves a half-made dataset behind. pyarrow and `datasets` (the `hf`
extra) are imported only to read those formats.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from stage1.data.errors import DataError
from stage1.data.hashing import sha256_text, text_id
from stage1.data.optional import HF_EXTRA, require
from stage1.data.rows import ROW_FIELDS

BUILTIN = "builtin"
JSONL_SUFFIXES = (".jsonl", ".ndjson")
PARQUET_SUFFIXES = (".parquet", ".pq")
FORMATS = ("auto", "jsonl", "text", "parquet", "datasets")  # --format
DEFAULT_FIELD = "instruction"
DEFAULT_TYPE = "general"
OPTIONAL_KEYS = ("id", "type", "source")  # besides the instruction, the input fields the pipeline reads


@dataclass(frozen=True)
class Instruction:
    id: str
    instruction: str
    type: str
    source: str
    extra: dict[str, Any] = field(default_factory=dict)  # other input fields, copied into every output row
    where: str = ""  # "file:line", for messages


def read_instructions(path: str | Path | None = None, fmt: str = "auto", field: str = DEFAULT_FIELD,
                      split: str | None = None) -> list[Instruction]:
    """Reads `path` (None: the built-in set). fmt: "auto" (a directory is a `datasets` one; by suffix: .jsonl/.ndjson
    are JSONL, .parquet/.pq parquet, anything else is text) or one of FORMATS. `field`: the column holding the
    instructions (not for text); `split`: which split of a saved DatasetDict. Raises DataError naming the file and
    line (a table's row as file[i], 0-based)."""
    if path is None:
        text = resources.files("stage1.data").joinpath("instructions.jsonl").read_text(encoding="utf-8")
        return _check_ids(_parse_jsonl(text, "<built-in instructions>", BUILTIN))
    path = Path(path)
    if fmt == "auto":
        fmt = _format_of(path)
    if split is not None and fmt != "datasets":
        raise DataError(f"--instruction-split picks a split of a `datasets` directory; {path} is read as {fmt}: drop "
                        "it")
    if fmt == "datasets":
        return _check_ids(_parse_table(*_saved_dataset(path, split), field))
    if not path.is_file():
        raise DataError(f"{path}: no such file; pass --instructions with a JSONL, text or parquet file or a `datasets` "
                        "directory, or leave it out to use the built-in instructions")
    if fmt == "parquet":
        return _check_ids(_parse_table(_parquet(path), str(path), path.name, field))
    text = _decode(path.read_bytes(), path)
    made_by_instruction_job = instruction_run_manifest(path) is not None
    if field != DEFAULT_FIELD and (fmt == "text" or made_by_instruction_job):
        what = "plain text (one instruction per line)" if fmt == "text" else "an instruction run's output"
        raise DataError(f"{path} is {what}: it has no columns, so --instruction-field {field} does not apply; drop it")
    if made_by_instruction_job:
        return _check_ids(_parse_instruction_run(text, str(path)))
    rows = (_parse_jsonl(text, str(path), path.name, field) if fmt == "jsonl"
            else _parse_text(text, str(path), path.name))
    if not rows:
        raise DataError(f"{path}: no instructions found (the file is empty or holds only blank lines); "
                        "write one instruction per line, or one JSON object per line in a .jsonl file")
    return _check_ids(rows)


def _format_of(path: Path) -> str:
    if path.is_dir():
        return "datasets"
    suffix = path.suffix.lower()
    return "jsonl" if suffix in JSONL_SUFFIXES else "parquet" if suffix in PARQUET_SUFFIXES else "text"


def _parquet(path: Path) -> Any:
    """The file as a pyarrow Table."""
    pa = require("pyarrow", HF_EXTRA, "reading parquet")
    parquet = require("pyarrow.parquet", HF_EXTRA, "reading parquet")
    try:
        return parquet.read_table(path)
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{path}: not a readable parquet file ({e}); pass a parquet file, or --format jsonl/text for "
                        "another kind") from None


def _saved_dataset(path: Path, split: str | None) -> tuple[Any, str, str]:
    """The Dataset (or the `split` of the DatasetDict) that `save_to_disk` wrote to `path`, as a pyarrow Table; its
    name in messages (a split's: its directory) and its rows' default source (the directory's name, /split)."""
    if not path.is_dir():
        raise DataError(f"{path}: no such directory; --format datasets reads a directory written by "
                        "Dataset.save_to_disk or DatasetDict.save_to_disk")
    if not ((path / "dataset_dict.json").is_file() or (path / "state.json").is_file()):
        raise DataError(f"{path}: a directory, but not a dataset saved with save_to_disk (it has neither "
                        "dataset_dict.json nor state.json); pass the directory save_to_disk wrote, or a JSONL, text or "
                        "parquet file")
    datasets = require("datasets", HF_EXTRA, "reading a `datasets` directory")
    try:
        saved = datasets.load_from_disk(str(path))
    except (OSError, ValueError) as e:  # datasets' own errors (FileNotFoundError, ...) derive from these
        raise DataError(f"{path}: datasets could not load it ({e}); save it again with save_to_disk") from None
    if isinstance(saved, datasets.DatasetDict):
        splits = ", ".join(saved)
        if split is None and len(saved) != 1:
            raise DataError(f"{path} holds a DatasetDict with the splits {splits}; pass --instruction-split NAME to "
                            "say which to read")
        if split is not None and split not in saved:
            raise DataError(f"{path}: no split {split!r} (it has {splits}); pass one of them to --instruction-split")
        split = split if split is not None else next(iter(saved))
        # its rows as a pyarrow Table (an indices mapping applied)
        return saved[split].with_format("arrow")[:], str(path / split), f"{path.name}/{split}"
    if split is not None:
        raise DataError(f"{path} holds one Dataset, not a DatasetDict of splits: drop --instruction-split {split}")
    return saved.with_format("arrow")[:], str(path), path.name


def instruction_run_manifest(path: str | Path | None) -> dict[str, Any] | None:
    """The manifest of the `python -m stage1.instructions` run whose data file `path` is (manifest.json beside it,
    of that job), or None."""
    if path is None:
        return None
    manifest = Path(path).parent / "manifest.json"
    if Path(path).name != "data.jsonl" or not manifest.is_file():
        return None
    try:
        made = json.loads(manifest.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    return made if isinstance(made, dict) and made.get("identity", {}).get("job") == "instructions" else None


def _parse_instruction_run(text: str, name: str) -> list[Instruction]:
    """The kept rows of an instruction run: their id, instruction, type and topic (its generation fields, which the
    response rows would clash with, stay in its own files; its manifest is referenced in the response run's)."""
    rows = []
    for n, line in enumerate(_lines(text), 1):
        if line.strip():
            obj = json.loads(line)
            rows.append(Instruction(obj["id"], obj["instruction"], obj["type"], obj["source"],
                                    {"topic": obj.get("topic")}, f"{name}:{n}"))
    return rows


def instructions_fingerprint(instructions: list[Instruction]) -> str:
    """A hash of the whole input (ids, texts, types, extras): resuming with another input is another run."""
    return sha256_text(json.dumps([[i.id, i.instruction, i.type, i.source, i.extra] for i in instructions],
                                  ensure_ascii=False, sort_keys=True))


def _decode(data: bytes, path: Path) -> str:
    try:
        return data.decode("utf-8-sig")  # a leading BOM is harmless, drop it
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: not valid UTF-8 (byte 0x{data[e.start]:02x} at offset {e.start}); "
                        "re-save the file as UTF-8") from None


def _lines(text: str) -> list[str]:
    """Lines as editors count them: str.splitlines would also split at U+2028, U+0085 and other characters that JSON
    strings may hold raw."""
    return text.split("\n")


def _parse_text(text: str, name: str, source: str) -> list[Instruction]:
    return [Instruction(text_id(line.strip()), line.strip(), DEFAULT_TYPE, source, where=f"{name}:{n}")
            for n, line in enumerate(_lines(text), 1) if line.strip()]


def _parse_table(table: Any, name: str, source: str, field: str) -> list[Instruction]:
    """The rows of a pyarrow Table (parquet, a `datasets` directory) read as JSONL objects are: `field` the
    instruction, `id`/`type`/`source` where not null, the other columns carried through."""
    columns = table.column_names
    if field not in columns:
        raise DataError(f"{name}: no column {field!r} (its columns: {', '.join(columns) or 'none'}); pass "
                        "--instruction-field NAME to take the instructions from another column")
    if table.num_rows == 0:
        raise DataError(f"{name}: no rows, so no instructions; pass a file that holds some")
    for column, type_ in zip(columns, table.schema.types):
        if not _holds_json(type_):
            raise DataError(f"{name}: column {column!r} is of type {type_}, which a JSON row can't hold; drop or cast "
                            "it (strings, numbers, booleans, lists and structs of them are carried through)")
    rows = []
    for i, obj in enumerate(table.to_pylist()):
        obj = {k: v for k, v in obj.items() if not (k in OPTIONAL_KEYS and v is None)}  # a table's "absent"
        rows.append(_instruction_from(obj, f"{name}[{i}]", source, field))
    return rows


def _holds_json(type_: Any) -> bool:
    """Whether every value of an Arrow type is a JSON value (the row is written as JSON, and hashed as such)."""
    pa = require("pyarrow", HF_EXTRA, "reading parquet")
    types = pa.types
    if isinstance(type_, pa.ExtensionType):
        return _holds_json(type_.storage_type)
    if types.is_dictionary(type_):
        return _holds_json(type_.value_type)
    if types.is_list(type_) or types.is_large_list(type_) or types.is_fixed_size_list(type_):
        return _holds_json(type_.value_type)
    if types.is_struct(type_):
        return all(_holds_json(type_.field(i).type) for i in range(type_.num_fields))
    return (types.is_string(type_) or types.is_large_string(type_) or types.is_integer(type_)
            or types.is_floating(type_) or types.is_boolean(type_) or types.is_null(type_))


def _parse_jsonl(text: str, name: str, source: str, field: str = DEFAULT_FIELD) -> list[Instruction]:
    rows = []
    for n, line in enumerate(_lines(text), 1):
        if not line.strip():
            continue
        where = f"{name}:{n}"
        rows.append(_instruction_from(json_object(line, where, '{"instruction": "..."}'), where, source, field))
    return rows


def json_object(line: str, where: str, example: str) -> dict[str, Any]:
    """The JSON object one JSONL line holds, or a DataError naming `where` (`example`: such an object, for the fix)."""
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise DataError(f"{where}: not valid JSON ({e.msg} at column {e.colno}); each line must be one JSON "
                        f"object such as {example}") from None
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object such as {example}, got {type(obj).__name__}")
    return obj


def _instruction_from(obj: dict[str, Any], where: str, source: str, field: str) -> Instruction:
    text = obj.get(field)
    if not isinstance(text, str) or not text.strip():
        what = f'has no "{field}" field' if field not in obj else f'has an empty or non-string "{field}"'
        raise DataError(f'{where}: the object {what}; every row needs "{field}": "<text>"')
    text = text.strip()  # edge whitespace would only change the prompt's layout
    rid = obj.get("id")
    if rid is None:
        rid = text_id(text)
    elif isinstance(rid, bool) or not isinstance(rid, (str, int)) or not str(rid).strip():
        raise DataError(f'{where}: "id" must be a non-empty string or an integer, got {rid!r}')
    for key in ("type", "source"):
        if key in obj and not isinstance(obj[key], str):
            raise DataError(f'{where}: "{key}" must be a string, got {obj[key]!r}')
    extra = {k: v for k, v in obj.items() if k != field and k not in OPTIONAL_KEYS}
    clash = sorted(set(extra) & set(ROW_FIELDS))
    if clash:
        raise DataError(f"{where}: field(s) {', '.join(clash)} are written by the pipeline itself; rename them in the "
                        "input (other fields are carried through unchanged)")
    return Instruction(str(rid), text, obj.get("type") or DEFAULT_TYPE, obj.get("source") or source, extra, where)


def _check_ids(rows: list[Instruction]) -> list[Instruction]:
    seen: dict[str, Instruction] = {}
    for row in rows:
        if row.id in seen:
            first = seen[row.id]
            hint = ("it has the same text as " + first.where + "; remove the duplicate"
                    if row.instruction == first.instruction else "first used at " + first.where
                    + '; give each row its own "id"')
            raise DataError(f"{row.where}: duplicate id {row.id!r} ({hint})")
        seen[row.id] = row
    return rows
