"""Small shared helpers: device/dtype choice, seeding, distributed init, rank-0 printing.

Imports nothing else from nanoseek, so every layer of the package may use it.
"""

from __future__ import annotations

import json
import os
import random
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def read_json_object(path: str | Path, error: type[Exception] = ValueError, hint: str = "") -> dict:
    """A JSON file holding one object (config.json, meta.json, tokenizer.json): anything else raises
    `error` naming the file, with `hint` appended, and so does a file that cannot be read (a folder, no
    permission). A missing file raises FileNotFoundError."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise
    except OSError as e:
        raise error(f"{path}: cannot read ({e.strerror or e}){hint}") from None
    except UnicodeDecodeError as e:
        raise error(f"{path}: not valid JSON ({e}){hint}") from None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise error(f"{path}: not valid JSON ({e}){hint}") from None
    except RecursionError:
        raise error(f"{path}: not valid JSON (nested too deeply){hint}") from None
    if not isinstance(obj, dict):
        raise error(f"{path}: expected a JSON object{hint}")
    return obj


def missing_folders(path: str | Path) -> list[Path]:
    """The folders `Path(path).mkdir(parents=True)` would make, deepest first."""
    path = Path(path)
    return [d for d in (path, *path.parents) if not d.exists()]


def remove_empty(folders: list[Path]) -> None:
    """Remove `folders` (deepest first, as missing_folders gives them) while they are empty: what a failed
    command made, and nothing it did not."""
    for d in folders:
        if not d.is_dir() or any(d.iterdir()):
            break
        d.rmdir()


def check_writable(path: str | Path, flag: str = "--out") -> None:
    """`path` (a file or folder, made later) can be written: its nearest existing folder takes a new file
    (checked by making and removing one; nothing is left behind). A ValueError names `flag` otherwise."""
    path = Path(path)
    folder = next(p for p in (path if path.is_dir() else path.parent, *path.parents) if p.exists())
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        raise ValueError(f"{flag} {path}: cannot write in {folder} ({e.strerror or e})") from None


class UsageError(ValueError):
    """A bad command-line value (an unknown --device or --dtype, say): `nanoseek` prints it as one line."""


def pick_device(name: str | None = None) -> torch.device:
    """`--device` default: cuda when present, else cpu. A device this machine lacks is a UsageError."""
    if name in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"--device {name!r} is not a device; use cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"--device {name}: this torch ({torch.__version__}) sees no CUDA device; use cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UsageError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) here")
    return device


def pick_dtype(name: str | torch.dtype | None, device: torch.device | None = None) -> torch.dtype:
    """`--dtype` parser. None means float32 (CPU) / bfloat16 (CUDA)."""
    if isinstance(name, torch.dtype):
        return name
    if name in (None, "", "auto"):
        return torch.bfloat16 if device is not None and device.type == "cuda" else torch.float32
    if name not in DTYPES:
        raise UsageError(f"unknown dtype {name!r}; choose one of {sorted(DTYPES)}")
    return DTYPES[name]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@dataclass
class DistInfo:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed(device: torch.device | None = None) -> DistInfo:
    """Initialise torch.distributed when launched by torchrun (RANK/WORLD_SIZE set).

    gloo on CPU, nccl on CUDA. Returns a DistInfo with world_size 1 otherwise.
    """
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return DistInfo()
    import torch.distributed as dist

    info = DistInfo(int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", 0)),
                    int(os.environ["WORLD_SIZE"]))
    if not dist.is_initialized():
        use_cuda = device is not None and device.type == "cuda"
        if use_cuda:
            torch.cuda.set_device(info.local_rank)
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return info


def print0(*args, **kwargs) -> None:
    """print on rank 0 only."""
    if int(os.environ.get("RANK", "0")) == 0:
        print(*args, **kwargs, flush=True)
