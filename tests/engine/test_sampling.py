"""The reference sampler: greedy, filtering, the distribution it draws from, and per-request seeds."""

from __future__ import annotations

import pytest
import torch

from stage1 import LLM, SamplingParams
from stage1.contract import gumbel_noise, philox4x32
from stage1.engine.sampler import SamplingBatch, filtered_probs, sample, token_logprobs
from transformers_warpers import combo_params, logits_for, mass_margin, transformers_survivors


def batch_of(params, seeds=None, steps=None):
    return SamplingBatch.build(params, torch.device("cpu"), seeds=seeds, steps=steps)


def test_greedy_rows_are_argmax():
    logits = torch.randn(5, 1000)
    params = [SamplingParams(max_tokens=1, temperature=0)] * 3 + [SamplingParams(max_tokens=1, temperature=1)] * 2
    tokens = sample(logits, batch_of(params))
    assert torch.equal(tokens[:3], logits[:3].argmax(-1))


def test_filters_keep_exactly_the_allowed_tokens():
    probs = torch.tensor([[0.4, 0.3, 0.15, 0.1, 0.05]])
    logits = probs.log()
    def kept(**kw):
        return (filtered_probs(logits, batch_of([SamplingParams(max_tokens=1, **kw)])) > 0).nonzero()[:, 1].tolist()
    assert kept(top_k=2) == [0, 1]
    assert kept(top_p=0.5) == [0, 1]  # 0.4 < 0.5, so the token that crosses 0.5 stays
    assert kept(top_p=0.4) == [0]
    assert kept(min_p=0.3) == [0, 1, 2]  # >= 0.3 * 0.4
    assert kept(top_k=4, top_p=0.9, min_p=0.2) == [0, 1, 2, 3]
    assert kept(top_k=4, top_p=0.9, min_p=0.3) == [0, 1, 2]  # 0.1 < 0.3 * 0.4
    assert kept(top_k=3, top_p=0.5) == [0, 1]
    assert kept(top_k=3, top_p=0.45) == [0]  # top-p over top-k's survivors: 0.4 / 0.85 >= 0.45 before token 1
    assert kept(top_k=3, top_p=0.6) == [0, 1]
    assert kept(top_k=2, top_p=0.9) == [0, 1]
    assert kept() == [0, 1, 2, 3, 4]


def full_sort_filter(logits, batch):
    """The filters' definition, on a full sort of every row (what filtered_probs shortcuts with top-k)."""
    t = torch.where(batch.temperature > 0, batch.temperature, 1.0)
    sorted_probs, order = (logits.float() / t[:, None]).softmax(dim=-1).sort(dim=-1, descending=True)
    vocab = logits.shape[-1]
    k = torch.where((batch.top_k > 0) & (batch.top_k < vocab), batch.top_k, vocab)
    drop = sorted_probs < sorted_probs.gather(-1, (k - 1)[:, None])  # top-k, ties with the k-th kept
    survivors_mass = torch.where(k < vocab, (sorted_probs * ~drop).sum(dim=-1), 1.0)
    drop |= (sorted_probs.cumsum(dim=-1) - sorted_probs) >= torch.where(
        batch.top_p < 1, batch.top_p * survivors_mass, float("inf"))[:, None]
    drop |= sorted_probs < batch.min_p[:, None] * sorted_probs[:, :1]
    drop[:, 0] = False
    return torch.zeros_like(drop).scatter_(-1, order, ~drop)


def test_filters_equal_a_full_sort_on_both_paths():
    """Prefixes that end among the 1024 most likely tokens (found with topk) and longer ones (a full sort)."""
    g = torch.Generator().manual_seed(4)
    vocab = 5000
    peaked = torch.randn(4, vocab, generator=g) * 3
    flat = torch.randn(4, vocab, generator=g) * 0.3
    logits = torch.cat([peaked, flat])
    params = [SamplingParams(max_tokens=1, **kw) for kw in (
        dict(top_p=0.9), dict(top_k=50, top_p=0.95, min_p=0.01), dict(min_p=0.05), dict(top_k=3000),
        dict(top_p=0.9), dict(top_p=0.999, temperature=1.5), dict(top_k=2000, min_p=0.2), dict(temperature=0.8))]
    batch = batch_of(params)
    kept = filtered_probs(logits, batch) > 0
    assert torch.equal(kept, full_sort_filter(logits, batch))
    counts = kept.sum(dim=-1)
    assert counts[4] > 1024 and counts[5] > 1024 and counts[0] < 1024  # both paths ran
    assert counts[3] == 3000 and counts[7] == vocab


@pytest.mark.parametrize("kind", ["normal", "peaked", "ties"])
def test_reference_keeps_what_transformers_warpers_keep(kind):
    """Every combination of temperature, top-k (1, 20, above the vocabulary), top-p (near 0 too) and min-p: the
    reference's survivors are those of transformers' TemperatureLogitsWarper -> TopKLogitsWarper -> TopPLogitsWarper
    -> MinPLogitsWarper. With exact ties (top-p off there: which tied tokens a top-p cut keeps is up to each one's
    sort) top-k keeps every token tied with the k-th, as transformers does."""
    vocab = 500
    params = [p for p in combo_params(vocab) if kind != "ties" or p[2] == 1.0]
    logits = logits_for(kind, len(params), vocab, seed=len(kind))
    batch = batch_of([SamplingParams(max_tokens=1, temperature=t, top_k=k, top_p=p, min_p=m) for t, k, p, m in params])
    ours = filtered_probs(logits, batch) > 0
    theirs = transformers_survivors(logits, params)
    close = mass_margin(logits, params) < 1e-6  # top-p decided by fp32 rounding, in either implementation
    assert close.sum() <= 2
    assert torch.equal(ours[~close], theirs[~close])
    # the old rule (top-p over the whole vocabulary) kept more where top-k and top-p are both on
    assert (theirs.sum(-1) < vocab).any()


def test_top_p_after_top_k_is_what_transformers_samples_from():
    """The issue's case: top_k=20, top_p=0.5. Measured over the whole vocabulary, top-p kept up to all 20 tokens;
    over the 20 survivors, fewer, and the distributions agree with transformers' to fp32 rounding."""
    logits = logits_for("normal", 8, 2000, seed=11) * 0.5
    params = [(1.0, 20, 0.5, 0.0)] * 8
    batch = batch_of([SamplingParams(max_tokens=1, top_k=20, top_p=0.5)] * 8)
    ours = filtered_probs(logits, batch)
    theirs = torch.cat([warpers_probs(logits[r:r + 1], p) for r, p in enumerate(params)])
    assert (0.5 * (ours - theirs).abs().sum(dim=-1)).max() < 1e-5  # total variation
    assert ((ours > 0).sum(dim=-1) < 20).all()


def warpers_probs(logits, params):
    from transformers_warpers import warpers

    return warpers(*params)(None, logits.float().clone()).softmax(dim=-1)


def test_draws_follow_the_filtered_distribution():
    """Chi-square goodness of fit of 20k draws against the filtered, temperature-scaled distribution."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(1, 50, generator=g) * 2
    sp = SamplingParams(max_tokens=1, temperature=0.8, top_k=20, top_p=0.95, min_p=0.02)
    expected = filtered_probs(logits, batch_of([sp]))[0]
    draws = 20_000
    rows = logits.expand(draws, -1)
    tokens = sample(rows, batch_of([sp] * draws, seeds=list(range(draws))))
    counts = torch.bincount(tokens, minlength=50).float()
    assert counts[expected == 0].sum() == 0, "a filtered-out token was drawn"
    keep = expected > 0
    e = expected[keep] * draws
    chi2 = ((counts[keep] - e) ** 2 / e).sum().item()
    dof = int(keep.sum()) - 1
    # 99.9% quantile of chi-square is below dof + 4.5 sqrt(2 dof) + 10 for these sizes
    assert chi2 < dof + 4.5 * (2 * dof) ** 0.5 + 10, (chi2, dof)


@pytest.mark.parametrize("counter, key, expected", [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF, 0xFFFFFFFF), (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
])
def test_philox_matches_the_random123_known_answers(counter, key, expected):
    as_tensor = lambda v: torch.tensor([v], dtype=torch.int64)  # noqa: E731
    words = philox4x32(tuple(map(as_tensor, counter)), tuple(map(as_tensor, key)))
    assert [int(w) for w in words] == list(expected)


def test_noise_depends_on_seed_step_and_token_only():
    tokens = torch.arange(4000)
    base = gumbel_noise(torch.full_like(tokens, 77), torch.full_like(tokens, 3), tokens)
    assert torch.equal(base[123:130], gumbel_noise(torch.full((7,), 77), torch.full((7,), 3), tokens[123:130]))
    assert not torch.equal(base, gumbel_noise(torch.full_like(tokens, 78), torch.full_like(tokens, 3), tokens))
    assert not torch.equal(base, gumbel_noise(torch.full_like(tokens, 77), torch.full_like(tokens, 4), tokens))
    # Gumbel(0, 1): mean 0.5772, variance pi^2 / 6; at most 16.7, the bound the race relies on
    assert abs(base.mean().item() - 0.5772) < 0.06 and abs(base.var().item() - 1.6449) < 0.15
    extreme = gumbel_noise(torch.zeros(1, dtype=torch.int64), torch.zeros(1, dtype=torch.int64), tokens[:1])
    assert base.max().item() <= 16.7 and extreme.item() <= 16.7
    # negative and 64-bit seeds use every bit of the key
    big = gumbel_noise(torch.full((4,), -5), torch.zeros(4, dtype=torch.int64), tokens[:4])
    assert not torch.equal(big, gumbel_noise(torch.full((4,), 5), torch.zeros(4, dtype=torch.int64), tokens[:4]))


def test_a_row_draws_the_same_token_whatever_its_neighbours():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(6, 500, generator=g) * 2
    params = [SamplingParams(max_tokens=1, temperature=t, top_p=p) for t, p in
              [(0.9, 0.9), (1.0, 1.0), (0, 1.0), (1.2, 0.5), (0.7, 0.95), (1.0, 0.8)]]
    seeds, steps = [11, 22, 33, 44, 55, 66], [0, 5, 9, 2, 7, 1]
    together = sample(logits, batch_of(params, seeds, steps))
    for i in range(6):
        alone = sample(logits[i:i + 1], batch_of(params[i:i + 1], seeds[i:i + 1], steps[i:i + 1]))
        assert alone.item() == together[i].item()
    moved = sample(logits.flip(0), batch_of(params[::-1], seeds[::-1], steps[::-1]))
    assert torch.equal(moved, together.flip(0))


@pytest.mark.parametrize("bad, message", [
    (dict(top_p=0), "top_p"), (dict(temperature=-1), "temperature"), (dict(n=0), "n must"),
    (dict(top_k=-5), "top_k"), (dict(min_p=2), "min_p"), (dict(logprobs=-1), "logprobs"),
    (dict(max_tokens=0), "max_tokens"),
])
def test_invalid_params_rejected_at_construction(bad, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**{"max_tokens": 8, **bad})


def test_max_tokens_has_no_silent_default():
    with pytest.raises(ValueError, match="max_tokens is required"):
        SamplingParams()


def test_seeded_request_same_alone_and_in_mixed_batch(tiny_model_dir):
    llm = LLM(tiny_model_dir, dtype="float32")
    seeded = SamplingParams(max_tokens=24, temperature=1.0, top_p=0.95, seed=1234, ignore_eos=True)
    prompt = "Write a short sentence about winter:"
    alone = llm.generate([prompt], seeded, use_tqdm=False)[0].outputs[0].token_ids
    again = llm.generate([prompt], seeded, use_tqdm=False)[0].outputs[0].token_ids
    others = [SamplingParams(max_tokens=30, temperature=1.2, seed=None, ignore_eos=True),
              SamplingParams(max_tokens=10, temperature=0, ignore_eos=True),
              SamplingParams(max_tokens=40, temperature=0.7, top_k=5, seed=7, ignore_eos=True)]
    mixed = llm.generate(["The quick brown fox", "What is 2+2?", prompt, "def add(a, b):"],
                         [others[0], others[1], seeded, others[2]], use_tqdm=False)
    assert alone == again == mixed[2].outputs[0].token_ids
    different_seed = SamplingParams(max_tokens=24, temperature=1.0, top_p=0.95, seed=99, ignore_eos=True)
    assert llm.generate([prompt], different_seed, use_tqdm=False)[0].outputs[0].token_ids != alone


def test_n_samples_differ_and_are_reproducible(tiny_model_dir):
    llm = LLM(tiny_model_dir, dtype="float32")
    sp = SamplingParams(max_tokens=16, temperature=1.0, seed=5, n=3, ignore_eos=True)
    a = llm.generate(["What is gravity?"], sp, use_tqdm=False)[0]
    b = llm.generate(["What is gravity?"], sp, use_tqdm=False)[0]
    assert [o.index for o in a.outputs] == [0, 1, 2]
    assert [o.token_ids for o in a.outputs] == [o.token_ids for o in b.outputs]
    assert len({tuple(o.token_ids) for o in a.outputs}) == 3


def test_token_logprobs_are_the_raw_log_softmax_and_its_rank():
    """What logprobs=0 costs and gives (the data pipeline asks it of every request): the chosen token's log_softmax
    entry of the raw logits (no temperature, no filtering), its rank among them, and no top list."""
    torch.manual_seed(0)
    logits = torch.randn(5, 300) * 4
    tokens = torch.tensor([0, 17, 299, 5, 123])
    logits[3, 5] = logits[3].max() + 1  # row 3 chose the most likely token
    chosen, rank, top_ids, top_values = token_logprobs(logits, tokens, 0)
    plain = logits.double().log_softmax(-1)
    assert torch.allclose(chosen.double(), plain[torch.arange(5), tokens], atol=1e-5)
    assert rank.tolist() == [int((plain[r] > plain[r, t]).sum()) + 1 for r, t in enumerate(tokens.tolist())]
    assert rank[3] == 1 and top_ids.shape == top_values.shape == (5, 0)



def test_token_logprobs_in_row_chunks_equal_the_whole_batch(monkeypatch):
    """On a CPU the rows go a few at a time (LOGPROB_CHUNK_ELEMENTS): chunks of 2 rows give the one-chunk results,
    and the top-k logprobs are the float64 log_softmax's."""
    from stage1.engine import sampler
    torch.manual_seed(1)
    logits = torch.randn(5, 300) * 4
    tokens = torch.tensor([3, 0, 299, 150, 7])
    whole = token_logprobs(logits, tokens, 4)
    monkeypatch.setattr(sampler, "LOGPROB_CHUNK_ELEMENTS", 600)
    chunked = token_logprobs(logits, tokens, 4)
    for a, b in zip(whole, chunked):
        assert torch.equal(a, b)
    plain = logits.double().log_softmax(-1)
    top_values, top_ids = plain.topk(4, dim=-1)
    assert torch.equal(chunked[2], top_ids) and torch.allclose(chunked[3].double(), top_values, atol=1e-5)