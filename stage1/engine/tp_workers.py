"""Tensor parallelism across processes: rank 0 runs in the engine's process, ranks 1..N-1 are workers it spawns.

Rank 0 keeps everything about requests (scheduler, block manager, prefix cache, sampler, tokenizer). Each step
it sends the workers the step's `StepPlan` (host arrays: a decode step carries one new token and one slot per
sequence, not the sequences) over a pipe, then every rank runs its shard of the model on it in lockstep; the
parallel layers' all-reduces and the logits' gather run over one process group (NCCL for CUDA tensors, gloo on
the CPU). Only rank 0 samples.

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
from .engine_config import EngineConfig
from .model_runner import ModelRunner, StepResult
from .scheduler import ScheduledBatch

# Rendezvous and each collective give up after this long (a rank that hangs rather than dies); loading a rank's
# shard of a large checkpoint happens before the first collective, so it is generous.
LOOPBACK = "127.0.0.1"  # the rendezvous: ranks are processes of this node
PROCESS_GROUP_TIMEOUT = datetime.timedelta(minutes=10)
_DEATH_GRACE_S = 5.0  # how long rank 0 waits for a worker whose connection broke to be reaped


class WorkerDiedError(RuntimeError):
    """A tensor-parallel worker ended; the engine cannot go on (its ranks are out of step)."""


class TensorParallelRunner:
    """Rank 0's model runner plus the workers for ranks 1..N-1; serves `run(batch)` like a `ModelRunner`."""

    def __init__(self, config: EngineConfig):
        if dist.is_initialized():
            raise RuntimeError("tensor parallelism needs this process's default process group, and one exists "
                               "already (another tensor-parallel LLM, or torchrun): shut that one down first")
        self.config, self.size = config, config.tensor_parallel_size
        self.backend = "nccl" if config.device.type == "cuda" else "gloo"
        self._error: BaseException | None = None  # set once the ranks are out of step; every later call raises
        self._closing = False
        threads = torch.get_num_threads()
        # Rank 0's store binds a free port and holds it from here on, so engines started side by side (data
        # parallelism) never race for one.
        self._store = dist.TCPStore(LOOPBACK, 0, self.size, is_master=True, timeout=PROCESS_GROUP_TIMEOUT,
                                    wait_for_workers=False)
        port = self._store.port
        spawn = mp.get_context("spawn")
        self.workers: list[_Worker] = []
        for rank in range(1, self.size):
            ours, theirs = spawn.Pipe()
            process = spawn.Process(target=_worker_main, name=f"stage1-tp-rank{rank}", daemon=True,
                                    args=(config, rank, port, threads, os.getpid(), theirs))
            process.start()
            theirs.close()
            self.workers.append(_Worker(rank, process, ours))
        self._finalizer = weakref.finalize(self, _stop_workers, list(self.workers))
        with self._watch():
            _set_rank_threads(threads, self.size)
            _init_process_group(self.backend, 0, self.size, self._store, config.rank_device(0))
            self.runner = ModelRunner(config, rank=0)
        self.num_kv_blocks, self.graphs = self.runner.num_kv_blocks, self.runner.graphs
        if self.backend == "nccl":  # a dead peer leaves NCCL waiting: abort the group so rank 0 raises
            threading.Thread(target=self._abort_when_a_worker_dies, daemon=True).start()

    def run(self, batch: ScheduledBatch) -> StepResult:
        plan = self.runner.prepare(batch)
        with self._watch():
            payload = pickle.dumps(plan, protocol=pickle.HIGHEST_PROTOCOL)
            for worker in self.workers:
                worker.conn.send_bytes(payload)
            return self.runner.execute(plan).result()

    def shutdown(self) -> None:
        self._closing = True
        self._finalizer()
        if dist.is_initialized():
            dist.destroy_process_group()
        self._store = None  # frees its port

    @contextlib.contextmanager
    def _watch(self):
        """Runs a call that involves the workers; any failure leaves the ranks out of step, so the engine stops,
        with the dead worker's name where one died."""
        if self._error is not None:
            raise RuntimeError("the tensor-parallel engine stopped after an earlier failure; build a new LLM"
                               ) from self._error
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

    def _abort_when_a_worker_dies(self) -> None:
        wait_for_any([w.process.sentinel for w in self.workers])
        abort = getattr(dist.distributed_c10d, "_abort_process_group", None)
        if not self._closing and abort is not None and dist.is_initialized():
            abort()


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


def _stop_workers(workers: list[_Worker]) -> None:
    """Asks every worker to exit, then ends the ones that do not."""
    for worker in workers:
        with contextlib.suppress(OSError):
            worker.conn.send_bytes(b"")
    for worker in workers:
        worker.process.join(timeout=5)
        if worker.process.is_alive():
            worker.process.kill()
            worker.process.join(timeout=5)
        worker.conn.close()


def _worker_main(config: EngineConfig, rank: int, port: int, threads: int, parent_pid: int, conn) -> None:
    """Rank `rank`: load its shard, then run every plan rank 0 sends until it sends b"" or goes away."""
    die_with_parent(parent_pid)
    try:
        _set_rank_threads(threads, config.tensor_parallel_size)
        store = dist.TCPStore(LOOPBACK, port, config.tensor_parallel_size, is_master=False,
                              timeout=PROCESS_GROUP_TIMEOUT)
        _init_process_group("nccl" if config.device.type == "cuda" else "gloo", rank, config.tensor_parallel_size,
                            store, config.rank_device(rank))
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


def _init_process_group(backend: str, rank: int, size: int, store: dist.Store, device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend, store=store, rank=rank, world_size=size, timeout=PROCESS_GROUP_TIMEOUT)


def _set_rank_threads(threads: int, size: int) -> None:
    """On a CPU the ranks share the cores: each computes with its share."""
    torch.set_num_threads(max(1, threads // size))


__all__ = ["TensorParallelRunner", "WorkerDiedError"]
