"""Checks the training and evaluation commands share, run before anything is loaded or written: a
bad value is one line (SystemExit), and a run folder that already holds a run is never written into."""

from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path
from typing import Any

from nanoseek.common import check_writable

# what a finished or started run of sft / grpo / distill / demo leaves in its folder
RUN_FILES = ("run.json", "metrics.jsonl", "report.md", "traces.jsonl", "model", "base", "final")


def fail(prog: str, message: str):
    raise SystemExit(f"nanoseek {prog}: {message}")


def utf8(prog: str, value: str, message: str) -> str:
    """A command-line string that UTF-8 can hold, else `message` in one line: bytes the terminal's encoding
    could not decode arrive as surrogate escapes, which tokenizers and file writes reject with a traceback."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        fail(prog, message)
    return value


def under_folders(prog: str, path: str | Path, flag: str = "--out") -> Path:
    """A path whose existing ancestors are all folders (one under a file cannot be made)."""
    path = Path(path)
    for parent in path.parents:
        if parent.exists() and not parent.is_dir():
            fail(prog, f"{flag} {path}: {parent} is a file, not a folder")
    return path


def out_folder(prog: str, out: str | Path) -> Path:
    """--out as a folder that can exist or be made, and written in: not a file, not under one."""
    run = under_folders(prog, out)
    utf8(prog, str(run), "--out is not a valid UTF-8 path; the run's files name it")
    if run.exists() and not run.is_dir():
        fail(prog, f"--out {run} is a file; give a folder for the run")
    writable(prog, run)
    return run


def writable(prog: str, path: Path) -> None:
    """`path` (a file or folder to be made) can be written (common.check_writable), else one line."""
    try:
        check_writable(path)
    except ValueError as e:
        fail(prog, str(e))


def fresh_run(prog: str, out: str | Path) -> Path:
    """--out as a run folder that holds no run yet (it may exist, empty or with other files)."""
    run = out_folder(prog, out)
    if (run / "config.json").exists():
        fail(prog, f"--out {run} is a model folder (it holds config.json); give a folder for the run")
    if (run / "checkpoints").is_dir() and not (run / "model").exists():
        fail(prog, f"{run} holds a run's checkpoints (pretrain's or an unfinished grpo's): choose another --out, "
                   f"or go on with --resume {run} in the command that made it")
    for name in RUN_FILES:
        if (run / name).exists():
            if not any((run / done).exists() for done in ("model", "final")):
                fail(prog, f"{run} holds an unfinished run ({name}, no model saved): remove it or choose another "
                           f"--out")
            fail(prog, f"{run} already holds a run ({name}); choose another --out")
    return run


SEED_LIMIT = 2 ** 32
MAX_THREADS = 1024      # torch.set_num_threads segfaults far above what any machine has


def threads(prog: str, value: int | None) -> None:
    """A --threads value torch.set_num_threads takes: 1 .. MAX_THREADS (None: not given)."""
    if value is not None and not 1 <= value <= MAX_THREADS:
        fail(prog, f"--threads must be in [1, {MAX_THREADS}], got {value}")


def seed(prog: str, value: int | None, flag: str = "--seed") -> None:
    """A seed every generator takes (torch, numpy, random): an integer in [0, 2**32)."""
    if value is not None and not 0 <= value < SEED_LIMIT:
        fail(prog, f"{flag} must be in [0, 2**32), got {value}")


def lr_range(prog: str, lr: float | None, min_lr: float | None) -> None:
    """The schedule decays from --lr to --min-lr: a --min-lr above --lr would raise the rate instead."""
    if lr is not None and min_lr is not None and min_lr > lr:
        fail(prog, f"--min-lr {min_lr} is above --lr {lr} (the schedule decays from --lr to --min-lr)")


def train_dtype(prog: str, dtype, given: str | None) -> None:
    """Training autocasts to fp32 or bf16; fp16 would need loss scaling, which nanoseek does not do."""
    import torch

    if dtype not in (torch.float32, torch.bfloat16):
        fail(prog, f"--dtype {given}: use fp32 or bf16 (fp16 needs loss scaling)")


def numbers(prog: str, args: Any, *, at_least_1: tuple[str, ...] = (), positive: tuple[str, ...] = (),
            non_negative: tuple[str, ...] = (), fraction: tuple[str, ...] = ()) -> None:
    """Range checks of argparse values by attribute name (None: not given, skipped): integers >= 1,
    finite numbers > 0, finite numbers >= 0, and fractions in [0, 1)."""
    def flag(name: str) -> str:
        return "--" + name.replace("_", "-")

    for name in at_least_1:
        v = getattr(args, name)
        if v is not None and v < 1:
            fail(prog, f"{flag(name)} must be >= 1, got {v}")
    for name in positive:
        v = getattr(args, name)
        if v is not None and not (math.isfinite(v) and v > 0):
            fail(prog, f"{flag(name)} must be a number > 0, got {v}")
    for name in non_negative:
        v = getattr(args, name)
        if v is not None and not (math.isfinite(v) and v >= 0):
            fail(prog, f"{flag(name)} must be a number >= 0, got {v}")
    for name in fraction:
        v = getattr(args, name)
        if v is not None and not (math.isfinite(v) and 0 <= v < 1):
            fail(prog, f"{flag(name)} must be in [0, 1), got {v}")


def seq_len(prog: str, value: int, model, whose: str = "the model's") -> None:
    """A training --seq-len within the positions the model was built for."""
    limit = model.config.max_position_embeddings
    if value > limit:
        fail(prog, f"--seq-len {value} > {whose} max_position_embeddings {limit}")


def positions(prog: str, model, longest_prompt: int, max_new_tokens: int) -> None:
    """The longest prompt plus --max-new-tokens within the positions the model was built for."""
    limit = model.config.max_position_embeddings
    if longest_prompt + max_new_tokens > limit:
        fail(prog, f"the longest prompt ({longest_prompt} tokens) + --max-new-tokens {max_new_tokens} is more "
                   f"than the model's max_position_embeddings ({limit})")


def sampling(prog: str, **params: Any) -> None:
    """The engine's own check of SamplingParams (temperature, top-k, max tokens, ...), up front."""
    from nanoseek.infer.engine import SamplingParams

    try:
        SamplingParams(**params).validate()
    except ValueError as e:
        fail(prog, str(e))


def load_optimizer_state(prog: str, model, optimizer, state: dict, ckpt: Path) -> None:
    """A checkpoint's optimizer state into `optimizer`; one line naming the file when it does not fit."""
    from nanoseek.train import parallel

    try:
        parallel.load_full_optimizer_state(model, optimizer, state)
    except (KeyError, ValueError, RuntimeError) as e:       # names or shapes that are not this model's
        fail(prog, f"{ckpt / 'trainer' / 'optimizer.pt'} does not fit the model "
                   f"({type(e).__name__}: {str(e).splitlines()[0][:120]})")


def output_file(prog: str, out: str | Path, protect: tuple = (), replace_if=None) -> Path:
    """--out as the file a command writes when its work is done, checked before the work: a file name (not a
    folder, not under a file), not in a `protect` folder (the model's own: writing there can break it),
    in a folder that can be made and written; an existing file only where replace_if(path) allows it."""
    out = under_folders(prog, out)
    if not out.name or out.name in (".", ".."):
        fail(prog, f"--out {str(out)!r} is not a file name")
    if out.is_dir():
        fail(prog, f"--out {out} is a directory; give a file name")
    for folder in protect:
        if folder and out.resolve().parent == Path(folder).resolve():
            fail(prog, f"--out {out} is in the model's folder {folder}; write it elsewhere")
    if out.exists() and not (replace_if is not None and replace_if(out)):
        fail(prog, f"--out {out} exists and is not an earlier result of this command; choose another name")
    writable(prog, out)
    return out


def write_atomic(prog: str, path: Path, text: str) -> None:
    """`text` into `path` through a fresh temporary file beside it and a rename: never half a file."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    except OSError as e:
        fail(prog, f"cannot write {path} ({e.strerror or e})")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        fail(prog, f"cannot write {path} ({e.strerror or e})")
