"""The rows' quality signals (mean and minimum token logprob under the raw distribution, with the token count) and
best-of-n (`--select best-logprob`): against hand-computed cases, shard-safe and resumable; and on the tiny real
checkpoint, the stored mean logprob recomputed from the model's own logits."""

from __future__ import annotations

import math

import pytest

from dataset_files import FILES, RUN, files, rows
from stage1.data import filters as F
from stage1.data.rows import logprob_signals
from stage1.engine.outputs import CompletionOutput, Logprob

SELECT = ("--select", "best-logprob")


def completion(logprobs: list[float], index: int = 0) -> CompletionOutput:
    ids = list(range(10, 10 + len(logprobs)))
    return CompletionOutput(index, "text", ids, "stop", None, [{t: Logprob(lp, 1)} for t, lp in zip(ids, logprobs)])


def test_the_signals_of_a_hand_made_completion():
    assert logprob_signals(completion([-0.5, -1.0, -0.25])) == (-1.75 / 3, -1.0)
    # only the chosen token's entry counts, whatever else the engine reported beside it
    comp = completion([-0.5, -2.0])
    comp.logprobs[0][99] = Logprob(-0.01, 1)
    assert logprob_signals(comp) == (-1.25, -2.0)
    assert logprob_signals(None) == (None, None)  # never generated from
    assert logprob_signals(CompletionOutput(0, "", [], "stop")) == (None, None)  # no logprobs asked for


def by_position(seed, index, position):
    """Token i of completion k has logprob -(i + 1) / 10 - k: completion 0 is the most likely of every instruction."""
    return -(position + 1) / 10 - index


def test_every_row_holds_the_signals_of_its_tokens(gen, make_llm, out):
    llm = make_llm(logprob=by_position)
    assert gen("--limit", 4, "--n", 2, llm=llm) == 0
    assert [sp.logprobs for sp in llm.seen_params] == [0] * 4  # every request asks for the chosen token's logprob
    kept = rows(out / "data.jsonl")
    assert len(kept) == 8
    for row in kept:
        n, k = row["response_tokens"], row["index"]
        assert n == len(row["raw_response"].encode())  # the fake's tokens are bytes
        assert row["mean_logprob"] == pytest.approx(-(n + 1) / 20 - k, abs=1e-12)
        assert row["min_logprob"] == pytest.approx(-n / 10 - k, abs=1e-12)
        assert list(row)[list(row).index("response_tokens"):][:3] == ["response_tokens", "mean_logprob", "min_logprob"]


def test_the_instruction_jobs_rows_hold_them_too(instr, make_llm, out):
    llm = make_llm(respond=lambda prompt, seed, index: "Write a short poem about the sea at night.",
                   logprob=by_position)
    assert instr("--count", 1, llm=llm) == 0
    [row] = rows(out / "data.jsonl")
    n = row["instruction_tokens"]
    assert row["mean_logprob"] == pytest.approx(-(n + 1) / 20) and row["min_logprob"] == pytest.approx(-n / 10)


# -- the selection --------------------------------------------------------------------------------------------------
def test_the_choice_is_the_highest_mean_then_the_lowest_index():
    assert F.best_logprob_choice([(0, -1.0), (1, -0.5), (2, -0.7)]) == 1
    assert F.best_logprob_choice([(0, -1.0), (2, -0.5), (3, -0.5)]) == 2  # a tie: the lower index
    assert F.best_logprob_choice([(3, -0.5), (2, -0.5)]) == 2  # whatever order they come in
    assert F.best_logprob_choice([(0, None), (1, -9.0)]) == 1  # no logprob ranks last
    assert F.best_logprob_choice([(1, None), (2, None)]) == 1


def candidate(index, mean):
    return F.Candidate("q", f"answer {index}", "stop", {}, f"a#{index}", 5, index, mean)


def test_the_selection_names_the_winner_in_each_others_detail():
    best = F.BestLogprob(enabled=True)
    assert best.select([candidate(0, -0.977), candidate(1, -0.412), candidate(3, -0.412)]) == [
        ("not_selected", "index 1 selected (mean logprob -0.412 > -0.977)"),
        None,
        ("not_selected", "index 1 selected (mean logprob -0.412 = -0.412)")]
    assert best.select([candidate(2, -0.5)]) == [None] and best.select([]) == []
    assert F.BestLogprob(enabled=False).select([candidate(0, -2.0), candidate(1, -0.1)]) == [None, None]


def test_the_selection_runs_between_the_row_and_the_dataset_filters():
    kinds = [f for f in F.FILTERS if issubclass(f, F.Selection)]
    assert kinds == [F.BestLogprob]
    at = F.FILTERS.index(F.BestLogprob)
    assert all(issubclass(f, (F.PromptFilter, F.RowFilter)) for f in F.FILTERS[:at])
    assert not any(issubclass(f, (F.PromptFilter, F.RowFilter)) for f in F.FILTERS[at + 1:])
    assert issubclass(F.FILTERS[-1], F.DatasetFilter)
    assert "not_selected" in F.reject_reasons()


def by_index(seed, index, position):
    return {0: -1.0, 1: -0.5, 2: -2.0}[index] - position / 1000


def test_best_of_n_keeps_one_completion_per_instruction(gen, make_llm, out):
    """Completion 1 is the most likely (by_index), but empty for every third instruction: there 0 wins."""
    llm = make_llm(logprob=by_index)
    answer = llm.respond
    llm.respond = lambda prompt, seed, index: "" if index == 1 and seed % 3 == 0 else answer(prompt, seed, index)
    assert gen("--limit", 12, "--n", 3, *SELECT, llm=llm) == 0
    kept, rejected = rows(out / "data.jsonl"), rows(out / "rejects.jsonl")
    assert len(kept) == 12 and len({row["id"] for row in kept}) == 12
    for row in kept:
        assert row["index"] == (0 if row["seed"] % 3 == 0 else 1)
    winner = {row["id"]: row["index"] for row in kept}
    assert [r["reason"] for r in rejected].count("empty") == sum(row["seed"] % 3 == 0 for row in kept)
    not_selected = [r for r in rejected if r["reason"] == "not_selected"]
    assert len(not_selected) == 24 - sum(r["reason"] == "empty" for r in rejected)
    for r in not_selected:
        assert r["detail"].startswith(f"index {winner[r['id']]} selected (mean logprob ")
    # rows come in input order, each instruction's by index
    order = {row["id"]: p for p, row in enumerate(kept)}
    assert [(order[r["id"]], r["index"]) for r in rejected] == sorted((order[r["id"]], r["index"]) for r in rejected)


def test_select_all_keeps_what_it_kept_before(gen, make_llm, out, tmp_path):
    assert gen(*RUN, llm=make_llm()) == 0
    assert gen(*RUN, "--select", "all", llm=make_llm(), out=tmp_path / "all") == 0
    assert files(out) == files(tmp_path / "all")
    assert not [r for r in rows(out / "rejects.jsonl") if r["reason"] == "not_selected"]


def test_the_selection_comes_before_the_dedup(gen, make_llm, out):
    """Every completion of every instruction the same text: the selection keeps one per instruction, then the
    near-duplicate filter rejects every instruction's winner but the first."""
    same = "The same answer to every question, word for word."
    assert gen("--limit", 3, "--n", 2, *SELECT, llm=make_llm(respond=lambda p, s, i: same, logprob=by_index)) == 0
    kept, rejected = rows(out / "data.jsonl"), rows(out / "rejects.jsonl")
    assert [(r["index"]) for r in kept] == [1]
    assert sorted((r["index"], r["reason"]) for r in rejected) == [
        (0, "not_selected"), (0, "not_selected"), (0, "not_selected"), (1, "near_duplicate"), (1, "near_duplicate")]


def test_shards_merged_equal_one_process(gen, make_llm, respond_mixed, out, tmp_path):
    whole = tmp_path / "whole"
    assert gen(*RUN, *SELECT, llm=make_llm(respond=respond_mixed), out=whole) == 0
    reasons = {r["reason"] for r in rows(whole / "rejects.jsonl")}
    assert {"not_selected", "near_duplicate"} <= reasons  # the merge has dedup work to do
    for index in range(3):
        assert gen(*RUN, *SELECT, "--num-shards", 3, "--shard-index", index, llm=make_llm(respond=respond_mixed)) == 0
    assert gen(*RUN, *SELECT, "--merge", llm=None) == 0
    assert files(out) == files(whole)


def test_a_crash_then_resume_equals_the_uninterrupted_run(gen, make_llm, respond_mixed, out, tmp_path):
    whole = tmp_path / "whole"
    assert gen(*RUN, *SELECT, llm=make_llm(respond=respond_mixed), out=whole) == 0
    with pytest.raises(RuntimeError, match="injected crash"):
        gen(*RUN, *SELECT, llm=make_llm(respond=respond_mixed, max_num_seqs=16, fail_at_step=300))
    assert 0 < sum(len(rows(out / name)) for name in FILES) < sum(len(rows(whole / name)) for name in FILES)
    assert gen(*RUN, *SELECT, "--resume", llm=make_llm(respond=respond_mixed)) == 0
    assert files(out) == files(whole)


@pytest.mark.parametrize("lost", ["kept", "not_selected"])
def test_an_instruction_half_written_resumes_to_the_same_choice(gen, make_llm, out, tmp_path, lost):
    """A kill between the appends to data.jsonl and rejects.jsonl leaves one instruction's rows in one file only: the
    resumed run regenerates its missing rows and chooses among all its completions again, as the first run did."""
    whole = tmp_path / "whole"
    assert gen("--limit", 4, "--n", 2, *SELECT, llm=make_llm(logprob=by_index), out=whole) == 0
    assert gen("--limit", 4, "--n", 2, *SELECT, llm=make_llm(logprob=by_index)) == 0
    last_id = rows(out / "data.jsonl")[-1]["id"]
    name = "data.jsonl" if lost == "kept" else "rejects.jsonl"
    lines = (out / name).read_bytes().splitlines(keepends=True)
    (out / name).write_bytes(b"".join(line for line in lines if f'"id": "{last_id}"'.encode() not in line))
    assert gen("--limit", 4, "--n", 2, *SELECT, "--resume", llm=make_llm(logprob=by_index)) == 0
    assert files(out) == files(whole)


def test_resume_with_another_select_is_refused(gen, make_llm, out, capsys):
    assert gen("--limit", 2, "--n", 2, llm=make_llm()) == 0
    assert gen("--limit", 2, "--n", 2, *SELECT, "--resume", llm=make_llm()) == 2
    assert "select: 'all' there, 'best-logprob' now" in capsys.readouterr().err


def test_the_instruction_job_offers_no_select(instr, make_llm, capsys):
    with pytest.raises(SystemExit) as e:
        instr("--count", 1, *SELECT, llm=make_llm())
    assert e.value.code == 2 and "unrecognized arguments: --select" in capsys.readouterr().err


# -- on the tiny real checkpoint ------------------------------------------------------------------------------------
def test_the_mean_logprob_is_the_models_own(tiny_model_dir, tmp_path):
    """Greedy, so the tokens are known without the engine: a plain forward pass of transformers over the prompt and
    the greedy continuation gives each token's raw logprob; the row's mean and min are theirs."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from stage1.engine.tokenizer import Tokenizer
    from stage1.generate import main

    out = tmp_path / "run"
    assert main(["--model", str(tiny_model_dir), "--out", str(out), "--limit", "2", "--max-tokens", "8",
                 "--temperature", "0", "--allow-run-on", "--dtype", "float32", "--no-progress"]) == 0
    row = next(r for name in FILES for r in rows(out / name) if r["index"] == 0)
    ids = Tokenizer(tiny_model_dir).encode(row["prompt"])
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_model_dir, torch_dtype=torch.float32).eval()
    chosen = []
    with torch.no_grad():
        for _ in range(row["response_tokens"]):
            logprobs = model(torch.tensor([ids])).logits[0, -1].double().log_softmax(-1)
            token = int(logprobs.argmax())
            chosen.append(float(logprobs[token]))
            ids.append(token)
    assert row["mean_logprob"] == pytest.approx(math.fsum(chosen) / len(chosen), abs=1e-4)
    assert row["min_logprob"] == pytest.approx(min(chosen), abs=1e-4)
