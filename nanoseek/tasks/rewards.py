"""Pieces every task shares: the Example record, the train/test split, the answer convention, the
format and accuracy helpers, the reward combination and DAPO's overlong shaping.

Answer convention (R1-Zero style, simple enough for a tiny model to learn):

    <think>
    ...reasoning, any text...
    </think>
    ANSWER

The generation prompt ends with "<think>\\n", so callers pass the assistant turn as generated, i.e.
the text after "<｜Assistant｜>", with or without that "<think>\\n" prefix: both are handled. The
answer part is everything after the (single) "</think>". A response with no "</think>" has no
answer and scores accuracy 0.

Reward (`combine`): total = accuracy + 0.1 * format (GRPO-Zero's 1 + 0.1; TinyZero gives a
format-only answer 0.1 too). Accuracy dominates; the small format term gives an untrained model a
gradient toward the tags before it gets anything right. Overlong shaping needs the token count,
which only the caller knows, so the trainer adds `overlong_penalty(...)` to `total` itself.

Every function here is total: any str (and None) in, a value out, never an exception.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
# Special tokens a caller may leave in decoded text; they are not part of the answer.
_TRAILING_SPECIALS = ("<｜end▁of▁sentence｜>", "<｜end of sentence｜>")
INSTRUCTION = "Think step by step inside <think> </think>, then write only the final answer after </think>."
FORMAT_WEIGHT = 0.1


@dataclass
class Example:
    """One problem. `answer` is the gold answer as a canonical string ("46", "(3+5)*2")."""
    prompt: str
    answer: str
    meta: dict = field(default_factory=dict)


# --- train / held-out split
def split_of(identity: str, test_frac: float = 0.1) -> str:
    """'train' or 'test' from a hash of the problem's identity (its numbers, or its question text).

    A pure function of the problem, not of the seed or the order of generation: a held-out problem
    is held out in every run, so training never sees it, whatever seed or n the trainer uses.
    """
    if not 0 < test_frac < 1:     # 0 or 1 would leave a split empty: no problem ever found for it
        raise ValueError(f"bad knobs: test_frac={test_frac} must be in (0, 1) (the held-out share of problems)")
    h = int.from_bytes(hashlib.sha256(identity.encode("utf-8")).digest()[:8], "big")
    return "test" if h / 2**64 < test_frac else "train"


def check_split(split: str) -> None:
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")


# --- response parsing
def answer_part(response: str | None) -> str | None:
    """The text after the last "</think>", stripped (None when there is no "</think>")."""
    if not isinstance(response, str) or THINK_CLOSE not in response:
        return None
    ans = response.rsplit(THINK_CLOSE, 1)[1].strip()
    for tok in _TRAILING_SPECIALS:           # decoded with special tokens: "46<｜end▁of▁sentence｜>"
        if ans.endswith(tok):
            ans = ans[: -len(tok)].rstrip()
    return ans


def format_ok(response: str | None) -> bool:
    """True for "[<think>] thinking </think> answer" with exactly one "</think>", no other tags,
    and a non-empty answer. The thinking may be empty (a tiny model may not need it)."""
    if not isinstance(response, str):
        return False
    text = response.lstrip()
    if text.startswith(THINK_OPEN):          # present when the prompt did not prefill "<think>\n"
        text = text[len(THINK_OPEN):]
    if text.count(THINK_CLOSE) != 1 or THINK_OPEN in text:
        return False
    ans = answer_part(text)
    return bool(ans)


def last_boxed(text: str) -> str | None:
    r"""Content of the last \boxed{...}, braces balanced; None if absent or unclosed."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    i = start + len("\\boxed{")
    depth = 1
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i:j]
    return None


# ASCII digits only (re.ASCII): "١٨" is not a number to us. A minus sign counts only when no digit
# precedes it, so "3-5" ends in 5, not -5. Comma groups need exactly 3 digits ("1,234"), so a list
# "1, 2, 3" ends in 3. A trailing "." is not a decimal point ("18." -> 18). The sign binds only to what
# follows it directly ("-5", "-$5"): in "10 - 5" the "-" is an operator and the answer 5 (a space may
# follow a "$" only, as in "$ 18").
# a number: optional sign (ASCII or U+2212 minus) right before it, optional "$", digits with optional thousands
# commas and decimals, or decimals alone (".5" is 0.5); never the tail of another number ("1.5" is not "5")
_NUMBER = re.compile(r"(?<![0-9.])([-\u2212]?)(?:\$\s?)?((?:[0-9]{1,3}(?:,[0-9]{3})+|[0-9]+)(?:\.[0-9]+)?|\.[0-9]+)",
                     re.ASCII)


def canonical_number(s: str) -> str | None:
    """'1,234.50' -> '1234.5', '-0.0' -> '0', '007' -> '7'; None when `s` is not a plain decimal.

    Exact string arithmetic (no float, no int()): huge numbers neither round nor hit Python's
    int-string size limit.
    """
    if not isinstance(s, str):
        return None
    s = s.strip().replace(",", "")
    neg = s.startswith("-")
    s = s[1:] if neg else s
    if not re.fullmatch(r"[0-9]+(\.[0-9]+)?", s, re.ASCII):
        return None
    whole, _, frac = s.partition(".")
    whole, frac = whole.lstrip("0") or "0", frac.rstrip("0")
    out = whole + ("." + frac if frac else "")
    return "-" + out if neg and out != "0" else out


def extract_number(text: str | None) -> str | None:
    r"""The final numeric answer in `text`, canonical; \boxed{} content is preferred when present.

    Handles "1,234", "$18", "18 dollars", "18.", "-5" and "−5", "18.0" (== "18"), ".5" (== "0.5"), "\boxed{18}".
    """
    if not isinstance(text, str):
        return None
    boxed = last_boxed(text)
    if boxed is not None:
        text = boxed
    matches = _NUMBER.findall(text)
    if not matches:
        return None
    sign, digits = matches[-1]
    return canonical_number(("-" if sign else "") + ("0" + digits if digits.startswith(".") else digits))


# --- reward
def combine(accuracy: float, fmt: float, format_weight: float = FORMAT_WEIGHT) -> dict[str, float]:
    """The reward dict every task returns: total = accuracy + format_weight * format."""
    return {"accuracy": float(accuracy), "format": float(fmt), "total": float(accuracy) + format_weight * float(fmt)}


def overlong_penalty(length: int, max_len: int, cache_len: int) -> float:
    """DAPO's soft overlong punishment (eq. 13), added to the reward of a response of `length` tokens.

    0 up to max_len - cache_len, then falls linearly to -1 at max_len, and -1 beyond it.
    (DAPO used max_len 20480, cache_len 4096.)
    """
    if cache_len <= 0:
        return 0.0 if length <= max_len else -1.0
    safe = max_len - cache_len
    if length <= safe:
        return 0.0
    if length <= max_len:
        return (safe - length) / cache_len
    return -1.0
