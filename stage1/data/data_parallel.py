"""Data parallelism on one node: `--data-parallel-size D` runs D shard processes (shards.py), each an ordinary
`python -m stage1.generate --num-shards D --shard-index i` with its own GPUs, then the caller merges them.

Each process sees only its slice of the GPUs (CUDA_VISIBLE_DEVICES: D x T devices for T-way tensor parallelism), so
its engine, its tensor-parallel workers and their rendezvous ports are its own; on a CPU each takes its share of the
cores. Their output lines reach our stderr prefixed with the shard's name. A process that fails ends the run: the
others are interrupted (they keep the rows they wrote, as after Ctrl-C), and the error names the shard; `--resume`
then reruns only the shards that are not complete.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from pathlib import Path

from stage1.data.errors import DataError, ShardFailedError
from stage1.data.shards import shard_name, shard_states
from stage1.processes import die_with_parent

# How long interrupted shard processes get to stop on their own (they abort their requests and exit) before a kill.
STOP_GRACE_S = 30.0
POLL_S = 0.1


def gpu_slices(size: int, tensor_parallel_size: int, device: str, env: Mapping[str, str] = os.environ
               ) -> list[str | None]:
    """Each process's CUDA_VISIBLE_DEVICES (None: leave it as it is, a CPU run)."""
    if device == "cpu":
        return [None] * size
    if device.startswith("cuda:"):
        raise DataError(f"--device {device} names one GPU, but --data-parallel-size {size} gives each process its own; "
                        "pass --device cuda (or auto)")
    visible = env.get("CUDA_VISIBLE_DEVICES")
    ids = [d for d in visible.split(",") if d.strip()] if visible is not None else [
        str(i) for i in range(_cuda_device_count())]
    if not ids and device == "auto":
        return [None] * size  # no GPU: a CPU run
    need = size * tensor_parallel_size
    if len(ids) < need:
        raise DataError(f"--data-parallel-size {size} x --tensor-parallel-size {tensor_parallel_size} needs {need} "
                        f"GPUs, this node shows {len(ids)} (CUDA_VISIBLE_DEVICES={visible!r}); lower one of them")
    return [",".join(ids[i * tensor_parallel_size:(i + 1) * tensor_parallel_size]) for i in range(size)]


def _cuda_device_count() -> int:
    try:
        import torch
    except ImportError:
        return 0
    return torch.cuda.device_count()


def cpu_threads_each(size: int, env: Mapping[str, str] = os.environ) -> int:
    """Each process's share of this process's cores (or of OMP_NUM_THREADS where the user set it)."""
    total = int(env["OMP_NUM_THREADS"]) if env.get("OMP_NUM_THREADS", "").isdigit() else len(os.sched_getaffinity(0))
    return max(1, total // size)


def run_shard_processes(module: str, argv: list[str], out: str | Path, size: int, tensor_parallel_size: int,
                        device: str, resume: bool) -> list[int]:
    """Runs shard i of `size` for each i not complete yet (all of them unless `resume`): `python -m <module> <argv>`
    for shard i, the job's CLI with the run's arguments. Waits for them, and returns the indices it ran. Raises
    ShardFailedError naming the first shard that failed."""
    slices = gpu_slices(size, tensor_parallel_size, device)
    states = shard_states(out, size) if resume else {}
    todo = [i for i in range(size) if states.get(i) != "complete"]
    for i in sorted(set(range(size)) - set(todo)):
        print(f"[{shard_name(i, size)}] complete, not rerun", file=sys.stderr)
    threads = cpu_threads_each(size)
    procs = {i: _start(module, argv, i, size, slices[i], threads) for i in todo}
    relays = [threading.Thread(target=_relay, args=(p, shard_name(i, size)), daemon=True) for i, p in procs.items()]
    for t in relays:
        t.start()
    try:
        failed = _wait_all(procs)
    except BaseException:  # Ctrl-C (the shards got it too: one process group) or anything else: stop them all
        _stop(procs.values())
        raise
    if failed is not None:
        _stop(p for i, p in procs.items() if i != failed)
    for t in relays:
        t.join(timeout=5)
    if failed is not None:
        raise ShardFailedError(_failure(procs[failed], shard_name(failed, size)))
    return todo


def _start(module: str, argv: list[str], index: int, size: int, gpus: str | None, threads: int) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1")
    if gpus is not None:
        env["CUDA_VISIBLE_DEVICES"] = gpus
    # The last occurrence of a flag wins with argparse: the process runs one shard, not data parallelism again.
    cmd = [sys.executable, "-m", module, *argv, "--data-parallel-size", "1", "--num-shards", str(size),
           "--shard-index", str(index)]
    parent = os.getpid()
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            preexec_fn=lambda: die_with_parent(parent))


def _relay(proc: subprocess.Popen, name: str) -> None:
    """The process's output lines, prefixed with its shard's name."""
    for line in iter(proc.stdout.readline, b""):
        sys.stderr.write(f"[{name}] {line.decode('utf-8', errors='replace').rstrip()}\n")
        sys.stderr.flush()
    proc.stdout.close()


def _wait_all(procs: dict[int, subprocess.Popen]) -> int | None:
    """Waits until all exit 0 (None) or one fails (its index)."""
    running = dict(procs)
    while running:
        for i, p in list(running.items()):
            code = p.poll()
            if code is None:
                continue
            if code != 0:
                return i
            del running[i]
        time.sleep(POLL_S)
    return None


def _stop(procs) -> None:
    """SIGINT (each shard stops as after Ctrl-C, its rows intact), then SIGKILL for any still running after the grace."""
    procs = [p for p in procs if p.poll() is None]
    for p in procs:
        with contextlib.suppress(ProcessLookupError):
            p.send_signal(signal.SIGINT)
    deadline = time.monotonic() + STOP_GRACE_S
    for p in procs:
        try:
            p.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def _failure(proc: subprocess.Popen, name: str) -> str:
    code = proc.returncode
    how = (f"was killed by {signal.Signals(-code).name}" if code < 0 else
           "stopped on bad input or usage (exit code 2; its message is above)" if code == 2 else
           f"exited with code {code} (its message is above)")
    return (f"shard {name} (process {proc.pid}) {how}; the other shards were stopped and every row written so far is "
            "kept: rerun the same command with --resume to finish only what is missing")
