"""Verifiable tasks: one module each, all with the same small interface.

    examples(n, seed, split="train", **knobs) -> list[Example]   deterministic; train/test never overlap
    messages(ex) -> [{"role": "user", "content": ...}]            the chat prompt
    reward(response, ex) -> {"accuracy", "format", "total"}       never raises
    extract_answer(response) -> str | None                        canonical answer, for majority voting

The answer convention and the reward combination are documented in tasks/rewards.py.
"""

from __future__ import annotations

from types import ModuleType

from nanoseek.tasks import arithmetic, countdown, gsm8k
from nanoseek.tasks.rewards import Example

TASKS: dict[str, ModuleType] = {"arithmetic": arithmetic, "countdown": countdown, "gsm8k": gsm8k}


def get_task(name: str) -> ModuleType:
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; choose one of {sorted(TASKS)}")
    return TASKS[name]


__all__ = ["TASKS", "get_task", "Example"]
