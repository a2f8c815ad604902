"""The judge (--judge, stage1/data/judge.py): the same model rates each completion the selection kept, from the next
token's distribution over the rating digits; --min-judge-score rejects below it (low_judge_score). The ratings are
follow-up requests of their generation's job in the streaming loop (stream.py), so a sharded, a resumed and a plain
run write the same files."""

from __future__ import annotations

import json
import math
import re

import pytest

from stage1.data.errors import DataError
from stage1.data.hashing import sha256_text
from stage1.data.judge import (DEFAULT_JUDGE_STYLE, JUDGE_STYLES_FILE, Judge, expected_score, judge_styles_fingerprint,
                               load_judge_styles)
from stage1.data.prompts import _read_package_text
from stage1.data.stream import FollowUp, Job, RequestStream
from stage1.engine.outputs import Logprob
from stage1.engine.params import SamplingParams

from fake_engine import FakeTokenizer, default_rate, rated_response
from dataset_files import FILES, RUN, files, rows

STYLE = load_judge_styles()[DEFAULT_JUDGE_STYLE]


def hand_score(top: dict[str, float]) -> float | None:
    """The expected score of a next-token distribution given by token text, computed by hand."""
    digits = {int(t): math.exp(lp) for t, lp in top.items() if t in "12345" and len(t) == 1}
    return round(sum(d * p for d, p in digits.items()) / sum(digits.values()), 4) if digits else None


# -- the score ----------------------------------------------------------------------------------------------------------
def test_the_score_is_the_mean_digit_under_the_next_token_distribution():
    """p(1) = .1, p(2) = .2, p(5) = .3 among the top tokens (3 and 4 outside them count as 0, a space takes .4):
    (1 * .1 + 2 * .2 + 5 * .3) / .6 = 2 / .6."""
    digit_ids = {d: 48 + d for d in range(1, 6)}
    top = {49: Logprob(math.log(.1), 4), 50: Logprob(math.log(.2), 3), 53: Logprob(math.log(.3), 2),
           32: Logprob(math.log(.4), 1)}
    assert expected_score(top, digit_ids) == round(2 / .6, 4) == 3.3333
    assert expected_score({53: Logprob(0.0, 1)}, digit_ids) == 5.0
    assert expected_score({32: Logprob(-0.1, 1), 10: Logprob(-2.5, 2)}, digit_ids) is None  # no digit: no score


def test_the_rating_prompt_is_the_examples_then_the_pair_and_the_label():
    text = STYLE.render("What is 2+2?", "4")
    assert text.startswith(STYLE.header + "\n\n")
    assert text.endswith("\n\nInstruction: What is 2+2?\nResponse: 4\nRating: ")
    assert text.count("\nRating: ") == len(STYLE.examples) + 1
    scores = [int(s) for s in re.findall(r"\nRating: (\d)\n", text)]
    assert scores == [ex.score for ex in STYLE.examples] and {1, 5} <= set(scores)  # good and bad examples
    assert judge_styles_fingerprint() == sha256_text(_read_package_text(JUDGE_STYLES_FILE))


def test_a_tokenizer_that_merges_a_space_and_a_digit_is_refused(tiny_model_dir):
    """The tiny checkpoint's BPE writes 'Rating: 2' as 'Rating' ':' ' 2' (but ' 1' as ' ' '1'): after 'Rating: ' the
    digit 2 is not the next token, so its probability can't be read; the judge refuses before anything is sent."""
    from stage1.engine.tokenizer import Tokenizer

    with pytest.raises(DataError, match="the digit 2 after the label 'Rating: ' is not one token of its own"):
        Judge(DEFAULT_JUDGE_STYLE, Tokenizer(tiny_model_dir))


class SpaceDigitTokenizer(FakeTokenizer):
    """A tokenizer that writes ' 5' as one token (as GPT-2's does): after 'Rating: ' a digit is not the next token."""

    def encode(self, text):
        return [1000 + int(t[1]) if len(t) == 2 else ord(t) for t in re.findall(r" \d|.", text, re.DOTALL)]


def test_a_label_whose_digits_are_not_the_next_token_is_refused():
    with pytest.raises(DataError, match="the digit 1 after the label 'Rating: ' is not one token of its own"):
        Judge(DEFAULT_JUDGE_STYLE, SpaceDigitTokenizer())


# -- the stream's follow-ups ----------------------------------------------------------------------------------------
def rating_jobs(count, with_follow_ups=lambda i: 2):
    """Job i asks, once its output is back, for with_follow_ups(i) follow-ups keyed 'r0', 'r1', ..."""
    params = SamplingParams(max_tokens=256, stop=["\n\n"], seed=0)

    def then(i):
        return lambda out: [FollowUp(f"r{k}", f"Rate follow-up {k} of topic {i}.\n", params)
                            for k in range(with_follow_ups(i))]
    for i in range(count):
        yield Job(i, f"Write a sentence about topic {i}.\n", params, then=then(i))


def test_follow_ups_are_released_with_their_job_in_input_order(make_llm, respond_mixed):
    """Each job waits for its follow-ups (sent only once its own output is back), and is released in its place with
    their outputs by key; done counts a job once all of it is back."""
    llm = make_llm(respond=respond_mixed, max_num_seqs=8)
    stream = RequestStream(llm)
    released = [item for step in stream.run(rating_jobs(40, lambda i: i % 3), 40) for item in step]
    assert [job.item for job, _, _ in released] == list(range(40))
    for job, out, follow_ups in released:
        assert out.prompt == f"Write a sentence about topic {job.item}.\n"
        assert {k: o.prompt for k, o in follow_ups.items()} == {
            f"r{k}": f"Rate follow-up {k} of topic {job.item}.\n" for k in range(job.item % 3)}
        own = llm.seen_prompts.index(out.prompt)
        assert all(llm.seen_prompts.index(o.prompt) > own for o in follow_ups.values())  # sent after it came back
    assert stream.done == 40 and len(llm.seen_prompts) == 40 + sum(i % 3 for i in range(40))
    assert not llm.has_unfinished_requests()


def test_closing_the_stream_aborts_the_follow_ups_in_flight(make_llm):
    llm = make_llm(max_num_seqs=4)
    stream = RequestStream(llm)
    steps = stream.run(rating_jobs(20), 20)
    while not any(p.startswith("Rate") for p in llm.seen_prompts):
        next(steps)
    in_flight = [rid for rid, (_, key) in stream._sent.items() if isinstance(key, str)]
    assert in_flight  # a follow-up was sent and is not back
    steps.close()
    assert not llm.has_unfinished_requests() and not llm._requests


def test_follow_ups_with_the_same_key_are_refused(make_llm):
    llm = make_llm(max_num_seqs=2)
    params = SamplingParams(max_tokens=8, seed=0)
    twice = Job(0, "Say hi.\n", params, then=lambda out: [FollowUp(0, "a\n", params), FollowUp(0, "b\n", params)])
    with pytest.raises(ValueError, match="the same key"):
        for _ in RequestStream(llm).run([twice], 1):
            pass
    assert not llm.has_unfinished_requests()


# -- the judge in a run ---------------------------------------------------------------------------------------------
def rating_requests(llm):
    return [(p, sp) for p, sp in zip(llm.seen_prompts, llm.seen_params) if rated_response(p) is not None]


def test_each_kept_row_carries_its_score_and_the_hash_of_the_rating_prompt_the_engine_got(gen, make_llm,
                                                                                          respond_mixed, out):
    llm = make_llm(respond=respond_mixed)
    assert gen(*RUN, "--judge", llm=llm) == 0
    kept, rejected = rows(out / "data.jsonl"), rows(out / "rejects.jsonl")
    sent = {sha256_text(p): p for p, _ in rating_requests(llm)}
    assert all(sp.max_tokens == 1 and sp.temperature == 0 and sp.logprobs == 20 for _, sp in rating_requests(llm))
    for row in kept:
        prompt = sent[row["judge_prompt_sha256"]]  # the exact string the engine tokenized
        assert prompt == STYLE.render(row["instruction"], row["response"])
        assert row["judge_score"] == hand_score(default_rate(prompt))
    # the rows the filters rejected before the judge were never rated; the dedup's were, and keep their score
    dedup = ("exact_duplicate", "near_duplicate")
    before = [r for r in rejected if r["reason"] not in dedup]
    assert before and all(r["judge_score"] is None and r["judge_prompt_sha256"] is None for r in before)
    dups = [r for r in rejected if r["reason"] in dedup]
    assert dups and all(r["judge_prompt_sha256"] in sent for r in dups)
    assert len(rating_requests(llm)) == len(kept) + len(dups)  # one rating each, nothing else rated
    assert list(kept[0])[-2:] == ["judge_score", "judge_prompt_sha256"]

    manifest = json.loads((out / "manifest.json").read_text())
    judge = manifest["judge"]
    assert (judge["style"], judge["styles_sha256"], judge["top_logprobs"]) == (
        DEFAULT_JUDGE_STYLE, judge_styles_fingerprint(), 20)
    tokens = sum(len(p.encode()) for p, _ in rating_requests(llm))  # the fake's tokens are bytes
    requests = len(rating_requests(llm))
    assert judge["cost"] == {"requests": requests, "prompt_tokens": tokens, "prompt_tokens_cached": 0}
    [session] = manifest["sessions"]
    assert (session["judge_requests"], session["judge_prompt_tokens"]) == (requests, tokens)
    assert manifest["judged"] == {"rated": requests, "no_score": 0}
    assert manifest["identity"]["judge"] and manifest["identity"]["judge_styles_sha256"] == judge_styles_fingerprint()


def test_min_judge_score_rejects_the_rows_below_it_before_the_dedup(gen, make_llm, respond_mixed, tmp_path):
    judged, filtered = tmp_path / "judged", tmp_path / "filtered"
    assert gen(*RUN, "--judge", llm=make_llm(respond=respond_mixed), out=judged) == 0
    assert gen(*RUN, "--min-judge-score", 3, llm=make_llm(respond=respond_mixed), out=filtered) == 0
    low = [r for r in rows(filtered / "rejects.jsonl") if r["reason"] == "low_judge_score"]
    assert low and all(r["judge_score"] < 3 and r["detail"] == f"judge score {r['judge_score']} < 3.0" for r in low)
    kept = rows(filtered / "data.jsonl")
    assert kept and all(r["judge_score"] >= 3 for r in kept)
    # the same rows as the plain --judge run's kept ones scoring 3 or more; those below are rejected before the dedup
    # sees them, so a near-duplicate of a low-scored row may now be kept in its place
    plain = rows(judged / "data.jsonl")
    assert [r for r in plain if r["judge_score"] >= 3] == [r for r in kept if r in plain]
    assert json.loads((filtered / "manifest.json").read_text())["judge"]["min_score"] == 3.0


def test_a_rating_without_a_digit_among_the_top_tokens_has_no_score_and_fails_a_minimum(gen, make_llm, out):
    """The engine's top 20 holds no digit: no score (counted in the manifest), and --min-judge-score rejects it."""
    def rate(prompt):
        response = rated_response(prompt)
        if response is None:
            return None
        return {" ": -0.1, "\n": -2.5} if "glacier" in response else {"1": math.log(.5), "5": math.log(.5), "\n": -5}

    assert gen("--limit", 20, "--min-judge-score", 2, llm=make_llm(rate=rate)) == 0
    kept, rejected = rows(out / "data.jsonl"), rows(out / "rejects.jsonl")
    assert kept and all(r["judge_score"] == 3.0 and "glacier" not in r["response"] for r in kept)
    assert rejected and all(r["reason"] == "low_judge_score" and r["judge_score"] is None and r["judge_prompt_sha256"]
                            and r["detail"].startswith("no judge score") for r in rejected)
    assert json.loads((out / "manifest.json").read_text())["judged"] == {"rated": 20, "no_score": len(rejected)}


def test_best_of_n_rates_only_the_selected_completion(gen, make_llm, respond_mixed, out):
    llm = make_llm(respond=respond_mixed)
    assert gen("--limit", 30, "--n", 3, "--select", "best-logprob", "--judge", llm=llm) == 0
    kept, rejected = rows(out / "data.jsonl"), rows(out / "rejects.jsonl")
    not_selected = [r for r in rejected if r["reason"] == "not_selected"]
    assert not_selected and all(r["judge_prompt_sha256"] is None for r in not_selected)
    rated = [r for r in kept + rejected if r["judge_prompt_sha256"] is not None]
    assert len(rated) == len({r["id"] for r in rated}) == len(rating_requests(llm))  # one per instruction at most
    assert {r["id"] for r in kept} <= {r["id"] for r in rated}


def test_a_rating_prompt_the_context_cannot_hold_is_not_sent(gen, make_llm, out):
    """max_model_len 1600 holds every generation prompt and 16 new tokens, but no rating prompt (~2,000 tokens): the
    rows are kept, unrated."""
    llm = make_llm(max_model_len=1600)
    assert gen("--limit", 6, "--max-tokens", 16, "--allow-run-on", "--judge", llm=llm) == 0
    kept = rows(out / "data.jsonl")
    assert len(kept) == 6 and all(r["judge_score"] is None and r["judge_prompt_sha256"] is None for r in kept)
    assert not rating_requests(llm)


def test_a_rating_whose_prompt_the_engine_tokenized_otherwise_stops_the_run(gen, make_llm, out, capsys):
    llm = make_llm()
    real_step = llm.step

    def step():
        outs = real_step()
        for o in outs:
            if rated_response(o.prompt) is not None:
                o.prompt_token_ids = o.prompt_token_ids[:-1]
        return outs

    llm.step = step
    assert gen("--limit", 4, "--judge", llm=llm) == 1
    assert "re-tokenizes" in capsys.readouterr().err
    assert rows(out / "data.jsonl") == []


@pytest.mark.parametrize("flags, message", [
    (("--min-judge-score", 6), "--min-judge-score must be in [1, 5]"),
    (("--min-judge-score", 0.5), "--min-judge-score must be in [1, 5]"),
])
def test_a_minimum_outside_the_scale_is_refused(gen, make_llm, capsys, flags, message):
    assert gen("--limit", 2, *flags, llm=make_llm()) == 2
    assert message in capsys.readouterr().err


# -- shards, crash and resume ---------------------------------------------------------------------------------------
JUDGED = (*RUN, "--min-judge-score", 3)


def test_shards_merged_equal_one_process_byte_for_byte(gen, make_llm, respond_mixed, out, tmp_path):
    one = tmp_path / "one"
    assert gen(*JUDGED, llm=make_llm(respond=respond_mixed), out=one) == 0
    assert {"low_judge_score", "near_duplicate"} <= {r["reason"] for r in rows(one / "rejects.jsonl")}
    for index in range(3):
        assert gen(*JUDGED, "--num-shards", 3, "--shard-index", index, llm=make_llm(respond=respond_mixed)) == 0
    assert gen(*JUDGED, "--merge", llm=None) == 0
    assert files(out) == files(one)
    merged, single = (json.loads((d / "manifest.json").read_text()) for d in (out, one))
    assert merged["judge"] == single["judge"]  # the cost summed over the shards
    assert [s["judge"]["requests"] for s in merged["merged_shards"]] and merged["judged"] == single["judged"]


def test_crash_then_resume_equals_the_uninterrupted_run(gen, make_llm, respond_mixed, tmp_path):
    full, crashed = tmp_path / "full", tmp_path / "crashed"
    argv = ("--limit", 40, "--n", 2, "--batch-size", 6, "--max-num-seqs", 16, "--min-judge-score", 3)
    assert gen(*argv, llm=make_llm(respond=respond_mixed), out=full) == 0
    with pytest.raises(RuntimeError, match="injected crash"):
        gen(*argv, llm=make_llm(respond=respond_mixed, max_num_seqs=16, fail_at_step=450), out=crashed)
    assert 0 < len(files(crashed)["data.jsonl"]) < len(files(full)["data.jsonl"])

    def rated(out):
        return sum(r["judge_prompt_sha256"] is not None for name in FILES for r in rows(out / name))
    rated_before = rated(crashed)
    resumed = make_llm(respond=respond_mixed)
    assert gen(*argv, "--resume", llm=resumed, out=crashed) == 0
    assert files(crashed) == files(full)
    assert len(rating_requests(resumed)) == rated(full) - rated_before > 0  # what is on disk is not rated again


def test_a_judged_run_resumes_only_with_the_same_judge(gen, make_llm, out, capsys):
    assert gen("--limit", 4, "--judge", llm=make_llm()) == 0
    assert gen("--limit", 4, "--min-judge-score", 2, "--resume", llm=make_llm()) == 2
    assert "min_judge_score: None there, 2.0 now" in capsys.readouterr().err


# -- the real engine ------------------------------------------------------------------------------------------------
def test_the_real_engine_rates_with_its_top_logprobs_and_its_prefix_cache(checkpoint, tmp_path, monkeypatch):
    """The tiny checkpoint (random weights) through stage1.LLM: each rating is one greedy token with the top 20
    logprobs, its prompt verified like the generation's, and the examples every rating prompt shares come from the
    prefix cache. Its tokenizer merges ' 2', so the label here ends in '[' (the digit follows it alone); its context
    is 4096 tokens, to hold the rating prompt."""
    import dataclasses

    from stage1.data import judge as judge_module
    from stage1.generate import main

    bracket = dataclasses.replace(STYLE, example=STYLE.example.replace("{score}", "[{score}"))
    monkeypatch.setattr(judge_module, "load_judge_styles", lambda: {DEFAULT_JUDGE_STYLE: bracket})
    out = tmp_path / "out"
    model_dir = checkpoint("gqa2-d128-untied", max_position_embeddings=4096)
    assert main(["--model", str(model_dir), "--out", str(out), "--limit", "4", "--max-tokens", "8",
                 "--allow-run-on", "--dtype", "float32", "--judge", "--no-progress"]) == 0
    kept = rows(out / "data.jsonl")
    assert len(kept) == 4
    for row in kept:
        assert row["judge_prompt_sha256"] == sha256_text(bracket.render(row["instruction"], row["response"]))
        assert row["judge_score"] is None or 1 <= row["judge_score"] <= 5
    cost = json.loads((out / "manifest.json").read_text())["judge"]["cost"]
    assert cost["requests"] == 4 and 0 < cost["prompt_tokens_cached"] < cost["prompt_tokens"]
