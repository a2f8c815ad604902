"""Does a bf16 checkpoint of the Qwen2.5-7B shape load and generate on this CPU, and with how much memory?

    python benchmarks/load_7b_bf16.py                   # native kernels, bf16 weights with fp32 arithmetic
    python benchmarks/load_7b_bf16.py --keep --kernels torch --dtype bfloat16

Writes random bf16 weights of the 7B shape once under --dir (15.2 GB, outside the repo), streamed tensor by tensor
into one safetensors file, so the writer never holds more than a slice of one tensor. Then, in a fresh process,
builds `LLM(dir, kernels=..., dtype=..., device="cpu")`, generates --new-tokens greedy tokens for one prompt of
--prompt-len random ids, and reports that process's peak resident memory (VmHWM), the load time and the prefill
and decode-step times. The default (`native` + `bfloat16`: the linear layers keep bf16 weights and multiply in fp32)
is what `auto` runs on a CPU without native bf16; in fp32 the weights alone would be 30.5 GB. Deletes the
checkpoint at the end unless --keep. The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
from common import json_line, print_header, streamed_bf16_checkpoint

PRESET = "qwen2.5-7b"


def child(model_dir: Path, kernels: str, dtype: str, prompt_len: int, new_tokens: int) -> None:
    """The load and the generation in this fresh process; prints one JSON line."""
    from stage1 import LLM, SamplingParams
    from stage1.engine.weights import peak_rss_bytes

    baseline = peak_rss_bytes()
    start = time.perf_counter()
    llm = LLM(model_dir, kernels=kernels, dtype=dtype, device="cpu", skip_tokenizer_init=True, max_num_seqs=1,
              max_model_len=prompt_len + new_tokens + 16, kv_cache_memory=256 << 20)
    loaded = time.perf_counter() - start
    after_load = peak_rss_bytes()
    prompt = {"prompt_token_ids": torch.randint(100, 150000, (prompt_len,),
                                                generator=torch.Generator().manual_seed(1)).tolist()}
    start = time.perf_counter()
    [out] = llm.generate([prompt], SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True),
                         use_tqdm=False)
    wall = time.perf_counter() - start
    s = llm.stats
    print(json.dumps(dict(kernels=llm.config.kernels.name, dtype=str(llm.config.dtype).removeprefix("torch."),
                          weight_dtype=str(llm.config.kernels.weight_dtype).removeprefix("torch."),
                          load_s=round(loaded, 1), generate_s=round(wall, 1), prefill_s=round(s.prefill_seconds, 2),
                          decode_step_ms=round(1e3 * s.decode_seconds / max(s.decode_steps, 1), 1),
                          tokens=len(out.outputs[0].token_ids), peak_rss=peak_rss_bytes(),
                          peak_rss_after_load=after_load, baseline_rss=baseline,
                          param_bytes=sum(p.numel() * p.element_size() for p in llm.core.runner.model.parameters()))))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", type=Path, default=Path("/tmp/stage1-7b-bf16"))
    parser.add_argument("--kernels", default="native")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=8)
    parser.add_argument("--keep", action="store_true", help="keep the checkpoint afterwards")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    ckpt = args.dir / "ckpt"
    if args.child:
        return child(ckpt, args.kernels, args.dtype, args.prompt_len, args.new_tokens)
    print_header()
    try:
        start = time.perf_counter()
        streamed_bf16_checkpoint(ckpt, PRESET)
        size = (ckpt / "model.safetensors").stat().st_size
        print(f"checkpoint: {size / 1e9:.2f} GB ({time.perf_counter() - start:.0f} s to have it)", flush=True)
        proc = subprocess.run([sys.executable, __file__, "--child", "--dir", str(args.dir), "--kernels", args.kernels,
                               "--dtype", args.dtype, "--prompt-len", str(args.prompt_len),
                               "--new-tokens", str(args.new_tokens)], capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"the load failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
        row = json.loads(proc.stdout.strip().splitlines()[-1])
    finally:
        if not args.keep:
            shutil.rmtree(args.dir, ignore_errors=True)
    print(f"kernels {row['kernels']}, run dtype {row['dtype']}, weights {row['weight_dtype']}: loaded in "
          f"{row['load_s']} s, peak RSS {row['peak_rss'] / 2**30:.2f} GiB (after loading "
          f"{row['peak_rss_after_load'] / 2**30:.2f} GiB; parameters {row['param_bytes'] / 2**30:.2f} GiB); "
          f"{row['tokens']} tokens: prefill of {args.prompt_len} in {row['prefill_s']} s, decode step "
          f"{row['decode_step_ms']} ms")
    print(json_line("load_7b_bf16", dict(shape=PRESET, checkpoint_bytes=size, **row)))


if __name__ == "__main__":
    main()
