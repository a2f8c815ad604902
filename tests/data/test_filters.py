"""Each filter on crafted text: what it rejects, with which reason, and what it lets through."""

import pytest

from stage1.data import filters as F
from stage1.data.prompts import load_styles
from stage1.data.settings import GenerationConfig

def test_post_process_cuts_at_the_first_stop_marker_only_and_strips():
    assert F.post_process("  Paris.\n\nWhat is next?\n\nMore", ["\n\n"]) == "Paris."
    assert F.post_process("line one\nline two\n", ["\n\n"]) == "line one\nline two"
    assert F.post_process("a STOP b\n\nc", ["\n\n", "STOP"]) == "a"
    assert F.post_process("  ", ["\n\n"]) == ""


def check(text, style="completion", finish="stop", examples=None, instruction="", **settings):
    """The first rejection of `text` by every completion filter in order, with nothing kept yet (no duplicates)."""
    filters = F.build_filters(GenerationConfig(style=style, **settings), F.RowFilter, F.DatasetFilter)
    return F.first_rejection(filters, F.Candidate(instruction, text, finish, examples or {}))


def dedup(near=True, threshold=F.NEAR_DUP_THRESHOLD):
    return [F.ExactDuplicate(), F.NearDuplicate(threshold, enabled=near)]


def keep(filters, key, instruction, response):
    F.add_kept(filters, F.Candidate(instruction, response, "stop", {}, key))


def dup_check(filters, instruction, response):
    return F.first_rejection(filters, F.Candidate(instruction, response, "stop", {}))


def test_a_good_answer_passes():
    assert check("Gravity is the force by which masses attract one another.") is None


def test_empty():
    assert check("") == ("empty", None)


def test_run_on_unless_allowed():
    assert check("An answer that never ended", finish="length")[0] == "run_on"
    assert check("An answer that never ended", finish="length", allow_run_on=True) is None


@pytest.mark.parametrize("token", ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|fim_prefix|>"])
def test_leaked_control_token_text(token):
    reason, detail = check(f"The answer is 4.{token}user")
    assert reason == "control_token" and token in detail


@pytest.mark.parametrize("style, text", [
    ("completion", "Paris.\nHere are examples of prompts and their completions:"),
    ("completion", "Paris.\nInstruction: name a city"),
    ("completion", "### Response: Paris"),
    ("qa", "Paris.\nQ: What is the capital of Spain?"),
    ("qa", "Paris.\nA: Madrid."),
])
def test_scaffolding_that_starts_the_next_example(style, text):
    assert check(text, style)[0] == "scaffolding"
    assert F.Scaffolding(load_styles()[style].scaffold_patterns).check(F.Candidate("", text, "stop", {}))


def test_qa_lines_are_fine_in_the_completion_style():
    assert check("Q: is a letter, and so is A.", "completion") is None


@pytest.mark.parametrize("text, rule", [
    ("I think so.\nI think so.\nI think so.\nMaybe not.", "duplicate line fraction"),
    ("a short one\nthe same long line, again and again\nthe same long line, again and again\nx\ny\nz\nw",
     "duplicate line character fraction"),
    ("The answer is that the answer is that the answer is that the answer is clear.", "duplicate 3-gram"),
    ("apples and pears " * 8, "duplicate 3-gram"),
    ("I like it. I like it. I like it.", "duplicate 3-gram"),
    ("apples and pears " * 20, "top 2-gram"),  # 50+ words: the Gopher rules proper
])
def test_repetition_gopher_rules(text, rule):
    reason, detail = check(text)
    assert reason == "repetition" and detail.startswith(rule), detail


@pytest.mark.parametrize("text", [
    # Answers of the real model (Qwen2.5-Coder-0.5B) that the Gopher n-gram thresholds wrongly called repetitive.
    "The early bird is a bird with a long head and a long tail.",
    "A lake is a body of water surrounded by ice, while a sea is a body of water that can be seen from above.",
    "Combine water, sugar, and milk to make a cup of tea. Add a pinch of cinnamon, a pinch of nutmeg, and a pinch of "
    "black pepper to taste. This is called steaming.",
    "Mammals are classified as birds because they have feathers and are not able to fly, but penguins are classified "
    "as birds because they have feathers and are able to fly.",
])
def test_natural_short_answers_are_not_repetition(text):
    assert F.Repetition().broken_rule(text) is None


def test_repetition_metrics_individually():
    assert F.duplicate_line_fractions("ok\nok\nfine\n}\n}") == pytest.approx((1 / 3, 2 / 8))
    ws = F.words("a b c a b c a b d")
    assert F.top_ngram_char_fraction(ws, 2) == pytest.approx((6 / 9, "a b"))  # "a b" three times
    assert F.top_ngram_char_fraction(F.words("a b c d"), 2) == (0.0, "")  # nothing repeats
    # "a b c" repeats at 3 and 6 (overlapping): words 3..8 are covered, the last "d" is not.
    assert F.duplicate_ngram_char_fraction(ws, 3) == pytest.approx(5 / 9)
    assert F.duplicate_ngram_char_fraction(ws, 5) == pytest.approx(5 / 9)  # "a b c a b" again at 3
    assert F.duplicate_ngram_char_fraction(ws, 6) == 0.0
    assert F.Repetition().broken_rule("Yes, yes.") is None  # too short for the n-gram rules
    assert F.Repetition().broken_rule("def f(x):\n    return x\n}\n}\n") is None  # lines without words don't count


def test_duplicate_ngram_rule_fires_when_top_ngram_rules_do_not():
    # A 10-word phrase said twice among 36 other words (all words 6 characters): the repeated 5-grams cover 60 of
    # 336 characters (0.18 > 0.15), while the top 4-gram covers only 48 (0.14 <= 0.16).
    phrase = " ".join(f"phr{i:03d}" for i in range(10))
    filler = " ".join(f"fil{i:03d}" for i in range(36))
    detail = F.Repetition().broken_rule(f"{phrase} {filler} {phrase}")
    assert detail.startswith("duplicate 5-gram character fraction 0.18"), detail


def test_rouge_l():
    assert F.rouge_l_f("the cat sat", "the cat sat") == 1.0
    assert F.rouge_l_f("a b c d", "x y z") == 0.0
    assert F.rouge_l_f("the quick brown fox", "the brown dog") == pytest.approx(2 * (2 / 4) * (2 / 3) / (2 / 4 + 2 / 3))


def test_copy_of_its_own_few_shot_completion():
    examples = {"ex-creative-01": "Snow blankets the quiet landscape in pristine white."}
    reason, detail = check("Snow blankets the quiet landscape in pure white.", examples=examples)
    assert reason == "example_copy" and "ex-creative-01" in detail
    assert check("Autumn leaves drift over the sleeping town.", examples=examples) is None
    assert check("Tokyo", examples={"ex-completion-05": "Tokyo"}) is None  # short answers may coincide


@pytest.mark.parametrize("instruction, response, echo", [
    ("Rewrite this sentence in the passive voice: The chef cooked a delicious meal.",
     "The chef cooked a delicious meal.", True),
    ("Summarize in one sentence: The library will extend its hours. It opens at nine.",
     "The library will extend its hours.", True),
    ("Is a penguin a bird or a mammal?", "A bird.", False),  # short: words of the question may be the answer
    ("Correct the grammar in this sentence: She don't like apples.", "She doesn't like apples.", False),
    ("Complete this sentence: The early bird", "The early bird catches the worm.", False),
])
def test_instruction_echo(instruction, response, echo):
    verdict = check(response, instruction=instruction)
    assert (verdict is not None and verdict[0] == "instruction_echo") == echo, verdict


def test_exact_duplicates_of_instruction_and_response():
    d = dedup(near=False)
    assert dup_check(d, "What is 2+2?", "4") is None
    keep(d, "a#0", "What is 2+2?", "4")
    assert dup_check(d, "what is  2+2?", " 4 ") == ("exact_duplicate", "same instruction and response as a#0")
    assert dup_check(d, "What is 3+1?", "4") is None  # the same short answer to another question is fine


def test_near_duplicates_across_the_dataset():
    base = ("Photosynthesis is the process by which green plants use sunlight water and carbon dioxide to make "
            "glucose and release oxygen into the air around them every day")
    d = dedup(threshold=0.7)
    keep(d, "a#0", "Explain photosynthesis.", base)
    keep(d, "b#0", "Explain gravity.", "Gravity pulls masses toward each other, which is why apples fall to the ground")
    reason, detail = dup_check(d, "What is photosynthesis?", base.replace("every day", "each day"))
    assert reason == "near_duplicate" and "a#0" in detail
    assert dup_check(d, "What is gravity?",
                     "Gravity is the curvature of spacetime described by general relativity") is None
    off = dedup(near=False)
    keep(off, "a#0", "Explain photosynthesis.", base)
    assert dup_check(off, "What is photosynthesis?", base.replace("every day", "each day")) is None


def test_near_duplicate_names_the_earliest_match():
    text = "one two three four five six seven eight nine ten eleven twelve thirteen fourteen"
    d = dedup(threshold=0.5)
    keep(d, "z#0", "q1", text)
    keep(d, "a#0", "q2", text + " fifteen")
    assert dup_check(d, "q3", text)[1].endswith("z#0")


def test_order_of_checks_first_reason_wins():
    assert check("<|im_end|>", finish="length")[0] == "run_on"
    assert check("Q: again <|im_end|>", "qa")[0] == "control_token"
