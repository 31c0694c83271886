"""Official VQA accuracy (leave-one-out over the human answers) and the official answer normalization, by hand."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from trl_rejection.eval.utility import (
    normalize_answer,
    process_digit_article,
    process_punctuation,
    score_utility,
    vqa_accuracy,
)


@pytest.mark.parametrize(("matches", "expected"), [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)])
def test_ten_annotators_leave_one_out(matches, expected):
    # e.g. 1 match: the 9 subsets that keep it score 1/3, the one that drops it 0 -> 9 * (1/3) / 10 = 0.3;
    # 3 matches: 7 subsets keep 3 (score 1), 3 keep 2 (2/3) -> (7 + 2) / 10 = 0.9. min(n/3, 1) would give 1/3 .. 1.
    answers = ["soup"] * matches + ["stew"] * (10 - matches)
    assert vqa_accuracy("soup", answers) == pytest.approx(expected)


def test_fewer_annotators_average_over_their_own_subsets():
    # dropping either "soup" leaves 1 match (1/3), dropping "stew" leaves 2 (2/3): (1/3 + 1/3 + 2/3) / 3 = 4/9
    assert vqa_accuracy("soup", ["soup", "soup", "stew"]) == pytest.approx(4 / 9)
    assert vqa_accuracy("soup", ["soup"]) == 0.0  # the only answer left out: no other human agrees
    with pytest.raises(ValueError, match="at least one human answer"):
        vqa_accuracy("soup", [])


@pytest.mark.parametrize(("text", "expected"), [
    ("black-and-white", "black and white"),  # no mark touches a space: "-" becomes a space
    ("yes, it is.", "yes it is"),  # ", " touches a space: "," deleted; the final period deleted
    ("1,000 dollars", "1000 dollars"),  # digit-comma-digit: every mark is deleted, not spaced
    ("3.5", "3.5"),  # a period before a digit stays
    ("what?!", "what  "),  # "?" and "!" touch no space: each becomes a space
    ("don't", "don't"),  # the apostrophe is not in the official punctuation list
])
def test_process_punctuation(text, expected):
    assert process_punctuation(text) == expected


@pytest.mark.parametrize(("text", "expected"), [
    ("The Two dogs", "2 dogs"),  # lower-cased, article dropped, number word to digit
    ("none of an apple", "0 of apple"),
    ("dont", "don't"), ("Whats", "what's"),  # contractions map
    ("Im", "im"),  # the official map's capitalized keys never match lower-cased words
    ("somebody'd", "somebodyd"),  # the official map's reversed entry, kept
    ("eleven", "eleven"),  # only zero..ten (and none) are mapped
])
def test_process_digit_article(text, expected):
    assert process_digit_article(text) == expected


def test_normalize_answer_chains_both_steps():
    assert normalize_answer("  The\tRed-car.\n") == "red car"
    assert normalize_answer("Two.") == "2"


def test_completion_normalized_human_answers_only_punctuated_when_they_differ():
    # Humans disagree: their answers go through process_punctuation ("red-car" -> "red car"): 3 matches -> 0.9.
    assert vqa_accuracy("The red car.", ["red-car"] * 3 + ["blue"] * 7) == pytest.approx(0.9)
    # Humans all agree: the official script leaves their answers as they are, so "red-car" never equals "red car".
    assert vqa_accuracy("red car", ["red-car"] * 10) == 0.0
    assert vqa_accuracy("Two", ["2"] * 10) == 1.0


def test_score_utility_routes_by_task():
    assert score_utility("B", "multiple_choice", ["B"], "Q\nA. x\nB. y") == 1.0
    assert score_utility("(A)", "multiple_choice", ["B"], "Q\nA. x\nB. y") == 0.0
    assert score_utility("unanswerable", "short_answer", ["unanswerable"] * 2 + ["blurry"] * 8) == pytest.approx(0.6)


@given(st.text(), st.lists(st.text(), min_size=1, max_size=10))
def test_vqa_accuracy_is_a_fraction(completion, answers):
    assert 0.0 <= vqa_accuracy(completion, answers) <= 1.0
