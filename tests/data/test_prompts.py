"""Prompt styles and the example pool: layout, determinism, and that an instruction never serves as its own example."""

import re

import pytest

from stage1.data.filters import Candidate, DatasetFilter, RowFilter, build_filters, first_rejection
from stage1.data.settings import GenerationConfig
from stage1.data.prompts import CompletionStylePrompts, Example, PromptStyle, load_examples, load_styles, normalize
from stage1.data.readers import read_instructions

HEADER = "Here are examples of prompts and their completions:"


def test_completion_style_layout_matches_the_design_note():
    p = CompletionStylePrompts("completion").build("What is gravity?", seed=7, type="fact")
    blocks = p.text.split("\n\n")
    assert blocks[0] == HEADER
    assert blocks[-1] == "What is gravity?\n"  # the instruction, then a newline for the model to continue
    examples = [load_examples_by_id()[i] for i in p.example_ids]
    assert blocks[1:-1] == [f"{ex.prompt}\n{ex.completion}" for ex in examples]
    assert 3 <= len(examples) <= 4
    assert p.style == "completion"


def test_qa_style_layout():
    p = CompletionStylePrompts("qa").build("What is gravity?", seed=7, type="fact")
    blocks = p.text.split("\n\n")
    assert blocks[-1] == "Q: What is gravity?\nA:"
    examples = [load_examples_by_id()[i] for i in p.example_ids]
    assert blocks[:-1] == [f"Q: {ex.prompt}\nA: {ex.completion}" for ex in examples]


@pytest.mark.parametrize("style", ["completion", "qa"])
def test_no_scaffolding_no_chat_template_no_special_tokens(style):
    for seed in range(50):
        text = CompletionStylePrompts(style).build("Explain tides.", seed).text
        assert not re.search(r"(?im)^\s*(instruction|response)\s*:", text)
        assert "<|" not in text and "|>" not in text


def test_example_choice_is_deterministic_per_seed_and_varies_across_seeds():
    builder = CompletionStylePrompts()
    a = builder.build("Name a colour.", seed=123, type="list")
    assert a == CompletionStylePrompts().build("Name a colour.", seed=123, type="list")
    assert len({builder.build("Name a colour.", seed=s).example_ids for s in range(30)}) > 20
    assert {len(builder.build("Name a colour.", seed=s).example_ids) for s in range(30)} == {3, 4}


def test_examples_include_one_of_the_instructions_type_and_otherwise_distinct_types():
    by_id = load_examples_by_id()
    for seed in range(40):
        ids = CompletionStylePrompts().build("Write a haiku about snow:", seed, type="creative").example_ids
        types = [by_id[i].type for i in ids]
        assert "creative" in types
        assert len(set(types)) == len(types)


@pytest.mark.parametrize("style", ["completion", "qa"])
def test_instruction_is_never_its_own_example(style):
    builder = CompletionStylePrompts(style)
    for ex in load_examples():
        # The exact text, and the same text with other case, punctuation and spacing.
        for text in (ex.prompt, ex.prompt.upper().rstrip(":?") + "  ", "  " + ex.prompt.lower()):
            for seed in range(10):
                prompt = builder.build(text, seed, type=ex.type)
                assert ex.id not in prompt.example_ids
                examples_part = prompt.text.rsplit("\n\n", 1)[0]
                lines = [line.removeprefix("Q: ") for line in examples_part.splitlines()]
                assert normalize(text) not in map(normalize, lines)


def test_pool_is_large_tagged_and_well_formed():
    pool = load_examples()
    assert len(pool) >= 40
    assert len({ex.id for ex in pool}) == len(pool)
    types = {ex.type for ex in pool}
    assert {"math", "completion", "fact", "creative", "explanation", "code", "list", "classification",
            "rewrite"} <= types
    assert len({normalize(ex.prompt) for ex in pool}) == len(pool)
    for ex in pool:
        assert re.fullmatch(rf"ex-{ex.type}-\d\d", ex.id)
        assert ex.prompt.strip() == ex.prompt and ex.completion.strip() == ex.completion
        assert "\n" not in ex.prompt and "\n\n" not in ex.completion  # a blank line is where an answer ends


@pytest.mark.parametrize("style", ["completion", "qa"])
def test_pool_completions_pass_every_quality_filter(style):
    """The filters would reject what the examples teach? Then the filters or the examples are wrong."""
    checks = build_filters(GenerationConfig(style=style, near_dedup=False), RowFilter, DatasetFilter)
    for ex in load_examples():
        assert first_rejection(checks, Candidate(ex.prompt, ex.completion, "stop", {})) is None, ex.id


def test_builtin_instructions_cover_the_pool_types():
    builtin = read_instructions()
    assert len(builtin) >= 100
    assert {i.type for i in builtin} == {ex.type for ex in load_examples()}
    assert not {normalize(i.instruction) for i in builtin} & {normalize(ex.prompt) for ex in load_examples()}
    assert len({i.type for i in builtin[:12]}) == 12  # interleaved by type: --limit gives a mix


def test_a_new_style_is_data_plus_the_one_render_function():
    style = PromptStyle(name="arrow", description="", header=None, example="{prompt} -> {completion}",
                        query="{prompt} ->", separator="\n", num_examples=(2, 2), stop=("\n",),
                        scaffold_patterns=())
    ex = [Example("a", "math", "1+1", "2"), Example("b", "math", "2+2 {braces}", "4")]
    assert style.render("3+3", ex) == "1+1 -> 2\n2+2 {braces} -> 4\n3+3 ->"


def test_unknown_style_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown prompt style 'chat'"):
        CompletionStylePrompts("chat")


def load_examples_by_id():
    return {ex.id: ex for ex in load_examples()}
