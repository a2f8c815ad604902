"""Start-up failures that say what to change: a KV cache that cannot hold one max_model_len sequence, weights larger
than the device's memory at this TP size, a max_model_len past the model's context. Each is one `StartupError` (a
ValueError) from LLM(...), raised before the weights load where the numbers are known by then, whose message names
the numbers and the argument / flag to change. The machine's memory is what `engine_config.device_memory` reports,
replaced here by small budgets."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from safetensors import safe_open

from stage1 import LLM, SamplingParams
from stage1.engine import engine_config, model_runner
from stage1.engine.config import ModelConfig
from stage1.engine.engine_config import EngineConfig, StartupError
from stage1.engine.kv_cache import bytes_per_block

MODEL = "gqa2-d128-untied"  # 4 query / 2 KV heads, head_dim 128, 2 layers; max_position_embeddings 1024


@pytest.fixture
def path(checkpoint):
    return checkpoint(MODEL)


@pytest.fixture
def no_loading(monkeypatch):
    """Loading the weights fails the test: these errors must come before it."""
    def load_model(*args, **kwargs):
        raise AssertionError("the weights were loaded before the start-up check")

    monkeypatch.setattr(model_runner, "load_model", load_model)


def block_bytes(path, dtype=torch.float32):
    return bytes_per_block(ModelConfig.from_dir(path), 16, dtype)  # 2 * 2 layers * 2 KV heads * 128 * 16 * 4


def checkpoint_bytes(path) -> int:
    """The checkpoint's tensors in bytes (fp32, as stored): what one rank holds at tensor_parallel_size=1."""
    total = 0
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(file, "pt") as f:
            total += sum(4 * math.prod(f.get_slice(name).get_shape()) for name in f.keys())
    return total


def build(path, **kwargs):
    return LLM(path, dtype="float32", kernels="torch", device="cpu", **kwargs)


# ---- 1. a KV cache that holds less than one max_model_len sequence ----

def test_a_kv_cache_smaller_than_one_sequence_names_the_blocks_and_the_fixes(path, no_loading):
    per_block = block_bytes(path)
    with pytest.raises(StartupError) as e:
        build(path, kv_cache_memory=10 * per_block, max_model_len=1024)
    message = str(e.value)
    assert isinstance(e.value, ValueError) and "\n" not in message
    for part in ("max_model_len=1024", "64 blocks of 16 tokens", f"{per_block} bytes each", "holds 10",
                 f"kv_cache_memory={64 * per_block} or more", "--max-model-len 160 or less", "--tp"):
        assert part in message, (part, message)


def test_a_kv_cache_of_no_block_says_so_with_the_numbers(path, no_loading):
    per_block = block_bytes(path)
    with pytest.raises(StartupError) as e:
        build(path, kv_cache_memory=per_block - 1, max_model_len=256)
    message = str(e.value)
    for part in (f"kv_cache_memory={per_block - 1} bytes", "holds 0", "16 blocks", f"kv_cache_memory={16 * per_block}"):
        assert part in message, (part, message)
    assert "--max-model-len" not in message  # no length fits in no block


def test_the_cpu_default_kv_cache_too_small_for_the_models_context(path, monkeypatch, no_loading):
    per_block = block_bytes(path)
    monkeypatch.setattr(engine_config, "_CPU_KV_CACHE_BYTES", 50 * per_block)
    with pytest.raises(StartupError) as e:
        build(path)  # max_model_len: the model's 1024 tokens, 64 blocks
    message = str(e.value)
    for part in (f"CPU default KV cache of {50 * per_block} bytes", "holds 50", "max_model_len=1024",
                 "--max-model-len 800 or less", f"kv_cache_memory={64 * per_block}"):
        assert part in message, (part, message)
    assert "--tp" not in message  # the CPU default is split between the ranks: a larger --tp holds no more


def test_the_pool_as_sized_after_loading_is_checked_too(path, monkeypatch):
    """On a GPU the default pool is what the weights leave free, known once they are loaded: the model runner
    checks it (here the build's check is skipped and the CPU's default made small)."""
    per_block = block_bytes(path)
    monkeypatch.setattr(EngineConfig, "fitted", lambda self, max_model_len_given=True: self)
    monkeypatch.setattr(engine_config, "_CPU_KV_CACHE_BYTES", 10 * per_block)
    with pytest.raises(StartupError) as e:
        build(path, max_model_len=512)
    assert "holds 10" in str(e.value) and "--max-model-len 160 or less" in str(e.value), str(e.value)


def test_on_a_gpu_the_pool_the_weights_will_leave_is_checked_before_loading(path, monkeypatch):
    """The GPU's branch, on any machine: a config for cuda:0 whose free memory is the weights plus 20 blocks (85%
    of which is the default pool)."""
    config = dataclasses.replace(EngineConfig.build(path, dtype="float32", kernels="torch", device="cpu"),
                                 device=torch.device("cuda"))
    per_block, weights = block_bytes(path), checkpoint_bytes(path)
    monkeypatch.setattr(engine_config, "device_memory", lambda device: weights + 20 * per_block)
    with pytest.raises(StartupError) as e:
        config.fitted()
    message = str(e.value)
    for part in (f"{int(20 * per_block * 0.85)} bytes per rank", f"{20 * per_block} bytes cuda:0 has free after the "
                 "weights", "holds 17", "--max-model-len 272 or less", "--tp (tensor_parallel_size)"):
        assert part in message, (part, message)


def test_an_explicit_kv_cache_lowers_an_unset_max_model_len_to_what_it_holds(path):
    """Without max_model_len, kv_cache_memory sizes the context (a small pool for preemption tests, say); a request
    longer than that is refused by name."""
    llm = build(path, kv_cache_memory=10 * block_bytes(path))
    assert llm.max_model_len == 160 and llm.core.block_manager.num_blocks == 10
    params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    assert len(llm.generate([{"prompt_token_ids": list(range(3, 100))}], params, use_tqdm=False)[0]
               .outputs[0].token_ids) == 4
    with pytest.raises(ValueError, match="max_model_len"):
        llm.generate([{"prompt_token_ids": [5] * 160}], params, use_tqdm=False)


# ---- 2. weights larger than the device's memory ----

def test_weights_larger_than_the_hosts_memory_fail_before_loading(path, monkeypatch, no_loading):
    weights = checkpoint_bytes(path)
    monkeypatch.setattr(engine_config, "device_memory", lambda device: weights - 1)
    with pytest.raises(StartupError) as e:
        build(path)
    message = str(e.value)
    assert isinstance(e.value, ValueError) and "\n" not in message
    for part in ("model too large", f"{weights} bytes", f"{weights - 1} bytes", "float32", "--dtype bfloat16",
                 "--tp does not help on a CPU"):
        assert part in message, (part, message)


def test_on_a_cpu_every_ranks_weights_share_the_host(path, monkeypatch, no_loading):
    per_rank = EngineConfig.build(path, dtype="float32", kernels="torch", device="cpu",
                                  tensor_parallel_size=2).weight_bytes_per_rank
    assert per_rank < checkpoint_bytes(path)
    monkeypatch.setattr(engine_config, "device_memory", lambda device: 2 * per_rank - 1)
    with pytest.raises(StartupError) as e:
        build(path, tensor_parallel_size=2)
    assert f"{2 * per_rank} bytes" in str(e.value) and f"2 ranks of {per_rank} bytes" in str(e.value), str(e.value)


def test_on_a_gpu_weights_too_large_for_one_name_the_tp_size_that_fits(path, monkeypatch):
    config = dataclasses.replace(EngineConfig.build(path, dtype="float32", kernels="torch", device="cpu"),
                                 device=torch.device("cuda"))
    weights = checkpoint_bytes(path)
    assert config.weight_bytes_per_rank == weights
    half = dataclasses.replace(config, tensor_parallel_size=2).weight_bytes_per_rank
    monkeypatch.setattr(engine_config, "device_memory", lambda device: half + 1)  # fits at --tp 2, not at 1
    with pytest.raises(StartupError) as e:
        config.fitted()
    message = str(e.value)
    for part in (f"{weights} bytes", "per rank at --tp 1", f"{half + 1} bytes", "free on cuda:0",
                 "--tp 2 or more (tensor_parallel_size)", "--dtype bfloat16"):
        assert part in message, (part, message)
    monkeypatch.setattr(engine_config, "device_memory", lambda device: 1000)  # no split this model allows fits
    with pytest.raises(StartupError, match="no --tp this model allows fits"):
        config.fitted()


def test_a_kv_cache_memory_that_does_not_fit_beside_the_weights(path, monkeypatch, no_loading):
    weights = checkpoint_bytes(path)
    monkeypatch.setattr(engine_config, "device_memory", lambda device: weights + (8 << 20))
    with pytest.raises(StartupError) as e:
        build(path, kv_cache_memory=16 << 20)
    message = str(e.value)
    for part in (f"kv_cache_memory={16 << 20} bytes", f"{weights} bytes", f"kv_cache_memory={8 << 20} or less"):
        assert part in message, (part, message)


# ---- 3. max_model_len past the model's context, and prompts past max_model_len ----

def test_max_model_len_longer_than_the_models_context(path, no_loading):
    with pytest.raises(StartupError) as e:
        build(path, max_model_len=4096)
    message = str(e.value)
    for part in ("max_model_len=4096", "max_position_embeddings=1024", "--max-model-len (max_model_len) 1024"):
        assert part in message, (part, message)
    with pytest.raises(ValueError, match="max_model_len must be >= 1"):
        build(path, max_model_len=-1)


def test_a_prompt_past_max_model_len_is_refused_at_generate(path):
    llm = build(path, max_model_len=64)
    with pytest.raises(ValueError, match=r"prompt 1 has 64 tokens.*max_model_len"):
        llm.generate([{"prompt_token_ids": [5] * 8}, {"prompt_token_ids": [5] * 64}],
                     SamplingParams(max_tokens=2), use_tqdm=False)


# ---- 4. max_num_seqs above the blocks the pool has: no error needed ----

def test_more_sequences_allowed_than_blocks_still_finish_every_request(path):
    """max_num_seqs=32 over 8 blocks: the scheduler admits what fits and preempts; nothing deadlocks, and the
    tokens are those of a pool with room for all."""
    g = torch.Generator().manual_seed(1)
    prompts = [{"prompt_token_ids": torch.randint(3, 400, (20,), generator=g).tolist()} for _ in range(12)]
    params = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)
    small = build(path, kv_cache_memory=8 * block_bytes(path), max_model_len=64, max_num_seqs=32,
                  max_num_batched_tokens=64)
    large = build(path, max_model_len=64, max_num_seqs=32)
    got = [o.outputs[0].token_ids for o in small.generate(prompts, params, use_tqdm=False)]
    assert got == [o.outputs[0].token_ids for o in large.generate(prompts, params, use_tqdm=False)]
    assert all(len(t) == 20 for t in got) and small.core.scheduler.num_preemptions > 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="measures a GPU's memory: the CPU's KV cache has a fixed size")
def test_the_kv_cache_is_sized_after_the_largest_step_ran(tiny_model_dir, caplog):
    """On a GPU the KV cache takes its share of what is free only after a max-chunk prefill, the LM head and the
    sampler over max_num_seqs rows ran once: the step that follows at full size then finds its memory."""
    import logging

    from stage1 import LLM, SamplingParams

    with caplog.at_level(logging.INFO, logger="stage1"):
        llm = LLM(tiny_model_dir, dtype="bfloat16", kernels="triton", max_num_batched_tokens=1024, max_num_seqs=64)
    assert "the largest step takes" in caplog.text
    prompts = [{"prompt_token_ids": [5 + i % 50] * (200 + i)} for i in range(64)]
    outs = llm.generate(prompts, SamplingParams(max_tokens=8, temperature=0.8, top_k=50, top_p=0.9, ignore_eos=True),
                        use_tqdm=False)
    assert all(len(o.outputs[0].token_ids) == 8 for o in outs)
