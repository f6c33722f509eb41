"""Parameter counts (total, active per token, MTP) and KV-cache bytes per token, MLA vs MHA.

    nanoseek info --preset deepseek-v3
    nanoseek info --model runs/demo/final

Nothing is built layer by layer: one block of each kind (dense, MoE) is made on the meta device and
counted once per layer of that kind, so even the 671B preset (or a config with 10^8 layers) answers at once.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import fields
from pathlib import Path

import torch

from nanoseek.infer.kv_cache import latent_bytes_per_token, mha_bytes_per_token
from nanoseek.model import PRESETS, ModelConfig, preset
from nanoseek.model.mtp import MTPModule
from nanoseek.model.transformer import Block


def human(n: float) -> str:
    for unit, div in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return str(int(n))


def moe_layers_in(cfg: ModelConfig, start: int, stop: int) -> int:
    """How many of the layer indices start..stop-1 are MoE layers (ModelConfig.is_moe_layer), without a loop."""
    if cfg.n_routed_experts is None:
        return 0
    f = cfg.moe_layer_freq
    first = -(-max(start, cfg.first_k_dense_replace) // f) * f       # the first multiple of f past the dense ones
    return 0 if first >= stop else (stop - 1 - first) // f + 1


def count_parameters_of(cfg: ModelConfig) -> dict[str, int]:
    """transformer.count_parameters(Transformer(cfg)) without building the model: every dense layer holds the
    same parameters, and so does every MoE layer, so one block of each kind is built (meta device) and counted
    once per layer of its kind. Sizes too large for a torch tensor raise OverflowError."""
    L, K, E = cfg.num_hidden_layers, cfg.num_nextn_predict_layers, cfg.n_routed_experts
    V, D = cfg.vocab_size, cfg.hidden_size
    for f in fields(cfg):                  # torch cannot even take such a size (a many-line TypeError)
        v = getattr(cfg, f.name)
        if isinstance(v, int) and v >= 2**63 and not f.name.endswith("_token_id"):
            raise OverflowError(f"ModelConfig.{f.name} is too large to count: a tensor size must be below 2**63 "
                                f"(got {v})")
    try:
        with torch.device("meta"):
            dense = sum(p.numel() for p in Block(cfg.replace(n_routed_experts=None), 0).parameters())
            if E is not None:
                block = Block(cfg.replace(first_k_dense_replace=0, moe_layer_freq=1), 0)
                moe = sum(p.numel() for p in block.parameters())
                idle = (E - cfg.num_experts_per_tok) * sum(p[0].numel() for p in block.ffn.experts.parameters())
            else:
                moe = idle = 0
            mtp_own = sum(p.numel() for p in MTPModule(cfg, L, torch.nn.Identity()).parameters())
    except RuntimeError as e:        # torch (meta device): "Storage size calculation overflowed with sizes=[...]"
        raise OverflowError(f"sizes too large to count: a tensor would take 2**63 bytes or more "
                            f"({str(e).splitlines()[0]})") from None
    n_moe, mtp_moe = moe_layers_in(cfg, 0, L), moe_layers_in(cfg, L, L + K)
    # embedding, final norm and head (one matrix when tied, as named_parameters counts it)
    total = V * D + D + (0 if cfg.tie_word_embeddings else V * D) + (L - n_moe) * dense + n_moe * moe
    mtp = K * mtp_own + (K - mtp_moe) * dense + mtp_moe * moe
    return {"total": total, "active": total - n_moe * idle, "mtp": mtp, "mtp_active": mtp - mtp_moe * idle,
            "embedding": V * D}


def describe(cfg: ModelConfig, name: str) -> dict:
    counts = count_parameters_of(cfg)
    mla = latent_bytes_per_token(cfg, torch.bfloat16)
    mha = mha_bytes_per_token(cfg, torch.bfloat16)
    return {"name": name, **counts, "kv_bytes_per_token_mla_bf16": mla, "kv_bytes_per_token_mha_bf16": mha,
            "kv_ratio": mha / mla, "moe_layers": moe_layers_in(cfg, 0, cfg.num_hidden_layers),
            "layers": cfg.num_hidden_layers}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="nanoseek info", description=__doc__.splitlines()[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--preset", choices=sorted(PRESETS))
    src.add_argument("--model", help="a Hugging Face model directory, or its config.json (only that is read)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    args = p.parse_args(argv)

    # --- config
    if args.preset:
        cfg, name = preset(args.preset), args.preset
    else:
        from nanoseek.checkpoint import read_config

        folder = Path(args.model)
        cfg_path = folder if folder.is_file() else folder / "config.json"
        if not folder.exists():
            raise SystemExit(f"nanoseek info: --model {args.model}: no such folder")
        if not cfg_path.exists():
            raise SystemExit(f"nanoseek info: {folder}: config.json is missing")
        try:
            # as the checkpoint loader reads it: a JSON object naming every shape (SHAPE_FIELDS), not the tiny
            # preset's defaults in place of missing ones
            cfg, name = read_config(cfg_path)[1], str(cfg_path.parent)
        except (FileNotFoundError, ValueError) as e:     # CheckpointError is a ValueError
            raise SystemExit(f"nanoseek info: {e}") from None

    # --- count
    try:
        d = describe(cfg, name)
    except OverflowError as e:
        raise SystemExit(f"nanoseek info: {name}: {e}") from None
    if args.json:
        print(json.dumps(d))
        return
    print(f"{name}: {cfg.model_type}, {d['layers']} layers ({d['moe_layers']} MoE), hidden {cfg.hidden_size}, "
          f"{cfg.n_routed_experts or 0} routed experts top-{cfg.num_experts_per_tok if cfg.n_routed_experts else 0}")
    print(f"  parameters  total {human(d['total'])} ({d['total']:,})   active/token {human(d['active'])} "
          f"({d['active']:,})")
    if cfg.num_nextn_predict_layers:
        # the released checkpoints repeat the shared embedding and head inside each MTP layer
        copies = cfg.num_nextn_predict_layers * 2 * cfg.vocab_size * cfg.hidden_size
        print(f"  MTP         {cfg.num_nextn_predict_layers} module(s) apart from the total: {human(d['mtp'])} own "
              f"+ {human(copies)} shared embedding/head copies in the checkpoint = {human(d['mtp'] + copies)}; "
              f"active {human(d['mtp_active'])}")
    print(f"  KV cache    {d['kv_bytes_per_token_mla_bf16']:,} B/token (MLA latent, bf16) vs "
          f"{d['kv_bytes_per_token_mha_bf16']:,} B/token (same model with MHA): {d['kv_ratio']:.1f}x smaller")
