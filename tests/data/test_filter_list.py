"""The filters as one ordered list (filters.FILTERS): the reject reasons are its names, its kinds run in order, and a
new filter is one class and one list entry: it rejects rows with its reason, in one process and at the merge of
shards, which gives the same files."""

from stage1.data import filters as F
from stage1.data.prompts import load_styles
from stage1.data.settings import GenerationConfig

from dataset_files import RUN, files, rows


def test_the_reason_list_is_the_filters_names_in_order():
    assert list(F.reject_reasons()) == [f.name for f in F.FILTERS] == [
        "prompt_too_long", "empty", "run_on", "control_token", "scaffolding", "repetition", "example_copy",
        "instruction_echo", "contaminated", "not_selected", "low_judge_score", "exact_duplicate", "near_duplicate"]
    assert all(F.reject_reasons().values())  # each says what it rejects


def test_the_kinds_run_in_order():
    """Prompt filters, row filters, selections, judge filters, then dataset filters: a shard runs the first four and
    the merge the last, so a row gets the reason it gets in one process."""
    kinds = (F.PromptFilter, F.RowFilter, F.Selection, F.JudgeFilter, F.DatasetFilter)
    ranks = [next(i for i, kind in enumerate(kinds) if issubclass(f, kind)) for f in F.FILTERS]
    assert ranks == sorted(ranks)


def test_build_takes_the_thresholds_from_the_run_settings():
    config = GenerationConfig(style="qa", max_tokens=100, allow_run_on=True, copy_threshold=0.5, near_dedup=False,
                              near_dup_threshold=0.6)
    built = {f.name: f for f in F.build_filters(config, F.Filter, max_model_len=1000)}
    assert list(built) == list(F.reject_reasons())  # a filter the run turned off is still listed, and passes
    assert (built["prompt_too_long"].max_tokens, built["prompt_too_long"].max_model_len) == (100, 1000)
    assert built["run_on"].allow and built["example_copy"].threshold == 0.5
    assert built["near_duplicate"].threshold == 0.6 and not built["near_duplicate"].enabled
    assert built["scaffolding"].patterns == load_styles()["qa"].scaffold_patterns
    assert [f.name for f in F.build_filters(config, F.DatasetFilter)] == ["exact_duplicate", "near_duplicate"]


def test_prompt_too_long_counts_the_prompt_and_max_tokens():
    too_long = F.PromptTooLong(max_tokens=64, max_model_len=100)
    assert too_long.check(F.Candidate("q", None, None, {}, prompt_tokens=36)) is None
    assert too_long.check(F.Candidate("q", None, None, {}, prompt_tokens=37)) == (
        "prompt_too_long", "37 prompt tokens + max_tokens 64 > max_model_len 100")


def test_a_dataset_filter_forgets_on_reset():
    exact = F.ExactDuplicate()
    row = F.Candidate("What is 2+2?", "4", "stop", {}, "a#0")
    exact.add(row)
    assert exact.check(row) == ("exact_duplicate", "same instruction and response as a#0")
    exact.reset()
    assert exact.check(row) is None


class ShortAnswer(F.RowFilter):
    """A new row filter: one class."""
    name = "short_answer"
    description = "fewer words than asked for"

    def __init__(self, min_words: int = 12):
        self.min_words = min_words

    def check(self, row):
        n = len(F.words(row.response))
        return self.reject(f"{n} words < {self.min_words}") if n < self.min_words else None


class SameOpening(F.DatasetFilter):
    """A new dataset filter: a response that opens with the same word as one kept before it."""
    name = "same_opening"
    description = "opens with the same word as a response kept before it"

    def __init__(self):
        self.reset()

    def reset(self):
        self._first = {}

    def check(self, row):
        first = self._first.get(F.words(row.response)[0])
        return None if first is None else self.reject(f"opens like {first}")

    def add(self, row):
        self._first.setdefault(F.words(row.response)[0], row.key)


def with_filter(new, before):
    """FILTERS with `new` as one more entry, before the filter class `before`."""
    at = F.FILTERS.index(before)
    return (*F.FILTERS[:at], new, *F.FILTERS[at:])


def test_a_new_row_filter_is_one_class_and_one_list_entry(gen, make_llm, respond_mixed, out, monkeypatch):
    monkeypatch.setattr(F, "FILTERS", with_filter(ShortAnswer, F.ExactDuplicate))
    assert list(F.reject_reasons())[-3:] == ["short_answer", "exact_duplicate", "near_duplicate"]
    assert F.reject_reasons()["short_answer"] == "fewer words than asked for"
    assert gen(*RUN, llm=make_llm(respond=respond_mixed)) == 0
    short = [r for r in rows(out / "rejects.jsonl") if r["reason"] == "short_answer"]
    assert short and all(r["detail"].endswith("words < 12") for r in short)
    assert all(len(F.words(r["response"])) >= 12 for r in rows(out / "data.jsonl"))
    # the filters before it still give their reasons first
    assert {"empty", "run_on", "control_token", "scaffolding"} <= {r["reason"] for r in rows(out / "rejects.jsonl")}


def test_a_new_dataset_filter_decides_at_the_merge_as_in_one_process(gen, make_llm, respond_mixed, out, tmp_path,
                                                                      monkeypatch):
    monkeypatch.setattr(F, "FILTERS", with_filter(SameOpening, F.NearDuplicate))
    unsharded = tmp_path / "unsharded"
    assert gen(*RUN, llm=make_llm(respond=respond_mixed), out=unsharded) == 0
    same = [r for r in rows(unsharded / "rejects.jsonl") if r["reason"] == "same_opening"]
    assert same and all(r["detail"].startswith("opens like ") for r in same)

    for index in range(3):  # the shards leave it to the merge
        assert gen(*RUN, "--num-shards", 3, "--shard-index", index, llm=make_llm(respond=respond_mixed)) == 0
    assert not any(r["reason"] == "same_opening" for r in rows(out / "shards" / "00000-of-00003" / "rejects.jsonl"))
    assert gen(*RUN, "--merge", llm=None) == 0
    assert files(out) == files(unsharded)



def test_the_readme_table_is_the_filter_list():
    """README.md's table of reject reasons lists FILTERS in order, each with its kind and its description."""
    from pathlib import Path

    from stage1.data.filters import FILTERS, JudgeFilter, PromptFilter, RowFilter, Selection

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    # the main job's section (the instruction job's has its own table, INSTRUCTION_FILTERS)
    readme = readme.split("\n## Instructions from the base model", 1)[0]
    rows = [line for line in readme.splitlines() if line.startswith("| `")
            and line.split("`")[1] in {f.name for f in FILTERS}]
    kind = lambda f: ("prompt" if issubclass(f, PromptFilter) else "row" if issubclass(f, RowFilter)  # noqa: E731
                      else "selection" if issubclass(f, Selection) else "judge" if issubclass(f, JudgeFilter)
                      else "dataset")
    assert rows == [f"| `{f.name}` | {kind(f)} | {f.description.replace('|', chr(92) + '|')} |" for f in FILTERS]
