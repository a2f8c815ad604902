"""Shards and their merge against the fake engine: three shards merged equal the unsharded run byte for byte (with
near-duplicates in different shards, and after a shard crashed and resumed), streaming (a few rows in memory at a
time); the merge refuses a missing, incomplete, duplicated, foreign or reordered shard, naming it, and writes
nothing."""

import json
import random
import shutil

import pytest

from stage1.data import merge, writer
from stage1.data.errors import DataError
from stage1.data.readers import read_instructions
from stage1.data.shards import incomplete_shards, resolve_shard, select, shard_dir, shard_of, shard_states

from dataset_files import FILES, RUN, files, rows


@pytest.fixture
def unsharded(gen, make_llm, respond_mixed, tmp_path):
    out = tmp_path / "unsharded"
    assert gen(*RUN, llm=make_llm(respond=respond_mixed), out=out) == 0
    return files(out)


def run_shards(gen, make_llm, respond, out, count=3, *extra):
    for index in range(count):
        assert gen(*RUN, "--num-shards", count, "--shard-index", index, *extra, llm=make_llm(respond=respond),
                   out=out) == 0


def test_shard_of_is_a_function_of_the_id_alone():
    ids = [f"row-{i}" for i in range(3000)]
    assert [shard_of(i, 7) for i in ids] == [shard_of(i, 7) for i in ids]
    sizes = [sum(shard_of(i, 7) == s for i in ids) for s in range(7)]
    assert min(sizes) > 3000 / 7 * 0.8  # a hash, not a skewed split
    insts = read_instructions()
    shuffled = random.Random(0).sample(insts, len(insts))
    for index in range(3):  # another file order: the same instructions in each shard, each shard in input order
        assert {i.id for i in select(shuffled, index, 3)} == {i.id for i in select(insts, index, 3)}
        assert select(insts, index, 3) == [i for i in insts if shard_of(i.id, 3) == index]


def test_shard_flags_default_to_the_slurm_array():
    assert resolve_shard(None, None, {}) is None
    assert resolve_shard(None, None, {"SLURM_ARRAY_TASK_COUNT": "8", "SLURM_ARRAY_TASK_ID": "3"}) == (3, 8)
    assert resolve_shard(10, None, {"SLURM_ARRAY_TASK_COUNT": "2", "SLURM_ARRAY_TASK_ID": "7"}) == (7, 10)
    with pytest.raises(DataError, match="outside 0..7"):
        resolve_shard(8, 8, {})
    with pytest.raises(DataError, match="--shard-index is set but not --num-shards"):
        resolve_shard(None, 1, {})
    with pytest.raises(DataError, match="SLURM_ARRAY_TASK_ID='x' is not an integer"):
        resolve_shard(None, None, {"SLURM_ARRAY_TASK_COUNT": "2", "SLURM_ARRAY_TASK_ID": "x"})


def test_three_shards_merged_equal_the_unsharded_run(gen, make_llm, respond_mixed, unsharded, out, capsys):
    run_shards(gen, make_llm, respond_mixed, out)
    assert shard_states(out, 3) == {0: "complete", 1: "complete", 2: "complete"} and not incomplete_shards(out, 3)
    # the shards skip the dataset-wide filters: their reject files hold no duplicate
    shard_reasons = {r["reason"] for i in range(3) for r in rows(shard_dir(out, i, 3) / "rejects.jsonl")}
    assert not shard_reasons & {"exact_duplicate", "near_duplicate"}
    assert not (out / "data.jsonl").exists()

    assert gen(*RUN, "--merge", llm=None) == 0  # N read from OUT/shards
    assert files(out) == unsharded
    merged_rejects = rows(out / "rejects.jsonl")
    # near-duplicates were found across shards: the row repeated lives in another shard than its duplicate
    across = [r for r in merged_rejects if r["reason"] == "near_duplicate"
              and shard_of(r["detail"].rsplit(" with ", 1)[1].rsplit("#", 1)[0], 3) != shard_of(r["id"], 3)]
    assert across
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["identity"]["num_shards"] == 3
    assert [s["name"] for s in manifest["merged_shards"]] == ["00000-of-00003", "00001-of-00003", "00002-of-00003"]
    assert sum(s["kept"] + s["rejected"] for s in manifest["merged_shards"]) == 120
    assert manifest["counts"]["completions"] == 120
    assert manifest["merge"]["dataset_filter_rejected"] == sum(
        r["reason"] in ("exact_duplicate", "near_duplicate") for r in merged_rejects)
    assert all(s["data_sha256"] and s["hosts"] and s["sessions"] == 1 for s in manifest["merged_shards"])
    assert "merged 3 shards" in capsys.readouterr().out

    assert gen(*RUN, "--merge", "--num-shards", 3, llm=None) == 0  # a merge is redone whole, to the same bytes
    assert files(out) == unsharded


class RowCensus:
    """Wraps the JSONL reader so that every row it reads is counted while alive (CPython frees a row as soon as the
    last reference goes): `peak` is the most rows in memory at once."""

    def __init__(self, read):
        self.read, self.alive, self.peak, self.read_total = read, 0, 0, 0
        census = self

        class CountedRow(dict):
            def __del__(self):
                census.alive -= 1
        self.row_type = CountedRow

    def __call__(self, path):
        for row in self.read(path):
            self.alive += 1
            self.read_total += 1
            self.peak = max(self.peak, self.alive)
            yield self.row_type(row)


def test_the_merge_holds_a_few_rows_at_a_time_not_the_dataset(gen, unsharded, three_shards, monkeypatch):
    census = RowCensus(writer.iter_jsonl)
    for module in (writer, merge):  # the merge's own name for it, and the one every other reader goes through
        monkeypatch.setattr(module, "iter_jsonl", census)
    assert gen(*RUN, "--merge", llm=None) == 0
    assert files(three_shards) == unsharded
    assert census.read_total >= 2 * 120  # every row went through the census: checked, then merged
    assert census.peak <= 2 * 3 + 1  # one row per shard file (data, rejects), and the one being written


def test_a_merge_failing_halfway_leaves_nothing_behind(gen, three_shards, monkeypatch):
    written = []

    def dumps_then_fail(row):
        if len(written) == 50:
            raise RuntimeError("injected failure")
        written.append(row)
        return writer.dumps_line(row)
    monkeypatch.setattr(merge, "dumps_line", dumps_then_fail)
    with pytest.raises(RuntimeError, match="injected failure"):
        gen(*RUN, "--merge", llm=None)
    assert len(written) == 50  # it failed halfway through the rows
    assert_nothing_written(three_shards)
    assert [p.name for p in three_shards.iterdir()] == ["shards"]  # nor a temporary file


def test_a_merge_that_hits_a_full_disk_says_to_rerun_the_merge(gen, three_shards, monkeypatch, capsys):
    def disk_full(row):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(merge, "dumps_line", disk_full)
    assert gen(*RUN, "--merge", llm=None) == 1
    err = capsys.readouterr().err
    assert "No space left on device" in err and "rerun the same --merge command" in err and "--resume" not in err
    assert_nothing_written(three_shards)


def test_a_shard_killed_mid_run_and_resumed_merges_to_the_same_files(gen, make_llm, respond_mixed, unsharded, out):
    shard = ("--num-shards", 3, "--shard-index", 1)
    with pytest.raises(RuntimeError, match="injected crash"):
        gen(*RUN, *shard, "--batch-size", 1, "--max-num-seqs", 8,
            llm=make_llm(respond=respond_mixed, max_num_seqs=8, fail_at_step=400))
    written = len(rows(shard_dir(out, 1, 3) / "data.jsonl")) + len(rows(shard_dir(out, 1, 3) / "rejects.jsonl"))
    assert 0 < written < 2 * len(select(read_instructions()[:60], 1, 3))  # a crash mid-shard
    for index in (0, 2):
        assert gen(*RUN, "--num-shards", 3, "--shard-index", index, llm=make_llm(respond=respond_mixed)) == 0
    assert incomplete_shards(out, 3) == [1]
    assert gen(*RUN, *shard, "--resume", llm=make_llm(respond=respond_mixed)) == 0
    assert gen(*RUN, "--merge", llm=None) == 0
    assert files(out) == unsharded


@pytest.fixture
def three_shards(gen, make_llm, respond_mixed, out):
    run_shards(gen, make_llm, respond_mixed, out)
    return out


def refused(gen, capsys, *extra) -> str:
    assert gen(*RUN, "--merge", *extra, llm=None) == 2
    return capsys.readouterr().err


def assert_nothing_written(out):
    assert not any((out / name).exists() for name in (*FILES, "manifest.json"))


def test_merge_refuses_a_missing_shard(gen, capsys, three_shards):
    shutil.rmtree(shard_dir(three_shards, 2, 3))
    err = refused(gen, capsys, "--num-shards", 3)
    assert "shard 00002-of-00003" in err and "is missing" in err and "--shard-index 2 --resume" in err
    assert_nothing_written(three_shards)


def test_merge_refuses_an_incomplete_shard(gen, capsys, three_shards):
    manifest_path = shard_dir(three_shards, 1, 3) / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest_path.write_text(json.dumps({**manifest, "status": "running"}))
    err = refused(gen, capsys)
    assert "shard 00001-of-00003" in err and "incomplete (status 'running')" in err
    assert_nothing_written(three_shards)

    manifest_path.write_text(json.dumps(manifest))  # complete, but its last rows lost: caught from the rows
    data = shard_dir(three_shards, 1, 3) / "data.jsonl"
    data.write_bytes(b"".join(data.read_bytes().splitlines(keepends=True)[:-1]))
    err = refused(gen, capsys)
    assert "shard 00001-of-00003" in err and "is incomplete: instruction" in err
    assert_nothing_written(three_shards)


def test_merge_refuses_a_duplicated_shard(gen, capsys, three_shards):
    shutil.rmtree(shard_dir(three_shards, 2, 3))
    shutil.copytree(shard_dir(three_shards, 1, 3), shard_dir(three_shards, 2, 3))
    err = refused(gen, capsys)
    assert "shard 00002-of-00003" in err and "says it is shard 1 of 3" in err and "duplicate" in err
    assert_nothing_written(three_shards)


def test_merge_refuses_a_foreign_shard(gen, make_llm, respond_mixed, capsys, three_shards, tmp_path):
    other = tmp_path / "other"
    assert gen(*RUN, "--seed", 5, "--num-shards", 3, "--shard-index", 0, llm=make_llm(respond=respond_mixed),
               out=other) == 0
    shutil.rmtree(shard_dir(three_shards, 0, 3))
    shutil.copytree(shard_dir(other, 0, 3), shard_dir(three_shards, 0, 3))
    err = refused(gen, capsys)
    assert "shard 00000-of-00003" in err and "belongs to another run (seed: 5 there, 0 now)" in err
    assert_nothing_written(three_shards)

    shutil.copytree(shard_dir(other, 0, 3), three_shards / "shards" / "00000-of-00004")  # another N
    err = refused(gen, capsys, "--num-shards", 3)
    assert "00000-of-00004 is not a shard of this 3-shard run" in err
    assert_nothing_written(three_shards)
    assert "holds shards of 3 and 4-shard runs; pass --num-shards" in refused(gen, capsys)


def test_merge_refuses_rows_of_another_limit(gen, capsys, three_shards):
    err = refused(gen, capsys, "--limit", 70)  # the shards ran the first 60 instructions
    assert "is incomplete: instruction" in err and "has no rows" in err
    err = refused(gen, capsys, "--limit", 50)
    assert "not in this run's input" in err
    assert_nothing_written(three_shards)


def test_merge_refuses_a_shard_file_out_of_input_order(gen, capsys, three_shards):
    data = shard_dir(three_shards, 2, 3) / "data.jsonl"
    lines = data.read_bytes().splitlines(keepends=True)
    data.write_bytes(b"".join([lines[1], lines[0], *lines[2:]]))  # the same rows, two swapped
    err = refused(gen, capsys)
    assert "shard 00002-of-00003" in err and "data.jsonl holds row" in err and "out of input order" in err
    assert_nothing_written(three_shards)


def test_merge_never_replaces_an_unsharded_run(gen, make_llm, respond_mixed, capsys, three_shards):
    assert gen(*RUN, llm=make_llm(respond=respond_mixed), out=three_shards) == 0  # an unsharded run in OUT itself
    before = files(three_shards)
    err = refused(gen, capsys)
    assert "holds an unsharded run" in err
    assert files(three_shards) == before


def test_shard_flags_are_checked(gen, make_llm, capsys):
    assert gen("--num-shards", 3, "--shard-index", 3, llm=make_llm()) == 2
    assert "--shard-index 3 is outside 0..2" in capsys.readouterr().err
    assert gen("--merge", "--shard-index", 1, llm=None) == 2
    assert "--merge merges every shard; drop --shard-index" in capsys.readouterr().err
    assert gen("--data-parallel-size", 2, "--num-shards", 2, "--shard-index", 0, llm=None) == 2
    assert "runs its own shards" in capsys.readouterr().err
    assert gen("--merge", llm=None) == 2
    assert "no shards to merge" in capsys.readouterr().err
