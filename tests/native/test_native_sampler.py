"""The native sampler (torch.ops.stage1.sample, csrc/cpu/sampler_kernel.h) draws exactly the reference's tokens
(stage1.engine.sampler.sample), on every CPU kernel set this machine runs.

Equality is the whole claim, so the grid aims at the places where it could break: a mixed batch whose rows cross
temperatures (greedy included), top-k 0/1/50/vocab, top-p 1/0.9/0.5 and min-p 0/0.05/0.3 at varied seeds and steps,
on vocabularies of 1000 (torch.topk's nth_element path) and 151,936 (its partial_sort path, Qwen's size), over
logits that are random normal at several scales, LLM-like (a few peaks), rounded (exact ties at the cuts, where the
op replays torch.topk's order), bf16-valued, flat, one-hot peaked, masked with -inf, and tied at the maximum.
The noise itself is compared with stage1.contract.gumbel_noise.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from stage1.contract import gumbel_noise
from stage1.engine.native import native_available, native_error
from stage1.engine.sampler import SamplingBatch, sample

if not native_available():
    pytest.skip(f"stage1._C is not built: {native_error()}", allow_module_level=True)


from stage1.engine.native import native_sample  # noqa: E402

QWEN_VOCAB = 151936


# Every row parameter combination; a batch's rows take them in turn from an offset (so each one meets each kind of
# logits at some row count).
COMBOS = list(itertools.product([0.0, 0.5, 0.8, 1.0, 1.5], [0, 1, 50, None], [1.0, 0.9, 0.5], [0.0, 0.05, 0.3]))


def mixed_batch(rows: int, vocab: int, offset: int, seed: int = 0) -> SamplingBatch:
    g = torch.Generator().manual_seed(seed)
    picked = [COMBOS[(offset + 7 * r) % len(COMBOS)] for r in range(rows)]
    temperature = [c[0] for c in picked]
    return SamplingBatch(
        temperature=torch.tensor(temperature, dtype=torch.float32),
        top_k=torch.tensor([vocab if c[1] is None else c[1] for c in picked], dtype=torch.int64),
        top_p=torch.tensor([c[2] for c in picked], dtype=torch.float32),
        min_p=torch.tensor([c[3] for c in picked], dtype=torch.float32),
        seeds=torch.randint(-2 ** 63, 2 ** 63 - 1, (rows,), generator=g, dtype=torch.int64),
        steps=torch.randint(0, 2 ** 32, (rows,), generator=g, dtype=torch.int64),
        all_greedy=all(t == 0 for t in temperature), max_logprobs=None)


def make_logits(kind: str, rows: int, vocab: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    randn = torch.randn(rows, vocab, generator=g)
    if kind.startswith("normal"):
        return randn * float(kind.split("*")[1])
    if kind == "llm":  # as benchmarks/kernels_sampling.py: a broad base and a few dozen peaks
        peaks = torch.randint(0, vocab, (rows, 48), generator=g)
        return (randn * 2).scatter_add_(1, peaks, 4 + 8 * torch.rand(rows, 48, generator=g))
    if kind == "rounded":  # many exact ties, at every cut
        return (randn * 3).round() / 2
    if kind == "bf16":
        return (randn * 4).bfloat16().float()
    if kind == "flat":
        return torch.zeros(rows, vocab)
    if kind == "peaked":
        return (randn * 0.1).index_fill_(1, torch.tensor([vocab // 3]), 40.0)
    if kind == "masked":  # most tokens -inf, as a grammar or a banned-token mask leaves them
        keep = torch.rand(rows, vocab, generator=g) < 0.01
        return torch.where(keep, randn * 3, float("-inf"))
    if kind == "max-tie":  # three tokens share the maximum, in different lanes and the row's tail
        logits = randn * 2
        logits[:, [3, 77, vocab - 2]] = 12.0
        return logits
    raise ValueError(kind)


KINDS = ["normal*0.5", "normal*2", "normal*6", "llm", "rounded", "bf16", "flat", "peaked", "masked", "max-tie"]
# (rows, vocab) -> the step between the parameter offsets tried (the reference's full sorts of 151,936 tokens take
# their time); 64 rows of the large vocabulary for the realistic kinds below
SIZES = {(1, QWEN_VOCAB): 13, (7, QWEN_VOCAB): 45, (7, 1000): 13, (64, 1000): 45}
_expected: dict = {}


def expected_tokens(kind, rows, vocab, offset):
    key = (kind, rows, vocab, offset)
    if key not in _expected:
        _expected[key] = sample(make_logits(kind, rows, vocab), mixed_batch(rows, vocab, offset))
    return _expected[key]


@pytest.mark.parametrize("rows, vocab", list(SIZES))
@pytest.mark.parametrize("kind", KINDS)
def test_same_tokens_as_the_reference(isa, kind, rows, vocab):
    for offset in range(0, len(COMBOS), SIZES[rows, vocab]):
        batch = mixed_batch(rows, vocab, offset)
        tokens = native_sample(make_logits(kind, rows, vocab), batch)
        assert tokens.dtype == torch.int64 and tokens.shape == (rows,)
        assert torch.equal(tokens, expected_tokens(kind, rows, vocab, offset)), (kind, offset)


@pytest.mark.parametrize("kind", ["normal*2", "llm", "rounded"])
def test_same_tokens_at_64_rows_of_qwens_vocabulary(isa, kind):
    batch = mixed_batch(64, QWEN_VOCAB, offset=5)
    logits = make_logits(kind, 64, QWEN_VOCAB)
    assert torch.equal(native_sample(logits, batch), expected_tokens(kind, 64, QWEN_VOCAB, 5))


def uniform_batch(rows, vocab, seed=0, **params):
    batch = mixed_batch(rows, vocab, 0, seed)
    for name, value in params.items():
        getattr(batch, name).fill_(value)
    batch.all_greedy = bool((batch.temperature == 0).all())
    return batch


@pytest.mark.parametrize("params", [dict(temperature=1.0, top_k=1), dict(temperature=1.0, top_k=2),
                                    dict(temperature=1.0, top_p=0.3), dict(temperature=0.7, top_k=40, top_p=0.8)])
def test_ties_at_the_cut_follow_torch_topk(isa, params):
    """Equal probabilities straddling the cut: the reference keeps those torch.topk lists first; many seeds, so the
    race often picks a tied token."""
    for vocab in (1000, QWEN_VOCAB):
        logits = make_logits("rounded", 16, vocab, seed=3)
        logits[:, [5, 900]] = logits.max(dim=-1, keepdim=True).values  # ties at the top as well
        batch = uniform_batch(16, vocab, seed=4, **{**dict(min_p=0.0, top_p=1.0, top_k=0), **params})
        assert torch.equal(native_sample(logits, batch), sample(logits, batch)), vocab


def test_edge_parameters(isa):
    logits = make_logits("normal*3", 6, 2000)
    batch = uniform_batch(6, 2000, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0)
    batch.top_p[0] = 0.0  # only the most likely token
    batch.min_p[1] = 1.0  # only the maximum
    batch.temperature[2] = -1.0  # a negative temperature samples at 1, as the reference does
    batch.top_k[3] = -5  # off
    batch.top_k[4] = 10 ** 9  # off
    batch.temperature[5] = 1e-4  # near-greedy: huge scaled logits
    assert torch.equal(native_sample(logits, batch), sample(logits, batch))
    batch.min_p[1] = 1.5  # no survivor: the reference's argmax over -inf scores is token 0
    assert native_sample(logits, batch)[1] == sample(logits, batch)[1] == 0


def test_greedy_takes_the_first_maximum(isa):
    logits = torch.randn(4, 1003)
    logits[0, [17, 500, 900]] = 9.0
    logits[1, [1001, 1002]] = 9.0  # in the tail past the last full vector
    logits[2] = float("-inf")
    logits[3, [8, 16]] = 9.0  # the same lane of two vectors
    batch = uniform_batch(4, 1003, temperature=0.0)
    assert batch.all_greedy
    assert native_sample(logits, batch).tolist() == [17, 1001, 0, 8]


def test_rows_with_a_stride_and_rows_that_move(isa):
    wide = make_logits("llm", 9, 3000)
    logits = wide[:, :2500]  # row stride 3000
    batch = mixed_batch(9, 2500, offset=11)
    tokens = native_sample(logits, batch)
    assert torch.equal(tokens, sample(logits.contiguous(), batch))
    # a row's token depends on its own logits and parameters only
    for r in (0, 4, 8):
        one = SamplingBatch(*(getattr(batch, f)[r:r + 1] for f in ("temperature", "top_k", "top_p", "min_p",
                                                                   "seeds", "steps")), False, None)
        assert native_sample(logits[r:r + 1], one).item() == tokens[r].item()


def test_noise_matches_the_contract(isa):
    """Within one ulp of 1 + |g| (the logs' rounding: glibc's logf against torch's vectorised log); mostly exact."""
    g = torch.Generator().manual_seed(0)
    n = 200_000
    seeds = torch.randint(-2 ** 63, 2 ** 63 - 1, (n,), generator=g, dtype=torch.int64)
    steps = torch.randint(0, 2 ** 32, (n,), generator=g, dtype=torch.int64)
    tokens = torch.randint(0, 2 ** 31 - 1, (n,), generator=g, dtype=torch.int64)
    expected = gumbel_noise(seeds, steps, tokens)
    got = torch.ops.stage1.gumbel_noise(seeds, steps, tokens)
    assert got.shape == expected.shape and got.dtype == torch.float32
    assert ((got - expected).abs() <= 2.0 ** -23 * (1 + expected.abs())).all()
    assert (got == expected).float().mean() > 0.8


def test_opcheck():
    logits = make_logits("llm", 3, 500)
    batch = mixed_batch(3, 500, offset=2)
    args = (logits, batch.temperature, batch.top_k, batch.top_p, batch.min_p, batch.seeds, batch.steps)
    torch.library.opcheck(torch.ops.stage1.sample.default, args)
    torch.library.opcheck(torch.ops.stage1.gumbel_noise.default, (batch.seeds, batch.steps, batch.top_k.abs()))


def test_bad_inputs_are_rejected():
    logits = torch.randn(3, 100)
    batch = mixed_batch(3, 100, 0)
    args = [logits, batch.temperature, batch.top_k, batch.top_p, batch.min_p, batch.seeds, batch.steps]

    def call(i, value):
        bad = list(args)
        bad[i] = value
        return torch.ops.stage1.sample(*bad)

    with pytest.raises(RuntimeError, match="logits must be \\[rows, vocab\\]"):
        call(0, logits[0])
    with pytest.raises(RuntimeError, match="logits must be float32"):
        call(0, logits.bfloat16())
    with pytest.raises(RuntimeError, match="temperature must be \\[rows\\]"):
        call(1, batch.temperature[:2])
    with pytest.raises(RuntimeError, match="top_p must be float32"):
        call(3, batch.top_p.double())
    with pytest.raises(RuntimeError, match="top_k must be int64"):
        call(2, batch.top_k.int())
    with pytest.raises(RuntimeError, match="steps must be \\[rows\\]"):
        call(6, batch.steps[:, None])
    with pytest.raises(RuntimeError, match="the vocabulary is empty"):
        call(0, logits[:, :0])
    with pytest.raises(RuntimeError, match="one shape"):
        torch.ops.stage1.gumbel_noise(batch.seeds, batch.steps, batch.seeds[:2])
    assert torch.ops.stage1.sample(logits[:0], *(a[:0] for a in args[1:])).shape == (0,)


@pytest.mark.parametrize("kind", ["normal", "peaked", "ties"])
def test_draws_only_what_transformers_warpers_keep(isa, kind):
    """Every combination of temperature, top-k (1, 20, above the vocabulary), top-p (near 0 too) and min-p, each
    row drawn with 16 seeds: every token is one transformers' warpers keep (temperature -> top-k -> top-p over
    top-k's survivors -> min-p) and the reference's own draw. Exact ties only with top-p off (see the reference's
    test in tests/engine/test_sampling.py)."""
    from transformers_warpers import combo_params, logits_for, mass_margin, transformers_survivors

    vocab, seeds = 500, 16
    params = [p for p in combo_params(vocab) if kind != "ties" or p[2] == 1.0]
    sure = mass_margin(logits_for(kind, len(params), vocab, seed=7), params) >= 1e-6
    params = [p for p, ok in zip(params, sure.tolist()) if ok]  # top-p not decided by fp32 rounding
    logits = logits_for(kind, len(params), vocab, seed=7).repeat_interleave(seeds, dim=0)
    rows = len(params) * seeds
    batch = SamplingBatch(
        temperature=torch.tensor([p[0] for p in params]).repeat_interleave(seeds),
        top_k=torch.tensor([p[1] for p in params]).repeat_interleave(seeds),
        top_p=torch.tensor([p[2] for p in params]).repeat_interleave(seeds),
        min_p=torch.tensor([p[3] for p in params]).repeat_interleave(seeds),
        seeds=torch.arange(rows), steps=torch.zeros(rows, dtype=torch.int64), all_greedy=False, max_logprobs=None)
    tokens = native_sample(logits, batch)
    allowed = transformers_survivors(logits[::seeds], params).repeat_interleave(seeds, dim=0)
    assert allowed.gather(1, tokens[:, None]).all()
    assert torch.equal(tokens, sample(logits, batch))
