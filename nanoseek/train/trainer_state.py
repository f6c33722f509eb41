"""Checkpoints that survive a crash: an HF model directory plus a trainer-state folder, made atomic.

    RUN/checkpoints/
      step_000200/
        model/            Hugging Face DeepseekV3 directory (config.json, safetensors, tokenizer.json)
        trainer/
          optimizer.pt    optimizer state keyed by parameter name (torch.save; loads with weights_only)
          state.pt        step, per-rank loader positions, RNG states, run arguments
          state.json      the same minus tensors, for people
      latest              text file: "step_000200"

A checkpoint is written under `step_000200.tmp`, renamed to `step_000200` when complete, and only
then does `latest` move (itself written to a temporary file and renamed). A process killed at any
point leaves `latest` naming the previous complete checkpoint. Nothing is ever unpickled.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import re
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from nanoseek.model import ModelConfig, Transformer

LATEST = "latest"
STEP_DIR = re.compile(r"step_[0-9]{6,}")


# --- RNG states (torch, CUDA, numpy, python) as tensors and plain lists: weights_only-loadable
def python_rng_state(rng: random.Random | Any = random) -> dict[str, Any]:
    """A Python generator's state (the `random` module's by default) as plain values."""
    version, state, gauss = rng.getstate()
    return {"version": version, "state": list(state), "gauss": gauss}


def set_python_rng_state(state: dict[str, Any], rng: random.Random | Any = random) -> None:
    rng.setstate((state["version"], tuple(state["state"]), state["gauss"]))


def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    out = {"torch": torch.get_rng_state(),
           "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                     "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
           "python": python_rng_state()}
    if torch.cuda.is_available():
        out["cuda"] = torch.cuda.get_rng_state()
    return out


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    set_python_rng_state(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def to_plain(obj: Any) -> Any:
    """numpy scalars/arrays -> Python numbers / tensors, recursively (torch.load(weights_only) refuses numpy)."""
    if isinstance(obj, dict):
        return {k: to_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_plain(v) for v in obj)
    if isinstance(obj, np.ndarray):
        return torch.from_numpy(obj.copy())
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return obj.tolist() if obj.numel() <= 16 else f"<tensor {tuple(obj.shape)}>"
    return obj if isinstance(obj, (str, int, float, bool)) or obj is None else str(obj)


# --- save
def plain_model(cfg: ModelConfig, state_dict: dict[str, torch.Tensor]) -> Transformer:
    """A CPU Transformer holding a full state dict (what FSDP2 gathers to rank 0 for saving)."""
    with torch.device("meta"):
        model = Transformer(cfg)
    model = model.to_empty(device="cpu")
    model.load_state_dict(state_dict)
    return model


def save_checkpoint(root: str | Path, step: int, model: Transformer, optimizer_state: dict,
                    state: dict[str, Any], model_files: dict[str, bytes] | None = None, keep: int = 2) -> Path:
    """Write RUN/checkpoints/step_{step:06d} atomically and point `latest` at it. Rank 0 only.

    model_files ({"tokenizer.json": contents, ...}) are written into the model directory so it is
    complete on its own; contents, not paths, as the files may live in a checkpoint that this save's
    pruning deletes (a resumed run's tokenizer). Keeps the newest `keep` checkpoints (0 keeps all).
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    name = f"step_{step:06d}"
    final, tmp = root / name, root / (name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "trainer").mkdir(parents=True)
    model.save_pretrained(tmp / "model", files=model_files)
    _test_pause(step)
    torch.save(optimizer_state, tmp / "trainer" / "optimizer.pt")
    state = to_plain({**state, "step": step})
    torch.save(state, tmp / "trainer" / "state.pt")
    (tmp / "trainer" / "state.json").write_text(
        json.dumps(_jsonable({k: v for k, v in state.items() if k != "rng"}), indent=2) + "\n")
    if final.exists():   # re-saving a step (a resumed run that stops where it started): swap it out
        old = root / (name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    pointer = root / (LATEST + ".tmp")
    pointer.write_text(name + "\n")
    os.replace(pointer, root / LATEST)
    if keep > 0:   # prune only older steps: never the one `latest` names, nor a later one left by another timeline
        older = sorted(p for p in root.glob("step_*")
                       if p.is_dir() and p.name[5:].isdigit() and int(p.name[5:]) < step)
        for old in older[:max(len(older) - (keep - 1), 0)]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def _test_pause(step: int) -> None:
    """NANOSEEK_SAVE_PAUSE=STEP:SECONDS sleeps in the middle of saving that step (model written,
    trainer state not yet): the crash test kills the process there."""
    spec = os.environ.get("NANOSEEK_SAVE_PAUSE")
    if spec:
        at, seconds = spec.split(":")
        if int(at) == step:
            print(f"NANOSEEK_SAVE_PAUSE: sleeping {seconds}s mid-save of step {step}", flush=True)
            time.sleep(float(seconds))


# --- load
def latest_name(run: str | Path) -> str | None:
    """The checkpoint RUN/checkpoints/latest names (e.g. "step_000200"), or None when none was saved."""
    try:
        name = (Path(run) / "checkpoints" / LATEST).read_text().strip()
    except (OSError, UnicodeDecodeError):       # none, or a damaged pointer (resolve_checkpoint says which)
        return None
    return name if STEP_DIR.fullmatch(name) else None


def resolve_checkpoint(path: str | Path) -> Path:
    """A run folder, its checkpoints/ folder, or one step_* folder in a checkpoints/ folder -> the step_*
    folder to load, as an absolute path (its parent's parent is the run, wherever `path` was given from)."""
    given = path
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"--resume {given}: no such file or directory")
    path = path.resolve()
    if (path / "model").is_dir() and (path / "trainer").is_dir():
        if not STEP_DIR.fullmatch(path.name) or path.parent.name != "checkpoints":
            raise FileNotFoundError(f"--resume {given}: not a checkpoint (RUN/checkpoints/step_NNNNNN)")
        return path
    root = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    pointer = root / LATEST
    if not pointer.exists():
        raise FileNotFoundError(f"--resume {given}: no checkpoint there (no checkpoints/{LATEST}, {LATEST} or "
                                f"step_* checkpoint folder)")
    try:
        name = pointer.read_text().strip()
    except (OSError, UnicodeDecodeError) as e:
        raise FileNotFoundError(f"--resume {given}: {pointer} cannot be read ({type(e).__name__}){_earlier(root)}") \
            from None
    if not STEP_DIR.fullmatch(name):
        raise FileNotFoundError(f"--resume {given}: {pointer} does not name a step_* folder ({name[:40]!r})"
                                f"{_earlier(root)}")
    ckpt = root / name
    if not (ckpt / "trainer" / "state.pt").exists():
        raise FileNotFoundError(f"--resume {given}: {pointer} names {ckpt.name}, which is incomplete or missing"
                                f"{_earlier(root)}")
    return ckpt


def load_trainer_state(ckpt: str | Path) -> tuple[dict[str, Any], dict]:
    """(state, optimizer_state) of a step_* folder; tensors on CPU, no unpickling. A file that does not
    load, or loads into something other than what save_checkpoint writes, is a ValueError that names it
    and the earlier checkpoints to resume from instead."""
    ckpt = Path(ckpt)
    out = []
    for name, keys in (("state.pt", ("args", "loader", "rng", "step")), ("optimizer.pt", ("state", "param_groups"))):
        path = ckpt / "trainer" / name
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except (OSError, RuntimeError, EOFError, pickle.UnpicklingError) as e:
            raise ValueError(f"{path} is missing or damaged ({type(e).__name__}: {str(e).splitlines()[0][:120]})"
                             f"{_earlier(ckpt)}") from None
        missing = [k for k in keys if k not in obj] if isinstance(obj, dict) else list(keys)
        if missing:
            raise ValueError(f"{path} is not a nanoseek trainer state (no {', '.join(missing)}){_earlier(ckpt)}")
        out.append(obj)
    return out[0], out[1]


def _earlier(ckpt: Path) -> str:
    """'; resume from an earlier one: ...' naming the complete checkpoints before `ckpt` (a step_* folder, or
    the checkpoints folder itself: all of them), or ''."""
    root, before = (ckpt, None) if not STEP_DIR.fullmatch(ckpt.name) else (ckpt.parent, int(ckpt.name[5:]))
    others = sorted((p for p in root.glob("step_*") if STEP_DIR.fullmatch(p.name)
                     and (before is None or int(p.name[5:]) < before) and (p / "trainer" / "state.pt").is_file()),
                    key=lambda p: int(p.name[5:]))
    return f"; resume from an earlier one: {', '.join(str(p) for p in others)}" if others else ""
