"""Instructions in: JSONL (`instruction` required; `id`, `type`, `source` optional; other fields carried through), plain
text (one instruction per line), or the built-in set. All input is read and validated before anything is generated, so
a bad line never leaves a half-made dataset behind.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from stage1.data.errors import DataError
from stage1.data.hashing import sha256_text, text_id
from stage1.data.rows import ROW_FIELDS

BUILTIN = "builtin"
JSONL_SUFFIXES = (".jsonl", ".ndjson")
DEFAULT_TYPE = "general"


@dataclass(frozen=True)
class Instruction:
    id: str
    instruction: str
    type: str
    source: str
    extra: dict[str, Any] = field(default_factory=dict)  # other input fields, copied into every output row
    where: str = ""  # "file:line", for messages


def read_instructions(path: str | Path | None = None, fmt: str = "auto") -> list[Instruction]:
    """Reads `path` (None: the built-in set). fmt: "auto" (by suffix: .jsonl/.ndjson are JSONL, anything else is
    text), "jsonl" or "text". Raises DataError naming the file and line."""
    if path is None:
        text = resources.files("stage1.data").joinpath("instructions.jsonl").read_text(encoding="utf-8")
        return _check_ids(_parse_jsonl(text, "<built-in instructions>", BUILTIN))
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file; pass --instructions with a JSONL or text file, or leave it out to use "
                        "the built-in instructions")
    text = _decode(path.read_bytes(), path)
    if instruction_run_manifest(path) is not None:
        return _check_ids(_parse_instruction_run(text, str(path)))
    if fmt == "auto":
        fmt = "jsonl" if path.suffix.lower() in JSONL_SUFFIXES else "text"
    rows = _parse_jsonl(text, str(path), path.name) if fmt == "jsonl" else _parse_text(text, str(path), path.name)
    if not rows:
        raise DataError(f"{path}: no instructions found (the file is empty or holds only blank lines); "
                        "write one instruction per line, or one JSON object per line in a .jsonl file")
    return _check_ids(rows)


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


def _parse_jsonl(text: str, name: str, source: str) -> list[Instruction]:
    rows = []
    for n, line in enumerate(_lines(text), 1):
        if not line.strip():
            continue
        where = f"{name}:{n}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: not valid JSON ({e.msg} at column {e.colno}); each line must be one JSON "
                            'object such as {"instruction": "..."}') from None
        if not isinstance(obj, dict):
            raise DataError(f'{where}: expected a JSON object such as {{"instruction": "..."}}, got '
                            f"{type(obj).__name__}")
        rows.append(_instruction_from(obj, where, source))
    return rows


def _instruction_from(obj: dict[str, Any], where: str, source: str) -> Instruction:
    text = obj.get("instruction")
    if not isinstance(text, str) or not text.strip():
        what = ('has no "instruction" field' if "instruction" not in obj
                else 'has an empty or non-string "instruction"')
        raise DataError(f'{where}: the object {what}; every line needs "instruction": "<text>"')
    text = text.strip()  # edge whitespace would only change the prompt's layout
    rid = obj.get("id")
    if rid is None:
        rid = text_id(text)
    elif isinstance(rid, bool) or not isinstance(rid, (str, int)) or not str(rid).strip():
        raise DataError(f'{where}: "id" must be a non-empty string or an integer, got {rid!r}')
    for key in ("type", "source"):
        if key in obj and not isinstance(obj[key], str):
            raise DataError(f'{where}: "{key}" must be a string, got {obj[key]!r}')
    extra = {k: v for k, v in obj.items() if k not in ("instruction", "id", "type", "source")}
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
