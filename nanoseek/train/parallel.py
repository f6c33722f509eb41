"""Data parallelism around an unmodified Transformer: DDP or FSDP2 `fully_shard`, and the few
collectives the trainer needs. The model code knows nothing of any of this.

- DDP (default): every rank holds the whole model; gradients are all-reduced during backward.
- FSDP2: each block (and each MTP module's block) is sharded across ranks, all-gathered just before it
  runs and freed after; for models that do not fit one device. Parameters become DTensors.
Both average gradients over ranks, so with an equal per-rank batch the update equals the
single-process update on the global batch.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.distributed as dist
from torch import nn

from nanoseek.common import DistInfo, init_distributed


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def start(device: torch.device) -> tuple[DistInfo, torch.device, bool]:
    """A command's processes: join torchrun's group when launched by it (common.init_distributed: gloo
    on CPU, nccl on CUDA) -> (rank info, this rank's device, whether this call created the group, for
    `finish`; a caller that set the group up keeps it)."""
    owns = not is_distributed()
    info = init_distributed(device)
    if device.type == "cuda":
        device = torch.device("cuda", info.local_rank)
    return info, device, owns


def finish(owns: bool) -> None:
    """Every rank waits for the others (rank 0 writes the run's files last), then leaves the group if
    `start` created it. No-op in one process."""
    barrier()
    if owns and is_distributed():
        dist.destroy_process_group()


def wrap_model(model: nn.Module, info: DistInfo, device: torch.device, fsdp: bool = False) -> nn.Module:
    """Return the module to call for training. Build the optimizer from the *returned* module's
    parameters afterwards (FSDP2 swaps them for DTensors in place)."""
    if not info.enabled:
        return model
    if fsdp:
        from torch.distributed.fsdp import fully_shard
        for block in model.layers:
            fully_shard(block)
        for mtp in model.mtp:
            # only the block: mtp_step calls the module's own norm outside its forward, which
            # would meet resharded weights if the whole module were one FSDP unit
            fully_shard(mtp.block)
        fully_shard(model)   # the rest: embedding and head (shared with MTP), norms, eh_proj
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP
    # Routed experts are stacked tensors, so every parameter gets a gradient each step even when
    # an expert receives no token (its rows are zero): no find_unused_parameters traversal needed.
    return DDP(model, device_ids=[device.index or 0] if device.type == "cuda" else None)


def reshard(model: nn.Module) -> None:
    """After a forward without backward (validation, sampling), FSDP2 leaves the root's parameters
    gathered; free them so the module holds its sharded parameters again (what the optimizer and
    the state-dict functions see). No-op otherwise."""
    for m in model.modules():
        if hasattr(m, "reshard") and hasattr(m, "set_requires_gradient_sync"):   # an FSDPModule
            m.reshard()


def unwrap(model: nn.Module) -> nn.Module:
    """The Transformer inside a DDP wrapper (FSDP2 wraps in place, so it is the module itself)."""
    return getattr(model, "module", model)


@contextmanager
def grad_sync(model: nn.Module, enabled: bool):
    """Skip the gradient all-reduce on all but the last micro-batch of an accumulation."""
    if enabled or not is_distributed():
        yield
        return
    if hasattr(model, "no_sync"):                        # DDP
        with model.no_sync():
            yield
    elif hasattr(model, "set_requires_gradient_sync"):   # FSDP2
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
    else:
        yield


def all_reduce_sum_(t: torch.Tensor) -> torch.Tensor:
    if is_distributed():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def counts_by_rank(n: int, device: torch.device | str = "cpu") -> tuple[list[int], int]:
    """(every rank's n in rank order, this rank): one small all-reduce; ([n], 0) in one process."""
    if not is_distributed():
        return [n], 0
    counts = torch.zeros(dist.get_world_size(), device=device)
    counts[dist.get_rank()] = n
    dist.all_reduce(counts, op=dist.ReduceOp.SUM)
    return [int(c) for c in counts.tolist()], dist.get_rank()


def all_reduce_grads_(params: list[torch.Tensor]) -> None:
    """Sum the parameters' gradients over the ranks, in place (no-op in one process): one flat
    all-reduce per dtype. For loops that normalize their losses globally themselves (GRPO) rather
    than through DDP's average. A parameter with a gradient on some rank but none on this one (a rank
    that trained no rows this step, or none that reach it) gets a zero gradient first, so every rank
    sums the same tensors and steps the same parameters (one small all-reduce of who has what)."""
    if not is_distributed():
        return
    has = torch.tensor([float(p.grad is not None) for p in params], device=params[0].device if params else None)
    dist.all_reduce(has, op=dist.ReduceOp.SUM)
    for p, h in zip(params, has.tolist()):
        if h and p.grad is None:
            p.grad = torch.zeros_like(p)
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for p in params:
        if p.grad is not None:
            by_dtype.setdefault(p.grad.dtype, []).append(p.grad)
    for grads in by_dtype.values():
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        offset = 0
        for g in grads:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()


def gather_objects(obj) -> list:
    """Every rank's picklable `obj`, in rank order (all_gather_object); [obj] in one process."""
    if not is_distributed():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    if is_distributed():
        t = t.clone()
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        t /= dist.get_world_size()
    return t


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def clip_grad_norm_(model: nn.Module, max_norm: float) -> torch.Tensor:
    """Global gradient norm (over all shards under FSDP2), clipped to max_norm when max_norm > 0."""
    params = [p for p in model.parameters() if p.grad is not None]
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"))
    if type(norm).__name__ == "DTensor":    # FSDP2: a replicated DTensor; hand back a plain tensor
        norm = norm.full_tensor()
    return norm


# --- full (unsharded) state for checkpoints, keyed by parameter name in every mode
def full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """Optimizer state keyed by parameter name, gathered to CPU on rank 0 (empty dict elsewhere).

    Name keys make a checkpoint loadable under any wrapping (plain, DDP, FSDP2) and world size.
    Collective under FSDP2: every rank must call it.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
    return get_optimizer_state_dict(unwrap(model), optimizer,
                                    options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Inverse of full_optimizer_state; every rank passes the full state (read from disk).

    strict=False: a parameter that never received a gradient before the save (an MTP module
    trained from step k on, say) has no state yet, which is not an error.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
    set_optimizer_state_dict(unwrap(model), optimizer, state,
                             options=StateDictOptions(full_state_dict=True, strict=False))


def full_model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Whole model state dict (parameters and the gates' bias buffers) on CPU, rank 0 only under FSDP2."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    return get_model_state_dict(unwrap(model), options=StateDictOptions(full_state_dict=True, cpu_offload=True))


# --- data parallel over the cores of one CPU process
# On CPU, intra-op threading splits every op across the cores, and many ops of a training step are too
# small or too memory-bound to split well (`small` at 8 x 512, two cores, bf16: 2.5-2.7 s a step,
# against ~1.95 s for half the batch on one core). Splitting the batch instead, one chunk per thread,
# each thread running its chunk's forward and backward with its share of the cores, keeps every op
# whole on one core: 2.2-2.5 s for the same step (tests/test_parallel.py checks the gradients equal).
# The threads share the parameters; torch releases the GIL inside ops, and each thread has its own
# scratch buffers (model/workspace.py).
_POOL: list = []   # [ThreadPoolExecutor] once made: its threads (and their scratch buffers) persist


def cpu_split(device: torch.device, rows: int, threads: int | None = None) -> int:
    """Chunks for `split_backward`: one per intra-op thread on CPU (at most one per row), 1 on other
    devices and under torch.distributed (DDP/FSDP reduce gradients during .backward(); a CPU run
    there already has one process per core)."""
    if device.type != "cpu" or is_distributed():
        return 1
    return max(1, min(threads or torch.get_num_threads(), rows))


def split_backward(fn, params: list[torch.Tensor], n: int, *batch: torch.Tensor) -> list:
    """Forward and backward of a batch as `n` row chunks, each in its own thread.

    fn(weight, *chunk) -> (loss, result) runs in the chunk's thread (enter autocast inside: it is
    per thread); weight = the chunk's rows / all rows, for fn to scale a per-row mean with, so that
    the gradients summed over the chunks are the whole batch's. Gradients are added to the
    parameters' .grad in chunk order (chunk 0 by its .backward(), the others' computed apart and
    added after it), so the result does not depend on which thread finishes first, and an
    accumulation over micro-steps works as with one .backward(). Returns the results in chunk order.
    Each thread runs with intra-op threads // n of the caller's; the caller's count is restored.
    n == 1 is the plain forward and backward on the calling thread.
    """
    rows = batch[0].shape[0]
    if n <= 1:
        loss, result = fn(1.0, *batch)
        loss.backward()
        return [result]
    from concurrent.futures import ThreadPoolExecutor
    bounds = [rows * k // n for k in range(n + 1)]
    chunks = [tuple(t[bounds[k]:bounds[k + 1]] for t in batch) for k in range(n)]
    weights = [(bounds[k + 1] - bounds[k]) / rows for k in range(n)]
    total = torch.get_num_threads()
    per = max(1, total // n)

    def other(k: int):
        torch.set_num_threads(per)   # this thread's OpenMP/MKL setting
        loss, result = fn(weights[k], *chunks[k])
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        return grads, result

    if not _POOL or _POOL[0]._max_workers < n - 1:
        if _POOL:
            _POOL.pop().shutdown()
        _POOL.append(ThreadPoolExecutor(n - 1, thread_name_prefix="nanoseek-split"))
    futures = [_POOL[0].submit(other, k) for k in range(1, n)]
    torch.set_num_threads(per)
    try:
        loss, result = fn(weights[0], *chunks[0])
        loss.backward()
        results = [result]
    finally:
        done = []
        for f in futures:             # wait for every chunk before anything else touches the grads
            try:
                done.append(f.result())
            except BaseException as e:  # noqa: BLE001 - re-raised below, after the others finished
                done.append(e)
        torch.set_num_threads(total)
    for d in done:
        if isinstance(d, BaseException):
            raise d
    with torch.no_grad():
        for grads, result in done:
            for p, g in zip(params, grads):
                if g is None:
                    continue
                if p.grad is None:
                    p.grad = g
                else:
                    p.grad.add_(g)
            results.append(result)
    return results
