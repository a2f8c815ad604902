"""The generation settings (stage1/data/settings.py): each sampling setting, declared once, is a CLI flag, a
SamplingParams argument, an entry of each row's `sampling` field and of the run identity; bad values are
SamplingParams' own errors, naming the flag. And the Engine protocol the fake and the real engine implement."""

import dataclasses
import inspect
import json
import re

import pytest

from stage1.data.engine import Engine, EngineStats, EngineTokenizer
from stage1.data.errors import DataError
from stage1.data.filters import Candidate, add_kept, first_rejection
from stage1.data.pipeline import Pipeline
from stage1.data.settings import GenerationConfig, flag
from stage1.data.writer import DatasetWriter
from stage1.engine.params import SamplingParams
from stage1.generate import build_parser

SAMPLING = [f.name for f in GenerationConfig.sampling_settings()]
# A valid value other than the default, for every sampling setting (a new setting needs one here).
OTHER_VALUES = {"temperature": 0.5, "top_p": 0.8, "top_k": 5, "min_p": 0.05, "max_tokens": 64, "n": 2}


def test_every_sampling_setting_is_a_flag_a_sampling_param_a_row_field_and_an_identity_entry(gen, make_llm, read_rows,
                                                                                             out):
    assert set(SAMPLING) == set(OTHER_VALUES)
    argv = [a for name, value in OTHER_VALUES.items() for a in (f"--{name.replace('_', '-')}", value)]
    llm = make_llm()
    assert gen("--limit", 4, *argv, llm=llm) == 0
    assert len(llm.seen_params) == 4
    for sp in llm.seen_params:
        assert {name: getattr(sp, name) for name in SAMPLING} == OTHER_VALUES
    rows = read_rows(out / "data.jsonl") + read_rows(out / "rejects.jsonl")
    assert rows and all(row["sampling"] == OTHER_VALUES for row in rows)
    assert all(list(row["sampling"]) == SAMPLING for row in rows)  # in declaration order
    manifest = json.loads((out / "manifest.json").read_text())
    assert {name: manifest["identity"][name] for name in SAMPLING} == OTHER_VALUES
    assert {name: manifest["generation"][name] for name in SAMPLING} == OTHER_VALUES


def test_sampling_settings_are_sampling_params_arguments_with_the_cli_defaults():
    params = inspect.signature(SamplingParams).parameters
    parser = build_parser()
    for f in GenerationConfig.sampling_settings():
        assert f.name in params, f.name
        assert parser.get_default(f.name) == f.default


def test_identity_is_what_it_was():
    """The identity entries the settings give: those the CLI wrote before they derived from the settings, min_p,
    select and the judge's."""
    assert set(GenerationConfig().identity()) == {
        "style", "n", "max_tokens", "temperature", "top_p", "top_k", "seed", "allow_run_on", "near_dedup",
        "near_dup_threshold", "copy_threshold", "min_p", "select", "judge", "judge_style", "min_judge_score"}


@pytest.mark.parametrize("argv, message", [
    (("--top-p", 1.5), "--top-p must be in (0, 1], got 1.5"),
    (("--top-p", 0), "--top-p must be in (0, 1], got 0.0"),
    (("--temperature", -1), "--temperature must be >= 0 (0 means greedy), got -1.0"),
    (("--top-k", -3), "--top-k must be an int >= 0 (0 or -1 disables it), got -3"),
    (("--max-tokens", 0), "--max-tokens must be an int >= 1"),
    (("--n", 0), "--n must be an int >= 1, got 0"),
    (("--min-p", 2), "--min-p must be in [0, 1], got 2.0"),
    (("--min-p", -0.1), "--min-p must be in [0, 1], got -0.1"),
])
def test_a_bad_sampling_value_is_samplingparams_error_naming_the_flag(gen, make_llm, out, capsys, argv, message):
    llm = make_llm()
    assert gen(*argv, llm=llm) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {message}") and err.count("\n") == 1, err
    assert "SamplingParams" not in err and llm.seen_prompts == [] and not out.exists()


def test_validated_keeps_what_samplingparams_normalises():
    assert GenerationConfig(top_k=-1).validated().top_k == 0  # -1 is off, as 0: recorded as the engine runs it
    with pytest.raises(DataError, match=re.escape("--top-p must be in (0, 1], got 2")):
        GenerationConfig(top_p=2).validated()


def test_a_flag_name_follows_the_field_name():
    by_name = {f.name: f for f in dataclasses.fields(GenerationConfig)}
    assert flag(by_name["top_p"]) == "--top-p" and flag(by_name["max_tokens"]) == "--max-tokens"


def test_an_identity_entry_missing_from_an_older_manifest_stands_for_its_default(gen, make_llm, out, capsys):
    """A run made before a setting existed (its manifest lacks the entry) resumes when the setting is at its default,
    the behaviour it had then; any other value is another run."""
    assert gen("--limit", 6, llm=make_llm()) == 0
    path = out / "manifest.json"
    manifest = json.loads(path.read_text())
    del manifest["identity"]["top_k"]
    path.write_text(json.dumps(manifest))
    assert gen("--limit", 6, "--top-k", 5, "--resume", llm=make_llm()) == 2
    assert "holds a different run (top_k: 0 there, 5 now)" in capsys.readouterr().err
    idle = make_llm()
    assert gen("--limit", 6, "--resume", llm=idle) == 0 and idle.seen_prompts == []


def test_the_fake_engine_implements_the_engine_protocol(make_llm):
    llm = make_llm()
    assert isinstance(llm, Engine)
    assert isinstance(llm.tokenizer, EngineTokenizer) and isinstance(llm.stats, EngineStats)


def test_pipeline_checks_each_completion_in_the_listed_order(make_llm, tmp_path):
    pipeline = Pipeline(make_llm(), GenerationConfig(), DatasetWriter(tmp_path))
    assert [check.name for check in pipeline.checks] == [
        "empty", "run_on", "control_token", "scaffolding", "repetition", "example_copy", "instruction_echo",
        "contaminated", "not_selected", "low_judge_score", "exact_duplicate", "near_duplicate"]
    # An echo of its instruction that repeats a kept row too: both checks fire, the earlier one is the reason.
    instruction = "Rewrite this sentence in the passive voice: The chef cooked a delicious meal."
    add_kept(pipeline.checks, Candidate(instruction, "The chef cooked a delicious meal.", "stop", {}, "a#0"))
    both = Candidate(instruction, "The chef cooked a delicious meal.", "stop", {})
    assert [check.check(both)[0] for check in pipeline.checks if check.check(both)] == [
        "instruction_echo", "exact_duplicate"]
    assert first_rejection(pipeline.checks, both)[0] == "instruction_echo"


def test_min_p_reaches_the_engine_the_rows_and_the_identity(gen, make_llm, read_rows, out):
    llm = make_llm()
    assert gen("--limit", 3, "--min-p", 0.1, llm=llm) == 0
    assert [sp.min_p for sp in llm.seen_params] == [0.1] * 3
    rows = read_rows(out / "data.jsonl") + read_rows(out / "rejects.jsonl")
    assert len(rows) == 3 and all(row["sampling"]["min_p"] == 0.1 for row in rows)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["identity"]["min_p"] == 0.1 and manifest["generation"]["min_p"] == 0.1


def test_a_run_from_before_min_p_resumes_at_min_p_0(gen, make_llm, read_rows, out, capsys):
    """Its manifest has no min_p (it sampled with none, i.e. 0): resumed with the default it is the same run."""
    assert gen("--limit", 4, llm=make_llm()) == 0
    path = out / "manifest.json"
    manifest = json.loads(path.read_text())
    del manifest["identity"]["min_p"]
    path.write_text(json.dumps(manifest))
    assert gen("--limit", 8, "--min-p", 0.1, "--resume", llm=make_llm()) == 2
    assert "holds a different run (min_p: 0.0 there, 0.1 now)" in capsys.readouterr().err
    assert len(read_rows(out / "data.jsonl") + read_rows(out / "rejects.jsonl")) == 4  # untouched
    resumed = make_llm()
    assert gen("--limit", 8, "--resume", llm=resumed) == 0 and len(resumed.seen_prompts) == 4
    assert json.loads(path.read_text())["identity"]["min_p"] == 0.0
