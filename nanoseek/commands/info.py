"""Parameter counts (total, active per token, MTP) and KV-cache bytes per token, MLA vs MHA.

    nanoseek info --preset deepseek-v3
    nanoseek info --model runs/demo/final

The model is built on the meta device, so even the 671B preset answers at once.
"""

from __future__ import annotations

import argparse
import json

import torch

from nanoseek.infer.kv_cache import latent_bytes_per_token, mha_bytes_per_token
from nanoseek.model import PRESETS, ModelConfig, Transformer, count_parameters, preset


def human(n: float) -> str:
    for unit, div in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return str(int(n))


def describe(cfg: ModelConfig, name: str) -> dict:
    with torch.device("meta"):
        model = Transformer(cfg)
    counts = count_parameters(model)
    mla = latent_bytes_per_token(cfg, torch.bfloat16)
    mha = mha_bytes_per_token(cfg, torch.bfloat16)
    return {"name": name, **counts, "kv_bytes_per_token_mla_bf16": mla, "kv_bytes_per_token_mha_bf16": mha,
            "kv_ratio": mha / mla,
            "moe_layers": sum(cfg.is_moe_layer(i) for i in range(cfg.num_hidden_layers)),
            "layers": cfg.num_hidden_layers}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="nanoseek info", description=__doc__.splitlines()[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--preset", choices=sorted(PRESETS))
    src.add_argument("--model", help="a Hugging Face model directory (only config.json is read)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    args = p.parse_args(argv)

    # --- config
    if args.preset:
        cfg, name = preset(args.preset), args.preset
    else:
        try:
            cfg, name = ModelConfig.from_json(f"{args.model}/config.json"), args.model
        except (FileNotFoundError, ValueError) as e:
            raise SystemExit(f"nanoseek info: {e}") from None

    # --- count
    d = describe(cfg, name)
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
