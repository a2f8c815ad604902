"""--decontaminate: the eval index (each input format, the 13-gram and short-text rules, normalization), the
`contaminated` filter in both jobs on the fake engine, shards + merge equal to one process, the manifest's hashes and
per-file counts, and a bad eval file as one line and exit 2."""

from __future__ import annotations

import hashlib
import json
import random

import pytest

from stage1.data.decontaminate import eval_index, eval_source
from stage1.data.filters import Candidate, Decontaminated, InstructionDecontaminated

from dataset_files import RUN, files

# A benchmark-like passage (27 words) and a short eval question.
PASSAGE = ("A baker makes twelve loaves every hour for seven hours and sells all but nine of them at the market on "
           "Saturday morning before the rain starts")
SHORT = "What is the boiling point of water?"
WORDS = PASSAGE.split()


def thirteen(start: int = 3) -> str:
    return " ".join(WORDS[start:start + 13])


def write_eval(tmp_path, kind: str, texts: list[str], name: str = "eval"):
    """An eval file of `kind` holding `texts`, one per line/object/row, after a line of unrelated text."""
    texts = ["The mitochondria is the powerhouse of the cell.", *texts]
    path = tmp_path / f"{name}.{kind}"
    if kind == "jsonl":
        path.write_text("".join(json.dumps({"id": i, "question": t, "answer": "42"}) + "\n"
                                for i, t in enumerate(texts)))
    elif kind == "txt":
        path.write_text("\n".join(texts) + "\n")
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq
        pq.write_table(pa.table({"id": list(range(len(texts))), "question": texts}), path)
    return path


@pytest.mark.parametrize("kind", ["jsonl", "txt", "parquet"])
def test_each_format_finds_a_shared_13_gram_and_passes_text_without_one(tmp_path, kind):
    path = write_eval(tmp_path, kind, [PASSAGE, SHORT])
    index = eval_index([str(path)])
    assert index.identity()["files"][0]["texts"] == (6 if kind == "jsonl" else 3)  # jsonl: question and answer
    match = index.match(f"Sure. Here is the story: {thirteen()}, and that is all there is to it.")
    assert (match.file, match.line) == (str(path), 2) and match.ngram == thirteen().lower()
    assert PASSAGE[:40] in match.excerpt
    assert index.match("A florist sells twelve roses every hour and keeps the rest of them for the evening.") is None
    assert index.match(SHORT).line == 3


def test_a_12_gram_is_not_enough_and_13_are(tmp_path):
    index = eval_index([str(write_eval(tmp_path, "txt", [PASSAGE]))])
    twelve = " ".join(WORDS[3:15])
    assert index.match(f"Well, {twelve} is what I heard, my friend, yes indeed.") is None
    assert index.match(f"Well, {twelve} {WORDS[15]} is what I heard, my friend, yes indeed.") is not None


def test_short_texts_must_equal_both_ways(tmp_path):
    index = eval_index([str(write_eval(tmp_path, "txt", [SHORT, PASSAGE]))])
    # a short eval text: the row equals it, or the row is more than it
    assert index.match("what is the BOILING point of water").ngram is None
    assert index.match("What is the boiling point of water? Explain it to a child, please, in two short lines.") \
        is None
    # a short row text: a long eval text holding it is not equal to it
    assert index.match(" ".join(WORDS[:8])) is None
    assert index.match("What is the boiling point of milk?") is None


def test_normalization_ignores_case_punctuation_and_unicode_forms(tmp_path):
    index = eval_index([str(write_eval(tmp_path, "txt", [PASSAGE, "The ﬁnal score was twenty-one to nine."]))])
    shouted = "\u201c" + thirteen().upper().replace(" ", " -- ") + "!\u201d"
    assert index.match(shouted).line == 2
    full_width = "".join(chr(ord(c) + 0xFEE0) if "a" <= c <= "z" else c for c in thirteen())  # NFKC: ａ -> a
    assert index.match(full_width).line == 2
    assert index.match("the final score was TWENTY ONE to nine").line == 3  # the ligature ﬁ is fi


def test_the_filter_names_the_side_file_line_and_text_and_the_summary_reads_it_back(tmp_path):
    path = str(write_eval(tmp_path, "txt", [PASSAGE, SHORT]))
    index = eval_index([path])
    response = Decontaminated(index).check(Candidate("Tell me a story.", f"Once, {thirteen()}.", "stop", {}))
    assert response[0] == "contaminated"
    assert response[1].startswith(f"{path}:2: the response shares the 13-gram {thirteen().lower()!r}")
    instruction = Decontaminated(index).check(Candidate(SHORT, "One hundred degrees.", "stop", {}))
    assert instruction[1].startswith(f"{path}:3: the instruction equals the eval text")
    assert eval_source(instruction[1]) == (path, 3) and eval_source("another detail") is None
    generated = InstructionDecontaminated(index).check(Candidate("", SHORT, "stop", {}))
    assert generated[1].startswith(f"{path}:3: the instruction equals")
    assert Decontaminated().check(Candidate(SHORT, SHORT, "stop", {})) is None  # no --decontaminate: all pass


def test_named_fields_only_are_read_and_a_list_gives_a_text_per_string(tmp_path):
    path = tmp_path / "qa.jsonl"
    path.write_text(json.dumps({"question": "Name a prime number.", "answer": SHORT}) + "\n"
                    + json.dumps({"question": "Pick one.", "choices": ["Paris", "The capital of Peru is Lima."]}) + "\n")
    assert eval_index([str(path)]).match(SHORT) is not None
    assert eval_index([str(path)], ["question"]).match(SHORT) is None
    assert eval_index([str(path)], ["question", "choices"]).match("the capital of peru is lima").line == 2
    import pyarrow as pa
    import pyarrow.parquet as pq
    table = tmp_path / "mc.parquet"
    pq.write_table(pa.table({"choices": [["Paris", "Rome"], None, ["The capital of Peru is Lima."]]}), table)
    index = eval_index([str(table)])
    assert index.match("the capital of peru is lima").line == 3 and index.identity()["files"][0]["texts"] == 3


# -- the jobs ---------------------------------------------------------------------------------------------------------
def contaminating(respond):
    """`respond`, but a fifth of the completions quote the eval passage inside an answer of their own."""
    def answer(prompt, seed, index):
        rng = random.Random(f"contaminate:{seed}:{index}")
        if rng.random() < 0.2:
            return f"Consider this: {thirteen(rng.randint(0, len(WORDS) - 13))}, so the answer follows."
        return respond(prompt, seed, index)
    return answer


@pytest.fixture
def evals(tmp_path):
    """Two eval files: a JSONL one with the passage, and a text one with a built-in instruction."""
    return [str(write_eval(tmp_path, "jsonl", [PASSAGE], "passages")),
            str(write_eval(tmp_path, "txt", ["what is 7 TIMES 8"], "questions"))]


def test_the_response_job_rejects_contaminated_rows_and_the_manifest_counts_them(gen, make_llm, respond_mixed, out,
                                                                                 read_rows, evals):
    assert gen(*RUN, "--decontaminate", *evals, llm=make_llm(respond=contaminating(respond_mixed))) == 0
    kept, rejects = read_rows(out / "data.jsonl"), read_rows(out / "rejects.jsonl")
    contaminated = [r for r in rejects if r["reason"] == "contaminated"]
    by_file = {path: [r for r in contaminated if eval_source(r["detail"])[0] == path] for path in evals}
    assert len(by_file[evals[0]]) >= 5 and all("the response shares the 13-gram" in r["detail"]
                                               for r in by_file[evals[0]])
    # the built-in "What is 7 times 8?": each completion another filter let through, by the instruction
    assert {r["id"] for r in by_file[evals[1]]} == {"builtin-math-001"} and not any(
        r["id"] == "builtin-math-001" for r in kept)
    assert all(r["detail"].startswith(f"{evals[1]}:2: the instruction equals") for r in by_file[evals[1]])
    index = eval_index(evals)
    assert not any(index.match(r["instruction"]) or index.match(r["response"]) for r in kept)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["contaminated_by_eval_file"] == {path: len(by_file[path]) for path in evals}
    assert manifest["rejected_by_reason"]["contaminated"] == len(contaminated)
    assert manifest["identity"]["decontaminate"] == {"ngram": 13, "fields": [], "files": [
        {"path": evals[0], "sha256": hashlib.sha256(open(evals[0], "rb").read()).hexdigest(), "texts": 4},
        {"path": evals[1], "sha256": hashlib.sha256(open(evals[1], "rb").read()).hexdigest(), "texts": 2}]}


def test_a_run_without_contamination_lists_each_file_with_0_and_without_the_flag_nothing(gen, make_llm, out,
                                                                                        tmp_path, evals):
    assert gen("--limit", 5, "--decontaminate", evals[0], llm=make_llm()) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["contaminated_by_eval_file"] == {evals[0]: 0}
    assert gen("--limit", 5, llm=make_llm(), out=tmp_path / "plain") == 0
    manifest = json.loads((tmp_path / "plain" / "manifest.json").read_text())
    assert "contaminated_by_eval_file" not in manifest and manifest["identity"]["decontaminate"] is None


def test_resume_with_other_eval_files_or_contents_is_refused(gen, make_llm, out, evals, capsys):
    assert gen("--limit", 5, "--decontaminate", evals[0], llm=make_llm()) == 0
    assert gen("--limit", 8, "--resume", "--decontaminate", evals[0], llm=make_llm()) == 0
    capsys.readouterr()
    assert gen("--limit", 8, "--resume", "--decontaminate", *evals, llm=make_llm()) == 2
    assert "holds a different run (decontaminate:" in capsys.readouterr().err
    with open(evals[0], "a") as f:
        f.write(json.dumps({"question": "One more eval question."}) + "\n")
    assert gen("--limit", 8, "--resume", "--decontaminate", evals[0], llm=make_llm()) == 2
    assert "holds a different run (decontaminate:" in capsys.readouterr().err


def test_shards_merged_equal_one_process_byte_for_byte(gen, make_llm, respond_mixed, tmp_path, evals):
    respond = contaminating(respond_mixed)
    one, sharded = tmp_path / "one", tmp_path / "sharded"
    assert gen(*RUN, "--decontaminate", *evals, llm=make_llm(respond=respond), out=one) == 0
    for index in range(3):
        assert gen(*RUN, "--decontaminate", *evals, "--num-shards", 3, "--shard-index", index,
                   llm=make_llm(respond=respond), out=sharded) == 0
    assert gen(*RUN, "--decontaminate", *evals, "--merge", llm=None, out=sharded) == 0
    assert files(sharded) == files(one)
    whole, merged = (json.loads((d / "manifest.json").read_text()) for d in (one, sharded))
    assert merged["contaminated_by_eval_file"] == whole["contaminated_by_eval_file"]
    assert sum(whole["contaminated_by_eval_file"].values()) == whole["rejected_by_reason"]["contaminated"] > 0
    assert merged["identity"]["decontaminate"] == whole["identity"]["decontaminate"]


def test_the_instruction_job_output_is_decontaminated(instr, make_llm, out, read_rows, tmp_path):
    evals = str(write_eval(tmp_path, "txt", ["Write a short poem about the sea at night."]))

    def respond(prompt, seed, index):
        rng = random.Random(f"i:{seed}:{index}")
        if rng.random() < 0.3:
            return "write a short poem about the SEA at night"
        return "Describe " + " ".join(rng.choice(WORDS) for _ in range(8)) + "."
    assert instr("--count", 12, "--decontaminate", evals, llm=make_llm(respond=respond)) == 0
    kept, rejects = read_rows(out / "data.jsonl"), read_rows(out / "rejects.jsonl")
    assert len(kept) == 12 and not any("poem" in r["instruction"] for r in kept)
    contaminated = [r for r in rejects if r["reason"] == "contaminated"]
    assert contaminated and all(r["detail"].startswith(f"{evals}:2: the instruction equals") for r in contaminated)
    assert json.loads((out / "manifest.json").read_text())["contaminated_by_eval_file"] == {evals: len(contaminated)}


def written(name: str, content: str | bytes):
    """A maker of a file `name` holding `content`, in the test's directory."""
    def make(d):
        path = d / name
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
        return [str(path)]
    return make


@pytest.mark.parametrize("make, extra, message", [
    (lambda d: [str(d / "nope.txt")], [], "nope.txt: no such file"),
    (written("eval.csv", "question\nWhat?\n"), [], "unknown kind of eval file (.csv)"),
    (written("empty.txt", "\n\n"), [], "empty.txt: holds no eval text"),
    (written("bad.jsonl", '{"q": "a"}\n{"q": \n'), [], "bad.jsonl:2: not valid JSON"),
    (written("numbers.jsonl", '{"q": "a"}\n{"n": 3}\n'), [], "numbers.jsonl:2: the object has no string field"),
    (lambda d: [str(write_eval(d, "jsonl", [SHORT]))], ["--decontaminate-field", "prompt"],
     "eval.jsonl:1: none of the fields prompt is a string"),
    (lambda d: [str(write_eval(d, "parquet", [SHORT]))], ["--decontaminate-field", "prompt"],
     "has no column prompt (its columns: id, question)"),
    (lambda d: [str(write_eval(d, "parquet", [SHORT]))], ["--decontaminate-field", "id"], "column id is int64"),
    (written("broken.parquet", b"not parquet at all"), [], "broken.parquet: not a readable parquet file"),
    (lambda d: [], ["--decontaminate-field", "question"], "--decontaminate-field names fields"),
])
def test_a_bad_eval_file_is_one_line_and_exit_2(gen, make_llm, tmp_path, capsys, make, extra, message):
    paths = make(tmp_path)
    assert gen("--limit", 2, *(["--decontaminate", *paths] if paths else []), *extra, llm=make_llm()) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err
