"""pass@k against its closed form; majority vote and cons@k."""

import math
from fractions import Fraction

import pytest

from nanoseek.eval_metrics import cons_at_k, majority_vote, pass_at_k


def closed_form(n, c, k):
    return 1 - Fraction(math.comb(n - c, k), math.comb(n, k))


@pytest.mark.parametrize("n,c,k", [(1, 0, 1), (1, 1, 1), (5, 2, 1), (5, 2, 3), (10, 3, 5), (16, 1, 8),
                                   (16, 15, 1), (100, 7, 10), (200, 50, 100), (1000, 5, 100)])
def test_pass_at_k_closed_form(n, c, k):
    assert pass_at_k(n, c, k) == pytest.approx(float(closed_form(n, c, k)), rel=1e-12, abs=1e-15)


def test_pass_at_k_edges():
    assert pass_at_k(10, 0, 5) == 0.0                    # nothing correct
    assert pass_at_k(10, 6, 5) == 1.0                    # n - c = 4 < k: every 5-subset has a hit
    assert pass_at_k(10, 10, 1) == 1.0
    assert pass_at_k(8, 3, 1) == pytest.approx(3 / 8)    # pass@1 = c / n
    for bad in [(5, 6, 1), (5, 1, 0), (5, 1, 6), (5, -1, 1)]:
        with pytest.raises(ValueError):
            pass_at_k(*bad)


def test_majority_vote():
    assert majority_vote(["3", "4", "4", "3", "5"]) == "3"        # tie 2-2: first seen wins
    assert majority_vote(["4", "3", "3", "4"]) == "4"
    assert majority_vote([None, "", "7", None]) == "7"            # no-answers never vote
    assert majority_vote([None, None]) is None
    assert majority_vote([]) is None


def test_cons_at_k():
    answers = ["1", "2", "2", None, "1", "1"]
    correct = [True, False, False, False, True, True]
    assert cons_at_k(answers, correct) == 1.0                     # "1" has 3 votes
    assert cons_at_k(answers, correct, k=3) == 0.0                # first 3: "2" wins 2-1
    assert cons_at_k([None, None], [False, False]) == 0.0
    with pytest.raises(ValueError):
        cons_at_k(answers, correct[:2])
