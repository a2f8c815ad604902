"""The persistent step inputs (stage1/engine/step_inputs.py): block-table rows kept across steps must always equal
the sequences' block tables, through growth, preemption (a table given back and regrown to the same length with
other blocks), and rows dropped when all are taken; the CPU upload is the arrays themselves."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import numpy as np
import torch

from stage1.engine.step_inputs import BlockTableRows, StagedUpload


@dataclass
class FakeSeq:
    seq_id: int
    block_table: list[int] = field(default_factory=list)


def check(rows_state: BlockTableRows, seqs, full):
    rows = rows_state.rows(seqs, full=full)
    assert len(set(rows.tolist())) == len(seqs)
    assert rows_state.width(rows) == max(len(seq.block_table) for seq in seqs)
    for seq, row in zip(seqs, rows):
        assert rows_state.table[row, :len(seq.block_table)].tolist() == seq.block_table


def test_rows_follow_growth_and_a_preemption_that_regrows_the_same_length():
    state = BlockTableRows(max_seqs=2, max_blocks=8)
    a, b = FakeSeq(0, [5, 9]), FakeSeq(1, [3])
    check(state, [a, b], full=True)  # prefill
    a.block_table.append(12)
    check(state, [a, b], full=False)  # decode: a gained a block
    # a is preempted: it gives its blocks back and is prefilled again with as many, but other, blocks
    a.block_table[:] = [5, 9, 14]
    check(state, [a], full=True)
    check(state, [a, b], full=False)
    assert state.table[state.rows([a], full=False)[0], :3].tolist() == [5, 9, 14]


def test_rows_survive_random_steps_and_row_reuse():
    """Random prefill/decode steps over many short-lived sequences (more than the array has rows): every step's
    rows hold exactly the tables."""
    rng = random.Random(0)
    state = BlockTableRows(max_seqs=4, max_blocks=16)
    next_id, next_block, running = 0, 0, []
    for _ in range(400):
        if len(running) < 4 and rng.random() < 0.4:  # a prefill step admits a sequence
            seq = FakeSeq(next_id, [next_block + i for i in range(rng.randint(1, 3))])
            next_id, next_block = next_id + 1, next_block + 3
            running.append(seq)
            check(state, [seq], full=True)
            continue
        if running and rng.random() < 0.1:  # a preemption: the table is regrown from scratch by a prefill
            seq = rng.choice(running)
            seq.block_table[:] = [rng.randrange(1000) for _ in seq.block_table]
            check(state, [seq], full=True)
        for seq in running:
            if rng.random() < 0.3 and len(seq.block_table) < 16:
                seq.block_table.append(rng.randrange(1000))
        if running:
            check(state, list(running), full=False)
        running = [s for s in running if rng.random() > 0.1]  # some finish


def test_cpu_upload_is_the_arrays_themselves():
    up = StagedUpload(torch.device("cpu"), 16, 16)
    ids, table = np.arange(5, dtype=np.int64), np.ones((2, 3), dtype=np.int32)
    t_ids, t_table = up.upload([ids], [table])
    assert t_ids.dtype == torch.int64 and t_table.shape == (2, 3)
    t_ids[0] = 42
    assert ids[0] == 42  # no copy on the CPU


def test_a_steps_device_inputs_come_only_from_the_staging(tiny_model_dir, monkeypatch):
    """Every tensor a step sends to the device (ids, positions, slots, block tables, the sampling rows' indices and
    parameters, the pending rows) comes through the one staged upload: no torch.tensor / torch.as_tensor from host
    values inside execute (on a GPU each would be a copy from pageable memory that waits for the stream, so async
    scheduling would overlap nothing), for prefill and decode steps, with mixed sampling parameters."""
    from stage1 import LLM, SamplingParams

    llm = LLM(tiny_model_dir, dtype="float32", kernels="torch", max_model_len=64)
    runner = llm.core.runner
    uploads, executes = [], []
    upload = runner.staging.upload
    monkeypatch.setattr(runner.staging, "upload", lambda *args: uploads.append(1) or upload(*args))
    execute = runner.execute

    def forbidden(*args, **kwargs):
        raise AssertionError("a host-to-device copy outside the staging inside execute")

    def guarded(plan):
        executes.append(plan.is_prefill)
        with monkeypatch.context() as m:
            m.setattr(torch, "tensor", forbidden)
            m.setattr(torch, "as_tensor", forbidden)
            return execute(plan)

    monkeypatch.setattr(runner, "execute", guarded)
    params = [SamplingParams(max_tokens=6, temperature=0), SamplingParams(max_tokens=6, temperature=0.8, top_k=5,
                                                                          top_p=0.9, min_p=0.05, seed=3)]
    outs = llm.generate([{"prompt_token_ids": [5, 6, 7]}, {"prompt_token_ids": [9, 4]}], params, use_tqdm=False)
    assert all(len(o.outputs[0].token_ids) == 6 for o in outs)
    assert set(executes) == {True, False}  # both kinds of step ran: prefill (True) and decode (False)
    assert len(uploads) == len(executes)
