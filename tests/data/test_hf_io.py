"""Hugging Face-ready input and output: --instructions from parquet and from `save_to_disk` directories (with
--instruction-field / --instruction-split, and each bad input as one line, exit 2); the dataset card OUT/README.md
(its YAML parsed, its counts the manifest's, `load_dataset(OUT)` giving the kept rows and the rejects; after a merge
too); `python -m stage1.export` in each form, read back by `datasets.load_dataset`."""

from __future__ import annotations

import json

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from stage1.data.card import dataset_card, size_category, write_card
from stage1.data.export import PROMPT_END
from stage1.export import main as export_main

from dataset_files import rows
from test_instructions_job import instruction_respond
from test_torch_free import probe

datasets.disable_progress_bars()

INPUT = [  # `q` holds the instructions; a null id/type is an absent one (a hash id, the default type)
    {"q": "What is 7 times 8?", "id": "m1", "type": "math", "source": "mine", "lang": "en", "tags": ["a", "b"]},
    {"q": "Name three rivers in Europe.", "id": None, "type": None, "source": "mine", "lang": "fr", "tags": []},
    {"q": "Write a haiku about autumn.", "id": "p3", "type": "poem", "source": "mine", "lang": "en", "tags": ["c"]},
]


def as_jsonl(records, field="q"):
    """The same records as the JSONL reader reads them (an absent key where the table has a null)."""
    out = []
    for r in records:
        obj = {("instruction" if k == field else k): v for k, v in r.items()
               if not (k in ("id", "type") and v is None)}
        out.append(json.dumps(obj))
    return "\n".join(out) + "\n"


def load(path, cache, **kwargs):
    """datasets' JSON loader over one file, its cache in `cache`."""
    return datasets.load_dataset("json", data_files=str(path), split="train", cache_dir=str(cache), **kwargs)


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and "Traceback" not in err, err
    return err


# --- input -----------------------------------------------------------------------------------------------------------

def test_parquet_input_gives_the_rows_the_same_jsonl_gives(gen, make_llm, tmp_path):
    pq.write_table(pa.Table.from_pylist(INPUT), tmp_path / "in.parquet")
    (tmp_path / "in.jsonl").write_text(as_jsonl(INPUT))
    assert gen("--instructions", tmp_path / "in.parquet", "--instruction-field", "q", llm=make_llm(),
               out=tmp_path / "p") == 0
    assert gen("--instructions", tmp_path / "in.jsonl", llm=make_llm(), out=tmp_path / "j") == 0
    assert (tmp_path / "p" / "data.jsonl").read_bytes() == (tmp_path / "j" / "data.jsonl").read_bytes()
    kept = rows(tmp_path / "p" / "data.jsonl")
    assert [r["instruction"] for r in kept] == [r["q"] for r in INPUT]
    assert [r["type"] for r in kept] == ["math", "general", "poem"] and kept[0]["id"] == "m1"
    assert [(r["lang"], r["tags"]) for r in kept] == [(r["lang"], r["tags"]) for r in INPUT]  # carried through
    identity = {d: json.loads((tmp_path / d / "manifest.json").read_text())["identity"] for d in "pj"}
    assert identity["p"]["instructions_sha256"] == identity["j"]["instructions_sha256"]


def test_the_input_fingerprint_covers_the_parquet_data(gen, make_llm, tmp_path, capsys):
    path = tmp_path / "in.parquet"
    pq.write_table(pa.Table.from_pylist(INPUT), path)
    assert gen("--instructions", path, "--instruction-field", "q", llm=make_llm()) == 0
    changed = [dict(INPUT[0], lang="de"), *INPUT[1:]]  # one value of a carried column
    pq.write_table(pa.Table.from_pylist(changed), path)
    assert gen("--instructions", path, "--instruction-field", "q", "--resume", llm=make_llm()) == 2
    assert "holds a different run (instructions_sha256" in one_line_error(capsys)


def test_save_to_disk_dataset_and_a_split_of_a_dataset_dict(gen, make_llm, tmp_path, read_rows):
    table = datasets.Dataset.from_list([{k: v for k, v in r.items() if k != "source"} for r in INPUT])
    table.save_to_disk(tmp_path / "ds")
    assert gen("--instructions", tmp_path / "ds", "--instruction-field", "q", llm=make_llm(), out=tmp_path / "a") == 0
    kept = read_rows(tmp_path / "a" / "data.jsonl")
    assert [(r["instruction"], r["source"]) for r in kept] == [(r["q"], "ds") for r in INPUT]

    splits = datasets.DatasetDict({"train": table, "test": table.select([2])})
    splits.save_to_disk(tmp_path / "dd")
    assert gen("--instructions", tmp_path / "dd", "--instruction-field", "q", "--instruction-split", "test",
               llm=make_llm(), out=tmp_path / "b") == 0
    [row] = read_rows(tmp_path / "b" / "data.jsonl")
    assert (row["id"], row["instruction"], row["source"]) == ("p3", INPUT[2]["q"], "dd/test")
    manifest = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert manifest["args"]["instruction_split"] == "test" and manifest["args"]["instruction_field"] == "q"

    single = datasets.DatasetDict({"only": table.select([0])})  # one split needs no --instruction-split
    single.save_to_disk(tmp_path / "one")
    assert gen("--instructions", tmp_path / "one", "--instruction-field", "q", llm=make_llm(), out=tmp_path / "c") == 0
    assert [r["source"] for r in read_rows(tmp_path / "c" / "data.jsonl")] == ["one/only"]


def _bad_inputs(tmp_path):
    """name -> (its path, extra flags, what the one-line error says)."""
    pq.write_table(pa.Table.from_pylist(INPUT), tmp_path / "in.parquet")
    pq.write_table(pa.Table.from_pylist([], schema=pa.schema([("instruction", pa.string())])), tmp_path / "e.parquet")
    (tmp_path / "zero.parquet").write_bytes(b"")
    pq.write_table(pa.table({"instruction": ["x"], "blob": [b"\x00"]}), tmp_path / "blob.parquet")
    pq.write_table(pa.table({"instruction": ["x", None]}), tmp_path / "null.parquet")
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "notes.txt").write_text("x\n")
    table = datasets.Dataset.from_dict({"instruction": ["a b", "c d"]})
    datasets.DatasetDict({"train": table, "test": table}).save_to_disk(tmp_path / "dd")
    table.save_to_disk(tmp_path / "ds")
    (tmp_path / "in.txt").write_text("one\ntwo\n")
    return {
        "missing column": ("in.parquet", [], "no column 'instruction' (its columns: q, id, type, source, lang, tags); "
                                             "pass --instruction-field NAME"),
        "missing named column": ("in.parquet", ["--instruction-field", "question"], "no column 'question'"),
        "empty table": ("e.parquet", [], "e.parquet: no rows, so no instructions"),
        "empty file": ("zero.parquet", [], "zero.parquet: not a readable parquet file"),
        "binary column": ("blob.parquet", [], "column 'blob' is of type binary, which a JSON row can't hold"),
        "null instruction": ("null.parquet", [], 'null.parquet[1]: the object has an empty or non-string "instruction"'),
        "not a saved dataset": ("plain", [], "not a dataset saved with save_to_disk (it has neither dataset_dict.json "
                                            "nor state.json)"),
        "several splits": ("dd", [], "holds a DatasetDict with the splits train, test; pass --instruction-split NAME"),
        "unknown split": ("dd", ["--instruction-split", "dev"], "no split 'dev' (it has train, test)"),
        "split of one dataset": ("ds", ["--instruction-split", "train"], "holds one Dataset, not a DatasetDict"),
        "split of a file": ("in.parquet", ["--instruction-split", "train"], "--instruction-split picks a split of a "
                                                                            "`datasets` directory"),
        "field of text": ("in.txt", ["--instruction-field", "q"], "--instruction-field q does not apply"),
    }


@pytest.mark.parametrize("case", ["missing column", "missing named column", "empty table", "empty file",
                                  "binary column", "null instruction", "not a saved dataset", "several splits",
                                  "unknown split", "split of one dataset", "split of a file", "field of text"])
def test_bad_input_is_one_line_naming_the_fix(case, gen, make_llm, tmp_path, capsys, out):
    name, flags, message = _bad_inputs(tmp_path)[case]
    llm = make_llm()
    assert gen("--instructions", tmp_path / name, *flags, llm=llm) == 2
    assert message in one_line_error(capsys)
    assert not llm.seen_prompts and not (out / "data.jsonl").exists()  # checked before anything is generated


def test_a_missing_optional_dependency_names_the_extra(gen, make_llm, tmp_path, capsys, monkeypatch):
    import sys
    pq.write_table(pa.Table.from_pylist(INPUT), tmp_path / "in.parquet")
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # what an install without the extra sees
    assert gen("--instructions", tmp_path / "in.parquet", "--instruction-field", "q", llm=make_llm()) == 2
    assert "reading parquet needs pyarrow, which is not installed: pip install 'stage1[hf]'" in one_line_error(capsys)


# --- the dataset card ------------------------------------------------------------------------------------------------

def card(out):
    text = (out / "README.md").read_text(encoding="utf-8")
    assert text.startswith("---\n")
    header, body = text[4:].split("\n---\n", 1)
    return yaml.safe_load(header), body


def check_card(out, cache):
    """The card's YAML and body against the manifest; `load_dataset(OUT)` through its configs."""
    manifest = json.loads((out / "manifest.json").read_text())
    meta, body = card(out)
    counts = manifest["counts"]
    assert meta["license"] == "other" and meta["language"] == ["en"]
    assert meta["task_categories"] == ["text-generation"] and "synthetic" in meta["tags"]
    assert meta["size_categories"] == [size_category(counts["kept"])]
    assert meta["configs"] == [
        {"config_name": "default", "data_files": [{"split": "train", "path": "data.jsonl"}]},
        {"config_name": "rejects", "data_files": [{"split": "train", "path": "rejects.jsonl"}]},
    ]
    assert f"| {counts['kept']} kept |" in body and f"| {counts['rejected']} rejected," in body
    for reason, n in manifest["rejected_by_reason"].items():
        assert f"| `{reason}` | {n} |" in body
    for fact in (manifest["model"]["config_sha256"], manifest["model"]["tokenizer_sha256"], manifest["command"],
                 f"`{manifest['generation']['style']}`", f"temperature `{manifest['generation']['temperature']}`"):
        assert fact in body
    if manifest["code"]["git_commit"]:
        assert manifest["code"]["git_commit"] in body
    # the folder itself loads: its configs pick data.jsonl / rejects.jsonl among the manifest, report, shards
    kept = datasets.load_dataset(str(out), split="train", cache_dir=str(cache))
    rejected = datasets.load_dataset(str(out), "rejects", split="train", cache_dir=str(cache))
    assert kept["id"] == [r["id"] for r in rows(out / "data.jsonl")] and kept.num_rows == counts["kept"]
    assert rejected.num_rows == counts["rejected"] == len(rows(out / "rejects.jsonl"))
    assert set(rejected["reason"]) == set(manifest["rejected_by_reason"])
    return meta, body


def test_a_finished_run_writes_its_card(gen, make_llm, respond_mixed, out, tmp_path):
    assert gen("--limit", 30, "--n", 2, llm=make_llm(respond=respond_mixed)) == 0
    meta, body = check_card(out, tmp_path / "cache")
    assert meta["pretty_name"] == "out" and meta["tags"] == ["synthetic", "sft", "stage1"]
    assert "python -m stage1.export" in body and "load_dataset(\"USER/NAME\", \"rejects\"" in body


def test_the_merge_writes_the_card_and_a_shard_writes_none(gen, make_llm, respond_mixed, out, tmp_path):
    for index in range(2):
        assert gen("--limit", 30, "--n", 2, "--num-shards", 2, "--shard-index", index,
                   llm=make_llm(respond=respond_mixed)) == 0
    assert not any(out.rglob("README.md"))
    assert gen("--limit", 30, "--n", 2, "--merge", llm=make_llm()) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["merge"]["dataset_filter_rejected"] > 0  # duplicates across the shards, found by the merge
    _, body = check_card(out, tmp_path / "cache")
    assert "**Shards**: 2, merged" in body
    assert [p.relative_to(out).as_posix() for p in out.rglob("README.md")] == ["README.md"]


def test_the_instruction_jobs_card(instr, make_llm, out, tmp_path):
    assert instr("--count", 10, llm=make_llm(respond=instruction_respond)) == 0
    meta, body = check_card(out, tmp_path / "cache")
    assert meta["tags"] == ["synthetic", "instructions", "stage1"]
    assert "until `10` were kept" in body and "- **goal**:" in body  # the manifest's other records, as they are


def test_the_card_is_the_manifests_alone_and_keeps_odd_values_in_their_cells(gen, make_llm, out, tmp_path):
    assert gen("--limit", 5, llm=make_llm()) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert write_card(tmp_path, manifest).read_text() == (out / "README.md").read_text()  # no file but the manifest
    odd = {**manifest, "identity": {**manifest["identity"], "odd": "a|b\nc`d"}, "args": {**manifest["args"],
                                                                                      "out": 'runs/"x": y'}}
    assert yaml.safe_load(dataset_card(odd)[4:].split("\n---\n")[0])["pretty_name"] == '"x": y'
    [row] = [line for line in dataset_card(odd).splitlines() if line.startswith("| odd |")]
    assert row == '| odd | ``"a\\|b\\nc`d"`` |'  # one line, the bar escaped: still a two-cell row


@pytest.mark.parametrize("rows_, label", [(0, "n<1K"), (999, "n<1K"), (1000, "1K<n<10K"), (99_999, "10K<n<100K"),
                                          (100_000, "100K<n<1M"), (10**9, "n>1B")])
def test_size_category(rows_, label):
    assert size_category(rows_) == label


# --- export ----------------------------------------------------------------------------------------------------------

@pytest.fixture
def finished(gen, make_llm, respond_mixed, out):
    """A finished run whose data.jsonl holds a stop token id in one `stop_reason` (an int beside strings and nulls,
    as a row stopped by a control token records it)."""
    assert gen("--limit", 30, "--n", 2, llm=make_llm(respond=respond_mixed)) == 0
    kept = rows(out / "data.jsonl")
    kept[0]["stop_reason"] = 151643
    (out / "data.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in kept))
    return kept


def test_export_parquet_holds_every_column_and_row(finished, out, tmp_path, capsys):
    assert export_main([str(out), "--to", "parquet"]) == 0
    dest = out / "export" / "data.parquet"
    assert capsys.readouterr().out == f"wrote {len(finished)} rows to {dest}\n"
    back = datasets.load_dataset("parquet", data_files=str(dest), split="train", cache_dir=str(tmp_path / "cache"))
    assert back.to_list() == load(out / "data.jsonl", tmp_path / "cache").to_list()
    assert back.column_names == list(finished[0]) and back[0]["stop_reason"] == 151643
    assert {r["stop_reason"] for r in back} == {r["stop_reason"] for r in finished}


def test_export_trl_prompt_completion(finished, out, tmp_path):
    dest = tmp_path / "sft" / "trl.jsonl"
    assert export_main([str(out), "--to", "trl", "--dest", str(dest)]) == 0
    back = load(dest, tmp_path / "cache")
    assert back.column_names == ["prompt", "completion"]
    assert back.to_list() == [{"prompt": r["instruction"] + "\n", "completion": r["response"]} for r in finished]
    assert PROMPT_END == "\n" and not any(r["completion"][:1].isspace() for r in back)


def test_export_chat_messages(finished, out, tmp_path):
    assert export_main([str(out), "--to", "messages"]) == 0
    back = load(out / "export" / "messages.jsonl", tmp_path / "cache")
    assert back.to_list() == [{"messages": [{"role": "user", "content": r["instruction"]},
                                            {"role": "assistant", "content": r["response"]}]} for r in finished]


def test_export_of_the_instruction_job(instr, make_llm, out, tmp_path, capsys):
    assert instr("--count", 6, llm=make_llm(respond=instruction_respond)) == 0
    for form in ("trl", "messages"):
        assert export_main([str(out), "--to", form]) == 2
        assert "instructions without responses" in one_line_error(capsys)
    assert export_main([str(out), "--to", "parquet"]) == 0
    back = datasets.load_dataset("parquet", data_files=str(out / "export" / "data.parquet"), split="train",
                                 cache_dir=str(tmp_path / "cache"))
    assert back["instruction"] == [r["instruction"] for r in rows(out / "data.jsonl")] and back.num_rows == 6


def test_export_refuses_what_is_no_finished_run(finished, out, tmp_path, capsys):
    assert export_main([str(tmp_path), "--to", "trl"]) == 2
    assert "no manifest.json, so no stage1 run's output" in one_line_error(capsys)
    manifest = json.loads((out / "manifest.json").read_text())
    (out / "manifest.json").write_text(json.dumps({**manifest, "status": "running"}))
    assert export_main([str(out), "--to", "trl"]) == 2
    assert "its run is not finished (status 'running')" in one_line_error(capsys)
    assert not (out / "export").exists()


def test_export_imports_no_torch(finished, out):
    for form in ("parquet", "trl"):
        report, stderr = probe("stage1.export", [out, "--to", form])
        assert report == {"rc": 0, "imported": []}, stderr
