"""`python -m stage1.generate` end to end against the fake engine: stored prompts, reproducibility (batch size,
crash and resume), rejects with reasons, bad input, output directories that hold another run."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from stage1.data.prompts import load_examples, normalize
from stage1.data.writer import DatasetWriter
from stage1.generate import main

REPO = Path(__file__).resolve().parents[2]
ROW_KEYS = {"id", "index", "instruction", "type", "source", "prompt", "response", "raw_response", "finish_reason",
            "stop_reason", "prompt_tokens", "response_tokens", "example_ids", "style", "seed", "sampling"}


def files(out):
    return {name: (out / name).read_bytes() for name in ("data.jsonl", "rejects.jsonl")}


@pytest.mark.parametrize("style", ["completion", "qa"])
def test_stored_prompt_is_exactly_what_the_engine_tokenized(gen, make_llm, read_rows, out, style):
    llm = make_llm()
    assert gen("--style", style, "--limit", 40, "--n", 2, "--batch-size", 16, llm=llm) == 0
    rows = read_rows(out / "data.jsonl") + read_rows(out / "rejects.jsonl")
    assert len(rows) == 80 and len(read_rows(out / "data.jsonl")) > 60
    pool = {ex.id: ex for ex in load_examples()}
    for row in rows:
        assert ROW_KEYS <= set(row)
        assert row["prompt"] in llm.seen_prompts  # the very string the engine got, not a re-rendered one
        assert llm.tokenizer.encode(row["prompt"]) and row["prompt_tokens"] == len(llm.tokenizer.encode(row["prompt"]))
        query = f"{row['instruction']}\n" if style == "completion" else f"Q: {row['instruction']}\nA:"
        assert row["prompt"].endswith("\n\n" + query)
        assert row["style"] == style and 3 <= len(row["example_ids"]) <= 4
        assert all(normalize(pool[i].prompt) != normalize(row["instruction"]) for i in row["example_ids"])
        assert all(f"{pool[i].prompt}\n" in row["prompt"] for i in row["example_ids"])
        assert row["sampling"] == {"temperature": 0.7, "top_p": 0.9, "top_k": 0, "min_p": 0.0, "max_tokens": 256,
                                   "n": 2}
    assert len(llm.seen_prompts) == 40  # one request per instruction, its n samples together
    assert llm.shut_down  # the run ends its engine (a tensor-parallel one's workers with it)


def test_same_seed_same_files_whatever_the_batching(gen, make_llm, respond_mixed, tmp_path):
    """Writes every 1, 7 or 64 instructions; 1, 5 or 256 sequences in flight (requests finishing out of order)."""
    runs = {}
    for batch, seqs in ((1, 256), (7, 5), (64, 1), (64, 256)):
        out = tmp_path / f"b{batch}-s{seqs}"
        llm = make_llm(respond=respond_mixed, max_num_seqs=seqs)
        assert gen("--limit", 30, "--n", 2, "--batch-size", batch, "--max-num-seqs", seqs, llm=llm, out=out) == 0
        runs[batch, seqs] = files(out)
    assert len(set(map(str, runs.values()))) == 1
    assert runs[1, 256]["rejects.jsonl"] and runs[1, 256]["data.jsonl"]
    other = tmp_path / "seed1"
    assert gen("--limit", 30, "--n", 2, "--seed", 1, llm=make_llm(respond=respond_mixed), out=other) == 0
    assert files(other) != runs[1, 256]


def test_rejects_file_gets_every_filtered_row_with_its_reason(gen, make_llm, respond_mixed, read_rows, out):
    assert gen("--n", 3, llm=make_llm(respond=respond_mixed)) == 0  # the 124 built-in instructions
    kept, rejected = read_rows(out / "data.jsonl"), read_rows(out / "rejects.jsonl")
    assert len(kept) + len(rejected) == 124 * 3  # nothing dropped silently
    assert {(r["id"], r["index"]) for r in kept}.isdisjoint({(r["id"], r["index"]) for r in rejected})
    reasons = {r["reason"] for r in rejected}
    assert {"empty", "run_on", "near_duplicate", "control_token", "scaffolding"} <= reasons
    for r in rejected:
        assert r["raw_response"] is not None and r["detail"] or r["reason"] == "empty"
        if r["reason"] == "run_on":
            assert r["finish_reason"] == "length" and r["response_tokens"] == 256
    # Kept rows were cut at the blank line (the fake leaves the stop string out, like the engine).
    assert all("\n\n" not in r["response"] and r["response"] == r["response"].strip() for r in kept)
    assert all(r["stop_reason"] in ("\n\n", None) for r in kept)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "complete"
    assert manifest["counts"] == {"instructions": 124, "completions": 372, "kept": len(kept),
                                  "rejected": len(rejected)}
    assert sum(manifest["rejected_by_reason"].values()) == len(rejected)
    assert manifest["stop_reasons"]["length"] == manifest["rejected_by_reason"]["run_on"]


def _crash_then_resume(gen, make_llm, respond, out, crash_at_step):
    argv = ("--limit", 40, "--n", 2, "--batch-size", 6, "--max-num-seqs", 16)
    crashing = make_llm(respond=respond, max_num_seqs=16, fail_at_step=crash_at_step)
    with pytest.raises(RuntimeError, match="injected crash"):
        gen(*argv, llm=crashing, out=out)
    assert json.loads((out / "manifest.json").read_text())["status"] == "running"
    assert crashing.shut_down  # a failed run ends its engine too
    return argv


def done_instructions(out, n=2):
    rows = [json.loads(line) for blob in files(out).values() for line in blob.splitlines()]
    ids = [r["id"] for r in rows]
    return {i for i in ids if ids.count(i) == n}


def test_crash_after_some_writes_then_resume_gives_the_same_files(gen, make_llm, respond_mixed, tmp_path):
    full = tmp_path / "full"
    assert gen("--limit", 40, "--n", 2, "--batch-size", 6, llm=make_llm(respond=respond_mixed), out=full) == 0
    out = tmp_path / "crashed"
    argv = _crash_then_resume(gen, make_llm, respond_mixed, out, crash_at_step=400)
    assert 0 < len(files(out)["data.jsonl"]) < len(files(full)["data.jsonl"])
    done = done_instructions(out)
    resumed = make_llm(respond=respond_mixed)
    assert gen(*argv, "--resume", "--batch-size", 5, llm=resumed, out=out) == 0
    assert files(out) == files(full)
    assert len(resumed.seen_prompts) == 40 - len(done)  # only what was missing
    sessions = json.loads((out / "manifest.json").read_text())["sessions"]
    assert [s["resumed"] for s in sessions] == [True]  # the crashed session never finished


@pytest.mark.parametrize("damage", ["data_cut_mid_line", "data_and_rejects_cut_mid_line"])
def test_kill_mid_write_then_resume_gives_the_same_files(gen, make_llm, respond_mixed, tmp_path, damage):
    """A kill while chunk 4 was being written leaves part of its lines, the last one cut short. Resume repairs the
    tails, regenerates what is missing, and ends identical to an uninterrupted run."""
    full = tmp_path / "full"
    assert gen("--limit", 40, "--n", 2, "--batch-size", 6, llm=make_llm(respond=respond_mixed), out=full) == 0
    out = tmp_path / "killed"
    argv = _crash_then_resume(gen, make_llm, respond_mixed, out, crash_at_step=400)
    whole, now = files(full), files(out)
    next_data = whole["data.jsonl"][len(now["data.jsonl"]):]
    next_rejects = whole["rejects.jsonl"][len(now["rejects.jsonl"]):]
    lines = next_data.splitlines(keepends=True)
    with open(out / "data.jsonl", "ab") as f:
        f.write(b"".join(lines[:3]) + lines[3][:25])
    if damage == "data_and_rejects_cut_mid_line":
        with open(out / "rejects.jsonl", "ab") as f:
            f.write(next_rejects[:7])
    assert gen(*argv, "--resume", llm=make_llm(respond=respond_mixed), out=out) == 0
    assert files(out) == files(full)


def test_kill_between_data_and_rejects_writes_then_resume(gen, make_llm, respond_mixed, tmp_path, monkeypatch):
    """Chunk 4's kept rows reached data.jsonl, its rejects never did (and some of its instructions have one completion
    kept, the other not yet written)."""
    full = tmp_path / "full"
    assert gen("--limit", 40, "--n", 2, "--batch-size", 6, llm=make_llm(respond=respond_mixed), out=full) == 0
    real_write_chunk = DatasetWriter.write_chunk
    chunks = []

    def write_chunk_then_die(self, kept, rejected):
        chunks.append(1)
        if len(chunks) == 4:
            real_write_chunk(self, kept, [])
            assert rejected  # the scenario needs rejects in that chunk
            raise KeyboardInterrupt
        real_write_chunk(self, kept, rejected)

    monkeypatch.setattr(DatasetWriter, "write_chunk", write_chunk_then_die)
    out = tmp_path / "killed"
    argv = ("--limit", 40, "--n", 2, "--batch-size", 6, "--max-num-seqs", 8)
    assert gen(*argv, llm=make_llm(respond=respond_mixed, max_num_seqs=8), out=out) == 130
    assert len(chunks) == 4
    monkeypatch.setattr(DatasetWriter, "write_chunk", real_write_chunk)
    assert gen(*argv, "--resume", llm=make_llm(respond=respond_mixed), out=out) == 0
    assert files(out) == files(full)


def test_limit_then_resume_with_a_larger_limit_equals_one_run(gen, make_llm, respond_mixed, tmp_path):
    one = tmp_path / "one"
    assert gen("--limit", 30, llm=make_llm(respond=respond_mixed), out=one) == 0
    two = tmp_path / "two"
    assert gen("--limit", 12, llm=make_llm(respond=respond_mixed), out=two) == 0
    assert gen("--limit", 30, "--resume", llm=make_llm(respond=respond_mixed), out=two) == 0
    assert files(one) == files(two)


def test_prompt_too_long_is_rejected_never_truncated(gen, make_llm, read_rows, out, tmp_path):
    inp = tmp_path / "in.jsonl"
    inp.write_text("\n".join(json.dumps(r) for r in [
        {"id": "short", "instruction": "What is 2+2?"},
        {"id": "long", "instruction": "Summarize: " + "a long text " * 200},
        {"id": "after", "instruction": "Name a colour."},
    ]) + "\n")
    llm = make_llm(max_model_len=1500)
    assert gen("--instructions", inp, "--max-tokens", 200, llm=llm) == 0
    assert [r["id"] for r in read_rows(out / "data.jsonl")] == ["short", "after"]
    [rej] = read_rows(out / "rejects.jsonl")
    assert rej["id"] == "long" and rej["reason"] == "prompt_too_long" and rej["index"] is None
    assert rej["prompt_tokens"] + 200 > 1500 and rej["response"] is None
    assert rej["instruction"] == ("Summarize: " + "a long text " * 200).strip()
    assert rej["prompt"].endswith("\n\n" + rej["instruction"] + "\n")  # the whole instruction, not cut
    assert all("a long text" not in p for p in llm.seen_prompts)  # never sent to the engine


def test_input_fields_are_carried_into_rows(gen, make_llm, read_rows, out, tmp_path):
    inp = tmp_path / "in.jsonl"
    inp.write_text(json.dumps({"instruction": "Name a colour.", "id": "c1", "type": "list", "source": "me",
                               "meta": {"k": [1, 2]}}) + "\n")
    assert gen("--instructions", inp, llm=make_llm()) == 0
    [row] = read_rows(out / "data.jsonl")
    assert (row["id"], row["type"], row["source"], row["meta"]) == ("c1", "list", "me", {"k": [1, 2]})


@pytest.mark.parametrize("content, message", [
    (b'{"instruction": "fine"}\n{"instruction": oops}\n', r"in\.jsonl:2: not valid JSON"),
    (b'{"instruction": "fine"}\n{"prompt": "no instruction"}\n', r'in\.jsonl:2: the object has no "instruction"'),
    (b"", r"in\.jsonl: no instructions found"),
    (b'{"instruction": "caf\xe9"}\n', r"in\.jsonl:1: not valid UTF-8"),
])
def test_bad_input_is_one_line_exit_2_and_nothing_written(gen, make_llm, out, tmp_path, capsys, content, message):
    inp = tmp_path / "in.jsonl"
    inp.write_bytes(content)
    llm = make_llm()
    assert gen("--instructions", inp, llm=llm) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err
    assert re.search(message, err), err
    assert not out.exists() and llm.seen_prompts == []


def test_bad_input_through_the_real_entry_point(tmp_path):
    inp = tmp_path / "in.jsonl"
    inp.write_text('{"instruction": "fine"}\nnot json\n')
    proc = subprocess.run([sys.executable, "-m", "stage1.generate", "--instructions", str(inp), "--model",
                           str(tmp_path), "--out", str(tmp_path / "out")], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 2
    assert proc.stderr.startswith(f"error: {inp}:2: not valid JSON") and proc.stderr.count("\n") == 1


def test_help_explains_the_tool():
    proc = subprocess.run([sys.executable, "-m", "stage1.generate", "--help"], capture_output=True, text=True,
                          cwd=REPO)
    assert proc.returncode == 0
    for word in ("--resume", "--overwrite", "--style", "data.jsonl", "rejects.jsonl", "manifest.json", "exit codes"):
        assert word in proc.stdout


@pytest.mark.parametrize("argv, message", [
    (("--n", 0), "--n must be an int >= 1, got 0"),  # SamplingParams' message, with the flag's name
    (("--top-p", 1.5), r"--top-p must be in \(0, 1\]"),
    (("--resume", "--overwrite"), "--resume and --overwrite contradict"),
])
def test_bad_arguments(gen, make_llm, capsys, argv, message):
    assert gen(*argv, llm=make_llm()) == 2
    assert re.search(message, capsys.readouterr().err)


def test_missing_model_dir_or_a_gguf_file(make_llm, tmp_path, capsys):
    assert main(["--model", str(tmp_path / "nope"), "--out", str(tmp_path / "o")],
                llm_factory=lambda d, a: make_llm()) == 2
    assert "not a model directory" in capsys.readouterr().err
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    assert main(["--model", str(tmp_path / "m.gguf"), "--out", str(tmp_path / "o")],
                llm_factory=lambda d, a: make_llm()) == 2
    assert "python -m stage1.models import-gguf" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_no_model_without_a_default_says_how_to_get_one(make_llm, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "stage1.models", None)  # as if stage1.models were not installed
    assert main(["--out", str(tmp_path / "o"), "--no-progress"], llm_factory=lambda d, a: make_llm()) == 2
    err = capsys.readouterr().err
    assert "no --model given" in err and "--model DIR" in err


def test_default_model_comes_from_stage1_models(make_llm, fake_model_dir, tmp_path, monkeypatch):
    import types
    seen = []
    fake_models = types.SimpleNamespace(resolve_model=lambda name: seen.append(name) or fake_model_dir)
    monkeypatch.setitem(sys.modules, "stage1.models", fake_models)
    argv = ["--out", str(tmp_path / "o"), "--limit", "2", "--no-progress"]
    assert main(argv, llm_factory=lambda d, a: make_llm()) == 0
    assert seen == [None]
    manifest = json.loads((tmp_path / "o" / "manifest.json").read_text())
    assert manifest["model"]["path"] == str(fake_model_dir.resolve())


def test_an_output_dir_holding_another_run_is_refused(gen, make_llm, out, capsys):
    assert gen("--limit", 5, llm=make_llm()) == 0
    before = files(out)
    assert gen("--limit", 5, "--seed", 1, llm=make_llm()) == 2
    assert "holds a different run (seed: 0 there, 1 now)" in capsys.readouterr().err
    assert gen("--limit", 5, "--seed", 1, "--resume", llm=make_llm()) == 2
    assert gen("--limit", 5, "--style", "qa", "--resume", llm=make_llm()) == 2
    assert "style: 'completion' there, 'qa' now" in capsys.readouterr().err
    assert files(out) == before
    assert gen("--limit", 5, llm=make_llm()) == 2  # the same run: needs --resume to be touched
    assert "already holds this run" in capsys.readouterr().err
    idle = make_llm()
    assert gen("--limit", 5, "--resume", llm=idle) == 0 and idle.seen_prompts == []  # nothing left to do
    assert files(out) == before
    assert gen("--limit", 5, "--seed", 1, "--overwrite", llm=make_llm()) == 0
    assert files(out) != before
    assert json.loads((out / "manifest.json").read_text())["identity"]["seed"] == 1


def test_overwrite_removes_the_replaced_runs_card_and_report(gen, make_llm, out):
    """Until the new run ends, no card or report describes the run it replaced (here the new run crashes)."""
    assert gen("--limit", 3, llm=make_llm()) == 0
    assert (out / "README.md").exists() and (out / "report.html").exists()
    with pytest.raises(RuntimeError):
        gen("--limit", 3, "--seed", 1, "--overwrite", llm=make_llm(fail_at_step=0))
    assert not (out / "README.md").exists() and not (out / "report.html").exists()


def test_a_run_from_before_job_kinds_resumes(gen, make_llm, out, capsys):
    """Its manifest's identity has no "job": it was the main job's, so it is this run."""
    assert gen("--limit", 4, llm=make_llm()) == 0
    path = out / "manifest.json"
    manifest = json.loads(path.read_text())
    assert manifest["identity"].pop("job") == "responses"
    path.write_text(json.dumps(manifest))
    resumed = make_llm()
    assert gen("--limit", 6, "--resume", llm=resumed) == 0 and len(resumed.seen_prompts) == 2


def test_a_dir_with_data_but_no_manifest_is_refused(gen, make_llm, out, capsys):
    out.mkdir()
    (out / "data.jsonl").write_text("{}\n")
    assert gen("--limit", 2, "--resume", llm=make_llm()) == 2
    assert "no manifest.json" in capsys.readouterr().err


def test_prompt_token_mismatch_stops_the_run_and_keeps_earlier_rows(gen, make_llm, read_rows, out, capsys):
    llm = make_llm(corrupt_ids_from_request=10, max_num_seqs=4)
    assert gen("--limit", 20, "--batch-size", 1, "--max-num-seqs", 4, llm=llm) == 1
    err = capsys.readouterr().err
    assert "re-tokenizes" in err and err.count("\n") == 1
    rows = read_rows(out / "data.jsonl") + read_rows(out / "rejects.jsonl")
    first_ten = {json.loads(r)["id"] for r in (REPO / "stage1/data/instructions.jsonl").read_text().splitlines()[:10]}
    # rows written before the bad one was judged are intact (those judged in its step are not written); none after
    assert 5 <= len(rows) <= 10 and {r["id"] for r in rows} <= first_ten


def test_manifest_describes_the_run(gen, make_llm, fake_model_dir, out):
    assert gen("--limit", 10, "--n", 2, "--temperature", 0.5, llm=make_llm()) == 0
    m = json.loads((out / "manifest.json").read_text())
    assert m["status"] == "complete"
    assert m["model"]["config_sha256"] and m["model"]["tokenizer_sha256"] and m["model"]["max_model_len"] == 8192
    assert m["args"]["temperature"] == 0.5 and m["args"]["n"] == 2 and m["command"].startswith("python -m")
    assert m["generation"]["stop"] == ["\n\n"] and m["generation"]["stop_token_ids"] == [0]
    assert set(m["code"]) >= {"stage1_version", "git_commit", "python", "torch"}
    assert m["counts"]["completions"] == 20
    [session] = m["sessions"]
    assert session["generated_tokens"] > 0 and session["tokens_per_s"] > 0 and session["wall_s"] > 0


def test_kernels_and_dtype_reach_the_engine_and_decide_the_run(gen, make_llm, fake_model_dir, out, capsys,
                                                               monkeypatch):
    """--kernels and --dtype go to the engine (stage1.LLM) and into the run's identity: the arithmetic decides the
    rows, so a resume with other kernels is refused."""
    import stage1
    from stage1.data.engine import load_llm

    built = {}
    monkeypatch.setattr(stage1, "LLM", lambda model_dir, **kw: built.update(kw) or make_llm())
    argv = ["--model", str(fake_model_dir), "--out", str(out), "--no-progress", "--limit", "3",
            "--kernels", "native", "--dtype", "float32"]
    assert main(argv, llm_factory=load_llm) == 0
    assert built["kernels"] == "native" and built["dtype"] == "float32"
    identity = json.loads((out / "manifest.json").read_text())["identity"]
    assert identity["kernels"] == "native" and identity["dtype"] == "float32"
    assert gen("--limit", 3, "--kernels", "torch", "--dtype", "float32", "--resume", llm=make_llm()) == 2
    assert "kernels: 'native' there, 'torch' now" in capsys.readouterr().err
