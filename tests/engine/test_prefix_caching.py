"""Prefix caching in the engine: prompts that share a few-shot prefix compute it once, and every output is the one
the engine gives with the cache off (greedy and seeded sampling, with a KV cache small enough that cached blocks
get evicted and sequences preempted)."""

from __future__ import annotations

import torch

from stage1 import LLM, SamplingParams


def run(path, prompts, params, **kwargs):
    llm = LLM(path, dtype="float32", kernels="torch", seed=3, **kwargs)
    outputs = llm.generate(prompts, params, use_tqdm=False)
    return llm, [[c.token_ids for c in o.outputs] for o in outputs]


def test_shared_prefixes_are_computed_once_with_the_same_outputs(checkpoint):
    path = checkpoint("gqa2-d128-untied")
    g = torch.Generator().manual_seed(0)
    shots = [torch.randint(3, 400, (n,), generator=g).tolist() for n in (45, 70)]  # two few-shot prefixes
    prompts = [{"prompt_token_ids": shots[i % 2] + torch.randint(3, 400, (int(n),), generator=g).tolist()}
               for i, n in enumerate(torch.randint(1, 12, (10,), generator=g))]
    prompts.append({"prompt_token_ids": list(shots[0][:32])})  # a prompt that is all cached blocks
    params = [SamplingParams(max_tokens=6 + (i % 3), temperature=0.0 if i % 2 else 0.8, seed=i, ignore_eos=True)
              for i in range(len(prompts))]
    params[3] = SamplingParams(max_tokens=5, temperature=1.0, n=3, seed=9, ignore_eos=True)
    # all the prompts (803 tokens) in one prefill step, then a small cache and small steps
    for budget in (dict(max_num_batched_tokens=1024),
                   dict(kv_cache_memory=14 * 2 * 2 * 2 * 128 * 16 * 4, max_num_batched_tokens=64)):
        off_llm, off = run(path, prompts, params, enable_prefix_caching=False, **budget)
        on_llm, on = run(path, prompts, params, **budget)
        assert on == off, budget
        assert off_llm.stats.prefix_cached_tokens == 0
        assert on_llm.stats.prefix_cached_tokens > 0
        if "kv_cache_memory" in budget:  # 14 blocks of 16 tokens: cached blocks were handed out again, and preempted
            assert on_llm.core.scheduler.num_preemptions > 0
        else:
            # one prefill step: the later sequences of each prefix shared the blocks the first computes in that
            # very step (45 tokens -> 2 full blocks, for 4 more prompts; 70 -> 4, for 4 more prompts and the
            # 2 more samples of request 3), and the prompt of two whole blocks took the first of them
            assert on_llm.stats.prefill_steps == off_llm.stats.prefill_steps == 1
            assert on_llm.stats.prefix_cached_tokens == 4 * 2 * 16 + 6 * 4 * 16 + 16
            assert on_llm.stats.prefill_tokens + on_llm.stats.prefix_cached_tokens == off_llm.stats.prefill_tokens


def test_a_failed_step_leaves_no_cached_prefix_behind(checkpoint, monkeypatch):
    """Blocks are registered when their prefill step is scheduled; if that step fails, a later request must not
    find them (they hold no valid K/V), and the engine goes on giving the right tokens."""
    path = checkpoint("gqa2-d128-untied")
    prompt = {"prompt_token_ids": list(range(3, 60))}
    params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    llm = LLM(path, dtype="float32", kernels="torch")
    expected = llm.generate([prompt], params, use_tqdm=False)[0].outputs[0].token_ids
    fresh = LLM(path, dtype="float32", kernels="torch")

    def failing(batch):
        raise RuntimeError("device lost")

    monkeypatch.setattr(fresh.core.runner, "launch", failing)  # what run() and async steps call
    try:
        fresh.generate([prompt], params, use_tqdm=False)
    except RuntimeError:
        pass
    assert fresh.core.block_manager.match_prefix([], prompt["prompt_token_ids"], 56) == []
    assert fresh.core.block_manager.num_free_blocks == fresh.core.block_manager.num_blocks
    monkeypatch.undo()
    assert fresh.generate([prompt], params, use_tqdm=False)[0].outputs[0].token_ids == expected
    # through the step API, a caller that catches the failure and steps on: two requests sharing the prefix were
    # scheduled in the failed step, the second on blocks the first was to fill; the first is then aborted, so
    # nobody fills them: the second must start over, not attend to them
    stepper = LLM(path, dtype="float32", kernels="torch")
    first, second = [stepper.add_request(prompt, params) for _ in range(2)]
    monkeypatch.setattr(stepper.core.runner, "launch", failing)
    try:
        stepper.step()
    except RuntimeError:
        pass
    monkeypatch.undo()
    stepper.abort([first])
    done = {}
    while stepper.has_unfinished_requests():
        done.update({out.request_id: out for out in stepper.step()})
    assert list(done) == [second] and done[second].outputs[0].token_ids == expected


def test_each_request_reports_the_prompt_tokens_it_took_from_the_cache(checkpoint):
    """RequestOutput.num_cached_tokens (vLLM's name): what each request's sequences took from the prefix cache; over
    all requests, the engine's prefix_cached_tokens (the judge's cost in the data pipeline reads it per request)."""
    llm = LLM(checkpoint("gqa2-d128-untied"), dtype="float32", kernels="torch", seed=3)
    shared = list(range(3, 43))  # 40 tokens: 2 full blocks of 16
    params = SamplingParams(max_tokens=2, temperature=0.0)
    first = llm.generate([{"prompt_token_ids": shared + [50, 51]}], params, use_tqdm=False)
    later = llm.generate([{"prompt_token_ids": shared + [60 + i]} for i in range(3)], params, use_tqdm=False)
    assert first[0].num_cached_tokens == 0
    assert [o.num_cached_tokens for o in later] == [32, 32, 32]
    assert sum(o.num_cached_tokens for o in first + later) == llm.stats.prefix_cached_tokens == 96
