"""Evaluation math as pure functions: pass@k (unbiased estimator) and majority vote (cons@k).

Per problem, draw n samples and count the c correct ones; average over problems. Answers for
voting are the tasks' canonical strings (`task.extract_answer`), so "18.0" and "18" vote together.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples with c correct: 1 - C(n-c, k) / C(n, k) (Chen et al. 2021, Codex).

    Product form 1 - prod_{i=n-c+1}^{n} (1 - k/i): no huge binomials, stable for any n.
    """
    if not (0 <= c <= n and 1 <= k <= n):
        raise ValueError(f"need 0 <= c <= n and 1 <= k <= n, got n={n} c={c} k={k}")
    if n - c < k:                            # every size-k subset holds a correct sample
        return 1.0
    prod = 1.0
    for i in range(n - c + 1, n + 1):
        prod *= 1.0 - k / i
    return 1.0 - prod


def majority_vote(answers: Sequence[str | None]) -> str | None:
    """The most common answer; ties go to the one that appeared first. None and "" (no answer
    extracted) never vote; if nothing voted, None."""
    votes = [a for a in answers if a]
    if not votes:
        return None
    counts = Counter(votes)
    best = max(counts.values())
    return next(a for a in votes if counts[a] == best)   # first occurrence among the tied


def cons_at_k(answers: Sequence[str | None], correct: Sequence[bool], k: int | None = None) -> float:
    """cons@k for one problem: 1.0 if the majority answer of the first k samples is correct.

    `correct[i]` is the verifier's verdict on sample i (so no gold comparison is redone here);
    the majority answer's verdict is that of its first occurrence. No answer at all scores 0.
    """
    if len(answers) != len(correct):
        raise ValueError(f"{len(answers)} answers but {len(correct)} verdicts")
    k = len(answers) if k is None else k
    if not 1 <= k <= len(answers):
        raise ValueError(f"need 1 <= k <= {len(answers)}, got k={k}")
    winner = majority_vote(answers[:k])
    if winner is None:
        return 0.0
    return float(bool(correct[list(answers[:k]).index(winner)]))
