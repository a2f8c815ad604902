"""The fused Triton sampler (kernels/sampling/) against the reference sampler (stage1.engine.sampler).

On a CPU the kernel runs in the Triton interpreter (tests/kernels/conftest.py sets TRITON_INTERPRET=1), where every
program costs tens of milliseconds, so the distribution tests draw thousands of tokens from one row at once with
sampling_hooks.many_draws (the same row at consecutive steps: each is the token a call with that step draws, which
`test_many_draws_equal_separate_calls` checks). `_sample`, fused_sample's launcher, overrides the config and
returns each row's state: the survivor cut, the search passes and whether the shortcut drew.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")

from stage1 import SamplingParams  # noqa: E402
from stage1.engine.sampler import SamplingBatch, filtered_probs  # noqa: E402
from stage1.kernels.sampling.launch import INTERPRETER_CONFIG, _sample, float_key, fused_sample  # noqa: E402
from sampling_hooks import kernel_noise, many_draws  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def rows_of(temperature, top_k, top_p, min_p, seeds=None, steps=None):
    n = len(temperature)
    return dict(temperature=torch.tensor(temperature, dtype=torch.float32, device=DEVICE),
                top_k=torch.tensor(top_k, dtype=torch.int64, device=DEVICE),
                top_p=torch.tensor(top_p, dtype=torch.float32, device=DEVICE),
                min_p=torch.tensor(min_p, dtype=torch.float32, device=DEVICE),
                seeds=torch.tensor(seeds if seeds is not None else list(range(n)), dtype=torch.int64, device=DEVICE),
                steps=torch.tensor(steps if steps is not None else [0] * n, dtype=torch.int64, device=DEVICE))


def sample(logits, rows):
    return fused_sample(logits, *params_of(rows))


def run(logits, rows, **config):
    """fused_sample's launches with `config` overrides (`splits`, SHORTCUT, FUSE, ...): tokens and row states."""
    return _sample(logits, *params_of(rows), **config)


def params_of(rows):
    return [rows[name] for name in ("temperature", "top_k", "top_p", "min_p", "seeds", "steps")]


def trace(result):
    """Per row: the survivor cut, the search passes, 1 where the shortcut drew (int64 [rows, 3])."""
    return torch.stack([result.cut, result.passes, result.shortcut_drew.long()], dim=1)


def reference_probs(logits, rows):
    """filtered_probs of the reference sampler, for the same per-row parameters."""
    params = [SamplingParams(max_tokens=1, temperature=float(t), top_k=int(k), top_p=float(p), min_p=float(mp))
              for t, k, p, mp in zip(rows["temperature"].tolist(), rows["top_k"].tolist(), rows["top_p"].tolist(),
                                     rows["min_p"].tolist())]
    return filtered_probs(logits.cpu(), SamplingBatch.build(params, torch.device("cpu")))


def survivors(logits, rows):
    """The kernel's survivor rule, in float64 PyTorch: a token of scaled logit v survives iff count(x > v) < k,
    mass(x > v) < top_p * (the mass of top-k's survivors; 1 without top-k) (top_p = 1: off) and
    p_v >= min_p * p_max; ties at the cut all survive."""
    logits, rows = logits.cpu(), {name: t.cpu() for name, t in rows.items()}
    t = torch.where(rows["temperature"] > 0, rows["temperature"], 1.0)
    x = logits.float() / t[:, None]
    vocab = x.shape[-1]
    xs, order = x.double().sort(dim=-1, descending=True)
    p = xs.softmax(dim=-1)
    ascending = xs.flip(-1).contiguous()
    greater = vocab - torch.searchsorted(ascending, xs.contiguous(), right=True)  # count strictly above
    mass_before = p.cumsum(dim=-1) - p
    mass_greater = mass_before.gather(-1, greater.clamp(max=vocab - 1))
    k = torch.where((rows["top_k"] > 0) & (rows["top_k"] < vocab), rows["top_k"], vocab)
    keep = greater < k[:, None]
    survivors_mass = torch.where(k < vocab, (p * keep).sum(dim=-1), 1.0)
    keep &= (rows["top_p"][:, None] >= 1) | (mass_greater < (rows["top_p"].double() * survivors_mass)[:, None])
    kept = torch.zeros_like(keep).scatter_(-1, order, keep)
    m = x.max(dim=-1, keepdim=True).values
    return kept & (torch.exp(x - m) >= rows["min_p"][:, None])


def kernel_survivors(logits, rows, cut):
    t = torch.where(rows["temperature"] > 0, rows["temperature"], 1.0).cpu()
    x = logits.cpu().float() / t[:, None]
    m = x.max(dim=-1, keepdim=True).values
    return (float_key(x) > cut.cpu()[:, None].int()) & (torch.exp(x - m) >= rows["min_p"].cpu()[:, None])


def chi_square_ok(counts, expected_probs, draws):
    """Chi-square goodness of fit, pooling bins expected below 5 draws; the bound is above the 99.9% quantile."""
    e = expected_probs.double() * draws
    c = counts.double()
    small = e < 5
    e = torch.cat([e[~small], e[small].sum()[None]]) if small.any() else e
    c = torch.cat([c[~small], c[small].sum()[None]]) if small.any() else c
    keep = e > 0
    chi2 = ((c[keep] - e[keep]) ** 2 / e[keep]).sum().item()
    dof = max(int(keep.sum()) - 1, 1)
    return chi2 < dof + 4.5 * (2 * dof) ** 0.5 + 10, (chi2, dof)


def test_greedy_rows_are_argmax_in_a_mixed_batch():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 1000, generator=g)
    logits[1, [17, 500, 900]] = 9.0  # a tie for the maximum: argmax takes the first index
    logits[3, [3, 4]] = 7.5
    logits = logits.to(DEVICE)
    rows = rows_of([0, 0, 1.0, 0, 0.7, 0], [0, 0, 20, 0, 0, 5], [1, 1, 0.9, 1, 1, 0.5], [0, 0, 0, 0, 0.1, 0])
    tokens = sample(logits, rows)
    greedy = rows["temperature"] == 0
    assert torch.equal(tokens[greedy], logits.argmax(-1)[greedy])
    assert tokens[1].item() == 17 and tokens[3].item() == 3
    # ties in the same lane of different chunks (the kernel keeps a running argmax per lane), in a vocabulary wider
    # than one chunk
    wide = torch.randn(2, 20_000, generator=g)
    wide[0, [100, 100 + 8192, 100 + 16384]] = 8.0
    wide[1, [19_999, 2047, 4095]] = 8.0
    wide = wide.to(DEVICE)
    tokens = sample(wide, rows_of([0, 0], [0, 0], [1, 1], [0, 0]))
    assert tokens.tolist() == [100, 2047]
    # bf16 logits (many exact ties) and an all-greedy batch
    logits16 = (torch.randn(4, 3000, generator=g) * 3).to(torch.bfloat16).to(DEVICE)
    tokens = sample(logits16, rows_of([0] * 4, [0] * 4, [1] * 4, [0] * 4))
    assert torch.equal(tokens, logits16.argmax(-1))


def test_seeded_rows_do_not_depend_on_the_batch():
    g = torch.Generator().manual_seed(1)
    vocab = 700
    logits = (torch.randn(5, vocab, generator=g) * 2).to(DEVICE)
    # the paths: top-k + top-p search, top-p only, min-p only, plain temperature (drawn in the first pass), greedy
    params = dict(temperature=[0.9, 1.0, 0.8, 1.2, 0], top_k=[30, 0, 0, 0, 0], top_p=[0.9, 0.8, 1, 1, 1],
                  min_p=[0.0, 0.0, 0.05, 0.0, 0], seeds=[11, 22, 33, 44, 55], steps=[3, 0, 7, 12, 1])
    rows = rows_of(**params)
    together = sample(logits, rows)
    again = sample(logits, rows)
    assert torch.equal(together, again)
    for i in range(5):
        alone = sample(logits[i:i + 1], {name: t[i:i + 1] for name, t in rows.items()})
        assert alone.item() == together[i].item()
    order = torch.tensor([3, 0, 4, 2, 1], device=DEVICE)
    permuted = sample(logits[order], {name: t[order] for name, t in rows.items()})
    assert torch.equal(permuted, together[order])
    # other neighbours (different logits and parameters around it) change nothing for row 0
    others = (torch.randn(3, vocab, generator=g) * 5).to(DEVICE)
    mixed_logits = torch.cat([others[:2], logits[:1], others[2:]])
    mixed = rows_of(temperature=[0.5, 0, 0.9, 2.0], top_k=[3, 0, 30, 0], top_p=[1, 1, 0.9, 0.5],
                    min_p=[0.2, 0, 0.0, 0], seeds=[1, 2, 11, 4], steps=[9, 9, 3, 9])
    tokens = sample(mixed_logits, mixed)
    assert tokens[2].item() == together[0].item()
    # rows of a wider tensor (row stride > vocab) and a tiny vocabulary
    wide = torch.cat([logits, torch.randn(5, 50, generator=g).to(DEVICE)], dim=1)
    strided = sample(wide[:, :vocab], rows)
    assert torch.equal(strided, together)
    tiny = sample(logits[:, :3], rows)
    assert (tiny < 3).all() and tiny[4].item() == logits[4, :3].argmax().item()
    # the stream moves with the step and the seed
    draws = {sample(logits[1:2], rows_of([1.0], [0], [0.8], [0.0], seeds=[22], steps=[s])).item()
             for s in range(12)}
    assert len(draws) > 1
    seeds = {sample(logits[3:4], rows_of([1.2], [0], [1], [0.0], seeds=[s], steps=[12])).item()
             for s in range(12)}
    assert len(seeds) > 1


def test_same_tokens_as_the_reference_sampler():
    """The kernel and stage1.engine.sampler.sample use the same Philox noise and race: from the same logits,
    parameters, seeds and steps they draw the same tokens (continuous logits: no ties at a cut)."""
    from stage1.engine.sampler import sample as reference_sample

    g = torch.Generator().manual_seed(10)
    n, vocab = 24, 3000
    logits = torch.randn(n, vocab, generator=g) * 2
    logits.scatter_add_(1, torch.randint(0, vocab, (n, 20), generator=g), 3 + 5 * torch.rand(n, 20, generator=g))
    logits = logits.to(DEVICE)
    params = [SamplingParams(max_tokens=1, temperature=t, top_k=k, top_p=p, min_p=m)
              for t, k, p, m in zip([0, 0.7, 1.0, 1.3] * 6, [0, 40, 0, 5, 0, 0] * 4, [1, 0.9, 0.95, 1, 0.5, 1] * 4,
                                    [0, 0, 0, 0, 0, 0.05, 0.1, 0] * 3)]
    drawn = set()
    for step in range(4):
        batch = SamplingBatch.build(params, DEVICE, seeds=[1000 + 7 * i for i in range(n)], steps=[step] * n)
        expected = reference_sample(logits, batch)
        tokens = fused_sample(logits, batch.temperature, batch.top_k, batch.top_p, batch.min_p, batch.seeds,
                              batch.steps)
        assert torch.equal(tokens, expected), (step, (tokens != expected).nonzero().flatten().tolist())
        drawn |= set(zip(range(n), tokens.tolist()))
    assert len(drawn) > n + 10  # the sampled rows did move with the step


def test_many_draws_equal_separate_calls():
    """many_draws (used below for thousands of draws) gives what separate calls with those steps give."""
    g = torch.Generator().manual_seed(2)
    logits = (torch.randn(1, 200, generator=g) * 2).to(DEVICE)
    for cfg in (dict(temperature=[1.0], top_k=[0], top_p=[1], min_p=[0.0]),  # drawn in the first pass
                dict(temperature=[0.8], top_k=[40], top_p=[0.95], min_p=[0.01])):  # searched, then drawn
        steps = list(range(5, 13))
        n = len(steps)
        separate = sample(logits.expand(n, -1), rows_of(**{k: v * n for k, v in cfg.items()},
                                                         seeds=[7] * n, steps=steps))
        together, _ = many_draws(logits, rows_of(**cfg, seeds=[7], steps=[5]), n)
        assert torch.equal(together[0], separate)


def test_split_rows_give_the_same_tokens():
    """Rows cut into several chunks (as on a GPU) give exactly the tokens, cut and search passes of one chunk per
    row, with temperature-only rows drawn in the statistics pass (FUSE) or later, and with the race shortcut on or
    off (every row searched)."""
    g = torch.Generator().manual_seed(9)
    n, vocab = 10, 5000
    logits = torch.randn(n, vocab, generator=g) * 2
    logits.scatter_add_(1, torch.randint(0, vocab, (n, 12), generator=g), 3 + 6 * torch.rand(n, 12, generator=g))
    logits[0, [2600, 4995, 10]] = 30.0  # a tie for the maximum across chunks: the first index wins
    logits[3, :] = float("-inf")
    logits[3, 2500] = 1.0
    logits = logits.to(DEVICE)
    # greedy; top-k + top-p; top-p; min-p (one finite token); temperature; top-k; top-p + min-p; and three rows
    # that leave only the most likely token: top-k 1, a tiny top-p, min-p 1
    rows = rows_of([0, 0.8, 1.0, 0.9, 1.1, 0.7, 1.3, 1.0, 5.0, 1.0], [0, 40, 0, 0, 0, 7, 0, 1, 0, 0],
                   [1, 0.9, 0.95, 1, 1, 1, 0.5, 1, 1e-6, 1], [0, 0, 0, 0.05, 0, 0, 0.02, 0, 0, 1.0],
                   seeds=[3, 1, 4, 1, 5, 9, 2, 6, 5, 3], steps=[0, 6, 5, 3, 5, 8, 9, 7, 9, 3])
    results = {}
    for fuse in (True, False):
        for shortcut in (True, False):
            for splits in (1, 3 if fuse else 4):
                result = run(logits, rows, splits=splits, SHORTCUT=shortcut, FUSE=fuse)
                results[fuse, shortcut, splits] = (result.tokens, trace(result))
    tokens, _ = results[True, True, 1]
    for (fuse, shortcut, splits), (other_tokens, debug) in results.items():
        assert torch.equal(other_tokens, tokens), (fuse, shortcut, splits)
        assert torch.equal(debug, results[fuse, shortcut, 1][1]), (fuse, shortcut, splits)
    drew = results[True, True, 1][1][:, 2]
    # the shortcut drew the sampled rows, except row 8: at T = 5 the flat row has more candidates than CAP, so it
    # went on to the search (3 passes)
    assert drew.tolist() == [0, 1, 1, 1, 0, 1, 1, 1, 0, 1]
    assert results[True, True, 1][1][8, 1].item() == 3
    assert not results[True, False, 1][1][:, 2].any()
    assert tokens[0].item() == 10 and tokens[3].item() == 2500
    assert torch.equal(tokens[7:], logits[7:].argmax(-1))
    assert len(set(tokens[1:7].tolist())) > 3  # the sampled rows drew from their own distributions


def test_shortcut_checks_its_front_and_hands_longer_ones_to_the_search():
    """Tokens lined up so that each beats the top token's race score and no more likely one beats it: the whole
    line is the shortcut's front, so the filters decide which of them wins. Up to NT the shortcut checks each
    one; a longer line goes to the threshold search. Both draw the reference's token."""
    from stage1.contract import gumbel_noise
    from stage1.engine.sampler import SamplingBatch
    from stage1.engine.sampler import sample as reference_sample
    vocab, seed, step = 4000, 77, 3
    noise = gumbel_noise(torch.full((vocab,), seed), torch.full((vocab,), step), torch.arange(vocab))
    by_noise = noise.argsort()

    def line(length):
        """x falls by 1e-3 along the line while the noise rises by far more: each token outscores the previous."""
        picks = by_noise[torch.linspace(vocab // 2, vocab - 1, length).long()]
        x = torch.full((vocab,), -20.0)
        x[picks] = 10.0 - 1e-3 * torch.arange(length, dtype=torch.float32)
        return x, picks

    long_line, _ = line(INTERPRETER_CONFIG["NT"] + 4)
    short_line, picks = line(10)
    logits = torch.stack([long_line, short_line, short_line, short_line]).to(DEVICE)
    # the line's tokens hold nearly equal mass (0.1 each): top-p 0.35 keeps four of them, top-k 5 five
    params = [SamplingParams(max_tokens=1, temperature=1.0, top_k=k, top_p=p, min_p=m)
              for k, p, m in ((50, 0.9, 0.0), (5, 1.0, 0.0), (0, 1.0, 0.5), (0, 0.35, 0.0))]
    batch = SamplingBatch.build(params, DEVICE, seeds=[seed] * 4, steps=[step] * 4)
    result = _sample(logits, batch.temperature, batch.top_k, batch.top_p, batch.min_p, batch.seeds, batch.steps)
    tokens = result.tokens
    assert result.shortcut_drew.tolist() == [False, True, True, True]  # the long line was searched
    assert tokens[1:].tolist() == [picks[4].item(), picks[9].item(), picks[3].item()]
    assert torch.equal(tokens, reference_sample(logits, batch))


def test_shortcut_coverage_counts_with_the_kernels_rule():
    """benchmarks/shortcut_coverage.py restates the shortcut's rule in PyTorch; on the same logits and noise it
    finds the kernel's candidates, fronts and hand-offs to the search, ties included: an equal race score beats the
    top token, or another candidate at least as likely, only from a lower index."""
    from stage1.kernels.sampling.common import _FRONT

    spec = importlib.util.spec_from_file_location(
        "shortcut_coverage", Path(__file__).parents[2] / "benchmarks" / "shortcut_coverage.py")
    coverage = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(coverage)

    g = torch.Generator().manual_seed(12)
    n, vocab, top = 6, 4096, 500
    seeds, steps = torch.arange(n, device=DEVICE), torch.full((n,), 3, device=DEVICE)
    noise = kernel_noise(seeds, steps, vocab).cpu()  # the interpreter's logs are not PyTorch's to the last bit
    logits = torch.full((n, vocab), -20.0)
    logits[:, top] = 10.0
    z_top = logits[:, top] + noise[:, top]

    def tie(row, token, z):
        """A logit that puts the token's race score exactly at z (at T = 1, x is the logit), or None: fp32 rounding
        can step over z (x + noise rounds to every other value when the noise's low bits are a half)."""
        x = z - noise[row, token]
        for _ in range(4):
            x = torch.nextafter(x, torch.tensor(float("-inf")))
        for _ in range(8):
            if x + noise[row, token] == z:
                return x
            x = torch.nextafter(x, torch.tensor(float("inf")))
        return None

    def tie_first(row, tokens, z):
        """Puts the first token that can be tied at race score z there."""
        token, x = next((t, x) for t in tokens if (x := tie(row, t, z)) is not None)
        logits[row, token] = x

    def less_likely(row, bound):
        """Tokens whose noise exceeds the top token's by `bound`: tied with it, they are less likely."""
        return [i for i in (noise[row] > max(noise[row, top] + bound, 0.0)).nonzero().flatten().tolist() if i != top]

    tie_first(0, [i for i in less_likely(0, 1) if i < top], z_top[0])  # a lower index than the top's: a candidate
    tie_first(1, [i for i in less_likely(1, 1) if i > top], z_top[1])  # a higher one: not
    # two candidates with one score: the lower index, at least as likely, prunes the other from the front
    z_pair, tokens = z_top[2] + 1, less_likely(2, 2)
    for low, high in zip(tokens, tokens[1:]):
        x_low, x_high = tie(2, low, z_pair), tie(2, high, z_pair)
        if noise[2, low] < noise[2, high] and x_low is not None and x_high is not None:
            break
    logits[2, low], logits[2, high] = x_low, x_high
    logits[3] = torch.randn(vocab, generator=g) * 2  # LLM-like: a few candidates
    logits[3].scatter_add_(0, torch.randint(0, vocab, (40,), generator=g), 4 + 8 * torch.rand(40, generator=g))
    logits[4] = torch.randn(vocab, generator=g) * 0.3  # flat: more than CAP candidates
    # a line of NT + 4 tokens, each less likely than the last and outscoring it: a front longer than NT
    line = noise[5].argsort()[torch.linspace(vocab // 2, vocab - 1, INTERPRETER_CONFIG["NT"] + 4).long()]
    logits[5, line] = 10.0 - 1e-3 * torch.arange(len(line), dtype=torch.float32)
    logits[5, top] = -20.0

    counts, fronts = coverage.shortcut_fronts(logits, 1.0, noise)
    cap, nt = INTERPRETER_CONFIG["CAP"], INTERPRETER_CONFIG["NT"]
    assert counts[:3].tolist() == [1, 0, 2] and fronts[2].item() == 1
    assert counts[4] > cap and fronts[5] > nt and 0 < counts[3] <= cap
    logits = logits.to(DEVICE)
    result = run(logits, rows_of([1.0] * n, [0] * n, [1] * n, [0.0] * n, seeds=seeds.tolist(), steps=[3] * n),
                 FUSE=False)  # temperature-only rows go through the shortcut, not the statistics pass
    assert result.candidates.cpu().tolist() == counts.tolist()
    handed_on = (counts > cap) | (fronts > nt)
    assert result.shortcut_drew.cpu().tolist() == (~handed_on).tolist()
    assert result.state_i[:, _FRONT.value].cpu().tolist() == torch.where(handed_on, -1, fronts).tolist()


@pytest.mark.parametrize("vocab, temperature, top_k, top_p, min_p", [
    (64, 0.8, 20, 0.95, 0.02),  # all three filters
    (256, 1.0, 0, 0.9, 0.0),  # top-p alone
    (128, 1.0, 5, 1.0, 0.0),  # top-k alone
    (300, 0.7, 0, 1.0, 0.05),  # min-p alone (no search)
    (512, 1.3, 0, 1.0, 0.0),  # temperature alone (drawn during the first pass)
])
def test_draws_follow_the_filtered_distribution(vocab, temperature, top_k, top_p, min_p):
    g = torch.Generator().manual_seed(vocab)
    logits = (torch.randn(1, vocab, generator=g) * 2).to(DEVICE)
    rows = rows_of([temperature], [top_k], [top_p], [min_p], seeds=[1234], steps=[0])
    expected = reference_probs(logits, rows)[0]
    draws = 4096
    tokens, _ = many_draws(logits, rows, draws)
    counts = torch.bincount(tokens[0].cpu(), minlength=vocab)
    assert counts[expected == 0].sum() == 0, "a filtered-out token was drawn"
    ok, stats = chi_square_ok(counts, expected, draws)
    assert ok, stats


def test_draws_across_seeds_follow_the_filtered_distribution():
    """Rows with different seeds (a few steps each) are independent draws too."""
    g = torch.Generator().manual_seed(8)
    vocab, n, per_row = 96, 128, 32
    logits = (torch.randn(1, vocab, generator=g) * 1.5).to(DEVICE)
    rows = rows_of([0.9] * n, [30] * n, [0.9] * n, [0.01] * n,
                   seeds=torch.randint(0, 2**62, (n,), generator=g).tolist(), steps=[100] * n)
    expected = reference_probs(logits[:1], {name: t[:1] for name, t in rows.items()})[0]
    tokens, _ = many_draws(logits.expand(n, -1), rows, per_row)
    counts = torch.bincount(tokens.flatten().cpu(), minlength=vocab)
    assert counts[expected == 0].sum() == 0, "a filtered-out token was drawn"
    ok, stats = chi_square_ok(counts, expected, n * per_row)
    assert ok, stats


def test_survivors_match_the_reference_filters():
    """The threshold search keeps exactly the reference's tokens (continuous logits: no ties at the cut)."""
    g = torch.Generator().manual_seed(3)
    n, vocab = 48, 400
    logits = (torch.randn(n, vocab, generator=g) * (0.5 + 3 * torch.rand(n, 1, generator=g))).to(DEVICE)
    temperature = (0.3 + 1.5 * torch.rand(n, generator=g)).tolist()
    top_k = [int(v) for v in torch.randint(1, vocab, (n,), generator=g) * (torch.rand(n, generator=g) < 0.5)]
    top_k[:4] = [1, 2, vocab - 1, vocab + 5]
    top_p = [p if p < 0.98 else 1.0 for p in (0.02 + torch.rand(n, generator=g)).clamp(max=1.0).tolist()]
    min_p = [p if p < 0.15 else 0.0 for p in (0.3 * torch.rand(n, generator=g)).tolist()]
    top_p[4:8] = [1.0] * 4  # top-k or min-p alone
    rows = rows_of(temperature, top_k, top_p, min_p)
    searched = run(logits, rows, SHORTCUT=False)
    tokens = searched.tokens
    # the shortcut checks the survivor condition only at a few tokens' values, and draws the same tokens
    shortcut = run(logits, rows)
    assert torch.equal(shortcut.tokens, tokens)
    assert shortcut.shortcut_drew.sum() > n // 2
    kept = kernel_survivors(logits, rows, searched.cut)
    assert torch.equal(kept, survivors(logits, rows))
    reference = reference_probs(logits, rows) > 0
    # the reference's cumsum can round to 1 before the end and drop a tail of ~1e-7 mass even at top_p = 1
    exact = rows["top_p"].cpu() < 1
    assert torch.equal(kept[exact], reference[exact])
    assert kept.gather(1, tokens.cpu()[:, None]).all()


@pytest.mark.parametrize("kind", ["normal", "peaked", "ties"])
def test_survivors_are_what_transformers_warpers_keep(kind):
    """Every combination of temperature, top-k (1, 20, above the vocabulary), top-p (near 0 too) and min-p: the
    kernel's survivors (searched) are those of transformers' warpers (temperature -> top-k -> top-p over top-k's
    survivors -> min-p), and its tokens (with the shortcut too) are the reference's. Exact ties only with top-p
    off: which tied tokens a top-p cut keeps is up to each implementation's sort (this kernel keeps them all)."""
    from transformers_warpers import combo_params, logits_for, mass_margin, transformers_survivors

    vocab = 256
    params = [p for p in combo_params(vocab) if kind != "ties" or p[2] == 1.0]
    logits = logits_for(kind, len(params), vocab, seed=5)
    sure = mass_margin(logits, params) >= 1e-6  # top-p not decided by fp32 rounding
    rows = rows_of(*[[p[i] for p in params] for i in range(4)], seeds=list(range(len(params))))
    logits = logits.to(DEVICE)
    searched = run(logits, rows, SHORTCUT=False)
    kept = kernel_survivors(logits, rows, searched.cut)
    theirs = transformers_survivors(logits.cpu(), params)
    assert torch.equal(kept[sure], theirs[sure])
    assert torch.equal(run(logits, rows).tokens, searched.tokens)
    reference_tokens = reference_sample(logits, rows)
    assert torch.equal(searched.tokens.cpu()[sure], reference_tokens[sure])


def reference_sample(logits, rows):
    from stage1.engine.sampler import sample as reference

    params = [SamplingParams(max_tokens=1, temperature=float(t), top_k=int(k), top_p=float(p), min_p=float(mp))
              for t, k, p, mp in zip(rows["temperature"].tolist(), rows["top_k"].tolist(), rows["top_p"].tolist(),
                                     rows["min_p"].tolist())]
    return reference(logits.cpu(), SamplingBatch.build(params, torch.device("cpu"), seeds=rows["seeds"].cpu().numpy(),
                                                       steps=rows["steps"].cpu().numpy()))


def test_ties_at_the_cut_all_survive():
    """bf16 logits tie often; every token tied with the last survivor survives (the reference keeps whichever of
    them its sort puts first)."""
    g = torch.Generator().manual_seed(4)
    n, vocab = 12, 2000
    logits = (torch.randn(n, vocab, generator=g) * 3).to(torch.bfloat16).to(DEVICE)
    rows = rows_of([1.0] * n, [5, 17, 40, 100, 0, 0, 0, 0, 8, 300, 2, 0],
                   [1, 1, 1, 1, 0.3, 0.5, 0.7, 0.9, 0.6, 0.95, 1, 0.05], [0.0] * n)
    searched = run(logits, rows, SHORTCUT=False)
    tokens = searched.tokens
    assert torch.equal(sample(logits, rows), tokens)  # the shortcut's condition treats ties alike
    kept = kernel_survivors(logits, rows, searched.cut)
    assert torch.equal(kept, survivors(logits, rows))
    reference = reference_probs(logits, rows) > 0
    assert (kept | ~reference).all(), "a token the reference keeps was dropped"
    x = logits.cpu().float()
    cut_value = torch.where(reference, x, float("inf")).min(dim=-1, keepdim=True).values
    extra = kept & ~reference
    assert (x[extra.nonzero(as_tuple=True)] == cut_value.expand_as(x)[extra.nonzero(as_tuple=True)]).all()
    assert extra.any(), "no tie straddled a cut: the test lost its point"
    # the bracket snaps to token values, so ties end the search early instead of bisecting down to one key
    assert searched.passes.max() <= 4, searched.passes.tolist()


def test_full_vocabulary_draws_only_survivors():
    """Qwen's vocabulary (152,064): the search isolates the survivors and nothing else is ever drawn."""
    g = torch.Generator().manual_seed(5)
    vocab = 152_064
    logits = torch.randn(3, vocab, generator=g) * 2
    peaks = torch.randint(0, vocab, (3, 40), generator=g)
    logits.scatter_add_(1, peaks, 4 + 8 * torch.rand(3, 40, generator=g))  # a few likely tokens, like an LLM's
    logits[2, 1000:2000] = float("-inf")  # masked tokens
    logits = logits.to(DEVICE)
    rows = rows_of([0.8, 1.0, 1.5], [50, 0, 2000], [0.9, 0.95, 0.99], [0.0, 0.01, 0.0])
    tokens, searched = many_draws(logits, rows, 16)
    kept = kernel_survivors(logits, rows, searched.cut)
    assert torch.equal(kept, survivors(logits, rows))
    assert torch.equal(kept, reference_probs(logits, rows) > 0)
    assert kept.gather(1, tokens.cpu()).all()
    assert (searched.passes <= 8).all(), searched.passes.tolist()  # search passes over the row
    # the shortcut draws the first of those tokens (the same step) without a search
    first = run(logits, rows)
    assert torch.equal(first.tokens, tokens[:, 0]) and first.shortcut_drew.all()


def test_edge_parameters():
    g = torch.Generator().manual_seed(7)
    logits = (torch.randn(5, 300, generator=g) * 2).to(DEVICE)
    argmax = logits.argmax(-1)
    # top_k = 1, a tiny top_p and min_p = 1 leave only the most likely token
    rows = rows_of([1.0, 1.0, 1.0, 1.0, 5.0], [1, 0, 0, 1, 0], [1, 1e-6, 1, 0.5, 1e-6], [0, 0, 1.0, 0, 0],
                   seeds=[9] * 5, steps=[0, 1, 2, 3, 4])
    tokens, _ = many_draws(logits, rows, 8)
    assert torch.equal(tokens, argmax[:, None].expand(-1, 8))
    # masked (-inf) tokens are never drawn, even at a high temperature
    masked = logits.clone()
    masked[:, 100:] = float("-inf")
    tokens, _ = many_draws(masked, rows_of([3.0] * 5, [0, 50, 0, 0, 0], [1, 1, 0.99, 1, 1], [0, 0, 0, 1e-4, 0]),
                           64)
    assert (tokens < 100).all()
    # rejects misshapen inputs, and config entries that do not exist
    with pytest.raises(ValueError, match="per-row"):
        fused_sample(logits, torch.ones(4), *[torch.zeros(5)] * 5)
    with pytest.raises(ValueError, match="no config entry"):
        run(logits, rows, SHORTCUTS=False)


@pytest.mark.skipif(DEVICE.type == "cuda", reason="a GPU compiles and runs the kernel in the tests above")
def test_compiles_for_hopper_without_spills():
    """The interpreter skips Triton's compiler: compile every sampler kernel as GPU_CONFIG configures it for sm_90
    (to the binary, with the bundled ptxas; compile_sm90.py), which catches what it never sees (non-constexpr
    globals, loop-carried types, layouts) and register spills."""
    env = dict(os.environ, TRITON_INTERPRET="0")
    script = Path(__file__).with_name("compile_sm90.py")
    out = subprocess.run([sys.executable, str(script), "sampling"], capture_output=True, text=True, env=env,
                         timeout=300, check=False)
    assert out.returncode == 0, out.stdout + out.stderr[-3000:]
    lines = [line for line in out.stdout.split("\n") if "spill_bytes" in line]
    assert len(lines) == 2 * 5, out.stdout  # each of the five kernels, for two logit dtypes
    assert all(line.endswith("spill_bytes=0") for line in lines), out.stdout
