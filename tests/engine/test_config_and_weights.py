"""config.json parsing and the safetensors loader, including every way a checkpoint can be wrong."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from stage1 import LLM
from stage1.engine.config import ConfigError, ModelConfig
from stage1.engine.weights import WeightsError, load_model

BASE = {"model_type": "qwen2", "vocab_size": 100, "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 512}


def test_official_and_transformers5_rope_fields():
    official = ModelConfig.from_dict({**BASE, "rope_theta": 1e6, "torch_dtype": "bfloat16",
                                      "tie_word_embeddings": True})
    v5 = ModelConfig.from_dict({**BASE, "rope_parameters": {"rope_theta": 1e6, "rope_type": "default"},
                                "dtype": "float32"})
    assert official.rope_theta == v5.rope_theta == 1e6
    assert official.torch_dtype == torch.bfloat16 and v5.torch_dtype == torch.float32
    assert official.tie_word_embeddings and not v5.tie_word_embeddings
    assert official.head_dim == 16 and official.max_position_embeddings == 512


@pytest.mark.parametrize("change, field", [
    ({"model_type": "llama"}, "model_type"),
    ({"use_sliding_window": True}, "use_sliding_window"),
    ({"rope_scaling": {"type": "yarn", "factor": 4}}, "rope scaling"),
    ({"num_key_value_heads": 3}, "num_key_value_heads"),
])
def test_unsupported_config_names_the_field(change, field):
    with pytest.raises(ConfigError, match=field):
        ModelConfig.from_dict({**BASE, "rope_theta": 1e6, **change})


def test_missing_model_dir_is_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        LLM(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="config.json is missing"):
        LLM(tmp_path)


def test_config_of_another_architecture(tiny_model_dir, tmp_path):
    bad = tmp_path / "llama"
    shutil.copytree(tiny_model_dir, bad)
    raw = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**raw, "model_type": "llama"}))
    with pytest.raises(ConfigError, match="model_type is 'llama'"):
        LLM(bad)


def _copy_with(tiny_model_dir, tmp_path, edit):
    bad = tmp_path / "bad"
    shutil.copytree(tiny_model_dir, bad)
    tensors = load_file(bad / "model.safetensors")
    edit(tensors)
    save_file(tensors, bad / "model.safetensors")
    return bad


def test_missing_tensor_is_named(tiny_model_dir, tmp_path):
    bad = _copy_with(tiny_model_dir, tmp_path, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(WeightsError, match=r"missing tensor\(s\) model.layers.1.mlp.up_proj.weight"):
        LLM(bad)


def test_unexpected_tensor_is_named(tiny_model_dir, tmp_path):
    bad = _copy_with(tiny_model_dir, tmp_path, lambda t: t.update({"model.layers.9.extra": torch.zeros(2)}))
    with pytest.raises(WeightsError, match="unexpected tensor 'model.layers.9.extra'"):
        LLM(bad)


def test_misshapen_tensor_is_named(tiny_model_dir, tmp_path):
    def edit(t):
        t["model.layers.0.self_attn.k_proj.bias"] = t["model.layers.0.self_attn.k_proj.bias"][:-1].clone()
    bad = _copy_with(tiny_model_dir, tmp_path, edit)
    with pytest.raises(WeightsError, match="k_proj.bias' has shape"):
        LLM(bad)


def test_missing_shard_is_named(checkpoint, tmp_path):
    bad = tmp_path / "sharded"
    shutil.copytree(checkpoint("gqa7-d64-sharded"), bad)
    shard = sorted(bad.glob("model-0*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(WeightsError, match=f"{shard.name}, which is missing"):
        LLM(bad)


def test_weights_cast_to_run_dtype_and_tied_head(checkpoint):
    path = checkpoint("gqa1-d64-tied")
    config = ModelConfig.from_dir(path)
    model = load_model(path, config, torch.bfloat16, torch.device("cpu"))
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert model.lm_head.weight is model.embed_tokens.weight
    ref = load_file(path / "model.safetensors")
    q = ref["model.layers.0.self_attn.q_proj.weight"]
    torch.testing.assert_close(model.layers[0].self_attn.qkv_proj.weight[:q.shape[0]], q.to(torch.bfloat16))


def test_sharded_checkpoint_loads_same_as_single(checkpoint):
    sharded = checkpoint("gqa7-d64-sharded")
    single = checkpoint("gqa7-d64-sharded", shard=False)
    config = ModelConfig.from_dir(single)
    a = load_model(sharded, config, torch.float32, torch.device("cpu")).state_dict()
    b = load_model(single, config, torch.float32, torch.device("cpu")).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_truncated_or_foreign_file_is_named(tiny_model_dir, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(tiny_model_dir, bad)
    data = (bad / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(data[:-1000])
    with pytest.raises(WeightsError, match="model.safetensors: tensor .* past the end of the file"):
        LLM(bad)
    (bad / "model.safetensors").write_bytes(b"PK\x03\x04 a zip, not a safetensors file")
    with pytest.raises(WeightsError, match="model.safetensors: not a safetensors file"):
        LLM(bad)


def test_tensor_parallel_ranks_must_fit_from_the_devices_index(tiny_model_dir, monkeypatch):
    """--device cuda:3 with --tp 2 needs GPUs 3 and 4: on a node of 4 the check counts from the index, not from 0."""
    from stage1.engine.engine_config import EngineConfig

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    with pytest.raises(ValueError, match=r"tensor_parallel_size=2 from cuda:3 needs GPUs 3\.\.4, but this node shows 4"):
        EngineConfig.build(tiny_model_dir, device="cuda:3", tensor_parallel_size=2)
