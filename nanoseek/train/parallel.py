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

from nanoseek.common import DistInfo


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


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
