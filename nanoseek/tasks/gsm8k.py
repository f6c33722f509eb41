"""GSM8K grade-school math: a question, a numeric answer after "####" in the reference solution.

Data: a JSONL file of {"question", "answer"} rows, by default data/gsm8k/train.jsonl under the repo
root (the parent of the nanoseek package); pass `path=` for another. The official test split is
held out by the project owner, so our "test" split is a deterministic hash split of the train file
by question text (10%): training with split="train" never sees a "test" question.

The model's final answer is the last number of the answer part (after "</think>"), or the content
of \\boxed{} when present; commas, "$", units, a trailing period and "18.0" vs "18" are handled by
rewards.extract_number.
"""

from __future__ import annotations

import json
import random
from functools import lru_cache
from pathlib import Path

from nanoseek.tasks.rewards import (INSTRUCTION, Example, answer_part, canonical_number, check_split, combine,
                                    extract_number, format_ok, split_of)

__all__ = ["Example", "examples", "messages", "reward", "extract_answer", "gold_answer", "DEFAULT_PATH"]

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_PATH = REPO_ROOT / "data" / "gsm8k" / "train.jsonl"


def gold_answer(solution: str) -> str:
    """The canonical number after "####" in a reference solution ("#### 1,234" -> "1234")."""
    tail = solution.rsplit("####", 1)[-1].strip()
    num = canonical_number(tail)
    if num is None:
        raise ValueError(f"no number after '####' in {solution[-80:]!r}")
    return num


@lru_cache(maxsize=4)
def _load(path: str, mtime_ns: int) -> tuple[tuple[str, str, str], ...]:
    """(question, gold, solution) rows of a JSONL file, cached per version of the file (eval and training
    both call this). A row that is not {"question": str, "answer": str with "#### N"} is a ValueError
    naming path:line."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                d = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{i}: not valid JSON ({e})") from None
            if not (isinstance(d, dict) and isinstance(d.get("question"), str) and isinstance(d.get("answer"), str)):
                raise ValueError(f'{path}:{i}: expected an object with "question" and "answer" strings')
            try:
                rows.append((d["question"], gold_answer(d["answer"]), d["answer"]))
            except ValueError as e:
                raise ValueError(f"{path}:{i}: {e}") from None
    return tuple(rows)


def examples(n: int, seed: int, split: str = "train", *, path: str | Path | None = None,
             test_frac: float = 0.1) -> list[Example]:
    """Up to `n` problems of `split` in a seed-determined order (all of them if the split is
    smaller than n; n < 0 also means all)."""
    check_split(split)
    p = Path(path) if path is not None else DEFAULT_PATH
    if not p.is_file():
        raise FileNotFoundError(f"GSM8K file not found: {p} (copy train.jsonl there or pass path=)")
    try:
        loaded = _load(str(p.resolve()), p.stat().st_mtime_ns)
    except UnicodeDecodeError as e:
        raise ValueError(f"{p}: not UTF-8 ({e.reason} at byte {e.start})") from None
    rows = [r for r in loaded if split_of("gsm8k:" + r[0].strip(), test_frac) == split]
    random.Random(f"gsm8k:{seed}:{split}").shuffle(rows)
    if n >= 0:
        rows = rows[:n]
    return [Example(prompt=q, answer=gold, meta={"solution": sol}) for q, gold, sol in rows]


def messages(ex: Example) -> list[dict]:
    return [{"role": "user", "content": f"{ex.prompt}\n{INSTRUCTION}"}]


def extract_answer(response: str | None) -> str | None:
    """The canonical final number of the answer part (None without "</think>" or a number)."""
    return extract_number(answer_part(response))


def reward(response: str | None, ex: Example) -> dict[str, float]:
    return combine(float(extract_answer(response) == canonical_number(ex.answer)), float(format_ok(response)))
