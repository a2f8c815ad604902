"""`python -m stage1.instructions` with the real engine on the tiny random checkpoint (fp32; tests/conftest.py:
tiny_model_dir). A random model writes gibberish: most of it passes the instruction filters as a "request" of 3+
words or is rejected for its length, which is all these tests need. What they check is the bookkeeping: the stored
prompt is what the engine tokenized; where every attempt is judged, the merged shards are one process's files; a
crash and --resume, and a --resume with a larger --count, give the uninterrupted run's files (all: byte for byte but
the logprob signals' last digits, which follow how the engine batched: dataset_files.assert_same_engine_files).
"""

import json

import pytest

from dataset_files import assert_same_engine_files
from stage1 import LLM
from stage1.data.instruction_prompts import attempt_id
from stage1.data.shards import shard_of
from stage1.instructions import main
from test_generate_engine import Recording

ARGS = ("--max-tokens", 12, "--allow-run-on", "--no-progress")


@pytest.fixture(scope="module")
def llm(tiny_model_dir):
    return LLM(str(tiny_model_dir))


def run(model_dir, out, *argv, llm=None):
    return main(["--model", str(model_dir), "--out", str(out), *map(str, ARGS), *map(str, argv)],
                llm_factory=None if llm is None else (lambda d, a: llm))


def rows(out, name):
    return [json.loads(line) for line in (out / name).read_bytes().splitlines()]


def test_stored_prompt_is_what_the_engine_tokenized(llm, tiny_model_dir, tmp_path):
    rec = Recording(llm)
    assert run(tiny_model_dir, tmp_path, "--count", 6, "--batch-size", 4, llm=rec) == 0
    by_prompt = {o.prompt: o for o in rec.outputs}
    written = rows(tmp_path, "data.jsonl") + rows(tmp_path, "rejects.jsonl")
    assert len(rows(tmp_path, "data.jsonl")) == 6
    for row in written:
        engine_out = by_prompt[row["prompt"]]
        assert llm.tokenizer.encode(row["prompt"]) == engine_out.prompt_token_ids
        assert row["prompt_tokens"] == len(engine_out.prompt_token_ids)
        assert row["raw_instruction"] == engine_out.outputs[0].text
        assert row["prompt"].endswith(f"Kind: {row['type']}\nRequest:")


def test_when_the_attempts_bound_the_run_shards_merged_are_one_process_byte_for_byte(llm, tiny_model_dir,
                                                                                   tmp_path):
    # --count = --max-attempts = 8: one process judges all 8 attempts unless it keeps every one; each shard's
    # attempts (by hash of id) are at most its share, so it judges all of its own too (tests/data/
    # test_instructions_job.py says why this is the case where the two must agree)
    assert sorted(shard_of(attempt_id(0, i), 2) for i in range(8)) == [0] * 4 + [1] * 4
    one, sharded = tmp_path / "one", tmp_path / "sharded"
    assert run(tiny_model_dir, one, "--count", 8, "--max-attempts", 8, llm=llm) == 0
    kept, rejected = rows(one, "data.jsonl"), rows(one, "rejects.jsonl")
    assert len(kept) + len(rejected) == 8 and rejected  # every attempt judged, some of them rejected
    for index in range(2):
        assert run(tiny_model_dir, sharded, "--count", 8, "--max-attempts", 8, "--num-shards", 2,
                   "--shard-index", index, "--max-num-seqs", 3, llm=llm) == 0
    assert run(tiny_model_dir, sharded, "--count", 8, "--max-attempts", 8, "--merge") == 0
    assert_same_engine_files(sharded, one)  # batched otherwise: the logprob signals' last digits aside


def test_crash_and_resume_and_top_up_give_the_uninterrupted_runs(llm, tiny_model_dir, tmp_path):
    whole6, whole10, out = tmp_path / "whole6", tmp_path / "whole10", tmp_path / "out"
    assert run(tiny_model_dir, whole6, "--count", 6, llm=llm) == 0
    assert run(tiny_model_dir, whole10, "--count", 10, llm=llm) == 0
    crashing = Recording(LLM(str(tiny_model_dir), max_num_seqs=2), fail_on_step=20)
    with pytest.raises(RuntimeError, match="injected crash"):
        run(tiny_model_dir, out, "--count", 6, "--batch-size", 2, "--max-num-seqs", 2, llm=crashing)
    assert 0 < len(rows(out, "data.jsonl")) < 6
    # resumed through the real loader (a fresh engine), with another batch size
    assert run(tiny_model_dir, out, "--count", 6, "--batch-size", 3, "--resume") == 0
    assert_same_engine_files(out, whole6)  # batched otherwise: the logprob signals' last digits aside
    # a larger --count tops the same dataset up: the first rows stay, the result is the run of 10
    first = (out / "data.jsonl").read_bytes()
    assert run(tiny_model_dir, out, "--count", 10, "--resume", llm=llm) == 0
    assert (out / "data.jsonl").read_bytes().startswith(first)
    assert_same_engine_files(out, whole10)
