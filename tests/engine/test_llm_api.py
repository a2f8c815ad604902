"""The offline API: inputs, outputs, stop conditions and clear errors."""

from __future__ import annotations

import pytest

from stage1 import LLM, SamplingParams


@pytest.fixture(scope="module")
def llm(tiny_model_dir):
    return LLM(tiny_model_dir, dtype="float32", max_model_len=256)


GREEDY = dict(temperature=0, ignore_eos=True)


def test_outputs_in_input_order_with_the_ids_fed(llm):
    prompts = ["What is 2+2?", {"prompt_token_ids": [5, 6, 7]}, "The quick brown fox jumps over the lazy dog."]
    outs = llm.generate(prompts, SamplingParams(max_tokens=4, **GREEDY), use_tqdm=False)
    assert [o.prompt for o in outs] == ["What is 2+2?", None, prompts[2]]
    assert outs[0].prompt_token_ids == llm.tokenizer.encode("What is 2+2?")
    assert outs[1].prompt_token_ids == [5, 6, 7]
    for o in outs:
        c = o.outputs[0]
        assert len(c.token_ids) == 4 and c.finish_reason == "length" and c.stop_reason is None
    # each request's output is the same whether run alone or batched
    alone = llm.generate(prompts[2], SamplingParams(max_tokens=4, **GREEDY), use_tqdm=False)[0]
    assert alone.outputs[0].token_ids == outs[2].outputs[0].token_ids


def test_stop_string_across_token_boundaries_is_cut(llm):
    free = llm.generate(["Gravity is"], SamplingParams(max_tokens=20, **GREEDY), use_tqdm=False)[0].outputs[0]
    text = free.text
    # a stop string made of the end of one token's text and the start of a later one's
    pieces = [llm.tokenizer.decode([t]) for t in free.token_ids]
    join = next(i for i in range(1, len(pieces)) if pieces[i - 1] and pieces[i] and "\ufffd" not in pieces[i - 1] + pieces[i])
    stop = pieces[join - 1][-1] + pieces[join][0]
    at = text.find(stop)
    out = llm.generate(["Gravity is"], SamplingParams(max_tokens=20, stop=[stop], **GREEDY), use_tqdm=False)[0]
    c = out.outputs[0]
    assert c.finish_reason == "stop" and c.stop_reason == stop
    assert c.text == text[:at]
    kept = llm.generate(["Gravity is"], SamplingParams(max_tokens=20, stop=[stop], include_stop_str_in_output=True,
                                                       **GREEDY), use_tqdm=False)[0].outputs[0]
    assert kept.text == text[:at + len(stop)]


def test_stop_token_ids_and_eos(llm, tiny_model_dir, monkeypatch):
    free = llm.generate(["What is 2+2?"], SamplingParams(max_tokens=12, **GREEDY), use_tqdm=False)[0].outputs[0]
    stop_id = free.token_ids[5]
    first = free.token_ids.index(stop_id)
    c = llm.generate(["What is 2+2?"], SamplingParams(max_tokens=12, stop_token_ids=[stop_id], **GREEDY),
                     use_tqdm=False)[0].outputs[0]
    assert c.finish_reason == "stop" and c.stop_reason == stop_id
    assert c.token_ids == free.token_ids[:first + 1]
    # the same id as EOS: stop_reason None, and ignore_eos=False is what makes it stop
    from stage1.engine import engine_config

    monkeypatch.setattr(engine_config, "read_eos_token_ids", lambda *args: [stop_id])
    eos_llm = LLM(tiny_model_dir, dtype="float32", max_model_len=256)
    assert eos_llm.eos_token_ids == (stop_id,)
    e = eos_llm.generate(["What is 2+2?"], SamplingParams(max_tokens=12, temperature=0), use_tqdm=False)[0].outputs[0]
    assert e.finish_reason == "stop" and e.stop_reason is None and e.token_ids[-1] == stop_id


def test_logprobs(llm):
    c = llm.generate(["Hello"], SamplingParams(max_tokens=5, logprobs=3, **GREEDY), use_tqdm=False)[0].outputs[0]
    assert len(c.logprobs) == 5
    for token, entry in zip(c.token_ids, c.logprobs):
        assert token in entry and entry[token].rank == 1  # greedy picks the most likely token
        assert len(entry) == 3
        assert all(lp.logprob <= 0 for lp in entry.values())
    assert c.cumulative_logprob == pytest.approx(sum(e[t].logprob for t, e in zip(c.token_ids, c.logprobs)))


def test_prompt_longer_than_context_is_a_clear_error(llm):
    with pytest.raises(ValueError, match=r"prompt 1 has 300 tokens, but the context holds 256"):
        llm.generate(["ok", {"prompt_token_ids": [5] * 300}], SamplingParams(max_tokens=4), use_tqdm=False)
    # nothing was left queued by the failed call
    assert not llm.has_unfinished_requests()


def test_generation_stops_at_the_context_limit(llm):
    c = llm.generate([{"prompt_token_ids": [5] * 250}], SamplingParams(max_tokens=None, **GREEDY),
                     use_tqdm=False)[0].outputs[0]
    assert len(c.token_ids) == 6 and c.finish_reason == "length"


def test_bad_prompt_types(llm):
    with pytest.raises(TypeError, match="prompt 0 must be a string"):
        llm.generate([42], SamplingParams(max_tokens=2), use_tqdm=False)
    with pytest.raises(ValueError, match="prompt_token_ids must be ints"):
        llm.generate([{"prompt_token_ids": [10**9]}], SamplingParams(max_tokens=2), use_tqdm=False)
    with pytest.raises(ValueError, match="needs sampling_params"):
        llm.generate(["x"])
    with pytest.raises(ValueError, match="2 prompts but 1 SamplingParams"):
        llm.generate(["x", "y"], [SamplingParams(max_tokens=2)])
