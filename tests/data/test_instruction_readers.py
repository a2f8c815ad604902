"""Reading instructions: JSONL, plain text, the built-in set, and every kind of bad input as a clear DataError."""

import json

import pytest

from stage1.data.errors import DataError
from stage1.data.hashing import text_id
from stage1.data.readers import read_instructions


def write(tmp_path, name, content):
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
    return path


def test_jsonl_fields_defaults_and_carried_through_extras(tmp_path):
    path = write(tmp_path, "in.jsonl", "\n".join([
        json.dumps({"instruction": "  What is 2+3?  ", "id": 7, "type": "math", "source": "mine", "lang": "en"}),
        "",
        json.dumps({"instruction": "Name a river.", "tags": ["geo"]}),
    ]) + "\n")
    a, b = read_instructions(path)
    assert (a.id, a.instruction, a.type, a.source, a.extra) == ("7", "What is 2+3?", "math", "mine", {"lang": "en"})
    assert (b.id, b.type, b.source, b.extra) == (text_id("Name a river."), "general", "in.jsonl", {"tags": ["geo"]})
    assert b.where == f"{path}:3"


def test_unicode_line_separators_inside_a_row_do_not_split_it(tmp_path):
    text = "Explain this:\u2028two lines\u0085and a NEL"
    path = write(tmp_path, "in.jsonl", json.dumps({"instruction": text}, ensure_ascii=False) + "\r\n")
    [row] = read_instructions(path)
    assert row.instruction == text


def test_plain_text_one_per_line_with_stable_hash_ids(tmp_path):
    path = write(tmp_path, "in.txt", "\ufeffFirst instruction\n\n  Second one \n")
    rows = read_instructions(path)
    assert [r.instruction for r in rows] == ["First instruction", "Second one"]  # BOM and edges dropped
    reordered = read_instructions(write(tmp_path, "re.txt", "Second one\nFirst instruction\n"))
    assert {r.instruction: r.id for r in rows} == {r.instruction: r.id for r in reordered}


def test_format_override_reads_a_txt_file_as_jsonl(tmp_path):
    path = write(tmp_path, "in.txt", '{"instruction": "x"}\n')
    assert read_instructions(path, "jsonl")[0].instruction == "x"
    assert read_instructions(path, "text")[0].instruction == '{"instruction": "x"}'


def test_builtin_set_is_the_default():
    rows = read_instructions(None)
    assert len(rows) >= 100 and all(r.source == "builtin" for r in rows)
    assert len({r.id for r in rows}) == len(rows)


@pytest.mark.parametrize("content, message", [
    ('{"instruction": "ok"}\n{"instruction": "broken"\n', r"in\.jsonl:2: not valid JSON"),
    ('{"instruction": "ok"}\n{"id": "x"}\n', r'in\.jsonl:2: the object has no "instruction" field'),
    ('{"instruction": "   "}\n', r'in\.jsonl:1: .*empty or non-string "instruction"'),
    ('{"instruction": 5}\n', r'in\.jsonl:1: .*non-string "instruction"'),
    ('["instruction"]\n', r"in\.jsonl:1: expected a JSON object"),
    ('{"instruction": "a", "id": "x"}\n{"instruction": "b", "id": "x"}\n',
     r"in\.jsonl:2: duplicate id 'x' \(first used at .*in\.jsonl:1"),
    ('{"instruction": "a"}\n{"instruction": "a"}\n', r"in\.jsonl:2: duplicate id .*same text as .*in\.jsonl:1"),
    ('{"instruction": "a", "id": true}\n', r'in\.jsonl:1: "id" must be a non-empty string or an integer'),
    ('{"instruction": "a", "type": 3}\n', r'in\.jsonl:1: "type" must be a string'),
    ('{"instruction": "a", "response": "b"}\n', r"in\.jsonl:1: field\(s\) response are written by the pipeline"),
    ("", r"in\.jsonl: no instructions found"),
    ("\n  \n", r"in\.jsonl: no instructions found"),
])
def test_bad_jsonl_names_file_and_line(tmp_path, content, message):
    with pytest.raises(DataError, match=message):
        read_instructions(write(tmp_path, "in.jsonl", content))


def test_non_utf8_bytes_name_the_line(tmp_path):
    path = write(tmp_path, "in.txt", b"fine\nalso fine\nbad \xff byte\n")
    with pytest.raises(DataError, match=r"in\.txt:3: not valid UTF-8 \(byte 0xff at offset 19\)"):
        read_instructions(path)


def test_empty_text_file_and_missing_file(tmp_path):
    with pytest.raises(DataError, match="no instructions found"):
        read_instructions(write(tmp_path, "empty.txt", ""))
    with pytest.raises(DataError, match="no such file"):
        read_instructions(tmp_path / "nope.jsonl")


def test_duplicate_text_lines_in_a_text_file(tmp_path):
    with pytest.raises(DataError, match=r"in\.txt:3: duplicate id .*same text as .*in\.txt:1; remove the duplicate"):
        read_instructions(write(tmp_path, "in.txt", "same\nother\nsame\n"))
