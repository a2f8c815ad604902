"""Does the judge (--judge, stage1/data/judge.py) rank deliberately broken responses below their originals, and
what does a rating cost?

Takes the first PAIRS (instruction, good response) pairs of the built-in example pool (stage1/data/examples.jsonl,
responses of 6+ words), makes four corruptions of each response, scores the originals and the corruptions with the
judge exactly as `python -m stage1.generate --judge` does (the same prompt, SamplingParams and score), all in one
batch, and prints, per corruption: the share of pairs where the original scores strictly higher, the mean scores;
then the judge's cost (rating prompts' tokens, those from the prefix cache, seconds per rating) with the machine
and the commit. The last line is one JSON object.

    python benchmarks/judge_check.py                  # the default model
    python benchmarks/judge_check.py --model DIR --pairs 20
"""

from __future__ import annotations

import argparse
import json
import random
import re
import statistics
import time

from common import json_line, print_header

from stage1 import LLM
from stage1.data.engine import resolve_model_dir
from stage1.data.judge import DEFAULT_JUDGE_STYLE, Judge
from stage1.data.prompts import _read_package_text

MIN_WORDS = 6  # a shorter response ("4", "Tokyo") has no words to shuffle or truncate


def shuffled(text: str, rng: random.Random) -> str:
    """Its words in a random order (another order than the original's)."""
    words = text.split()
    order = list(words)
    while order == words:
        rng.shuffle(order)
    return " ".join(order)


def truncated(text: str) -> str:
    """Cut mid-sentence: the first half of its words, the last one's trailing punctuation dropped."""
    words = text.split()
    return " ".join(words[:max(2, len(words) // 2)]).rstrip(".,;:!?")


def repeated(text: str) -> str:
    """Its first few words as a phrase, said four times."""
    phrase = " ".join(text.split()[:5]).rstrip(".,;:!?") + "."
    return " ".join([phrase] * 4)


def corruptions(pairs: list[tuple[str, str]], seed: int = 0) -> dict[str, list[str]]:
    """Each pair's response broken four ways; `other_answer` is the response of the pair half the list away."""
    rng = random.Random(seed)
    half = len(pairs) // 2
    return {
        "shuffled_words": [shuffled(r, rng) for _, r in pairs],
        "other_answer": [pairs[(i + half) % len(pairs)][1] for i in range(len(pairs))],
        "truncated": [truncated(r) for _, r in pairs],
        "repeated_phrase": [repeated(r) for _, r in pairs],
    }


def example_pairs(count: int) -> list[tuple[str, str]]:
    examples = [json.loads(line) for line in _read_package_text("examples.jsonl").splitlines() if line.strip()]
    pairs = [(ex["prompt"], ex["completion"]) for ex in examples
             if len(re.findall(r"\w+", ex["completion"])) >= MIN_WORDS]
    return pairs[:count]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="model directory (default: the stage1 default model)")
    p.add_argument("--pairs", type=int, default=40)
    p.add_argument("--style", default=DEFAULT_JUDGE_STYLE)
    p.add_argument("--dtype", default="auto")
    args = p.parse_args()

    print_header()
    model_dir = resolve_model_dir(args.model)
    llm = LLM(str(model_dir), dtype=args.dtype)
    judge = Judge(args.style, llm.tokenizer)
    pairs = example_pairs(args.pairs)
    variants = {"original": [r for _, r in pairs], **corruptions(pairs)}
    prompts = [judge.prompt(inst, response) for responses in variants.values()
               for (inst, _), response in zip(pairs, responses)]

    t0 = time.perf_counter()
    outs = llm.generate(prompts, judge.params, use_tqdm=False)
    seconds = time.perf_counter() - t0
    scores = [judge.score(out) for out in outs]
    by_variant = {name: scores[i * len(pairs):(i + 1) * len(pairs)] for i, name in enumerate(variants)}

    original = by_variant["original"]
    print(f"model {model_dir} ({llm.engine_info.get('dtype')}), judge style {judge.style.name}, {len(pairs)} pairs")
    print(f"{'variant':<16} {'mean score':>10} {'original higher':>16} {'no score':>9}")
    results = {}
    for name, values in by_variant.items():
        scored = [v for v in values if v is not None]
        mean = statistics.fmean(scored) if scored else float("nan")
        wins = sum(o is not None and v is not None and o > v for o, v in zip(original, values))
        results[name] = {"mean": round(mean, 3), "original_higher": None if name == "original" else wins,
                         "no_score": len(values) - len(scored)}
        higher = "" if name == "original" else f"{wins}/{len(pairs)} ({wins / len(pairs):.0%})"
        print(f"{name:<16} {mean:>10.3f} {higher:>16} {len(values) - len(scored):>9}")
    corrupted = [n for n in variants if n != "original"]
    wins = sum(results[n]["original_higher"] for n in corrupted)
    total = len(corrupted) * len(pairs)
    print(f"all corruptions: the original scores higher in {wins}/{total} ({wins / total:.0%})")

    prompt_tokens = sum(len(out.prompt_token_ids) for out in outs)
    cached = sum(out.num_cached_tokens for out in outs)
    print(f"cost: {len(outs)} ratings, {prompt_tokens} prompt tokens ({prompt_tokens / len(outs):.0f} a rating), "
          f"{cached} of them from the prefix cache ({cached / prompt_tokens:.0%}); {seconds:.1f} s, "
          f"{seconds / len(outs):.3f} s a rating (one batch, max_num_seqs {llm.max_num_seqs})")
    print(json_line("judge_check", {"model": str(model_dir), "dtype": llm.engine_info.get("dtype"),
                                    "style": judge.style.name, "pairs": len(pairs), "variants": results,
                                    "original_higher": wins, "comparisons": total, "ratings": len(outs),
                                    "prompt_tokens": prompt_tokens, "prompt_tokens_cached": cached,
                                    "seconds": round(seconds, 2), "seconds_per_rating": round(seconds / len(outs), 4)}))


if __name__ == "__main__":
    main()
