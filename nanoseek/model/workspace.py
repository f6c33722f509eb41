"""Scratch buffers kept between calls, for CPU temporaries that live within one call.

On this kind of machine (a VM) a fresh multi-MB tensor costs more in page faults than the op that
fills it: glibc hands large blocks back to the OS on free and maps them again on the next malloc,
and each first touch of a 4 KB page faults (2-10 us a page measured here, against ~0.2 us to write
it). A training step of `small` at 8 x 512 took ~60k of them. A buffer reused from call to call is
touched once. Only for temporaries whose every use ends before the function that takes them returns
(nothing returned or saved for the backward may be a view of one); other devices allocate fresh
(CUDA's caching allocator already reuses memory). Each thread has its own buffers: the CPU data
parallel step (train/parallel.split_backward) runs the model in several threads at once.
"""

from __future__ import annotations

import threading

import torch

_LOCAL = threading.local()   # .buffers: {(tag, dtype): tensor}, per thread


def scratch(tag: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An uninitialised contiguous tensor of `shape`, the same memory on every call with this tag
    (grown when a call needs more). Two live uses need two tags."""
    n = 1
    for s in shape:
        n *= s
    if torch.device(device).type != "cpu":
        return torch.empty(shape, dtype=dtype, device=device)
    buffers = getattr(_LOCAL, "buffers", None)
    if buffers is None:
        buffers = _LOCAL.buffers = {}
    key = (tag, dtype)
    buf = buffers.get(key)
    if buf is None or buf.numel() < n:
        buf = buffers[key] = torch.empty(n, dtype=dtype)
    return buf[:n].view(shape)
