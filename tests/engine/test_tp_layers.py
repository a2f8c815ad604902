"""Tensor-parallel layers and the sharded loader: which rows and columns each rank reads, the sizes a model allows,
and the TP=2 prefill against TP=1 over a real (gloo, loopback) process group.

Run as a script, this file is one rank of that process group (see `_rank_main`).
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from stage1.contract import AttentionContext
from stage1.engine.config import ModelConfig
from stage1.engine.distributed import first_kv_head, parallel_state
from stage1.engine.model import Qwen2ForCausalLM
from stage1.engine.weights import CheckpointFile, load_model

PROMPT_LENGTHS = [1, 16, 17, 5, 33, 7]

# (shape, overrides): KV heads sharded (4 or 2 of them) and replicated (1), tied and untied, a vocabulary that
# 2 and 4 do not divide (511: the last shard padded), a checkpoint in several files
CASES = {
    "kv4-tied": ("gqa1-d64-tied", {}),
    "kv2-untied": ("gqa2-d128-untied", {}),
    "kv1-tied-v511": ("gqa1-d64-tied", dict(kv_heads=1, vocab=511)),
    "h8-kv4-untied-v511-files": ("gqa2-d128-untied", dict(heads=8, kv_heads=4, head_dim=32, vocab=511, shard=True)),
}


def prefill_logits(model: Qwen2ForCausalLM, vocab: int) -> torch.Tensor | None:
    """The model's logits for a packed ragged batch of random prompts, with no KV cache."""
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, vocab, (n,), generator=g) for n in PROMPT_LENGTHS]
    cu = [0]
    for p in prompts:
        cu.append(cu[-1] + len(p))
    ctx = AttentionContext(is_prefill=True, kv_cache=None, slot_mapping=None, block_tables=None,
                           context_lens=torch.tensor(PROMPT_LENGTHS), cu_seqlens_q_host=cu,
                           context_lens_host=PROMPT_LENGTHS)
    positions = torch.cat([torch.arange(n) for n in PROMPT_LENGTHS])
    with torch.no_grad():
        return model.compute_logits(model(torch.cat(prompts), positions, ctx))


def load_rank(path: Path, rank: int, size: int) -> Qwen2ForCausalLM:
    with parallel_state(rank, size):
        return load_model(path, ModelConfig.from_dir(path), torch.float32, torch.device("cpu"))


# ---- the reader ----


def test_reader_slices_equal_safetensors_bit_for_bit(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {"w": torch.randn(37, 1000, generator=g).to(torch.bfloat16), "b": torch.randn(37, generator=g),
               "t": torch.randn(6, 5, 3, generator=g).to(torch.float16), "s": torch.tensor(2.5)}
    save_file(tensors, tmp_path / "x.safetensors")
    with safe_open(tmp_path / "x.safetensors", "pt") as ref, CheckpointFile(tmp_path / "x.safetensors") as ours:
        assert sorted(ours.keys()) == sorted(ref.keys())
        for name, index in [("w", slice(5, 20)), ("w", (slice(None), slice(500, 1000))), ("w", slice(None)),
                            ("w", (slice(3, 9), slice(7, 8))), ("w", slice(37, 37)), ("b", slice(30, 37)),
                            ("t", (slice(None), slice(1, 4))), ("t", slice(2, 3))]:
            got, want = ours.get_slice(name)[index], ref.get_slice(name)[index]
            assert got.dtype == want.dtype and got.shape == want.shape and torch.equal(got, want), (name, index)
        assert torch.equal(ours.get_slice("s")[:], ref.get_tensor("s"))  # a scalar, read whole
        before = ours.bytes_read
        ours.get_slice("w")[:, 0:250]
        assert ours.bytes_read - before == 37 * 250 * 2


# ---- the sizes a model splits into ----

QWEN = {"0.5b": (dict(hidden_size=896, intermediate_size=4864, num_attention_heads=14, num_key_value_heads=2,
                      tie_word_embeddings=True, vocab_size=151936), "1, 2"),
        "7b": (dict(hidden_size=3584, intermediate_size=18944, num_attention_heads=28, num_key_value_heads=4,
                    vocab_size=152064), "1, 2, 4"),
        "32b": (dict(hidden_size=5120, intermediate_size=27648, num_attention_heads=40, num_key_value_heads=8,
                     vocab_size=152064), "1, 2, 4, 8")}


@pytest.mark.parametrize("name", QWEN)
def test_a_size_that_does_not_split_the_model_names_those_that_do(name):
    fields, sizes = QWEN[name]
    config = ModelConfig.from_dict({"model_type": "qwen2", "num_hidden_layers": 2, "rope_theta": 1e6, **fields})
    largest = int(sizes.split(", ")[-1])
    for size in (3, 2 * largest):
        with parallel_state(0, size), torch.device("meta"):
            with pytest.raises(ValueError, match=f"Sizes that work: {sizes}$"):
                Qwen2ForCausalLM(config)
    with parallel_state(largest - 1, largest), torch.device("meta"):
        attn = Qwen2ForCausalLM(config).layers[0].self_attn
    assert attn.num_heads * largest == config.num_attention_heads
    assert attn.num_kv_heads == max(1, config.num_key_value_heads // largest)


# ---- the sharded loader ----


def _assemble_kv(parts: list[torch.Tensor], num_kv_heads: int, size: int, head_dim: int) -> torch.Tensor:
    """The full k (or v) from the ranks' parts: each sits at its first KV head; replicas must be identical."""
    full = [None] * num_kv_heads
    for rank, part in enumerate(parts):
        first = first_kv_head(rank, num_kv_heads, size)
        for j, head in enumerate(part.split(head_dim)):
            if full[first + j] is None:
                full[first + j] = head
            else:
                assert torch.equal(full[first + j], head), f"replicas of KV head {first + j} differ"
    return torch.cat(full)


@pytest.mark.parametrize("size", [2, 4])
@pytest.mark.parametrize("case", CASES)
def test_rank_shards_put_back_together_equal_the_full_tensors(checkpoint, case, size):
    shape, overrides = CASES[case]
    path = checkpoint(shape, **overrides)
    config = ModelConfig.from_dir(path)
    full = load_rank(path, 0, 1)
    ranks = [load_rank(path, r, size) for r in range(size)]
    hd, kv = config.head_dim, config.num_key_value_heads
    local_kv = max(1, kv // size)
    for n, ref in enumerate(full.layers):
        layers = [m.layers[n] for m in ranks]
        for kind in ("weight", "bias"):
            q, k, v = getattr(ref.self_attn.qkv_proj, kind).split([config.q_size, config.kv_size, config.kv_size])
            parts = [getattr(layer.self_attn.qkv_proj, kind).split([config.q_size // size, local_kv * hd,
                                                                      local_kv * hd]) for layer in layers]
            assert torch.equal(torch.cat([p[0] for p in parts]), q)  # query heads: dim 0
            assert torch.equal(_assemble_kv([p[1] for p in parts], kv, size, hd), k)
            assert torch.equal(_assemble_kv([p[2] for p in parts], kv, size, hd), v)
        parts = [layer.mlp.gate_up_proj.weight.chunk(2) for layer in layers]
        for i, part in enumerate(ref.mlp.gate_up_proj.weight.chunk(2)):  # gate, up: each on its own, dim 0
            assert torch.equal(torch.cat([p[i] for p in parts]), part)
        for name in ("self_attn.o_proj", "mlp.down_proj"):  # dim 1
            got = torch.cat([layer.get_submodule(name).weight for layer in layers], dim=1)
            assert torch.equal(got, ref.get_submodule(name).weight), name
        for layer in layers:
            assert torch.equal(layer.input_layernorm.weight, ref.input_layernorm.weight)
            assert torch.equal(layer.post_attention_layernorm.weight, ref.post_attention_layernorm.weight)
            assert (layer.self_attn.num_heads, layer.self_attn.num_kv_heads) == (config.num_attention_heads // size,
                                                                                 local_kv)
    rows = -(-config.vocab_size // size)
    for name in ("embed_tokens", "lm_head"):
        shards = [getattr(m, name).weight for m in ranks]
        assert all(s.shape == (rows, config.hidden_size) for s in shards)
        joined = torch.cat(shards)
        assert torch.equal(joined[:config.vocab_size], getattr(full, name).weight)
        assert not joined[config.vocab_size:].any()  # the last shard's padding rows are zeros
    for m in ranks:
        assert torch.equal(m.norm.weight, full.norm.weight)
        assert (m.lm_head.weight is m.embed_tokens.weight) == config.tie_word_embeddings


def test_each_rank_reads_only_its_slices(checkpoint):
    """Bytes read: q/gate/up/o/down/vocabulary 1/N, KV heads per rank, norms whole (the loader's own count)."""
    path = checkpoint("gqa2-d128-untied")
    config = ModelConfig.from_dir(path)
    reports = []
    logger = logging.getLogger("stage1")
    handler = logging.Handler()
    handler.emit = lambda record: reports.append(record.load_report) if hasattr(record, "load_report") else None
    logger.addHandler(handler)
    old_level = logger.level
    logger.setLevel(logging.INFO)
    try:
        for rank, size in [(0, 1), (0, 2), (1, 2)]:
            load_rank(path, rank, size)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
    whole, *halves = reports
    assert whole.bytes_read == whole.checkpoint_bytes and whole.size == 1
    h, L = config.hidden_size, config.num_hidden_layers
    replicated = 4 * (L * 2 * h + h)  # fp32 norms
    for r in halves:
        assert r.size == 2 and r.checkpoint_bytes == whole.checkpoint_bytes
        assert r.bytes_read == (whole.checkpoint_bytes - replicated) // 2 + replicated
        assert r.param_bytes == r.bytes_read and r.largest_read == config.vocab_size * h * 4 // 2


# ---- TP=2 over gloo against TP=1 ----


def test_tp2_prefill_logits_equal_tp1(checkpoint, tmp_path):
    paths = {case: checkpoint(shape, **overrides) for case, (shape, overrides) in CASES.items()}
    # the ranks meet through a file in this test's directory (no port another test could pick too) and talk over
    # loopback only
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo", "PYTHONPATH": os.pathsep.join(
        [str(Path(__file__).resolve().parents[2]), os.environ.get("PYTHONPATH", "")])}
    args = [json.dumps({case: str(p) for case, p in paths.items()}), str(tmp_path)]
    logs = [tmp_path / f"rank{rank}.log" for rank in range(2)]
    procs = []
    try:
        for rank, log in enumerate(logs):
            with log.open("w") as out:
                procs.append(subprocess.Popen([sys.executable, __file__, str(rank), *args], env=env, stdout=out,
                                              stderr=subprocess.STDOUT))
        for p in procs:
            p.wait(timeout=300)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert all(p.returncode == 0 for p in procs), "\n".join(
        f"rank {r} (exit {p.returncode}):\n{log.read_text()[-3000:]}" for r, (p, log) in enumerate(zip(procs, logs)))
    assert (tmp_path / "rank1-got-none").is_file()  # compute_logits is None off rank 0
    torch.set_num_threads(1)
    for case, path in paths.items():
        config = ModelConfig.from_dir(path)
        want = prefill_logits(load_rank(path, 0, 1), config.vocab_size)
        got = torch.load(tmp_path / f"{case}.pt")
        assert got.shape == want.shape == (sum(PROMPT_LENGTHS), config.vocab_size)
        # TP=2 sums o_proj's and down_proj's products in another order; fp32 rounding alone moves these logits
        # (|max| ~10) by ~3e-5 from fp64, so the bound is 1e-5 of their scale (a wrong shard is off by > 0.1)
        err, scale = (got - want).abs().max().item(), want.abs().max().item()

        assert err < 1e-5 * max(1.0, scale), f"{case}: max |TP=2 - TP=1| = {err:.3g} (logits up to {scale:.3g})"


def _rank_main(rank: int, cases: dict[str, str], out: Path) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{out / 'store'}", rank=rank, world_size=2,
                            timeout=timedelta(seconds=60))
    try:
        none_elsewhere = True
        for case, path in cases.items():
            with parallel_state(rank, 2):
                model = load_model(path, ModelConfig.from_dir(path), torch.float32, torch.device("cpu"))
                logits = prefill_logits(model, model.config.vocab_size)
            if rank == 0:
                torch.save(logits, out / f"{case}.pt")
            none_elsewhere &= logits is None
        if rank == 1 and none_elsewhere:
            (out / "rank1-got-none").touch()
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    _rank_main(int(sys.argv[1]), json.loads(sys.argv[2]), Path(sys.argv[3]))
