"""What the rows' quality signals cost the engine: the same requests with `SamplingParams(logprobs=0)` (what every
request of `python -m stage1.generate` asks, for `mean_logprob` / `min_logprob`) and without, alternating in one
process on one engine, so both see the same machine and a warm prefix cache.

The workload is the main job's: the built-in instructions' completion-style prompts (as the pipeline renders them),
sampled as it samples (temperature 0.7, top-p 0.9, its stops), --max-tokens new tokens at most. Prints each
repetition's seconds and tokens/s and the ratio of the medians; the last line is one JSON object.

    python benchmarks/logprob_cost.py                     # the default model, 124 prompts, 3 repetitions each
    python benchmarks/logprob_cost.py --model DIR --reps 5
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import replace

from common import json_line, print_header

from stage1 import LLM
from stage1.data.engine import resolve_model_dir
from stage1.data.hashing import derive_seed
from stage1.data.pipeline import default_stop_token_ids
from stage1.data.prompts import CompletionStylePrompts
from stage1.data.readers import read_instructions
from stage1.data.settings import GenerationConfig


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="model directory (default: the stage1 default model)")
    p.add_argument("--reps", type=int, default=3, help="repetitions of each variant, alternating (default 3)")
    p.add_argument("--max-tokens", type=int, default=64)
    args = p.parse_args()

    model_dir = resolve_model_dir(args.model)
    llm = LLM(str(model_dir))
    config = GenerationConfig(max_tokens=args.max_tokens)
    prompts = CompletionStylePrompts(config.style)
    instructions = read_instructions()
    texts, params = [], {}
    for inst in instructions:
        seed = derive_seed(config.seed, inst.id)
        texts.append(prompts.prompt_for(inst, seed).text)
        base = config.sampling_params(seed, prompts.style.stop, default_stop_token_ids(llm))
        for name, logprobs in (("without", None), ("logprobs=0", 0)):
            params.setdefault(name, []).append(replace(base, logprobs=logprobs))
    print_header()
    print(f"model {model_dir} ({llm.engine_info.get('dtype')}, kernels {llm.engine_info.get('kernels')}), "
          f"{len(texts)} prompts, up to {args.max_tokens} new tokens")
    llm.generate(texts, params["without"], use_tqdm=False)  # warm-up: first-call costs, the prompts in the prefix cache
    seconds: dict[str, list[float]] = {"without": [], "logprobs=0": []}
    tokens: dict[str, int] = {}
    for rep in range(args.reps):
        for name in ("without", "logprobs=0") if rep % 2 == 0 else ("logprobs=0", "without"):
            t0 = time.perf_counter()
            outs = llm.generate(texts, params[name], use_tqdm=False)
            seconds[name].append(time.perf_counter() - t0)
            tokens[name] = sum(len(c.token_ids) for o in outs for c in o.outputs)
            print(f"rep {rep} {name:>11}: {seconds[name][-1]:6.2f} s, {tokens[name]} tokens, "
                  f"{tokens[name] / seconds[name][-1]:6.1f} tokens/s")
    medians = {name: statistics.median(v) for name, v in seconds.items()}
    ratio = medians["logprobs=0"] / medians["without"]
    print(f"median: without {medians['without']:.2f} s, logprobs=0 {medians['logprobs=0']:.2f} s: "
          f"ratio {ratio:.3f} (same tokens: {tokens['without'] == tokens['logprobs=0']})")
    llm.shutdown()
    print(json_line("logprob_cost", {"model": str(model_dir), "prompts": len(texts), "max_tokens": args.max_tokens,
                                     "seconds": seconds, "tokens": tokens, "ratio_of_medians": round(ratio, 4)}))


if __name__ == "__main__":
    main()
