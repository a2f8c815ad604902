"""A tensor-parallel engine cleans up like a Python object: `del llm` (garbage collection) and an exception inside
`LLM(...)` end its worker processes and free its process group, so engines can be built one after another in
one process (a notebook, a sweep), and two can be alive at once, each with a process group of its own.

Each test runs its engines in a fresh interpreter: what it checks is process-wide (child processes, process
groups), so a regression must not leak into the other tests, and the subprocess's timeout bounds it. The script
prints one JSON line of facts that the test then checks.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.slow

PRELUDE = """
import gc, json, multiprocessing as mp, sys, time
from stage1 import LLM, SamplingParams

PATH = sys.argv[1]

def engine(tp):
    return LLM(PATH, dtype="float32", kernels="torch", tensor_parallel_size=tp, kv_cache_memory=1 << 20,
               max_model_len=128)

def greedy(llm):
    outputs = llm.generate([{"prompt_token_ids": [5, 6, 7, 8]}, {"prompt_token_ids": [9, 3]}],
                           SamplingParams(max_tokens=12, temperature=0, ignore_eos=True), use_tqdm=False)
    return [o.outputs[0].token_ids for o in outputs]

def worker_pids(llm):
    return [w.process.pid for w in llm.core.runner.workers]

def running(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"  # a zombie has ended
    except FileNotFoundError:
        return False

def left_after(pids, seconds=10.0):
    '''The pids still running after up to `seconds`.'''
    deadline = time.monotonic() + seconds
    while any(map(running, pids)) and time.monotonic() < deadline:
        time.sleep(0.05)
    return [pid for pid in pids if running(pid)]
"""


def run_script(checkpoint_dir, body: str, timeout: float = 240) -> dict:
    """Runs PRELUDE + body in a fresh interpreter (its workers die with it); returns the JSON it printed last."""
    script = PRELUDE + textwrap.dedent(body)
    result = subprocess.run([sys.executable, "-c", script, str(checkpoint_dir)], capture_output=True, text=True,
                            timeout=timeout)
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_del_ends_the_workers_and_the_next_engine_gives_the_same_tokens(checkpoint):
    facts = run_script(checkpoint("gqa2-d128-untied"), """
        llm = engine(2)
        first, pids = greedy(llm), worker_pids(llm)
        del llm
        gc.collect()
        started = time.monotonic()
        left = left_after(pids)
        seconds = time.monotonic() - started
        llm = engine(2)
        second = greedy(llm)
        print(json.dumps(dict(first=first, second=second, pids=pids, left=left, seconds=seconds)))
    """)
    assert facts["pids"] and not facts["left"], f"workers {facts['left']} outlived `del llm`"
    assert facts["seconds"] < 10
    assert facts["second"] == facts["first"]


def test_an_exception_inside_llm_construction_ends_the_workers(checkpoint):
    """A failure after the workers started, at rank 0's model runner (inside the tensor-parallel runner) and at
    the engine core's block manager (after it): LLM(...) raises it and no worker is left; then an engine builds."""
    facts = run_script(checkpoint("gqa2-d128-untied"), """
        import stage1.engine.engine_core as engine_core
        import stage1.engine.tp_workers as tp_workers

        def failing(name):
            def fail(*args, **kwargs):
                started.extend(p.pid for p in mp.active_children())  # the workers, running by now
                raise RuntimeError(f"injected failure in {name}")
            return fail

        results = {}
        for module, name in [(tp_workers, "ModelRunner"), (engine_core, "BlockManager")]:
            started, real = [], getattr(module, name)
            setattr(module, name, failing(name))
            try:
                engine(2)
                raised = None
            except RuntimeError as error:
                raised = str(error)
            finally:
                setattr(module, name, real)
            results[name] = dict(raised=raised, started=started, left=left_after(started))
        tokens = greedy(engine(2))
        print(json.dumps(dict(results=results, tokens=tokens)))
    """)
    for name, result in facts["results"].items():
        assert result["raised"] == f"injected failure in {name}"
        assert result["started"], f"{name}: no worker had started: the failure was injected too early"
        assert not result["left"], f"{name}: workers {result['left']} outlived the failed LLM(...)"
    assert len(facts["tokens"]) == 2


def test_two_engines_alive_at_once_each_give_the_tokens_of_one_rank(checkpoint):
    facts = run_script(checkpoint("gqa2-d128-untied"), """
        import torch.distributed as dist
        reference = greedy(engine(1))
        a = engine(2)
        b = engine(2)
        runs = [greedy(a), greedy(b), greedy(a)]
        pids_a, pids_b = worker_pids(a), worker_pids(b)
        a.shutdown()
        a.shutdown()  # idempotent
        left_a = left_after(pids_a)
        after_a = greedy(b)  # b does not depend on a
        del b
        gc.collect()
        print(json.dumps(dict(reference=reference, runs=runs, after_a=after_a, left_a=left_a,
                              left_b=left_after(pids_b), default_group=dist.is_initialized())))
    """)
    assert all(run == facts["reference"] for run in facts["runs"])
    assert facts["after_a"] == facts["reference"]
    assert not facts["left_a"] and not facts["left_b"]
    assert not facts["default_group"], "an engine used the process's default group"


def test_a_shut_down_engine_says_so(checkpoint):
    facts = run_script(checkpoint("gqa2-d128-untied"), """
        llm = engine(2)
        llm.shutdown()
        try:
            greedy(llm)
            message = None
        except RuntimeError as error:
            message = str(error)
        print(json.dumps(dict(message=message)))
    """)
    assert facts["message"] and "shut down" in facts["message"]
