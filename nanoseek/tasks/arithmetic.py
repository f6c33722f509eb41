"""Multi-digit arithmetic: "What is 12+34*5?" -> "182". The demo's task, learnable from scratch.

Difficulty knobs: n_digits (operands are uniform in 0 .. 10**n_digits - 1), n_operands, ops (any of
"+-*"). Usual precedence: * binds tighter than + and -, which are left-associative; results may be
negative. A problem's identity is its expression string, so the hash split keeps "12+34" held out
in every run (and "34+12" is a different problem).

Three kinds of text come out of here:
- `examples` / `messages` / `reward`: the RL task interface every task module shares.
- `corpus(n, seed)`: bare equation lines "12+34*5=182" from the train split, to pretrain a tiny
  model from scratch (it learns the digits and operators before it ever sees the chat format).
- `worked(ex)` / `sft_messages(ex)`: the assistant turn with a short trace, one operation a line:
  "<think>\\n34*5=170\\n12+170=182\\n</think>\\n182", for SFT (the think trace is exactly the
  evaluation order, so it is always correct and short).
"""

from __future__ import annotations

import random

from nanoseek.tasks.rewards import (INSTRUCTION, Example, answer_part, check_split, combine, extract_number,
                                    format_ok, split_of)

__all__ = ["Example", "examples", "messages", "reward", "extract_answer", "corpus", "worked", "sft_messages"]


def _steps(operands: list[int], ops: list[str]) -> list[tuple[int, str, int, int]]:
    """Evaluate with precedence, returning the steps (a, op, b, result) in the order done."""
    vals, pending, steps = [operands[0]], [], []
    # First pass: fold every '*' into its left neighbour.
    for op, b in zip(ops, operands[1:]):
        if op == "*":
            a = vals[-1]
            vals[-1] = a * b
            steps.append((a, "*", b, a * b))
        else:
            pending.append(op)
            vals.append(b)
    # Second pass: + and - left to right.
    acc = vals[0]
    for op, b in zip(pending, vals[1:]):
        r = acc + b if op == "+" else acc - b
        steps.append((acc, op, b, r))
        acc = r
    return steps


def _value(operands: list[int], ops: list[str]) -> int:
    steps = _steps(operands, ops)
    return steps[-1][3] if steps else operands[0]


MAX_DIGITS = 4000


def examples(n: int, seed: int, split: str = "train", *, n_digits: int = 2, n_operands: int = 2,
             ops: str = "+-*", test_frac: float = 0.1, unique: bool = True) -> list[Example]:
    """`n` problems of `split`, deterministic for `seed`. unique=True never repeats a problem
    (raises ValueError if the split has fewer than n distinct problems at these knobs)."""
    check_split(split)
    bad = [why for why, wrong in ((f"n_digits={n_digits} (at least 1)", n_digits < 1),
                                  (f"n_operands={n_operands} (at least 2)", n_operands < 2),
                                  (f"ops={ops!r} (some of + - *)", not ops or set(ops) - set("+-*"))) if wrong]
    if bad:
        raise ValueError(f"bad knobs: {', '.join(bad)}")
    if n_digits * n_operands > MAX_DIGITS:      # a product's digits must print (Python's 4300-digit limit)
        raise ValueError(f"bad knobs: n_digits={n_digits} x n_operands={n_operands} above {MAX_DIGITS} digits")
    hi = 10**n_digits - 1
    space = (hi + 1) ** n_operands * len(set(ops)) ** (n_operands - 1)     # distinct expressions, both splits
    if unique and n > space:         # at once, not after 100 n draws
        raise ValueError(f"could not find {n} distinct {split} problems with n_digits={n_digits}, "
                         f"n_operands={n_operands}, ops={ops!r}: there are {space} in all; ask for fewer or raise "
                         f"the difficulty")
    rng = random.Random(f"arithmetic:{seed}:{split}")
    out: list[Example] = []
    seen: set[str] = set()
    attempts = 0
    while len(out) < n:
        attempts += 1
        if attempts > 100 * n + 10_000:
            raise ValueError(f"could not find {n} distinct {split} problems with n_digits={n_digits}, "
                             f"n_operands={n_operands}, ops={ops!r}; ask for fewer or raise the difficulty")
        operands = [rng.randint(0, hi) for _ in range(n_operands)]
        opl = [rng.choice(ops) for _ in range(n_operands - 1)]
        expr = str(operands[0]) + "".join(o + str(b) for o, b in zip(opl, operands[1:]))
        if split_of("arithmetic:" + expr, test_frac) != split or (unique and expr in seen):
            continue
        seen.add(expr)
        out.append(Example(prompt=f"What is {expr}?", answer=str(_value(operands, opl)),
                           meta={"expr": expr, "operands": operands, "ops": opl}))
    return out


def messages(ex: Example) -> list[dict]:
    return [{"role": "user", "content": f"{ex.prompt} {INSTRUCTION}"}]


def extract_answer(response: str | None) -> str | None:
    """The canonical final number of the answer part (None without "</think>" or a number)."""
    return extract_number(answer_part(response))


def reward(response: str | None, ex: Example) -> dict[str, float]:
    """accuracy: the answer's final number equals the gold; format: see rewards.format_ok."""
    return combine(float(extract_answer(response) == ex.answer), float(format_ok(response)))


def worked(ex: Example) -> str:
    """The assistant turn for SFT: a one-operation-a-line trace in <think>, then the answer."""
    steps = _steps(ex.meta["operands"], ex.meta["ops"])
    trace = "\n".join(f"{a}{op}{b}={r}" for a, op, b, r in steps)
    return f"<think>\n{trace}\n</think>\n{ex.answer}"


def sft_messages(ex: Example) -> list[dict]:
    return messages(ex) + [{"role": "assistant", "content": worked(ex)}]


def corpus(n: int, seed: int, **knobs) -> list[str]:
    """`n` pretraining lines "12+34*5=182" from the train split only (held-out problems never
    appear in any training text). `knobs` are those of `examples`."""
    knobs.setdefault("unique", False)
    return [f"{ex.meta['expr']}={ex.answer}" for ex in examples(n, seed, "train", **knobs)]
