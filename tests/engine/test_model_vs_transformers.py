"""Our decoder and engine against transformers' Qwen2 on the same tiny random checkpoints (fp32)."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from tiny_models import SHAPES
from stage1 import LLM, SamplingParams
from stage1.engine.attention import AttentionContext
from stage1.engine.config import ModelConfig
from stage1.engine.weights import load_model

# Lengths chosen around block_size 16: one token, exactly one block, just over, several blocks.
PROMPT_LENGTHS = [1, 16, 17, 5, 33, 48, 7, 70]
NEW_TOKENS = 32


def prompts_of(lengths, vocab, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lengths]


def hf_model(path):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()


@pytest.fixture(scope="module")
def hf_greedy():
    """transformers' greedy continuation of each prompt alone (no padding), cached per checkpoint."""
    cache = {}

    def run(path, prompts):
        key = (str(path), tuple(map(tuple, prompts)))
        if key not in cache:
            model = hf_model(path)
            outs = []
            with torch.no_grad():
                for ids in prompts:
                    out = model.generate(torch.tensor([ids]), max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                                         do_sample=False, eos_token_id=None, pad_token_id=0)
                    outs.append(out[0, len(ids):].tolist())
            cache[key] = outs
        return cache[key]

    return run


@pytest.mark.parametrize("shape", SHAPES)
def test_prefill_logits_match_transformers(checkpoint, shape):
    path = checkpoint(shape)
    config = ModelConfig.from_dir(path)
    ours = load_model(path, config, torch.float32, torch.device("cpu"))
    ref = hf_model(path)
    prompts = prompts_of(PROMPT_LENGTHS, config.vocab_size)
    # all prompts packed into one ragged batch, no cache: the model itself, with no engine around it
    cu = [0]
    for p in prompts:
        cu.append(cu[-1] + len(p))
    ctx = AttentionContext(is_prefill=True, kv_cache=None, slot_mapping=None, block_tables=None,
                           context_lens=torch.tensor(PROMPT_LENGTHS), cu_seqlens_q_host=cu,
                           context_lens_host=PROMPT_LENGTHS)
    ids = torch.tensor([t for p in prompts for t in p])
    positions = torch.cat([torch.arange(len(p)) for p in prompts])
    with torch.no_grad():
        logits = ours.compute_logits(ours(ids, positions, ctx))
        for i, p in enumerate(prompts):
            expected = ref(torch.tensor([p])).logits[0]
            got = logits[cu[i]:cu[i + 1]]
            assert (got - expected).abs().max().item() < 1e-4, f"prompt {i} (len {len(p)})"


@pytest.mark.parametrize("shape", SHAPES)
def test_greedy_batch_matches_transformers(checkpoint, hf_greedy, shape):
    path = checkpoint(shape)
    llm = LLM(path, dtype="float32", block_size=16)
    prompts = prompts_of(PROMPT_LENGTHS, llm.vocab_size)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                        SamplingParams(max_tokens=NEW_TOKENS, temperature=0, ignore_eos=True), use_tqdm=False)
    expected = hf_greedy(path, prompts)
    for i, out in enumerate(outs):
        assert out.prompt_token_ids == prompts[i]
        assert out.outputs[0].token_ids == expected[i], f"prompt {i} (len {len(prompts[i])})"
        assert out.outputs[0].finish_reason == "length"


def test_greedy_identical_under_preemption(checkpoint, hf_greedy):
    path = checkpoint("gqa2-d128-untied")
    # 8 sequences of up to 102 tokens need ~50 blocks of 16; give the pool 12, so running ones get preempted.
    config = ModelConfig.from_dir(path)
    from stage1.engine.kv_cache import bytes_per_block
    llm = LLM(path, dtype="float32", block_size=16, kv_cache_memory=12 * bytes_per_block(config, 16, torch.float32))
    assert llm.core.block_manager.num_blocks == 12
    prompts = prompts_of(PROMPT_LENGTHS, config.vocab_size)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                        SamplingParams(max_tokens=NEW_TOKENS, temperature=0, ignore_eos=True), use_tqdm=False)
    assert llm.core.scheduler.num_preemptions > 0
    assert [o.outputs[0].token_ids for o in outs] == hf_greedy(path, prompts)
    assert llm.core.block_manager.num_free_blocks == 12  # every block came back


def test_greedy_identical_with_chunked_prefill(checkpoint, hf_greedy):
    """A token budget smaller than the prompts cuts them into chunks whose queries start after cached tokens."""
    path = checkpoint("gqa7-d64-sharded")
    llm = LLM(path, dtype="float32", block_size=16, max_num_batched_tokens=20)
    prompts = prompts_of(PROMPT_LENGTHS, llm.vocab_size)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                        SamplingParams(max_tokens=NEW_TOKENS, temperature=0, ignore_eos=True), use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == hf_greedy(path, prompts)


def test_requests_joining_while_others_decode(checkpoint, hf_greedy):
    path = checkpoint("gqa2-d128-untied")
    llm = LLM(path, dtype="float32", block_size=16)
    prompts = prompts_of(PROMPT_LENGTHS, llm.vocab_size)
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0, ignore_eos=True)
    ids = [llm.add_request({"prompt_token_ids": p}, params) for p in prompts[:4]]
    done = {}
    for _ in range(5):  # the first four are decoding now
        done.update((o.request_id, o) for o in llm.step())
    assert all(len(s.output_token_ids) > 1 for r in llm._requests.values() for s in r.seqs)
    ids += [llm.add_request({"prompt_token_ids": p}, params) for p in prompts[4:]]
    while llm.has_unfinished_requests():
        done.update((o.request_id, o) for o in llm.step())
    assert [done[i].outputs[0].token_ids for i in ids] == hf_greedy(path, prompts)
