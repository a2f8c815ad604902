"""The streaming loop (stage1/data/stream.py) against the fake engine, which schedules like the real one and finishes
requests out of order: the engine stays full while instructions remain, outputs come back in input order, the
reorder window bounds what is held, and the tail is reported: low occupancy counts only while more instructions waited
than slots were free, not at the end of the input."""

from __future__ import annotations

import dataclasses
import json

import pytest

from stage1.data.stream import Job, ReorderBuffer, RequestStream
from stage1.engine.params import SamplingParams


def instructions_file(tmp_path, count):
    path = tmp_path / "many.txt"
    path.write_text("".join(f"Describe item number {i} of the catalogue in one sentence.\n" for i in range(count)))
    return path


@pytest.mark.parametrize("max_num_seqs, n", [(16, 1), (16, 2), (64, 1)])
def test_no_decode_step_below_half_occupancy_while_instructions_remain(gen, make_llm, respond_mixed, tmp_path, out,
                                                                       max_num_seqs, n):
    """400 instructions through 16 or 64 slots, completions of 1 to 256 tokens (8% run-ons hold a slot 256 steps):
    every decode step runs max_num_seqs sequences (so none below half) until the last instruction has entered."""
    total = 400
    llm = make_llm(respond=respond_mixed, max_num_seqs=max_num_seqs)
    assert gen("--instructions", instructions_file(tmp_path, total), "--n", n, "--max-num-seqs", max_num_seqs,
               llm=llm) == 0
    feeding = [seqs for seqs, added in llm.decode_log if added < total]
    tail = [seqs for seqs, added in llm.decode_log if added == total]
    assert len(feeding) > 500 and min(feeding) == max_num_seqs  # full: a finish's slot is refilled (a prefill) first
    low_in_tail = sum(2 * s < max_num_seqs for s in tail)
    assert low_in_tail > 0  # the last run-ons, decoding alone: reported, not hidden
    assert llm.most_in_flight <= max_num_seqs * n  # topped up to max_num_seqs requests, never more waiting
    [session] = json.loads((out / "manifest.json").read_text())["sessions"]
    assert session["underfilled_decode_steps"] == 0 and session["underfilled_share"] == 0  # the engine was kept full
    assert session["low_occupancy_decode_steps"] == low_in_tail == llm.stats.low_occupancy_decode_steps
    assert session["decode_steps"] == len(llm.decode_log)
    assert session["low_occupancy_decode_seconds"] == pytest.approx(low_in_tail * llm.STEP_SECONDS)
    assert session["tail_seconds"] >= 0


def test_fewer_instructions_than_slots_is_no_tail(gen, make_llm, respond_mixed, out, capsys):
    """The README's first command: 124 instructions never fill 256 slots, so every decode step runs below half, and
    none of that is a tail the engine could have avoided: the summary says 0, and where the others went."""
    llm = make_llm(respond=respond_mixed)
    assert gen("--n", 1, llm=llm) == 0
    [session] = json.loads((out / "manifest.json").read_text())["sessions"]
    low = llm.stats.low_occupancy_decode_steps
    assert low == session["decode_steps"] == len(llm.decode_log) > 100  # all of them below half of 256
    assert session["low_occupancy_decode_steps"] == low and session["underfilled_decode_steps"] == 0
    printed = capsys.readouterr().out
    assert (f"tail: 0 of {low} decode steps ran below half of --max-num-seqs while more instructions waited than "
            "slots were free (0.0 s, 0.0% of the generation time)") in printed
    assert f"{low} others ran below half at the end of the input, with too few instructions left" in printed


def jobs(count, llm, none_at=()):
    params = SamplingParams(max_tokens=256, stop=["\n\n"], seed=0)
    for i in range(count):
        yield Job(i, None if i in none_at else f"Write a sentence about topic {i}.\n", params)


def test_outputs_come_back_in_input_order_though_requests_finish_out_of_order(make_llm, respond_mixed):
    llm = make_llm(respond=respond_mixed, max_num_seqs=8)
    released = [(job.item, out) for step in RequestStream(llm).run(jobs(100, llm, none_at={0, 41, 99}), 100)
                for job, out, _ in step]
    assert [item for item, _ in released] == list(range(100))
    assert [item for item, out in released if out is None] == [0, 41, 99]  # never sent, released in their place
    assert all(out.prompt == f"Write a sentence about topic {item}.\n" for item, out in released if out)
    order = [int(request_id.split("-")[1]) for request_id in llm.finish_order]
    assert order != sorted(order)  # the engine did finish them out of order
    assert not llm.has_unfinished_requests()


def test_the_reorder_window_bounds_the_outputs_held(make_llm):
    """Job 0 runs 256 steps, the others 5: with a window of 12 the stream never holds more than 12 jobs past the
    oldest unreleased one (and so stops feeding while job 0 runs: the window is the bound on low occupancy). Those
    steps, job 0 decoding alone while 47 jobs wait, are the tail the engine could have avoided: counted."""
    def respond(prompt, seed, index):
        return "x" * 400 if "topic 0." in prompt else "done\n\nmore"

    llm = make_llm(respond=respond, max_num_seqs=4)
    stream = RequestStream(llm, window=12)
    done = 0
    for step in stream.run(jobs(60, llm), 60):
        done += len(step)
        assert len(llm.seen_prompts) - done <= 12
    assert done == 60 == stream.done
    assert max(added for _, added in llm.decode_log) == 60
    alone_while_held = sum(seqs == 1 and added == 12 for seqs, added in llm.decode_log)
    assert alone_while_held > 200  # job 0 decoding alone, the window full of 11 finished jobs behind it
    assert alone_while_held <= stream.tail.underfilled_decode_steps <= llm.stats.low_occupancy_decode_steps
    assert stream.tail.underfilled_decode_seconds == pytest.approx(
        stream.tail.underfilled_decode_steps * llm.STEP_SECONDS)


def test_done_counts_jobs_as_the_engine_finishes_them(make_llm):
    """What progress counts: a job is done when the engine finishes it, in any order (or at once, never sent), long
    before a slow job ahead of it releases it."""
    def respond(prompt, seed, index):
        return "x" * 400 if "topic 0." in prompt else "done\n\nmore"

    llm = make_llm(respond=respond, max_num_seqs=4)
    stream = RequestStream(llm)
    released, most_ahead = 0, 0
    for step in stream.run(jobs(30, llm, none_at={5}), 30):
        released += len(step)
        most_ahead = max(most_ahead, stream.done - released)
    assert stream.done == released == 30
    assert most_ahead == 29  # all but job 0 done while job 0 held them back


def test_closing_the_stream_early_aborts_the_requests_in_flight(make_llm):
    llm = make_llm(max_num_seqs=4)
    steps = RequestStream(llm).run(jobs(50, llm), 50)
    released = 0
    while released == 0 or not llm.has_unfinished_requests():
        released += len(next(steps))
    steps.close()  # what a failing caller's `with closing(...)` does
    assert not llm.has_unfinished_requests()


def test_an_output_for_a_request_never_sent_stops_the_stream(make_llm):
    from stage1.data.errors import PromptMismatchError
    llm = make_llm(max_num_seqs=2)
    real_step = llm.step

    def step():
        return [dataclasses.replace(out, request_id="nope") for out in real_step()]

    llm.step = step
    with pytest.raises(PromptMismatchError, match="never sent"):
        for _ in RequestStream(llm).run(jobs(4, llm), 4):
            pass


def test_reorder_buffer_releases_contiguous_runs():
    buffer = ReorderBuffer()
    buffer.put(2, "c")
    buffer.put(1, "b")
    assert buffer.pop_ready() == [] and len(buffer) == 2
    buffer.put(0, "a")
    assert buffer.pop_ready() == ["a", "b", "c"] and buffer.head == 3 and len(buffer) == 0
    with pytest.raises(ValueError, match="already put"):
        buffer.put(1, "again")
