"""The instruction job (python -m stage1.instructions) on the fake engine: what it stores, where it stops, its
filters, shards and merge, top-up by --resume, and the response job reading its output."""

from __future__ import annotations

import json
import math
import random

import pytest

from stage1.data import filters as F
from stage1.data.filters import Candidate
from stage1.data.instruction_prompts import attempt_id
from stage1.data.jobs import INSTRUCTIONS
from stage1.data.settings import GenerationConfig

VERBS = "Write Explain Describe List Compare Summarize Translate Classify".split()
NOUNS = ("river stone lantern maple orbit velvet harbor signal meadow copper ember glacier willow cobalt thistle "
         "prairie beacon saffron canyon").split()


def instruction_respond(prompt: str, seed: int, index: int) -> str:
    """A fresh request per (seed, index), and, now and then, one of two stock ones (duplicates for the dedup)."""
    rng = random.Random(f"instr:{seed}:{index}")
    if rng.random() < 0.15:
        return rng.choice(["Write a short poem about the sea at night.", "Explain how a rainbow forms in the sky."])
    return f"{rng.choice(VERBS)} " + " ".join(rng.choice(NOUNS) for _ in range(rng.randint(5, 10))) + "."


def test_stored_prompt_is_what_the_engine_tokenized_and_count_is_kept(instr, make_llm, out, read_rows):
    llm = make_llm(respond=instruction_respond, max_num_seqs=4)
    assert instr("--count", 12, llm=llm) == 0
    kept, rejected = read_rows(out / "data.jsonl"), read_rows(out / "rejects.jsonl")
    assert len(kept) == 12
    rows = sorted(kept + rejected, key=lambda r: r["id"])
    assert [r["id"] for r in rows] == [attempt_id(0, i) for i in range(len(rows))]  # a prefix of the attempts
    sent = set(llm.seen_prompts)
    for row in rows:
        assert row["prompt"] in sent and row["prompt_tokens"] == len(llm.tokenizer.encode(row["prompt"]))
        assert row["prompt"].endswith(f"Kind: {row['type']}\nRequest:")
        # one entry per example, then the new one's start
        assert row["prompt"].count("\nRequest:") == len(row["example_ids"]) + 1 and 4 <= len(row["example_ids"]) <= 6
        assert row["sampling"]["temperature"] == 1.0 and row["sampling"]["top_p"] == 0.95
    assert {r["reason"] for r in rejected} <= {"exact_duplicate", "near_duplicate", "run_on"}  # bytes: 64 tokens
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["goal"]["kept"] == 12 and not manifest["goal"]["cap_reached"]


def test_types_are_drawn_evenly_and_topics_condition_the_prompt(instr, make_llm, out, read_rows, tmp_path):
    topics = tmp_path / "topics.txt"
    topics.write_text("volcanoes\nchess\n\nvolcanoes\n")
    assert instr("--count", 8, "--types", "math,code", "--topics", topics, "--no-near-dedup",
                 llm=make_llm(respond=instruction_respond)) == 0
    rows = sorted(read_rows(out / "data.jsonl") + read_rows(out / "rejects.jsonl"), key=lambda r: r["id"])
    for pair in zip(rows[0::2], rows[1::2]):  # each cycle of 2 attempts holds both types, both topics
        assert {r["type"] for r in pair} == {"math", "code"} and {r["topic"] for r in pair} == {"volcanoes", "chess"}
    assert all(r["prompt"].endswith(f"Topic: {r['topic']}\nRequest:") for r in rows)


def test_attempt_i_draws_its_type_and_topic_from_its_cycles_seeded_order(tmp_path):
    """The definition a run's attempts must keep (a resumed run built by another version must see the same ones):
    attempt i's type is sorted(types, key=derive_seed(seed, "type", cycle, type))[i mod len(types)], its topic
    likewise; each cycle's order is computed once (with 1,000 topics, once per attempt took 12 s for 10,100)."""
    import argparse

    from stage1.data.hashing import derive_seed
    from stage1.data.instruction_prompts import InstructionSpec, attempts
    topics = tmp_path / "topics.txt"
    topics.write_text("\n".join(f"topic {k}" for k in range(7)))
    spec = InstructionSpec.from_args(argparse.Namespace(count=20, n=1, max_attempts=50, examples=None,
                                                        types="math,code,fact", topics=str(topics)))
    made = attempts(spec, 3)
    assert len(made) == 50
    for i, attempt in enumerate(made):
        for what, choices, got in (("type", spec.types, attempt.type), ("topic", spec.topics, attempt.extra["topic"])):
            cycle, place = divmod(i, len(choices))
            assert got == sorted(choices, key=lambda c: derive_seed(3, what, cycle, c))[place]


def test_cap_on_attempts_is_reported(instr, make_llm, out, capsys):
    assert instr("--count", 5, "--max-attempts", 6, llm=make_llm(respond=lambda p, s, i: "Sure, here it is.")) == 0
    assert "stopped at the cap on attempts" in capsys.readouterr().out
    assert json.loads((out / "manifest.json").read_text())["goal"]["cap_reached"]


@pytest.mark.parametrize("argv, message", [
    (["--count", "0"], "--count must be at least 1"),
    (["--types", "math,nope"], "unknown nope"),
    (["--topics", "/no/such/file"], "--topics /no/such/file: no such file"),
    (["--examples", "/no/such/file"], "--examples /no/such/file: no such file"),
    (["--count", "10", "--max-attempts", "5"], "below --count"),
    (["--n", "2"], "--n must be 1"),
])
def test_bad_input_is_one_line_and_exit_2(instr, make_llm, capsys, argv, message):
    assert instr(*argv, llm=make_llm()) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def _row(text, pool=None):
    return Candidate("", text, "stop", pool or {}, key="k", prompt_tokens=10)


POOL = {"ex-math-02": "What is 15% of 80?", "ex-code-01": "Write a Python function that reverses a string."}


@pytest.mark.parametrize("name, bad, good", [
    ("length", "Sort.", "Sort these numbers: 3, 1, 2."),
    ("length", " ".join(["word"] * 121), "Write a haiku about autumn leaves."),
    ("multiple_instructions", "What is a lake?\nWhat is a sea?", "What is the difference between a lake and a sea?"),
    ("multiple_instructions", "1. Write a poem.\n2. Explain gravity.",
     "Put these steps in order:\n1. Boil water.\n2. Add tea."),
    ("answer_not_request", "Sure, here is a poem about the sea.", "Write a poem about the sea."),
    ("answer_not_request", "The answer is 42.", "North America's largest lake: name it."),
    ("scaffolding", "Write a poem.\nKind: creative", "Write a poem about kindness."),
    ("control_token", "Write a poem.<|im_end|>", "Write a poem."),
    ("pool_copy", "What is 15% of 90?", "What is 30% of 250 apples in a basket?"),
    ("pool_copy", "write a python function that reverses a string", "Write a Python function that sorts a list."),
])
def test_each_instruction_filter_rejects_its_case_and_passes_a_good_one(name, bad, good):
    config = GenerationConfig(style="labeled", near_dup_threshold=F.INSTRUCTION_NEAR_DUP_THRESHOLD,
                              copy_threshold=F.POOL_COPY_THRESHOLD)
    (check,) = [f for f in F.build_filters(config, F.RowFilter, filters=INSTRUCTIONS.filters()) if f.name == name]
    verdict = check.check(_row(bad, POOL))
    assert verdict and verdict[0] == name
    assert check.check(_row(good, POOL)) is None


@pytest.mark.parametrize("name, first, bad, good", [
    ("exact_duplicate", "Write a poem about the sea.", "write a poem  about the SEA.", "Write a poem about the moon."),
    ("near_duplicate", "Write a short poem about the sea at night and the stars.",
     "Write a short poem about the sea at night and the moon.", "Explain how tides depend on the moon's orbit."),
])
def test_instruction_dedup_filters(name, first, bad, good):
    config = GenerationConfig(style="labeled", near_dup_threshold=F.INSTRUCTION_NEAR_DUP_THRESHOLD)
    (check,) = [f for f in F.build_filters(config, F.DatasetFilter, filters=INSTRUCTIONS.filters()) if f.name == name]
    check.add(_row(first))
    assert check.check(_row(bad))[0] == name
    assert check.check(_row(good)) is None


def test_resume_with_a_larger_count_tops_up_leaving_the_first_rows(instr, make_llm, tmp_path):
    first, whole = tmp_path / "first", tmp_path / "whole"
    assert instr("--count", 10, "--batch-size", 3, llm=make_llm(respond=instruction_respond), out=first) == 0
    before = (first / "data.jsonl").read_bytes()
    assert instr("--count", 25, "--resume", llm=make_llm(respond=instruction_respond, max_num_seqs=3),
                 out=first) == 0
    after = (first / "data.jsonl").read_bytes()
    assert after.startswith(before) and after.count(b"\n") == 25
    # the same as one uninterrupted run of 25, whatever the batching
    assert instr("--count", 25, llm=make_llm(respond=instruction_respond, max_num_seqs=7), out=whole) == 0
    for name in ("data.jsonl", "rejects.jsonl"):
        assert (first / name).read_bytes() == (whole / name).read_bytes()


def test_a_crash_then_resume_gives_the_uninterrupted_run(instr, make_llm, tmp_path):
    crashed, whole = tmp_path / "crashed", tmp_path / "whole"
    with pytest.raises(RuntimeError):
        instr("--count", 20, "--batch-size", 2, llm=make_llm(respond=instruction_respond, max_num_seqs=2,
                                                             fail_at_step=40), out=crashed)
    assert instr("--count", 20, "--resume", llm=make_llm(respond=instruction_respond), out=crashed) == 0
    assert instr("--count", 20, llm=make_llm(respond=instruction_respond), out=whole) == 0
    for name in ("data.jsonl", "rejects.jsonl"):
        assert (crashed / name).read_bytes() == (whole / name).read_bytes()


def _run_shards(instr, make_llm, out, count, *extra, seqs=4):
    for index in range(2):
        assert instr("--count", count, "--num-shards", 2, "--shard-index", index, *extra,
                     llm=make_llm(respond=instruction_respond, max_num_seqs=seqs), out=out) == 0
    return instr("--count", count, "--merge", *extra, llm=None, out=out)


def test_shards_each_keep_their_share_and_the_merge_dedups_across_them(instr, make_llm, tmp_path, read_rows,
                                                                      capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    assert _run_shards(instr, make_llm, a, 30) == 0
    shard_kept = [len(read_rows(a / f"shards/0000{i}-of-00002/data.jsonl")) for i in range(2)]
    assert shard_kept == [15, 15]
    kept = read_rows(a / "data.jsonl")
    merged_out = capsys.readouterr().out
    # the two stock requests appear in both shards: the merge keeps the first of each, in attempt order
    assert len(kept) < 30 and f"{len(kept)} of --count 30 remain" in merged_out and "--resume --count" in merged_out
    texts = [r["instruction"] for r in kept]
    assert len(set(texts)) == len(texts)
    assert [r["id"] for r in kept] == sorted(r["id"] for r in kept)
    # merged shards are byte for byte the same whatever each shard's batching
    assert _run_shards(instr, make_llm, b, 30, seqs=1) == 0
    for name in ("data.jsonl", "rejects.jsonl"):
        assert (a / name).read_bytes() == (b / name).read_bytes()
    # topping the sharded run up keeps the merged rows there and adds to them
    before = (a / "data.jsonl").read_bytes()
    assert _run_shards(instr, make_llm, a, 40, "--resume") == 0
    assert len(read_rows(a / "data.jsonl")) > len(kept)
    assert set(before.splitlines()) <= set((a / "data.jsonl").read_bytes().splitlines())


def test_when_the_attempts_bound_the_run_shards_merged_are_one_process_byte_for_byte(instr, make_llm, tmp_path):
    """Attempt i is the same request in any process (its id, type, topic and seed derive from (seed, i)), so where
    every attempt is judged both ways, the merge (which dedups across shards in attempt order) writes one process's
    files. Here --max-attempts = --count = 8 and some attempts fail, so one process goes through all 8; the shards'
    attempts (by hash of id: 4 and 4) are each at most their share (4), so each shard goes through all of its own too.
    Where --count binds first, each shard stops at its share, which one process cannot know: the previous test."""
    from stage1.data.hashing import derive_seed
    from stage1.data.shards import shard_of
    assert [shard_of(attempt_id(0, i), 2) for i in range(8)] == [1, 0, 1, 1, 0, 0, 1, 0]
    seed_of = {derive_seed(0, attempt_id(0, i)): i for i in range(8)}

    def respond(prompt, seed, index):
        i = seed_of[seed]
        if i == 5:
            return "Sure, here it is."  # answer_not_request, in shard 0
        # attempt 2 (shard 1) repeats attempt 1 (shard 0): only the merge sees both
        return instruction_respond(prompt, derive_seed(0, attempt_id(0, 1 if i == 2 else i)), index)

    one, sharded = tmp_path / "one", tmp_path / "sharded"
    assert instr("--count", 8, "--max-attempts", 8, "--max-tokens", 256, llm=make_llm(respond=respond), out=one) == 0
    for index in range(2):
        assert instr("--count", 8, "--max-attempts", 8, "--max-tokens", 256, "--num-shards", 2, "--shard-index", index,
                     llm=make_llm(respond=respond, max_num_seqs=3), out=sharded) == 0
    assert instr("--count", 8, "--max-attempts", 8, "--max-tokens", 256, "--merge", llm=None, out=sharded) == 0
    rejects = [json.loads(line) for line in (one / "rejects.jsonl").read_bytes().splitlines()]
    assert sorted((r["id"], r["reason"]) for r in rejects) == [(attempt_id(0, 2), "exact_duplicate"),
                                                             (attempt_id(0, 5), "answer_not_request")]
    for name in ("data.jsonl", "rejects.jsonl"):
        assert (one / name).read_bytes() == (sharded / name).read_bytes()


def test_the_response_job_reads_the_instruction_run(instr, gen, make_llm, tmp_path, read_rows):
    instructions = tmp_path / "instr"
    assert instr("--count", 6, llm=make_llm(respond=instruction_respond), out=instructions) == 0
    responses = tmp_path / "resp"
    assert gen("--instructions", instructions / "data.jsonl", llm=make_llm(), out=responses) == 0
    made = read_rows(instructions / "data.jsonl")
    answered = read_rows(responses / "data.jsonl") + read_rows(responses / "rejects.jsonl")
    assert sorted((r["id"], r["instruction"], r["type"], r["topic"]) for r in answered) == sorted(
        (r["id"], r["instruction"], r["type"], r["topic"]) for r in made)
    manifest = json.loads((responses / "manifest.json").read_text())
    assert manifest["instructions_from"]["manifest"] == str(instructions / "manifest.json")
    assert manifest["instructions_from"]["identity"]["job"] == "instructions"


def _always_kept(prompt: str, seed: int, index: int) -> str:
    rng = random.Random(f"kept:{seed}:{index}")
    return f"{rng.choice(VERBS)} item {seed % 100000} " + " ".join(rng.sample(NOUNS, 6)) + "."


@pytest.mark.parametrize("respond", [_always_kept, instruction_respond])
def test_only_about_what_is_still_needed_enters_the_engine_and_the_rows_do_not_change(
        instr, make_llm, tmp_path, read_rows, monkeypatch, respond):
    from stage1.data import pipeline, stream
    capped, uncapped = tmp_path / "capped", tmp_path / "uncapped"
    llm = make_llm(respond=respond)  # 256 slots: the cap on attempts (150) would all enter at once
    assert instr("--count", 10, llm=llm, out=capped) == 0
    if respond is _always_kept:
        assert not read_rows(capped / "rejects.jsonl") and len(read_rows(capped / "data.jsonl")) == 10
        # the prior's estimate for 10 missing rows, plus the margin
        assert len(llm.seen_prompts) <= math.ceil(10 / stream.PRIOR_KEPT_RATE) + stream.GOAL_MARGIN
    monkeypatch.setattr(pipeline, "attempts_ahead", lambda missing, judged, kept: 10**6)
    llm_all = make_llm(respond=respond)
    assert instr("--count", 10, llm=llm_all, out=uncapped) == 0
    assert len(llm_all.seen_prompts) == 150  # as before: every allowed attempt entered
    for name in ("data.jsonl", "rejects.jsonl"):
        assert (capped / name).read_bytes() == (uncapped / name).read_bytes()


def test_attempts_ahead_follows_the_kept_rate_with_a_floor():
    from stage1.data.stream import GOAL_MARGIN, attempts_ahead
    assert attempts_ahead(0, 50, 50) == 0
    assert attempts_ahead(10, 0, 0) == math.ceil(10 / 0.8) + GOAL_MARGIN  # the prior
    assert attempts_ahead(10, 96, 96) == 11 + GOAL_MARGIN  # everything kept: about the missing ones (the prior's 0.8 fades)
    assert attempts_ahead(10, 96, 0) == 40 + GOAL_MARGIN  # nothing kept: floored at a quarter


def test_the_summary_says_the_goal_held_attempts_back(instr, make_llm, capsys):
    assert instr("--count", 10, llm=make_llm(respond=_always_kept)) == 0
    assert "while the keep goal held back the attempts not yet needed" in capsys.readouterr().out
