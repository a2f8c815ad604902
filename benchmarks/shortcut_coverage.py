"""How often the Triton sampler's race shortcut can draw a row, on a real model's logits (no GPU needed).

    python benchmarks/shortcut_coverage.py                     # the default model (cached), float32, on the CPU
    python benchmarks/shortcut_coverage.py --model DIR --json

The shortcut (kernels/sampling/shortcut.py) gathers the tokens whose race score x + noise beats the most likely
token's, keeps those no more likely token outscores (the front) and checks the filters at them in one pass. A row
with more than CAP candidates or NT front tokens falls back to the threshold search, and every candidate's block
needs Philox noise. This script runs the model teacher-forced over a few texts (every position is one next-token
distribution), draws the sampler's very noise (the reference's Philox) and counts with the kernel's rule
(`shortcut_fronts`, which tests/kernels/test_sampling_kernel.py ties to the kernel), per temperature: candidates,
front sizes, the rows the shortcut would hand to the search, and the share of tokens that need noise. The same for
the benchmarks' synthetic LLM-like logits (common.llm_like_logits), for comparison.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

TEXTS = [
    "Here are examples of prompts and their completions:\n\nThe answer to \"What is 2+2?\" is:\n4\n\n"
    "Write a short sentence about winter:\nSnow blankets the quiet landscape in pristine white.\n\n"
    "What is gravity?\nGravity is the force by which a planet or other body draws objects toward its center. It "
    "keeps the moon in orbit around the earth and makes things fall to the ground when dropped.",
    "def quicksort(xs):\n    if len(xs) <= 1:\n        return xs\n    pivot = xs[0]\n"
    "    left = [x for x in xs[1:] if x < pivot]\n    right = [x for x in xs[1:] if x >= pivot]\n"
    "    return quicksort(left) + [pivot] + quicksort(right)\n",
    "The history of the Roman Empire spans many centuries, from the founding of the city to the fall of "
    "Constantinople. Historians often divide it into periods, each with its own emperors, wars and reforms.",
]
TEMPERATURES = (0.7, 1.0, 1.5)


def model_logits(model_dir: Path) -> torch.Tensor:
    """Next-token logits at every position of TEXTS, [positions, vocab] fp32 (one forward per text, no cache)."""
    from stage1.contract import AttentionContext
    from stage1.engine.config import ModelConfig
    from stage1.engine.tokenizer import Tokenizer
    from stage1.engine.weights import load_model

    config = ModelConfig.from_dir(model_dir)
    model = load_model(model_dir, config, torch.float32, torch.device("cpu"))
    tokenizer = Tokenizer(model_dir)
    rows = []
    with torch.inference_mode():
        for text in TEXTS:
            ids = tokenizer.encode(text)
            n = len(ids)
            ctx = AttentionContext(is_prefill=True, kv_cache=None, slot_mapping=None, block_tables=None,
                                   context_lens=torch.tensor([n]), cu_seqlens_q_host=[0, n], context_lens_host=[n])
            hidden = model(torch.tensor(ids), torch.arange(n), ctx)
            rows.append(model.compute_logits(hidden).float())
    return torch.cat(rows)


def shortcut_fronts(logits: torch.Tensor, temperature: float,
                    noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The shortcut's rule (kernels/sampling/shortcut.py; rows without min-p, as here), per row of `logits` with
    the race noise `noise` (same shape): how many candidates there are, the tokens whose race score z = x + noise
    beats the top token's (the raw argmax, the first index on ties; an equal score beats it from a lower index),
    and how many of them make the front, those that no candidate at least as likely (x_j >= x_i) beats (a higher
    score, or the same from a lower index). test_sampling_kernel.py ties this rule to the kernel's."""
    rows, vocab = logits.shape
    x = logits.float() / temperature
    z = x + noise
    top = logits.argmax(-1, keepdim=True)
    z_top = z.gather(1, top)
    idx = torch.arange(vocab)[None, :]
    candidates = (z > z_top) | ((z == z_top) & (idx < top))
    fronts = []
    for r in range(rows):
        i = candidates[r].nonzero().flatten()
        cx, cz = x[r, i], z[r, i]
        beats = (cz[None, :] > cz[:, None]) | ((cz[None, :] == cz[:, None]) & (i[None, :] < i[:, None]))
        fronts.append(int((~(beats & (cx[None, :] >= cx[:, None])).any(1)).sum()))
    return candidates.sum(-1), torch.tensor(fronts)


def coverage(logits: torch.Tensor, temperature: float, cap: int, front_limit: int, step: int = 3) -> dict:
    """The shortcut's candidates and fronts for each row of `logits` at `temperature` (seed = row)."""
    from stage1.contract import GUMBEL_MAX, gumbel_noise

    rows, vocab = logits.shape
    x = logits / temperature
    seeds = torch.arange(rows)[:, None].expand(rows, vocab)
    noise = gumbel_noise(seeds, torch.full((rows, vocab), step), torch.arange(vocab)[None].expand(rows, vocab))
    counts, fronts = shortcut_fronts(logits, temperature, noise)
    z_top = (x + noise).gather(1, logits.argmax(-1, keepdim=True))
    fallback = (counts > cap) | (fronts > front_limit)
    return dict(temperature=temperature, rows=rows, candidates_median=counts.median().item(),
                candidates_p99=counts.float().quantile(0.99).item(), candidates_max=counts.max().item(),
                front_max=fronts.max().item(), fallback_rows=fallback.float().mean().item(),
                tokens_needing_noise=(x + GUMBEL_MAX >= z_top).float().mean().item())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=None, help="a checkpoint directory (default: the default model)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    # here, not at the top: tests/kernels/test_sampling_kernel.py loads this file by its path for shortcut_fronts
    from common import json_line, llm_like_logits, print_header

    from stage1.kernels.sampling import GPU_CONFIG
    from stage1.models.fetch import default_model_dir

    model_dir = args.model or default_model_dir()
    try:
        real = model_logits(model_dir)
    except (OSError, ValueError) as e:  # a missing or broken checkpoint: its message says what to pass
        raise SystemExit(f"shortcut_coverage: {e}") from None
    sources = {f"{model_dir.name} (teacher-forced)": real,
               "common.py llm_like_logits": llm_like_logits(64, 152_064)}
    results = []
    print_header()
    print(f"CAP {GPU_CONFIG['CAP']}, front limit NT {GPU_CONFIG['NT']} (GPU_CONFIG)")
    for name, logits in sources.items():
        print(f"{name}: {logits.shape[0]} rows x {logits.shape[1]}")
        for t in TEMPERATURES:
            r = dict(coverage(logits, t, GPU_CONFIG["CAP"], GPU_CONFIG["NT"]), source=name)
            results.append(r)
            print(f"  T {t}: candidates median {r['candidates_median']}, p99 {r['candidates_p99']:.0f}, max "
                  f"{r['candidates_max']}; front max {r['front_max']}; rows left to the search "
                  f"{r['fallback_rows']:.1%}; tokens needing noise {r['tokens_needing_noise']:.1%}")
    if args.json:
        print(json.dumps(results))
    print(json_line("shortcut_coverage", {"model": str(model_dir), "cap": GPU_CONFIG["CAP"], "nt": GPU_CONFIG["NT"],
                                          "results": results}))


if __name__ == "__main__":
    main()
