"""GGUF -> HF import on tiny GGUF files written by the tests: weights, config, tied embeddings, and transformers'
own GGUF loader as an independent oracle for the tensor mapping."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from tiny_ggufs import gguf_name, tiny_tokenizer_vocab, write_tiny_gguf

from stage1.models.__main__ import main
from stage1.models.gguf_import import import_gguf

QUIET = {"log": lambda msg: None}


def q8_0_bound(w: np.ndarray) -> np.ndarray:
    """Per-element error bound of Q8_0: blocks of 32 share a scale d = amax/127 stored as fp16; values round to
    the nearest multiple (<= d/2) and the fp16 scale adds up to 127 * d * 2^-11."""
    blocks = w.reshape(*w.shape[:-1], -1, 32)
    d = np.abs(blocks).max(axis=-1, keepdims=True) / 127
    return np.broadcast_to(d * (0.5 + 127 * 2.0 ** -11) + 1e-7, blocks.shape).reshape(w.shape)


def test_roundtrip_weights_match_originals(tiny_gguf, tiny_imported):
    _, originals = tiny_gguf
    ours = load_file(tiny_imported / "model.safetensors")
    assert set(ours) == set(originals)
    q8_error = 0.0
    for name, w in originals.items():
        got = ours[name]
        assert got.dtype == torch.float32 and tuple(got.shape) == w.shape, name
        suffix = gguf_name(name).split(".", 2)[-1]
        if w.ndim == 1 or suffix == "attn_v.weight":  # F32: exact
            torch.testing.assert_close(got, torch.from_numpy(w), rtol=0, atol=0, msg=name)
        elif suffix == "attn_output.weight":  # F16: exactly the fp16 rounding
            torch.testing.assert_close(got, torch.from_numpy(w.astype(np.float16).astype(np.float32)), rtol=0, atol=0)
        elif suffix == "ffn_gate.weight":  # BF16: exactly the bf16 rounding
            torch.testing.assert_close(got, torch.from_numpy(w).to(torch.bfloat16).float(), rtol=0, atol=0)
        else:  # Q8_0: within the quantization error, element by element
            err = np.abs(got.numpy() - w)
            assert (err <= q8_0_bound(w)).all(), f"{name}: max error {err.max()}"
            q8_error = max(q8_error, float(err.max()))
    assert q8_error > 0  # the Q8_0 path really was quantized, not stored as float


def test_config_json(tiny_gguf, tiny_imported):
    tokens, _, _ = tiny_tokenizer_vocab()
    config = json.loads((tiny_imported / "config.json").read_text())
    assert config["architectures"] == ["Qwen2ForCausalLM"] and config["model_type"] == "qwen2"
    assert {k: config[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                                   "num_key_value_heads", "max_position_embeddings", "vocab_size")} == {
        "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "max_position_embeddings": 4096, "vocab_size": len(tokens)}
    assert config["rope_theta"] == 1_000_000.0
    assert config["rms_norm_eps"] == 1e-6  # not float32's 9.99999997e-07
    assert config["tie_word_embeddings"] is False and config["use_sliding_window"] is False
    assert config["hidden_act"] == "silu" and config["rope_scaling"] is None
    assert config["torch_dtype"] == "float32"
    assert config["bos_token_id"] == tokens.index("<|endoftext|>")
    assert config["eos_token_id"] == tokens.index("<|im_end|>")
    generation = json.loads((tiny_imported / "generation_config.json").read_text())
    assert generation == {"bos_token_id": tokens.index("<|endoftext|>"), "eos_token_id": tokens.index("<|im_end|>"),
                          "pad_token_id": tokens.index("<|endoftext|>")}
    tok_config = json.loads((tiny_imported / "tokenizer_config.json").read_text())
    assert tok_config["eos_token"] == "<|im_end|>" and tok_config["add_bos_token"] is False


def test_default_dtype_is_bf16(tiny_gguf, tiny_imported, tmp_path):
    out = import_gguf(tiny_gguf[0], tmp_path / "bf16", **QUIET)
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    bf16, fp32 = load_file(out / "model.safetensors"), load_file(tiny_imported / "model.safetensors")
    assert set(bf16) == set(fp32)
    for name in fp32:
        assert bf16[name].dtype == torch.bfloat16
        assert torch.equal(bf16[name], fp32[name].to(torch.bfloat16)), name


def test_tied_embeddings_have_no_lm_head(tmp_path):
    write_tiny_gguf(tmp_path / "tied.gguf", tied=True)
    out = import_gguf(tmp_path / "tied.gguf", tmp_path / "out", **QUIET)
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is True
    assert "lm_head.weight" not in load_file(out / "model.safetensors")


def test_output_is_a_regular_directory(tiny_imported):
    assert sorted(p.name for p in tiny_imported.iterdir()) == [
        "config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]
    assert not [p for p in tiny_imported.parent.iterdir() if p.name.startswith(".")]  # no staging leftovers
    assert tiny_imported.stat().st_mode & 0o755 == 0o755  # not mkdtemp's private 0700


def test_transformers_gguf_loader_agrees(tiny_gguf, tiny_imported):
    """transformers reads qwen2 GGUFs itself: its weights and logits must equal those from our directory."""
    from transformers import AutoModelForCausalLM

    path, _ = tiny_gguf
    theirs = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    ours = AutoModelForCausalLM.from_pretrained(tiny_imported, dtype=torch.float32).eval()
    a, b = theirs.state_dict(), ours.state_dict()
    assert set(a) == set(b)
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=0, atol=1e-6, msg=name)
    ids = torch.tensor([[5, 17, 300, 2, 41, 99]])
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, theirs(ids).logits, rtol=1e-5, atol=1e-5)


def test_cli_import_prints_the_directory(tiny_gguf, tmp_path, capsys):
    out = tmp_path / "cli"
    assert main(["import-gguf", str(tiny_gguf[0]), str(out), "--dtype", "fp32"]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == str(out)
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "float32"


def test_import_into_existing_empty_directory(tiny_gguf, tmp_path):
    (tmp_path / "empty").mkdir()
    out = import_gguf(tiny_gguf[0], tmp_path / "empty", **QUIET)
    assert (out / "model.safetensors").is_file()


@pytest.mark.parametrize("dtype", ["fp16", "int8"])
def test_unknown_dtype_is_refused(tiny_gguf, tmp_path, dtype):
    from stage1.models import GGUFImportError

    with pytest.raises(GGUFImportError, match="bf16 or fp32"):
        import_gguf(tiny_gguf[0], tmp_path / "out", dtype=dtype, **QUIET)
    assert not (tmp_path / "out").exists()
