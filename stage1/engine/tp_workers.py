"""Tensor parallelism across processes: rank 0 runs in the engine's process, ranks 1..N-1 are workers it spawns.

Rank 0 keeps everything about requests (scheduler, block manager, prefix cache, sampler, tokenizer). Each step
it sends the workers the step's `StepPlan` (host arrays: a decode step carries one new token and one slot per
sequence, not the sequences) over a pipe, then every rank runs its shard of the model on it in lockstep; the
parallel layers' all-reduces and the logits' gather run over the engine's own process group (NCCL for CUDA
tensors, gloo on the CPU), built on the engine's own store and not as the process's default group, so engines
can be built one after another, or live side by side, in one process. Only rank 0 samples.

An engine ends like a Python object: `shutdown()`, garbage collection (`del llm`) and a failure while it is built
all stop its workers (by process: asked, then terminated, then killed) and free its process group, its store's
port and its share of the CPU threads. What does that (`_Held`) holds no reference to the runner, so a finalizer
can run it once the runner is gone.

Faults end the run with a name instead of a hang: a worker that dies (killed, out of memory, an exception)
makes rank 0's next collective or send fail, which is reported as `WorkerDiedError` naming the rank and how it
ended; workers die with rank 0 (PR_SET_PDEATHSIG, and the pipe closing); the process group's rendezvous and
collectives have a finite timeout; each engine rendezvous on a loopback port its rank 0 holds from the start
(its TCPStore binds a free one), so engines started side by side never race for one.
"""

from __future__ import annotations

import contextlib
import datetime
import multiprocessing as mp
import os
import pickle
import signal
import threading
import weakref
from multiprocessing.connection import wait as wait_for_any

import torch
import torch.distributed as dist

from ..processes import die_with_parent
from .distributed import parallel_state
from .engine_config import EngineConfig
from .model_runner import ModelRunner, StepResult
from .scheduler import ScheduledBatch

# Rendezvous and each collective give up after this long (a rank that hangs rather than dies); loading a rank's
# shard of a large checkpoint happens before the first collective, so it is generous.
LOOPBACK = "127.0.0.1"  # the rendezvous: ranks are processes of this node
PROCESS_GROUP_TIMEOUT = datetime.timedelta(minutes=10)
_DEATH_GRACE_S = 5.0  # how long rank 0 waits for a worker whose connection broke to be reaped
_EXIT_GRACE_S = 2.0  # how long a worker asked to exit gets before it is terminated (an idle one needs milliseconds)


class WorkerDiedError(RuntimeError):
    """A tensor-parallel worker ended; the engine cannot go on (its ranks are out of step)."""


class TensorParallelRunner:
    """Rank 0's model runner plus the workers for ranks 1..N-1; serves `run(batch)` like a `ModelRunner`."""

    def __init__(self, config: EngineConfig):
        self.config, self.size = config, config.tensor_parallel_size
        self.backend = "nccl" if config.device.type == "cuda" else "gloo"
        self._error: BaseException | None = None  # set once the ranks are out of step; every later call raises
        # Rank 0's store binds a free port and holds it from here on, so engines started side by side (data
        # parallelism, or two LLMs in one process) never race for one.
        store = dist.TCPStore(LOOPBACK, 0, self.size, is_master=True, timeout=PROCESS_GROUP_TIMEOUT,
                              wait_for_workers=False)
        self._held = _Held(store)
        self._finalizer = weakref.finalize(self, self._held.close)  # `del llm` and garbage collection end it too
        self.workers = self._held.workers
        try:
            threads = self._held.take_threads(self.size)
            spawn = mp.get_context("spawn")
            for rank in range(1, self.size):
                ours, theirs = spawn.Pipe()
                process = spawn.Process(target=_worker_main, name=f"stage1-tp-rank{rank}", daemon=True,
                                        args=(config, rank, store.port, threads, os.getpid(), theirs))
                process.start()
                theirs.close()
                self.workers.append(_Worker(rank, process, ours))
            with self._watch():
                self._held.group = _new_group(self.backend, 0, self.size, store, config.rank_device(0))
                with parallel_state(0, self.size, self._held.group):  # the model runner's layers take this group
                    self.runner = ModelRunner(config, rank=0)
        except BaseException:
            self.shutdown()
            raise
        self.num_kv_blocks, self.graphs = self.runner.num_kv_blocks, self.runner.graphs
        if self.backend == "nccl":  # a dead peer leaves NCCL waiting: abort the group so rank 0 raises
            threading.Thread(target=_abort_when_a_worker_dies, args=(self._held,), daemon=True).start()

    def run(self, batch: ScheduledBatch) -> StepResult:
        plan = self.runner.prepare(batch)
        with self._watch():
            payload = pickle.dumps(plan, protocol=pickle.HIGHEST_PROTOCOL)
            for worker in self.workers:
                worker.conn.send_bytes(payload)
            result = self.runner.execute(plan).result()
            # A worker that ended during the step may have left rank 0's collectives finished from partial sums
            # (an aborted NCCL group returns without an error): those tokens must not reach any row.
            if self._held.aborted.is_set() or wait_for_any([w.process.sentinel for w in self.workers], timeout=0):
                raise RuntimeError("a tensor-parallel worker ended during the step; its tokens are discarded")
            return result

    def shutdown(self) -> None:
        """Stops the workers and frees the process group, now; idempotent. The engine is unusable after."""
        self._finalizer()

    @contextlib.contextmanager
    def _watch(self):
        """Runs a call that involves the workers; any failure leaves the ranks out of step, so the engine stops,
        with the dead worker's name where one died."""
        if self._error is not None:
            raise RuntimeError("the tensor-parallel engine stopped after an earlier failure; build a new LLM"
                               ) from self._error
        if self._held.closed.is_set():
            raise RuntimeError("this tensor-parallel engine was shut down (shutdown() or its LLM deleted): "
                               "build a new LLM")
        try:
            yield
        except BaseException as error:
            dead = self._dead_worker()
            self._error = WorkerDiedError(dead) if dead else error
            self.shutdown()
            if dead:
                raise self._error from error
            raise

    def _dead_worker(self) -> str | None:
        """How the first worker that ended did, waiting a little for one whose connection just broke."""
        ended = wait_for_any([w.process.sentinel for w in self.workers], timeout=_DEATH_GRACE_S)
        for worker in self.workers:
            if worker.process.sentinel in ended:
                worker.process.join(_DEATH_GRACE_S)  # its pipe closes just before it can be reaped
                return worker.describe_end()
        return None


class _Worker:
    def __init__(self, rank: int, process: mp.Process, conn):
        self.rank, self.process, self.conn = rank, process, conn

    def describe_end(self) -> str:
        code = self.process.exitcode
        how = ("closed its connection" if code is None else f"was killed by {signal.Signals(-code).name}"
               if code < 0 else f"exited with code {code}")
        message = ""
        with contextlib.suppress(OSError, EOFError):
            while self.conn.poll():
                message = f": {pickle.loads(self.conn.recv_bytes())}"
        return f"tensor-parallel worker rank {self.rank} (pid {self.process.pid}) {how}{message}"


class _Held:
    """What one engine holds outside Python objects (worker processes, a process group, a store's port, a share
    of the CPU threads), apart from the runner so that its finalizer can free them without keeping it alive."""

    def __init__(self, store: dist.TCPStore):
        self.store, self.group, self.workers = store, None, []
        self.closed = threading.Event()
        self.aborted = threading.Event()  # the group was aborted because a worker died (NCCL)
        # the abort thread and `close` take turns: a group is never aborted while (or after) it is shut down
        self.lock = threading.Lock()
        self._threads_taken = False

    def take_threads(self, size: int) -> int:
        """The CPU threads the ranks share; rank 0 computes with its share until `close`."""
        threads = _cpu_threads.take()
        self._threads_taken = True
        _set_rank_threads(threads, size)
        return threads

    def close(self) -> None:
        with self.lock:
            self.closed.set()
        _stop_workers(self.workers)
        if self.group is not None:  # its peers are gone: nothing to wait for
            with contextlib.suppress(Exception):
                getattr(self.group, "shutdown", lambda: None)()
        self.group = self.store = None  # the store's port is freed with it
        if self._threads_taken:
            self._threads_taken = False
            _cpu_threads.give_back()


class _CpuThreads:
    """Rank 0's CPU threads while tensor-parallel engines live: each computes with its share of what the process
    had before the first, which it gets back when the last ends (so engines built one after another each start
    from the full count, not from the last one's share)."""

    def __init__(self):
        self._lock, self._engines, self._before = threading.Lock(), 0, 0

    def take(self) -> int:
        with self._lock:
            if self._engines == 0:
                self._before = torch.get_num_threads()
            self._engines += 1
            return self._before

    def give_back(self) -> None:
        with self._lock:
            self._engines -= 1
            if self._engines == 0:
                torch.set_num_threads(self._before)


_cpu_threads = _CpuThreads()


def _stop_workers(workers: list[_Worker]) -> None:
    """Asks every worker to exit; terminates, then kills, the ones that do not in time (stuck in a collective)."""
    for worker in workers:
        with contextlib.suppress(OSError):
            worker.conn.send_bytes(b"")
    for worker in workers:
        for end, wait_s in ((None, _EXIT_GRACE_S), (worker.process.terminate, 5), (worker.process.kill, 5)):
            if not worker.process.is_alive():
                break
            if end is not None:
                end()
            worker.process.join(wait_s)
        worker.conn.close()


def _abort_when_a_worker_dies(held: _Held) -> None:
    """NCCL only: a dead peer leaves the others waiting in a collective; aborting the group makes rank 0 raise."""
    wait_for_any([w.process.sentinel for w in held.workers])
    with held.lock:
        group = held.group
        if not held.closed.is_set() and group is not None and hasattr(group, "abort"):
            held.aborted.set()
            group.abort()


def _worker_main(config: EngineConfig, rank: int, port: int, threads: int, parent_pid: int, conn) -> None:
    """Rank `rank`: load its shard, then run every plan rank 0 sends until it sends b"" or goes away."""
    die_with_parent(parent_pid)
    try:
        size = config.tensor_parallel_size
        _set_rank_threads(threads, size)
        store = dist.TCPStore(LOOPBACK, port, size, is_master=False, timeout=PROCESS_GROUP_TIMEOUT)
        group = _new_group("nccl" if config.device.type == "cuda" else "gloo", rank, size, store,
                           config.rank_device(rank))
        with parallel_state(rank, size, group):
            runner = ModelRunner(config, rank=rank)
        while payload := conn.recv_bytes():
            runner.execute(pickle.loads(payload))
    except EOFError:  # rank 0 is gone
        pass
    except BaseException as error:  # tell rank 0 why, then end: its next collective fails and names this rank
        with contextlib.suppress(OSError):
            conn.send_bytes(pickle.dumps(f"{type(error).__name__}: {error}"))
        os._exit(1)
    os._exit(0)  # skip interpreter teardown: nothing is left to flush, and a torn-down group may hang at exit


def _new_group(backend: str, rank: int, size: int, store: dist.Store, device: torch.device):
    """The engine's own process group over its own store: not the process's default group (of which there is
    one per process), so engines do not exclude each other, nor a torchrun job's group."""
    if backend == "nccl":
        torch.cuda.set_device(device)
        options = dist.ProcessGroupNCCL.Options()
        options._timeout = PROCESS_GROUP_TIMEOUT
        return dist.ProcessGroupNCCL(store, rank, size, options)
    return dist.ProcessGroupGloo(store, rank, size, PROCESS_GROUP_TIMEOUT)


def _set_rank_threads(threads: int, size: int) -> None:
    """On a CPU the ranks share the cores: each computes with its share."""
    torch.set_num_threads(max(1, threads // size))


__all__ = ["TensorParallelRunner", "WorkerDiedError"]
