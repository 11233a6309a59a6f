"""The tokens admission expects of a typed answer, learnt from the model's answers (plain data)."""
import pytest

from airan.core.answer_length import AnswerLengths

BRIEF = ("smollm2", 16)


def test_the_bound_until_enough_answers_then_a_high_quantile_of_them():
    lengths = AnswerLengths(window=20, min_samples=5, quantile=0.95)
    for n in (7, 8, 7, 7):
        lengths.observe(BRIEF, n)
    assert lengths.expected(BRIEF, 16) == 16 and not lengths.learnt(BRIEF)  # four answers: not yet
    lengths.observe(BRIEF, 9)
    assert lengths.expected(BRIEF, 16) == 9 and lengths.learnt(BRIEF)
    for _ in range(15):
        lengths.observe(BRIEF, 7)
    assert lengths.expected(BRIEF, 16) == 8  # 20 answers: the 19th longest, the lone 9 is past the quantile
    assert lengths.expected(("other-model", 16), 16) == 16  # each kind learns apart


def test_answers_that_hit_the_bound_pull_the_estimate_back_up_and_old_ones_age_out():
    lengths = AnswerLengths(window=10, min_samples=5, quantile=0.9)
    for _ in range(10):
        lengths.observe(BRIEF, 7)
    assert lengths.expected(BRIEF, 16) == 7
    for _ in range(2):
        lengths.observe(BRIEF, 16)  # cut at max_tokens
    assert lengths.expected(BRIEF, 16) == 16
    for _ in range(10):
        lengths.observe(BRIEF, 30)  # never above the bound the request allows
    assert lengths.expected(BRIEF, 16) == 16


def test_bad_settings_are_refused():
    with pytest.raises(ValueError):
        AnswerLengths(window=4, min_samples=5)
    with pytest.raises(ValueError):
        AnswerLengths(quantile=0.0)
