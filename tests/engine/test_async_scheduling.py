"""Async scheduling (engine_core.py): step N+1 is scheduled and launched before step N's tokens are read back, its
sequences carrying a PENDING token the device fills in. Forced on here on the CPU (the default only on a GPU), it
must give exactly the synchronous loop's outputs: greedy and seeded sampling, EOS and stop strings ending
sequences one step before the work in flight, n > 1 with prefix caching, preemption, chunked prefill, requests
joining mid-decode, logprobs; and every KV block must come back. Its void tokens (sampled for a sequence that had
already ended) are not counted as generated."""

from __future__ import annotations

import pytest
import torch

from stage1 import LLM, SamplingParams
from stage1.engine.config import ModelConfig
from stage1.engine.kv_cache import bytes_per_block

LENGTHS = [5, 17, 33, 1, 60, 16, 9, 48]


def prompts(vocab: int, lengths=LENGTHS, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    return [{"prompt_token_ids": torch.randint(3, vocab, (n,), generator=g).tolist()} for n in lengths]


def outputs(llm: LLM, reqs, params):
    return [[(c.token_ids, c.text, c.finish_reason, c.stop_reason, c.logprobs) for c in o.outputs]
            for o in llm.generate(reqs, params, use_tqdm=False)]


def count_device_fed_inputs(llm: LLM) -> list[int]:
    """A counter of the inputs the device filled in from the previous step's tokens (PENDING ones)."""
    runner, count = llm.core.runner, [0]
    prepare = runner.prepare

    def counted(batch):
        plan = prepare(batch)
        count[0] += len(plan.pending_rows)
        return plan
    runner.prepare = counted
    return count


def both(path, reqs, params, **engine):
    runs = {}
    for mode in (False, True):
        llm = LLM(path, dtype="float32", async_scheduling=mode, **engine)
        assert llm.config.async_scheduling is mode
        fed_on_device = count_device_fed_inputs(llm)
        runs[mode] = outputs(llm, reqs, params)
        assert llm.core.stats.generated_tokens == sum(len(c[0]) for o in runs[mode] for c in o)
        assert (fed_on_device[0] > 0) is mode  # async: decode inputs came from the device's last tokens
        assert bool(llm.core.runner._sample_row_of) is mode  # where those are read from: kept only when needed
        assert not llm.core.has_unfinished()
        assert llm.core.block_manager.num_free_blocks == llm.core.block_manager.num_blocks
        if "kv_cache_memory" in engine:
            assert llm.core.scheduler.num_preemptions > 0
    assert runs[True] == runs[False]
    return runs[True]


def test_greedy_sampled_and_logprobs_equal_the_synchronous_loop(checkpoint):
    path = checkpoint("gqa2-d128-untied")
    reqs = prompts(ModelConfig.from_dir(path).vocab_size)
    per_request = [SamplingParams(max_tokens=8 + 3 * i, temperature=0 if i % 3 == 0 else 0.9, top_p=0.9,
                                  seed=100 + i, ignore_eos=True, logprobs=2 if i == 1 else None)
                   for i in range(len(reqs))]
    out = both(path, reqs, per_request)
    assert [len(o[0][0]) for o in out] == [8 + 3 * i for i in range(len(reqs))]


def test_eos_stop_strings_and_n_samples_equal_the_synchronous_loop(checkpoint):
    """Sequences that end early (EOS, stop strings, stop ids) have one more step in flight when they end."""
    path = checkpoint("gqa1-d64-tied")
    reqs = prompts(ModelConfig.from_dir(path).vocab_size)
    params = SamplingParams(max_tokens=40, temperature=1.0, seed=7, n=2, stop=["e", " t"], stop_token_ids=[5])
    out = both(path, reqs, params)
    assert {c[2] for o in out for c in o} >= {"stop"}  # some did end early


def test_generated_tokens_are_the_tokens_appended_not_the_void_ones(checkpoint):
    """Async scheduling samples one void token for each sequence that ended a step earlier; the stats leave it out,
    so both modes count what the outputs hold."""
    path = checkpoint("gqa1-d64-tied")
    reqs = prompts(ModelConfig.from_dir(path).vocab_size)
    params = SamplingParams(max_tokens=40, temperature=1.0, seed=7, n=2, stop=["e", " t"], stop_token_ids=[5])
    for mode in (False, True):
        llm = LLM(path, dtype="float32", async_scheduling=mode)
        stats, sampled = llm.core.stats, [0]
        record = stats.record

        def counted(batch, *args, **kwargs):
            sampled[0] += len(batch.sampling_seqs)  # a token sampled for each, void or not
            return record(batch, *args, **kwargs)
        stats.record = counted
        appended = sum(len(c.token_ids) for o in llm.generate(reqs, params, use_tqdm=False) for c in o.outputs)
        assert stats.generated_tokens == appended
        assert (sampled[0] > appended) is mode  # only async mode sampled void tokens


def test_preemption_and_chunked_prefill_equal_the_synchronous_loop(checkpoint):
    path = checkpoint("gqa2-d128-untied")
    config = ModelConfig.from_dir(path)
    reqs = prompts(config.vocab_size)
    params = SamplingParams(max_tokens=40, temperature=0.8, seed=3, ignore_eos=True)
    both(path, reqs, params, block_size=16, kv_cache_memory=12 * bytes_per_block(config, 16, torch.float32))
    both(path, reqs, params, block_size=16, max_num_batched_tokens=20)


def test_requests_joining_mid_decode_through_the_step_api(checkpoint):
    path = checkpoint("gqa7-d64-sharded")
    reqs = prompts(ModelConfig.from_dir(path).vocab_size)
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    runs = {}
    for mode in (False, True):
        llm = LLM(path, dtype="float32", async_scheduling=mode)
        done, pending = {}, list(reqs)
        llm.add_request(pending.pop(0), params)
        while llm.has_unfinished_requests() or pending:
            if pending:
                llm.add_request(pending.pop(0), params)  # one joins at every step
            for out in llm.step():
                done[out.request_id] = out.outputs[0].token_ids
        runs[mode] = done
    assert runs[True] == runs[False] and len(runs[True]) == len(reqs)


def test_async_scheduling_needs_one_rank(checkpoint):
    with pytest.raises(ValueError, match="async_scheduling=True needs tensor_parallel_size=1"):
        LLM(checkpoint("gqa2-d128-untied"), async_scheduling=True, tensor_parallel_size=2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="a GPU's stream is what a launch must not wait for")
def test_a_launch_never_waits_for_the_device(tiny_model_dir, monkeypatch):
    """On a GPU, launching a step (prepare, staged upload, forward, sampling, the token copy) runs under
    torch.cuda.set_sync_debug_mode("error"): any copy from pageable memory or read-back raises. Only the result
    waits, for its own event. Greedy and sampled rows, prefill and decode; the tokens equal the synchronous loop's."""
    params = [SamplingParams(max_tokens=8, temperature=0, ignore_eos=True),
              SamplingParams(max_tokens=8, temperature=0.9, top_k=20, top_p=0.9, min_p=0.02, seed=5, ignore_eos=True)]
    reqs = prompts(ModelConfig.from_dir(tiny_model_dir).vocab_size, lengths=(5, 17))
    sync = LLM(tiny_model_dir, dtype="bfloat16", kernels="triton", async_scheduling=False, enforce_eager=True)
    expected = outputs(sync, reqs, params)
    del sync
    llm = LLM(tiny_model_dir, dtype="bfloat16", kernels="triton", async_scheduling=True)
    launch = llm.core.runner.launch

    def strict(batch):
        torch.cuda.set_sync_debug_mode("error")
        try:
            return launch(batch)
        finally:
            torch.cuda.set_sync_debug_mode("default")

    monkeypatch.setattr(llm.core.runner, "launch", strict)
    assert outputs(llm, reqs, params) == expected
