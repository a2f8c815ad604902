"""The tokenizer.json rebuilt from the real Qwen2.5-Coder GGUF (marker real_model): the ids of transformers'
tokenizer loaded straight from the GGUF, lossless decode(encode(text)), and control-token strings in text encoded as
plain text. The same checks on the tiny GGUF are tests/models/test_gguf_tokenizer.py."""

from __future__ import annotations

import pytest
from tokenizer_checks import CORPUS, SPECIAL_TEXTS, check_against_transformers, check_lossless, check_no_control_tokens

from stage1.engine.tokenizer import Tokenizer

pytestmark = pytest.mark.real_model


@pytest.fixture(scope="module")
def real_transformers_tokenizer(real_gguf_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(real_gguf_path.parent, gguf_file=real_gguf_path.name)


def test_real_same_ids_as_transformers(real_model_dir, real_transformers_tokenizer):
    ours = Tokenizer(real_model_dir)
    check_against_transformers(ours, real_transformers_tokenizer, CORPUS)
    assert ours.encode("hello world") == [14990, 1879]  # Qwen2.5's ids


def test_real_lossless(real_model_dir):
    check_lossless(Tokenizer(real_model_dir), CORPUS + SPECIAL_TEXTS)


def test_real_no_control_token_injection(real_model_dir, real_transformers_tokenizer):
    ours = Tokenizer(real_model_dir)
    assert [ours.token_to_id(t) for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>")] == [151643, 151644, 151645]
    check_no_control_tokens(ours, {151643, 151644, 151645})
    for text in SPECIAL_TEXTS:
        assert ours.encode(text) == real_transformers_tokenizer.encode(text, add_special_tokens=False,
                                                                      split_special_tokens=True)
    assert ours.vocab_size == 151936
