"""Tensor parallelism end to end on the CPU (gloo, loopback): N ranks in N processes give the tokens of one.

Tiny random checkpoints with 1, 2 and 4 KV heads (KV heads replicated or sharded), tied and untied. Each engine
runs with a small KV cache (preemption), a small prefill budget (chunked prompts) and prompts sharing a prefix
(prefix caching), greedy and seeded sampling; a killed worker ends `generate` with its name, and no process
outlives the engine.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest
import torch

from stage1 import LLM, SamplingParams
from stage1.engine.distributed import kv_heads_per_rank
from stage1.engine.kv_cache import bytes_per_block
from stage1.engine.config import ModelConfig
from stage1.engine.tp_workers import WorkerDiedError

pytestmark = pytest.mark.slow

BLOCKS = 20  # for 8 prompts of up to 61 tokens + 24 new ones (up to 48 blocks): sequences get preempted


def engine(path, tp: int, **kwargs) -> LLM:
    """The same pool of BLOCKS blocks at any TP size (a rank's block holds only its KV heads)."""
    config = ModelConfig.from_dir(path)
    per_block = bytes_per_block(config, 16, torch.float32, kv_heads_per_rank(config.num_key_value_heads, tp))
    return LLM(path, dtype="float32", kernels="torch", tensor_parallel_size=tp, kv_cache_memory=BLOCKS * per_block,
               max_num_batched_tokens=48, max_model_len=128, **kwargs)


def prompts(vocab: int) -> list[dict]:
    g = torch.Generator().manual_seed(3)
    shared = torch.randint(3, vocab, (37,), generator=g).tolist()  # two full blocks to share
    lengths = [1, 61, 9, 33, 17, 4, 50, 26]
    return [{"prompt_token_ids": (shared if i % 3 == 0 else []) + torch.randint(3, vocab, (n,), generator=g).tolist()}
            for i, n in enumerate(lengths)]


def run(llm: LLM, batch: list[dict]) -> tuple[list, list]:
    greedy = llm.generate(batch, SamplingParams(max_tokens=24, temperature=0, ignore_eos=True), use_tqdm=False)
    sampled = llm.generate(batch, [SamplingParams(max_tokens=16, temperature=0.9, top_p=0.9, seed=i, n=1 + i % 2,
                                                  ignore_eos=True) for i in range(len(batch))], use_tqdm=False)
    return ([[c.token_ids for c in o.outputs] for o in greedy], [[c.token_ids for c in o.outputs] for o in sampled])


@pytest.mark.parametrize("shape,overrides,tp", [
    ("gqa2-d128-untied", dict(kv_heads=1), 2),  # one KV head: both ranks keep it
    ("gqa2-d128-untied", {}, 2),  # two KV heads: one each
    ("gqa2-d128-untied", {}, 4),  # two KV heads over four ranks: each kept by two
    ("gqa1-d64-tied", {}, 4),  # four KV heads, tied embeddings: one each
])
def test_tensor_parallel_gives_the_tokens_of_one_rank(checkpoint, shape, overrides, tp):
    path = checkpoint(shape, **overrides)
    batch = prompts(ModelConfig.from_dir(path).vocab_size)
    reference = engine(path, 1)
    expected = run(reference, batch)
    with engine(path, tp) as llm:
        assert run(llm, batch) == expected
        # the conditions this test is about did happen, and the same way on both
        assert llm.core.scheduler.num_preemptions == reference.core.scheduler.num_preemptions > 0
        assert llm.stats.prefix_cached_tokens == reference.stats.prefix_cached_tokens > 0
        assert llm.stats.prefill_steps == reference.stats.prefill_steps > len(batch) // 2  # chunked
        assert llm.core.block_manager.num_blocks == BLOCKS
    assert not llm.core.runner.workers[0].process.is_alive()


def test_a_killed_worker_ends_generate_with_its_name(checkpoint):
    path = checkpoint("gqa2-d128-untied")
    llm = engine(path, 2)
    worker = llm.core.runner.workers[0].process
    killed_at = []

    def kill():
        time.sleep(1.0)
        killed_at.append(time.monotonic())
        os.kill(worker.pid, signal.SIGKILL)

    threading.Thread(target=kill, daemon=True).start()
    long_run = SamplingParams(max_tokens=None, temperature=0, ignore_eos=True)  # to the context limit, repeatedly
    with pytest.raises(WorkerDiedError, match=r"worker rank 1 \(pid \d+\) was killed by SIGKILL"):
        while True:
            llm.generate([{"prompt_token_ids": [5, 6, 7]}] * 8, long_run, use_tqdm=False)
    assert time.monotonic() - killed_at[0] < 10
    with pytest.raises(RuntimeError, match="stopped after an earlier failure"):
        llm.generate([{"prompt_token_ids": [5]}], long_run, use_tqdm=False)
    assert not llm.core.runner.workers[0].process.is_alive()
    llm.shutdown()


def test_a_step_a_worker_died_during_is_refused(checkpoint, monkeypatch):
    """An aborted NCCL group lets rank 0's collectives return from partial sums without an error: stood in for by
    rank 0's step killing the worker, waiting for its end, and returning made-up tokens. run() must raise, naming the
    worker, instead of handing those tokens to the rows."""
    from stage1.engine.model_runner import PendingResult

    llm = engine(checkpoint("gqa2-d128-untied"), 2)
    runner = llm.core.runner
    worker = runner.workers[0].process

    def partial_sums(plan):
        os.kill(worker.pid, signal.SIGKILL)
        worker.join(10)
        return PendingResult(torch.zeros(len(plan.sample_rows), dtype=torch.int64))

    monkeypatch.setattr(runner.runner, "execute", partial_sums)
    with pytest.raises(WorkerDiedError, match=r"worker rank 1 \(pid \d+\) was killed by SIGKILL"):
        llm.generate([{"prompt_token_ids": [5, 6, 7]}], SamplingParams(max_tokens=4, temperature=0), use_tqdm=False)
    llm.shutdown()


def test_workers_end_when_rank_zero_dies(checkpoint, tmp_path):
    """Rank 0 killed outright (no cleanup runs): its workers must not outlive it."""
    script = textwrap.dedent(f"""
        import os, signal
        from stage1 import LLM
        llm = LLM({str(checkpoint("gqa2-d128-untied"))!r}, dtype="float32", kernels="torch", tensor_parallel_size=2,
                  kv_cache_memory=1 << 20)
        print(llm.core.runner.workers[0].process.pid, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == -signal.SIGKILL, result.stderr
    pid = int(result.stdout.split()[0])
    deadline = time.monotonic() + 10
    while _running(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _running(pid), f"worker {pid} outlived rank 0"


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"  # a zombie has ended
    except FileNotFoundError:
        return False


def test_a_tensor_parallel_size_that_does_not_split_the_model_names_the_ones_that_do(checkpoint):
    with pytest.raises(ValueError, match=r"tensor_parallel_size=3 does not split this model.*Sizes that work: 1, 2, 4"):
        LLM(checkpoint("gqa2-d128-untied"), tensor_parallel_size=3)
