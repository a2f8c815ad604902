"""The writer: whole lines per chunk, a cut-off last line repaired, a foreign corrupt line refused."""

import json

import pytest

from stage1.data.errors import DataError
from stage1.data.writer import DatasetWriter, dumps_line, iter_jsonl, repair_truncated_tail, replaced_whole


def test_chunks_append_whole_lines_to_both_files(tmp_path):
    with DatasetWriter(tmp_path) as w:
        w.write_chunk([{"id": "a", "response": "line\nbreak"}], [{"id": "b", "reason": "empty"}])
        w.write_chunk([{"id": "c", "response": "ünïcode"}], [])
    assert list(iter_jsonl(w.data_path)) == [{"id": "a", "response": "line\nbreak"},
                                             {"id": "c", "response": "ünïcode"}]
    assert list(iter_jsonl(w.rejects_path)) == [{"id": "b", "reason": "empty"}]
    assert w.data_path.read_bytes().count(b"\n") == 2


def test_a_lone_surrogate_is_escaped_not_fatal():
    line = dumps_line({"text": "bad \ud800 char"})
    assert line.endswith(b"\n") and json.loads(line) == {"text": "bad \ud800 char"}


def test_truncated_last_line_is_ignored_then_repaired(tmp_path):
    path = tmp_path / "data.jsonl"
    good = dumps_line({"id": "a"}) + dumps_line({"id": "b"})
    path.write_bytes(good + b'{"id": "c", "resp')
    assert list(iter_jsonl(path)) == [{"id": "a"}, {"id": "b"}]
    assert repair_truncated_tail(path) == len(b'{"id": "c", "resp')
    assert path.read_bytes() == good
    assert repair_truncated_tail(path) == 0


def test_repair_of_a_file_that_is_one_partial_line(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_bytes(b'{"id": "a"' * 10000)  # longer than the scan-back block
    assert repair_truncated_tail(path) == 100000
    assert path.read_bytes() == b""


def test_writer_repairs_before_appending(tmp_path):
    (tmp_path / "data.jsonl").write_bytes(dumps_line({"id": "a"}) + b'{"id": "b"')
    with DatasetWriter(tmp_path) as w:
        w.write_chunk([{"id": "c"}], [])
    assert list(iter_jsonl(w.data_path)) == [{"id": "a"}, {"id": "c"}]


def test_a_corrupt_complete_line_is_refused(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_bytes(dumps_line({"id": "a"}) + b"not json\n" + dumps_line({"id": "c"}))
    with pytest.raises(DataError, match=r"data\.jsonl:2: not a valid JSON row"):
        list(iter_jsonl(path))


def test_a_file_replaced_whole_is_the_old_one_until_the_new_one_is_complete(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_bytes(b"old\n")
    with pytest.raises(OSError, match="disk full"):
        with replaced_whole(path) as f:
            f.write(b"half of the new")
            assert path.read_bytes() == b"old\n"
            raise OSError("disk full")
    assert path.read_bytes() == b"old\n" and [p.name for p in tmp_path.iterdir()] == ["data.jsonl"]
    with replaced_whole(path) as f:
        f.write(b"new\n")
    assert path.read_bytes() == b"new\n" and [p.name for p in tmp_path.iterdir()] == ["data.jsonl"]
