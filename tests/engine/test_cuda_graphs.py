"""The decode step CUDA graphs replay (stage1/engine/cuda_graphs.py), run eagerly on the CPU: batches padded to a
bucket size, the padding's K/V in a sink block, attention sized by the full-width block tables. It must give the
tokens of the plain eager engine while the batch shrinks, grows and reuses rows. (Capturing real graphs needs a GPU:
tests/kernels/test_engine_triton.py does that there.)"""

from __future__ import annotations

import pytest
import torch

from stage1 import LLM, SamplingParams
from stage1.engine.cuda_graphs import batch_buckets
from stage1.engine.engine_config import EngineConfig


def test_batch_buckets():
    assert batch_buckets(1) == [1]
    assert batch_buckets(5) == [1, 2, 4, 5]
    assert batch_buckets(20) == [1, 2, 4, 8, 16, 20]
    assert batch_buckets(256)[:5] == [1, 2, 4, 8, 16] and batch_buckets(256)[-1] == 256


def run(path, prompts, params, monkeypatch, graphs: bool, **kwargs):
    """Token ids per request, and the (batch, bucket) sizes of the decode steps the graphs ran."""
    llm = LLM(path, dtype="float32", kernels="torch", max_model_len=96, seed=4, enforce_eager=not graphs, **kwargs)
    assert (llm.core.runner.graphs is not None) == graphs
    steps = []
    if graphs:
        graphs, run_step = llm.core.runner.graphs, llm.core.runner.graphs.run

        def spy(input_ids, positions, ctx):
            n = input_ids.shape[0]
            steps.append((n, next(b for b in graphs.buckets if b >= n)))
            return run_step(input_ids, positions, ctx)

        monkeypatch.setattr(graphs, "run", spy)
    outputs = llm.generate(prompts, params, use_tqdm=False)
    return llm, [[c.token_ids for c in o.outputs] for o in outputs], steps


@pytest.mark.parametrize("max_num_seqs", [5, 16])
def test_padded_decode_gives_the_eager_tokens(checkpoint, monkeypatch, decode_graphs_on_cpu, max_num_seqs):
    path = checkpoint("gqa2-d128-untied")
    # a KV cache of 12 blocks: freed blocks soon go to other sequences (and some are preempted), so padding rows
    # that wrote anywhere but their sink, or kept an earlier step's slots, would corrupt a live sequence
    block_bytes = 2 * 2 * 2 * 128 * 16 * 4  # K and V, 2 layers, 2 KV heads, head_dim 128, 16 tokens, fp32
    g = torch.Generator().manual_seed(0)
    # requests end at different steps (the batch shrinks through the buckets) and more wait than fit at once
    # (new ones join, reusing rows that were padding)
    prompts = [{"prompt_token_ids": torch.randint(3, 400, (int(n),), generator=g).tolist()}
               for n in torch.randint(1, 40, (9,), generator=g)]
    params = [SamplingParams(max_tokens=4 + 5 * (i % 4), temperature=0.0 if i % 3 else 0.9, top_p=0.9,
                             ignore_eos=True) for i in range(9)]
    params[4] = SamplingParams(max_tokens=6, temperature=1.0, n=2, seed=7, ignore_eos=True)
    kwargs = dict(max_num_seqs=max_num_seqs, kv_cache_memory=12 * block_bytes)
    _, eager, _ = run(path, prompts, params, monkeypatch, False, **kwargs)
    llm, padded, steps = run(path, prompts, params, monkeypatch, True, **kwargs)
    assert padded == eager
    assert any(n < bucket for n, bucket in steps) and len({n for n, _ in steps}) >= 3  # padded, and shrinking
    # the sink block is the pool's last, and no sequence is ever given it
    assert llm.core.runner.graphs.sink_block == llm.core.block_manager.num_blocks == 11
    assert max_num_seqs == 5 or llm.core.scheduler.num_preemptions > 0  # recomputed sequences too


def test_eager_unless_a_gpu_runs_the_triton_kernels(tiny_model_dir, monkeypatch):
    llm = LLM(tiny_model_dir, dtype="float32", kernels="torch")
    assert llm.core.runner.graphs is None and not llm.config.decode_graphs  # the CPU: no CUDA graphs
    # on a GPU, only with the Triton kernels (the reference attention would gather full-width block tables)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert not EngineConfig.build(tiny_model_dir, kernels="torch").decode_graphs


def test_rows_past_the_batch_always_point_at_the_sink():
    """A row that held a sequence in a bigger step is padding again in a smaller one: whatever it held then, it
    now writes to and reads from the sink block only (its old blocks may belong to another sequence by now)."""
    from stage1.engine.attention import AttentionContext
    from stage1.engine.cuda_graphs import DecodeGraphs

    seen = []

    def model(ids, positions, ctx):
        seen.append((ids.clone(), ctx.slot_mapping.clone(), ctx.context_lens.clone(), ctx.block_tables.clone()))
        return torch.zeros(ids.shape[0], 3)

    graphs = DecodeGraphs(model, [], None, max_batch=8, max_blocks_per_seq=4, sink_block=9, block_size=16,
                          device=torch.device("cpu"))  # the CPU: the padded step, eagerly

    def step(n):
        ctx = AttentionContext(is_prefill=False, kv_cache=[], slot_mapping=torch.arange(n) + 100,
                               block_tables=torch.arange(2 * n, dtype=torch.int32).view(n, 2),
                               context_lens=torch.full((n,), 20, dtype=torch.int32))
        return graphs.run(torch.arange(n) + 5, torch.full((n,), 19), ctx)

    assert step(7).shape == (7, 3)  # bucket 8: one padding row
    assert step(3).shape == (3, 3)  # bucket 4: row 3 held a sequence a step ago
    ids, slots, lens, tables = seen[-1]
    assert ids.shape == (4,) and ids[:3].tolist() == [5, 6, 7]
    assert slots.tolist() == [100, 101, 102, 9 * 16] and lens.tolist() == [20, 20, 20, 1]
    assert tables[3, 0].item() == 9 and tables[:3, :2].flatten().tolist() == list(range(6))


@pytest.mark.parametrize("local_capture, verdicts, calls", [
    (True, [False], 1),  # this rank captured, another did not: all eager, after one agreement
    (False, [False], 1),  # this rank failed to capture: it says so at the same point
    (True, [True, False], 2),  # captured everywhere, another rank's replay did not match: all eager
    (True, [True, True], 2),  # captured and matched everywhere: the graph is kept
])
def test_tensor_parallel_ranks_agree_on_each_capture(local_capture, verdicts, calls, caplog):
    """With tensor parallelism a capture that fails on one rank must leave every rank eager, or the ranks run
    different collectives and hang. Each rank asks `agree` at the same two points (after recording, after checking
    the replay) whatever happened locally: here a stand-in for the other ranks' answers."""
    import logging

    from stage1.engine.attention import AttentionContext
    from stage1.engine.cuda_graphs import DecodeGraphs

    def model(ids, positions, ctx):
        return ids[:, None].float().expand(-1, 3).clone()

    asked = []

    def agree(ok):
        asked.append(ok)
        return ok and verdicts[len(asked) - 1]

    graphs = DecodeGraphs(model, [], None, max_batch=4, max_blocks_per_seq=2, sink_block=3, block_size=16,
                          device=torch.device("cpu"), agree=agree)
    graphs.capture = True  # as on a GPU

    class Replay:  # a graph whose replay recomputes the step into its output, as a real one does
        def __init__(self, size):
            self.size, self.hidden = size, torch.zeros(size, 3)

        def replay(self):
            self.hidden.copy_(graphs._forward(self.size))

    def record(size):
        if not local_capture:
            raise RuntimeError("capture failed on this rank")
        graph = Replay(size)
        return graph, graph.hidden

    graphs._record = record
    ctx = AttentionContext(is_prefill=False, kv_cache=[], slot_mapping=torch.arange(2),
                           block_tables=torch.zeros(2, 1, dtype=torch.int32),
                           context_lens=torch.ones(2, dtype=torch.int32))
    with caplog.at_level(logging.WARNING, logger="stage1"):
        hidden = graphs.run(torch.tensor([7, 8]), torch.zeros(2, dtype=torch.long), ctx)
    assert hidden[:, 0].tolist() == [7.0, 8.0]
    assert len(asked) == calls and asked[0] == local_capture
    kept = verdicts == [True, True]
    assert graphs.captured == ([2] if kept else []) and graphs.capture == kept
    assert ("decode steps run eagerly" in caplog.text) != kept
