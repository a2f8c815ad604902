"""`python -m stage1.generate` with the real engine on the tiny random checkpoint (tests/conftest.py: tiny_model_dir).

A random model writes gibberish, so most completions are run-ons; --allow-run-on keeps them where a test needs kept
rows. What matters here is the bookkeeping: the stored prompt is what the engine tokenized, its ids are the ids the
model received, the stored seed regenerates the stored response, and files do not depend on batching or on a crash.
"""

import json

import pytest

import stage1
from stage1 import LLM, SamplingParams
from dataset_files import assert_same_engine_files
from stage1.generate import main

ARGS = ("--limit", 6, "--n", 2, "--max-tokens", 12, "--no-progress")


class Recording:
    """The engine, recording what each step returned; optionally crashing on step `fail_on_step` (0-based)."""

    def __init__(self, llm, fail_on_step=None):
        self.llm, self.fail_on_step, self.outputs, self.steps = llm, fail_on_step, [], 0

    def __getattr__(self, name):
        return getattr(self.llm, name)

    def step(self):
        if self.steps == self.fail_on_step:
            raise RuntimeError("injected crash")
        self.steps += 1
        outs = self.llm.step()
        self.outputs += outs
        return outs


@pytest.fixture(scope="module")
def llm(tiny_model_dir):
    return LLM(str(tiny_model_dir))


def run(model_dir, out, *argv, llm_factory=None):
    return main(["--model", str(model_dir), "--out", str(out), *map(str, ARGS), *map(str, argv)],
                llm_factory=llm_factory)


def rows(out):
    return [json.loads(line) for name in ("data.jsonl", "rejects.jsonl")
            for line in (out / name).read_bytes().splitlines()]


@pytest.mark.parametrize("style", ["completion", "qa"])
def test_stored_prompt_is_what_the_model_saw(llm, tiny_model_dir, tmp_path, style):
    rec = Recording(llm)
    out = tmp_path / style
    assert run(tiny_model_dir, out, "--style", style, "--batch-size", 4, "--allow-run-on",
               llm_factory=lambda d, a: rec) == 0
    by_prompt = {o.prompt: o for o in rec.outputs}
    all_rows = rows(out)
    assert len(all_rows) == 12 and len(by_prompt) == 6
    special = {llm.tokenizer.token_to_id(t) for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>")}
    for row in all_rows:
        engine_out = by_prompt[row["prompt"]]
        assert llm.tokenizer.encode(row["prompt"]) == engine_out.prompt_token_ids
        assert row["prompt_tokens"] == len(engine_out.prompt_token_ids)
        assert not special & set(engine_out.prompt_token_ids)  # no control tokens in what the model saw
        assert row["raw_response"] == engine_out.outputs[row["index"]].text
    # The stored prompt and seed alone regenerate the stored responses (the seed is per row, not per batch).
    row = all_rows[0]
    [again] = llm.generate([row["prompt"]], SamplingParams(max_tokens=12, temperature=0.7, top_p=0.9, n=2,
                                                           seed=row["seed"], stop=["\n\n"],
                                                           stop_token_ids=sorted(special | {0})), use_tqdm=False)
    assert again.outputs[row["index"]].text == row["raw_response"]


def test_same_files_across_batching_and_after_crash_and_resume(llm, tiny_model_dir, tmp_path):
    full = tmp_path / "full"
    assert run(tiny_model_dir, full, "--batch-size", 6, llm_factory=lambda d, a: llm) == 0
    out = tmp_path / "crashed"
    one_at_a_time = Recording(LLM(str(tiny_model_dir), max_num_seqs=2), fail_on_step=30)  # 12 steps an instruction
    with pytest.raises(RuntimeError, match="injected crash"):
        run(tiny_model_dir, out, "--batch-size", 2, "--max-num-seqs", 2, llm_factory=lambda d, a: one_at_a_time)
    assert 0 < len(rows(out)) < 12
    # Resume through the real loader (a fresh engine, 256 sequences in flight), with yet another batch size.
    assert run(tiny_model_dir, out, "--batch-size", 3, "--resume") == 0
    assert_same_engine_files(out, full)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"]["completions"] == 12 and manifest["code"]["stage1_version"] == stage1.__version__
    assert manifest["model"]["eos_token_ids"] == list(llm.eos_token_ids)  # a list in JSON, whatever LLM holds
    # the session records what auto resolved to on this machine (the rows depend on it)
    resumed = manifest["sessions"][-1]["engine"]
    assert resumed == llm.engine_info and resumed["kernels"] == llm.config.kernels.name
    assert resumed["dtype"] == str(llm.config.dtype).removeprefix("torch.") and resumed["device"] == "cpu"


def test_the_engine_implements_the_data_pipelines_engine_protocol(llm):
    from stage1.data.engine import Engine, EngineStats, EngineTokenizer
    assert isinstance(llm, Engine)
    assert isinstance(llm.tokenizer, EngineTokenizer) and isinstance(llm.stats, EngineStats)
    assert isinstance(llm.vocab_size, int) and isinstance(llm.stats.prefix_cached_tokens, int)
