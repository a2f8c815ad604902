"""Our engine against transformers on the real Qwen2.5-Coder-0.5B checkpoint (marker real_model), both loading the
same imported safetensors directory in fp32."""

from __future__ import annotations

import pytest
import torch

from stage1 import LLM, SamplingParams
from stage1.engine.attention import AttentionContext

pytestmark = pytest.mark.real_model

# Mixed lengths and languages, prose and code.
PROMPTS = [
    "def fibonacci(n):",
    "The capital of France is",
    "Here are examples of prompts and their completions:\n\nWhat is 2+2?\n4\n\nWhat is gravity?\n",
    "日本の首都は",
    "import numpy as np\n\n# compute the mean of each row of a matrix\ndef row_means(m):\n\t",
    "Écris une phrase sur l'hiver :",
    "SELECT name, COUNT(*) FROM users",
    "Q: Why is the sky blue?\nA:",
    "1, 1, 2, 3, 5, 8,",
    "Привет! Как",
]
NEW_TOKENS = 64


@pytest.fixture(scope="module")
def engines(real_model_dir):
    from transformers import AutoModelForCausalLM

    llm = LLM(real_model_dir, dtype="float32", max_model_len=2048)
    ref = AutoModelForCausalLM.from_pretrained(real_model_dir, dtype=torch.float32).eval()
    return llm, ref


def test_prefill_logits_match_transformers(engines):
    llm, ref = engines
    prompts = [llm.tokenizer.encode(p) for p in PROMPTS]
    lengths = [len(p) for p in prompts]
    cu = [0]
    for n in lengths:
        cu.append(cu[-1] + n)
    ctx = AttentionContext(is_prefill=True, kv_cache=None, slot_mapping=None, block_tables=None,
                           context_lens=torch.tensor(lengths), cu_seqlens_q_host=cu, context_lens_host=lengths)
    model = llm.core.runner.model
    with torch.inference_mode():
        hidden = model(torch.tensor([t for p in prompts for t in p]),
                       torch.cat([torch.arange(n) for n in lengths]), ctx)
        for i, ids in enumerate(prompts):
            ours = model.compute_logits(hidden[cu[i]:cu[i + 1]])
            expected = ref(torch.tensor([ids])).logits[0]
            assert (ours - expected).abs().max().item() < 1e-3, PROMPTS[i]


def test_greedy_batch_matches_transformers(engines):
    llm, ref = engines
    outs = llm.generate(PROMPTS, SamplingParams(max_tokens=NEW_TOKENS, temperature=0, ignore_eos=True),
                        use_tqdm=False)
    with torch.inference_mode():
        for prompt, out in zip(PROMPTS, outs):
            ids = torch.tensor([out.prompt_token_ids])
            expected = ref.generate(ids, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False,
                                    eos_token_id=None, pad_token_id=151643)[0, ids.shape[1]:].tolist()
            assert out.outputs[0].token_ids == expected, prompt
    assert "fibonacci" in outs[0].outputs[0].text or "return" in outs[0].outputs[0].text
