"""Fixtures of the tests against a real SLURM: one single-node cluster per test module (tests/launch/slurm_cluster.py),
stopped by process id at the module's end; the queue emptied after each test; the unsharded run to compare with."""

from __future__ import annotations

import os
import shutil
import tempfile

import pytest

from real_slurm import RUN_ARGS, write_instructions
from slurm_cluster import SlurmCluster, unavailable

# .ci/run sets this: there a cluster that cannot start is a failure, not a skip
REQUIRED = os.environ.get("STAGE1_SLURM_TESTS") == "require"


def start_cluster(accounting: bool, **settings):
    why = unavailable(accounting)
    if why:
        if REQUIRED:
            pytest.fail(f"STAGE1_SLURM_TESTS=require, but {why}")
        pytest.skip(why)
    # a short path: munge's socket path must fit a sockaddr_un
    cluster = SlurmCluster(tempfile.mkdtemp(prefix="stage1-slurm-"), accounting=accounting, **settings)
    try:
        cluster.start()  # on a failure it stops what it started, by process id, and says why
    except BaseException:
        shutil.rmtree(cluster.root, ignore_errors=True)
        raise
    return cluster


def stop_cluster(cluster: SlurmCluster) -> None:
    left = cluster.stop()
    shutil.rmtree(cluster.root, ignore_errors=True)
    assert not left, f"job processes outlived SLURM's daemons (killed by pid): {left}"


@pytest.fixture(scope="module")
def slurm_settings():
    """Overridden by a test module to start its cluster another way."""
    return {"accounting": False}


@pytest.fixture(scope="module")
def slurm(slurm_settings):
    cluster = start_cluster(**slurm_settings)
    try:
        yield cluster
    finally:
        stop_cluster(cluster)


@pytest.fixture
def queue(slurm):
    """The cluster, its queue emptied after the test (each test starts with no job)."""
    yield slurm
    slurm.cancel_all()


@pytest.fixture(scope="session")
def instructions(tmp_path_factory):
    return write_instructions(tmp_path_factory.mktemp("instructions") / "instructions.jsonl")


@pytest.fixture(scope="session")
def plain_run(tiny_model_dir, instructions, tmp_path_factory):
    """The unsharded run of the arguments the cluster tests shard (one process, in this one)."""
    from stage1.generate import main as generate_main

    out = tmp_path_factory.mktemp("plain") / "out"
    assert generate_main(["--model", str(tiny_model_dir), "--instructions", str(instructions), "--out", str(out),
                          *RUN_ARGS]) == 0
    return out
