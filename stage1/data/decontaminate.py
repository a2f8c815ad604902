"""Decontamination (--decontaminate): an index of eval texts (benchmark prompts and answers a team must not train on)
and the question the `contaminated` filter (filters.py) asks of a row's text: does it share a word n-gram with one of
them, or, for a short text, equal one?

Texts are compared normalized: NFKC, lower-cased, split into words as filters.words splits them. A text of at least
`DECONTAMINATION_NGRAM` (13) words matches an eval text holding one of its 13-grams; a shorter one matches an eval
text equal to it (a long text equal to an eval text shares its 13-grams anyway).

Eval files: JSONL (.jsonl, .ndjson; each line an object whose eval texts are its string fields, or those --
decontaminate-field names; a list of strings gives one text per string), plain text (.txt; one text per non-empty
line) and parquet (.parquet, .pq; its string columns, or the named ones; read with pyarrow, the `hf` extra). A text
is named by its file and line (for parquet, its row, from 1).

The index is built once per process (`eval_index` keeps the last one, keyed by the files' hashes). It holds 12 bytes
per distinct 13-gram (a sorted array of 64-bit hashes and the number of the first text holding each) and, per text,
its file, line and an excerpt; the texts themselves are not kept. Building it streams the files and peaks at about
50 bytes per 13-gram (the arrays, their sort); a text's 13-gram hashes cost one blake2b per word (README: its cost).
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from array import array
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stage1.data.errors import DataError
from stage1.data.filters import DECONTAMINATION_NGRAM, words
from stage1.data.hashing import sha256_file
from stage1.data.optional import HF_EXTRA, require
from stage1.data.readers import JSONL_SUFFIXES, PARQUET_SUFFIXES, json_object

TEXT_SUFFIXES = (".txt",)
EXCERPT_CHARS = 160  # of the eval text, in a contaminated row's detail
_GRAM_MULTIPLIER = 0x9E3779B97F4A7C15  # odd: a 13-gram's hash is a polynomial in its words' hashes, mod 2**64
_FORMATS = "JSONL (.jsonl, .ndjson), plain text (.txt) or parquet (.parquet, .pq)"


def normalized_words(text: str) -> list[str]:
    return words(unicodedata.normalize("NFKC", text))


@dataclass(frozen=True)
class EvalFile:
    path: str  # as given to --decontaminate: the detail and the manifest's per-file counts name it so
    sha256: str
    texts: int  # eval texts read from it


@dataclass(frozen=True)
class Match:
    """Where a row's text meets an eval text."""
    file: str
    line: int
    ngram: str | None  # the shared 13-gram, normalized; None: the texts are equal (under 13 words)
    excerpt: str  # the start of the eval text

    def describe(self, side: str) -> str:
        """The `contaminated` detail: `side` names the row's text (instruction, response). `eval_source` reads it."""
        if self.ngram is None:
            return f"{self.file}:{self.line}: the {side} equals the eval text {self.excerpt!r} once normalized"
        return (f"{self.file}:{self.line}: the {side} shares the {DECONTAMINATION_NGRAM}-gram {self.ngram!r} with the "
                f"eval text {self.excerpt!r}")


_DETAIL_RE = re.compile(r"(?P<file>.+?):(?P<line>\d+): the \w+ (?:equals|shares) ")


def eval_source(detail: str | None) -> tuple[str, int] | None:
    """(eval file, line) a `contaminated` detail names (Match.describe), or None for another detail."""
    m = _DETAIL_RE.match(detail or "")
    return (m.group("file"), int(m.group("line"))) if m else None


class EvalIndex:
    """The eval texts of some files: their 13-grams (hashed) and their short texts, each naming the first text that
    holds it (files in the order given, lines in file order)."""

    def __init__(self, paths: Sequence[str], fields: Sequence[str], hashes: Sequence[str]):
        import numpy as np

        self.fields = tuple(fields)
        self._text_file = array("I")  # per indexed text: its file's number, its line, an excerpt
        self._text_line = array("I")
        self._excerpts: list[str] = []
        self._short: dict[str, int] = {}  # a text under 13 words, normalized -> its text number
        grams = array("Q")  # every 13-gram's hash, with the number of its text
        sources = array("I")
        files = []
        for file_no, (path, sha256) in enumerate(zip(paths, hashes)):
            count = 0
            for line, text in read_eval_texts(path, self.fields):
                count += 1
                ws = normalized_words(text)
                if not ws:
                    continue
                number = len(self._excerpts)
                self._text_file.append(file_no)
                self._text_line.append(line)
                self._excerpts.append(_excerpt(text))
                if len(ws) < DECONTAMINATION_NGRAM:
                    self._short.setdefault(" ".join(ws), number)
                else:
                    h = gram_hashes(ws)
                    grams.frombytes(h.tobytes())
                    sources.extend([number] * len(h))
            if not count:
                raise DataError(f"{path}: holds no eval text (empty, or only blank lines or null cells); pass a file "
                                "with one text per line, or drop it from --decontaminate")
            files.append(EvalFile(path, sha256, count))
        self.files = tuple(files)
        # Sorted for a binary search; a stable sort keeps the first text of equal hashes first, and only it stays.
        all_hashes = np.frombuffer(grams, dtype=np.uint64) if grams else np.zeros(0, dtype=np.uint64)
        order = np.argsort(all_hashes, kind="stable")
        sorted_hashes = all_hashes[order]
        first = np.ones(len(sorted_hashes), dtype=bool)
        first[1:] = sorted_hashes[1:] != sorted_hashes[:-1]
        self._hashes = sorted_hashes[first]
        self._sources = (np.frombuffer(sources, dtype=np.uint32) if sources else np.zeros(0, dtype=np.uint32))[
            order[first]]

    @property
    def ngrams(self) -> int:
        """Distinct 13-grams held."""
        return len(self._hashes)

    def identity(self) -> dict[str, Any]:
        """What the run identity records: the files (path, sha256, texts) and how they were read."""
        return {"ngram": DECONTAMINATION_NGRAM, "fields": list(self.fields),
                "files": [{"path": f.path, "sha256": f.sha256, "texts": f.texts} for f in self.files]}

    def match(self, text: str) -> Match | None:
        """The eval text `text` meets: the first of its 13-grams that one holds, or (under 13 words) the eval text it
        equals; None if none."""
        import numpy as np

        ws = normalized_words(text)
        if not ws:
            return None
        if len(ws) < DECONTAMINATION_NGRAM:
            number = self._short.get(" ".join(ws))
            return None if number is None else self._match(number, None)
        if not len(self._hashes):
            return None
        h = gram_hashes(ws)
        at = np.minimum(np.searchsorted(self._hashes, h), len(self._hashes) - 1)
        hits = np.flatnonzero(self._hashes[at] == h)
        if not len(hits):
            return None
        i = int(hits[0])
        return self._match(int(self._sources[at[i]]), " ".join(ws[i:i + DECONTAMINATION_NGRAM]))

    def _match(self, number: int, ngram: str | None) -> Match:
        return Match(self.files[self._text_file[number]].path, self._text_line[number], ngram, self._excerpts[number])


def gram_hashes(ws: list[str]):
    """The 64-bit hash of each word 13-gram of `ws` (at least 13 words), in order: stable across processes (blake2b of
    each word, combined by a polynomial), so every shard decides as one process does."""
    import numpy as np

    word_hashes = np.frombuffer(b"".join(hashlib.blake2b(w.encode("utf-8"), digest_size=8).digest() for w in ws),
                                dtype="<u8").astype(np.uint64)
    count = len(ws) - DECONTAMINATION_NGRAM + 1
    h = np.zeros(count, dtype=np.uint64)
    multiplier = np.uint64(_GRAM_MULTIPLIER)
    for k in range(DECONTAMINATION_NGRAM):
        h = h * multiplier + word_hashes[k:k + count]  # wraps mod 2**64
    return h


def _excerpt(text: str) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= EXCERPT_CHARS else flat[:EXCERPT_CHARS - 1] + "\u2026"


_INDEX: dict[tuple, EvalIndex] = {}  # the last index built: a process builds its run's once


def eval_index(paths: Sequence[str], fields: Sequence[str] = ()) -> EvalIndex:
    """The index of these eval files (built once per process for the same files, contents and fields). Raises
    DataError naming a file that is missing, of an unknown kind, unreadable or empty."""
    for path in paths:
        _check_kind(path)
    hashes = [sha256_file(path) for path in paths]
    missing = [path for path, h in zip(paths, hashes) if h is None]
    if missing:
        raise DataError(f"{missing[0]}: no such file; pass --decontaminate an existing eval file ({_FORMATS})")
    key = (tuple(paths), tuple(hashes), tuple(fields))
    if key not in _INDEX:
        _INDEX.clear()  # before building: never two indexes at once
        _INDEX[key] = EvalIndex(paths, fields, hashes)
    return _INDEX[key]


def eval_identity(paths: Sequence[str], fields: Sequence[str] = ()) -> dict[str, Any] | None:
    """The run identity's `decontaminate` entry: None without eval files."""
    return eval_index(paths, fields).identity() if paths else None


# -- reading eval files -----------------------------------------------------------------------------------------------
def _check_kind(path: str) -> str:
    suffix = Path(path).suffix.lower()
    if suffix in JSONL_SUFFIXES + TEXT_SUFFIXES + PARQUET_SUFFIXES:
        return suffix
    raise DataError(f"{path}: unknown kind of eval file ({suffix or 'no suffix'}); --decontaminate reads {_FORMATS}: "
                    "rename or convert it")


def read_eval_texts(path: str, fields: Sequence[str] = ()) -> Iterator[tuple[int, str]]:
    """(line, text) of each eval text of `path`, streamed; `fields`: the JSONL fields / parquet columns holding them
    (empty: every string one)."""
    suffix = _check_kind(path)
    if suffix in PARQUET_SUFFIXES:
        yield from _parquet_texts(path, fields)
        return
    with open(path, "rb") as f:
        for line, raw in enumerate(f, 1):
            try:
                text = raw.decode("utf-8-sig" if line == 1 else "utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{path}:{line}: not valid UTF-8 ({e.reason}); re-save the file as UTF-8") from None
            if not text.strip():
                continue
            if suffix in TEXT_SUFFIXES:
                yield line, text.strip()
            else:
                for value in _jsonl_texts(path, line, text, fields):
                    yield line, value


def _strings(value: Any) -> list[str]:
    """The eval texts of one field's value: a string, or the strings of a list."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, list):
        return [v for v in value if isinstance(v, str)]
    return []


def _jsonl_texts(path: str, line: int, text: str, fields: Sequence[str]) -> list[str]:
    obj = json_object(text, f"{path}:{line}", '{"question": "...", "answer": "..."}')
    texts = [s for key in (fields or obj) for s in _strings(obj.get(key))]
    if not texts:
        if fields:
            raise DataError(f"{path}:{line}: none of the fields {', '.join(fields)} is a string (or a list of them) "
                            f"here (it has {', '.join(obj) or 'no fields'}); name the fields holding the eval text "
                            "with --decontaminate-field")
        raise DataError(f"{path}:{line}: the object has no string field, so no eval text; give it one, or remove "
                        "the line")
    return texts


def _parquet_texts(path: str, fields: Sequence[str]) -> Iterator[tuple[int, str]]:
    pq = require("pyarrow.parquet", HF_EXTRA, f"{path}: reading a parquet eval file")
    import pyarrow as pa  # there once pyarrow.parquet is

    try:
        parquet = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{path}: not a readable parquet file ({e}); re-export it, or pass JSONL or text") from None
    schema = parquet.schema_arrow

    def textual(t) -> bool:
        if pa.types.is_list(t) or pa.types.is_large_list(t):
            return textual(t.value_type)
        return pa.types.is_string(t) or pa.types.is_large_string(t)

    if fields:
        absent = [f for f in fields if f not in schema.names]
        if len(absent) == len(fields):
            raise DataError(f"{path}: has no column {', '.join(fields)} (its columns: {', '.join(schema.names)}); "
                            "name the column holding the eval text with --decontaminate-field")
        columns = [f for f in fields if f not in absent]
        wrong = [c for c in columns if not textual(schema.field(c).type)]
        if wrong:
            raise DataError(f"{path}: column {wrong[0]} is {schema.field(wrong[0]).type}, not text; name string "
                            "columns with --decontaminate-field")
    else:
        columns = [f.name for f in schema if textual(f.type)]
        if not columns:
            raise DataError(f"{path}: has no string column (its columns: {', '.join(schema.names)}); pass a file whose "
                            "eval texts are strings")
    row = 0
    for batch in parquet.iter_batches(columns=columns, batch_size=4096):
        values = [batch.column(c).to_pylist() for c in columns]
        for cells in zip(*values):
            row += 1
            for cell in cells:
                for text in _strings(cell):
                    yield row, text
