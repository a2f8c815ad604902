"""How much host time does a decode step cost, apart from the model's own compute?

    python benchmarks/bench_host.py --batch 64,256

On a GPU the host work of a step (scheduling, building the step's inputs, the sampler's bookkeeping, appending
tokens, detokenizing, stop checks) either overlaps the GPU's work or makes the GPU wait. This runs the engine's
real loop on a model whose compute is small: one decoder layer of hidden size 64, with the real 151,936-token
vocabulary and the default model's tokenizer, so the LM head's rows, the sampler's rows and the detokenizer are the
real sizes. Every decode step's time is split into

    schedule     Scheduler.schedule
    inputs       ModelRunner.prepare (host arrays) + upload (device tensors, attention context)
    sample       ModelRunner.sample without the sampler's kernel (parameters to tensors, tokens back to lists)
    postprocess  EngineCore._postprocess (tokens appended, text, stop rules, blocks)
    device       ModelRunner.forward + compute_logits (the LM head) + the sampler's kernel: what a GPU would
                 run (here the CPU runs it; reported, not counted as host time)
    other        the step's wall time outside these (the engine core's own lines); reported apart

Each batch size runs twice: with the device work stubbed (placeholders that return at once: the host loop alone,
as a GPU machine's CPU runs it) and with the model on the device (on a CPU its matmuls and logits also evict the
host loop's data from the caches: an upper bound there). `host_ms_per_decode_step` is schedule + inputs + sample
+ postprocess of the stubbed run, the mean over the decode steps that ran the full batch
(`host_ms_with_device_work`: the other run's). The phases are timed by wrapping the engine's methods from outside (nothing in the engine knows). The
last line is one JSON object.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import time
from collections import defaultdict
from dataclasses import replace
from pathlib import Path

import torch
from common import json_line, print_header, random_checkpoint

from stage1 import LLM, SamplingParams
from stage1.models.fetch import default_model_dir

PROBE = "host-probe"  # benchmarks/common.py PRESETS: 1 layer, hidden 64, the real vocabulary


def stand_in_tokenizer(out: Path, regular: int = 151643) -> None:
    """A byte-level BPE tokenizer.json of Qwen's size, for a machine without the default model and no network (the
    GPU machine): the 256 byte-level characters, then tokens made by appending one of them to an earlier token (each
    with its merge), up to `regular` tokens, then Qwen's three special tokens at 151643-151645. The engine decodes
    through a per-token byte table, so its host cost depends on the vocabulary's size, not on which strings it holds
    (the token ids here are random anyway)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    alphabet = sorted(alphabet)
    vocab = {c: i for i, c in enumerate(alphabet)}
    tokens, merges, stem = list(alphabet), [], 0
    while len(tokens) < regular:
        for c in alphabet:
            if len(tokens) >= regular:
                break
            token = tokens[stem] + c
            vocab[token] = len(tokens)
            tokens.append(token)
            merges.append((tokens[stem], c))
        stem += 1
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    tok.save(str(out))


def probe_checkpoint() -> Path:
    """The probe model's random fp32 weights with the default model's tokenizer beside them; where the default
    model is not cached (`python -m stage1.models fetch` puts it there) a stand-in of the same size. Prints which."""
    path = random_checkpoint(PROBE, torch.float32)
    if not (path / "tokenizer.json").is_file():
        try:
            shutil.copy(default_model_dir(fetch=False) / "tokenizer.json", path / "tokenizer.json")
            (path / "tokenizer.source").write_text("the default model's")
        except Exception as error:  # noqa: BLE001 - no cached model, and no network to fetch it (the GPU machine)
            stand_in_tokenizer(path / "tokenizer.json")
            (path / "tokenizer.source").write_text(
                f"a stand-in byte-level BPE of 151,646 tokens (the default model's was not cached: "
                f"{type(error).__name__})")
    print(f"tokenizer: {tokenizer_source(path)}")
    return path


def tokenizer_source(path: Path) -> str:
    marker = path / "tokenizer.source"
    return marker.read_text() if marker.is_file() else "the default model's"


class PhaseClock:
    """Accumulates seconds per phase for the current step; `end_step` files them under the step's kind."""

    def __init__(self):
        self.current: dict[str, float] = defaultdict(float)
        self.steps: list[tuple[bool, int, dict[str, float]]] = []  # (is_prefill, seqs, phases)
        self.last_logits = None

    def wrap(self, owner, name: str, phase: str, sign: float = 1.0):
        fn = getattr(owner, name)

        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.current[phase] += sign * (time.perf_counter() - start)
        setattr(owner, name, timed)
        return timed

    def end_step(self, is_prefill: bool, seqs: int) -> None:
        self.steps.append((is_prefill, seqs, dict(self.current)))
        self.current.clear()


def instrument(llm: LLM) -> PhaseClock:
    clock = PhaseClock()
    core, runner = llm.core, llm.core.runner
    clock.wrap(core.scheduler, "schedule", "schedule")
    clock.wrap(runner, "prepare", "inputs")
    clock.wrap(runner, "upload", "inputs")
    clock.wrap(runner, "forward", "device")
    compute_logits = runner.compute_logits

    def logits_kept_until_next_step(*args):
        # freed inside the next call, as device time: freeing a [256, 151936] fp32 tensor on the CPU is a ~20 ms
        # munmap that a GPU's caching allocator does not have
        clock.last_logits = None
        clock.last_logits = compute_logits(*args)
        return clock.last_logits
    runner.compute_logits = logits_kept_until_next_step
    clock.wrap(runner, "compute_logits", "device")
    # the sampler's kernel is device work, taken out of `sample`, which wraps it
    clock.wrap(runner, "sample", "sample")
    kernels = runner.config.kernels
    sampler = kernels.sample

    def timed_sampler(logits, batch):
        start = time.perf_counter()
        tokens = sampler(logits, batch)
        if tokens.device.type == "cuda":
            torch.cuda.synchronize(tokens.device)
        spent = time.perf_counter() - start
        clock.current["device"] += spent
        clock.current["sample"] -= spent
        return tokens
    object.__setattr__(runner.config, "kernels", replace(kernels, sample=timed_sampler))

    step = core.step
    postprocess = clock.wrap(core, "_postprocess", "postprocess")

    def timed_step():
        seen, start = {}, time.perf_counter()

        def remember(batch, result):
            seen["batch"] = batch
            return postprocess(batch, result)
        core._postprocess = remember
        try:
            return step()
        finally:
            core._postprocess = postprocess
            clock.current["step"] = time.perf_counter() - start
            if "batch" in seen:
                clock.end_step(seen["batch"].is_prefill, len(seen["batch"].seqs))
            else:
                clock.current.clear()
    core.step = timed_step
    return clock


def prompts(batch: int, length: int, vocab_text: int, seed: int) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    return [{"prompt_token_ids": torch.randint(0, vocab_text, (length,), generator=g).tolist()} for _ in range(batch)]


HOST_PHASES = ("schedule", "inputs", "sample", "postprocess")


VOCAB_TEXT = 151643  # Qwen's ids below the special tokens


def stub_device_work(llm: LLM, seed: int = 0) -> None:
    """Replaces what a GPU would run (the forward, the LM head, the sampler's kernel) by placeholders that return at
    once: a zero hidden state, a one-column logits tensor, and random token ids of the real vocabulary. Left is the
    host's loop alone, as a GPU machine's CPU runs it: with the model on this CPU, its matmuls and the 151,936-wide
    logits also evict the host loop's data from the caches between steps, which a GPU's work would not."""
    runner = llm.core.runner
    hidden = llm.config.model.hidden_size
    g = torch.Generator().manual_seed(seed)
    runner.forward = lambda inputs: torch.zeros(len(inputs.input_ids), hidden)
    runner.compute_logits = lambda states, inputs, is_prefill: torch.zeros(len(inputs.sample_rows), 1)
    kernels = runner.config.kernels
    object.__setattr__(runner.config, "kernels", replace(
        kernels, sample=lambda logits, batch: torch.randint(0, VOCAB_TEXT, (logits.shape[0],), generator=g)))


def run_batch(model_dir: Path, batch: int, new_tokens: int, prompt_len: int, kernels: str, device: str,
              temperature: float, stub: bool) -> dict:
    llm = LLM(model_dir, dtype="float32", device=device, max_num_seqs=batch, kernels=kernels,
              max_num_batched_tokens=max(batch * prompt_len, 2048))
    vocab_text = VOCAB_TEXT
    params = SamplingParams(max_tokens=new_tokens, temperature=temperature, top_p=0.9 if temperature else 1.0,
                            seed=0, ignore_eos=True)
    llm.generate(prompts(batch, prompt_len, vocab_text, seed=1), params, use_tqdm=False)  # warm-up
    if stub:
        stub_device_work(llm)
    clock = instrument(llm)
    start = time.perf_counter()
    outputs = llm.generate(prompts(batch, prompt_len, vocab_text, seed=2), params, use_tqdm=False)
    wall = time.perf_counter() - start
    assert all(len(o.outputs[0].token_ids) == new_tokens for o in outputs)
    full = [phases for is_prefill, seqs, phases in clock.steps if not is_prefill and seqs == batch]
    mean_ms = {p: 1e3 * statistics.fmean(s.get(p, 0.0) for s in full) for p in HOST_PHASES + ("device", "step")}
    mean_ms["other"] = mean_ms.pop("step") - sum(mean_ms.values())
    host = [1e3 * sum(s.get(p, 0.0) for p in HOST_PHASES) for s in full]
    llm.shutdown()
    return dict(batch=batch, decode_steps=len(full), wall_s=round(wall, 3),
                host_ms_per_decode_step=round(statistics.fmean(host), 4),
                host_ms_median=round(statistics.median(host), 4),
                phases_ms={p: round(v, 4) for p, v in mean_ms.items()}, kernels=llm.config.kernels.name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", default="64,256", help="comma-separated batch sizes (default 64,256)")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--kernels", default="auto")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 (default): greedy")
    args = parser.parse_args()
    device = llm_device(args.device)
    print_header(device)
    model_dir = probe_checkpoint()
    print(f"probe model {model_dir}")
    print(f"{'batch':>6} {'host ms/step':>13} {'schedule':>9} {'inputs':>8} {'sample':>8} {'postproc':>9} "
          f"{'device*':>9} {'other':>7}   (*model + LM head + sampler, run by the CPU here; not host time)")
    results = {}
    for batch in (int(b) for b in args.batch.split(",")):
        for stub in (True, False):
            r = run_batch(model_dir, batch, args.new_tokens, args.prompt_len, args.kernels, args.device,
                          args.temperature, stub)
            ph = r["phases_ms"]
            print(f"{batch:>6} {r['host_ms_per_decode_step']:>13.3f} {ph['schedule']:>9.3f} {ph['inputs']:>8.3f} "
                  f"{ph['sample']:>8.3f} {ph['postprocess']:>9.3f} {ph['device']:>9.2f} {ph['other']:>7.3f}   "
                  f"({'device work stubbed' if stub else f'device work on {device}'}; "
                  f"{r['decode_steps']} full decode steps, kernels {r['kernels']})", flush=True)
            results.setdefault(batch, {})["stubbed" if stub else "device"] = r
    print(json_line("bench_host", dict(
        new_tokens=args.new_tokens, prompt_len=args.prompt_len, temperature=args.temperature,
        tokenizer=tokenizer_source(model_dir),
        # the host loop alone (device work stubbed): what a GPU machine's CPU spends per step
        host_ms_per_decode_step={b: r["stubbed"]["host_ms_per_decode_step"] for b, r in results.items()},
        host_ms_with_device_work={b: r["device"]["host_ms_per_decode_step"] for b, r in results.items()},
        runs=results), device))


def llm_device(device: str) -> str:
    return ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device


if __name__ == "__main__":
    main()
