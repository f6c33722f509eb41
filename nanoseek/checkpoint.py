"""Hugging Face model directories <-> nanoseek Transformer.

One explicit name-mapping table (HF name suffix <-> nanoseek parameter), applied in both directions
and covered by a round-trip test. Sharded safetensors with model.safetensors.index.json; per-expert
HF tensors <-> nanoseek's stacked experts; the MTP layers at model.layers.{num_hidden_layers + k}
are kept; FP8 (e4m3) weights with 128x128 `weight_scale_inv` block scales are dequantized on load.
Nothing is ever unpickled.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import warnings
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from nanoseek.common import read_json_object
from nanoseek.model.config import ModelConfig
from nanoseek.model.transformer import Transformer

# --- the mapping table: (HF suffix inside model.layers.{i}., nanoseek suffix inside the block)
BLOCK_MAP: list[tuple[str, str]] = [
    ("input_layernorm.weight", "attn_norm.weight"),
    ("post_attention_layernorm.weight", "ffn_norm.weight"),
    ("self_attn.q_proj.weight", "attn.wq.weight"),
    ("self_attn.q_a_proj.weight", "attn.wq_a.weight"),
    ("self_attn.q_a_proj.bias", "attn.wq_a.bias"),
    ("self_attn.q_a_layernorm.weight", "attn.q_norm.weight"),
    ("self_attn.q_b_proj.weight", "attn.wq_b.weight"),
    ("self_attn.kv_a_proj_with_mqa.weight", "attn.wkv_a.weight"),
    ("self_attn.kv_a_proj_with_mqa.bias", "attn.wkv_a.bias"),
    ("self_attn.kv_a_layernorm.weight", "attn.kv_norm.weight"),
    ("self_attn.kv_b_proj.weight", "attn.wkv_b.weight"),
    ("self_attn.o_proj.weight", "attn.wo.weight"),
    ("self_attn.o_proj.bias", "attn.wo.bias"),
    ("mlp.gate_proj.weight", "ffn.w1.weight"),
    ("mlp.up_proj.weight", "ffn.w3.weight"),
    ("mlp.down_proj.weight", "ffn.w2.weight"),
    ("mlp.gate.weight", "ffn.gate.weight"),
    ("mlp.gate.e_score_correction_bias", "ffn.gate.bias"),
    ("mlp.shared_experts.gate_proj.weight", "ffn.shared.w1.weight"),
    ("mlp.shared_experts.up_proj.weight", "ffn.shared.w3.weight"),
    ("mlp.shared_experts.down_proj.weight", "ffn.shared.w2.weight"),
    # routed experts: HF keeps one tensor per expert, nanoseek stacks them (index j)
    ("mlp.experts.{j}.gate_proj.weight", "ffn.experts.w1"),
    ("mlp.experts.{j}.up_proj.weight", "ffn.experts.w3"),
    ("mlp.experts.{j}.down_proj.weight", "ffn.experts.w2"),
]
# MTP module k lives at HF model.layers.{L+k}; its block parts use BLOCK_MAP under mtp.{k}.block.
MTP_MAP: list[tuple[str, str]] = [
    ("enorm.weight", "enorm.weight"),
    ("hnorm.weight", "hnorm.weight"),
    ("eh_proj.weight", "eh_proj.weight"),
    ("shared_head.norm.weight", "norm.weight"),
]
# The official checkpoints repeat the shared embedding and head inside each MTP layer.
MTP_SHARED = {"embed_tokens.weight": "embed.weight", "shared_head.head.weight": "head.weight"}
TOP_MAP: list[tuple[str, str]] = [
    ("model.embed_tokens.weight", "embed.weight"),
    ("model.norm.weight", "norm.weight"),
    ("lm_head.weight", "head.weight"),
]

_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_EXPERT = re.compile(r"^mlp\.experts\.(\d+)\.(.+)$")


SHAPE_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim")


class CheckpointError(ValueError):
    pass


def hf_to_nanoseek(name: str, cfg: ModelConfig) -> tuple[str, int | None] | None:
    """HF tensor name -> (nanoseek parameter name, expert index or None); None = shared copy to skip.

    Raises CheckpointError for a name the table does not know.
    """
    for hf, ours in TOP_MAP:
        if name == hf:
            return ours, None
    m = _LAYER.match(name)
    if m:
        i, rest = int(m.group(1)), m.group(2)
        L = cfg.num_hidden_layers
        if i < L:
            prefix = f"layers.{i}."
        elif i < L + cfg.num_nextn_predict_layers:
            k = i - L
            if rest in MTP_SHARED:
                return None
            for hf, ours in MTP_MAP:
                if rest == hf:
                    return f"mtp.{k}.{ours}", None
            prefix = f"mtp.{k}.block."
        else:
            raise CheckpointError(f"unexpected tensor {name!r}: layer {i} is beyond num_hidden_layers={L} "
                                  f"+ num_nextn_predict_layers={cfg.num_nextn_predict_layers}")
        e = _EXPERT.match(rest)
        if e:
            j, tail = int(e.group(1)), e.group(2)
            for hf, ours in BLOCK_MAP:
                if hf == "mlp.experts.{j}." + tail:
                    return prefix + ours, j
        for hf, ours in BLOCK_MAP:
            if rest == hf:
                return prefix + ours, None
    raise CheckpointError(f"unexpected tensor {name!r}: not in nanoseek's name-mapping table")


def nanoseek_to_hf(name: str, cfg: ModelConfig, n_experts: int = 0) -> list[str]:
    """nanoseek parameter name -> HF tensor names (one per expert for stacked experts)."""
    for hf, ours in TOP_MAP:
        if name == ours:
            return [hf]
    m = re.match(r"^(layers\.(\d+)|mtp\.(\d+)\.block)\.(.+)$", name)
    if m:
        i = int(m.group(2)) if m.group(2) is not None else cfg.num_hidden_layers + int(m.group(3))
        rest = m.group(4)
        for hf, ours in BLOCK_MAP:
            if rest == ours:
                if "{j}" in hf:
                    return [f"model.layers.{i}." + hf.format(j=j) for j in range(n_experts)]
                return [f"model.layers.{i}." + hf]
    m = re.match(r"^mtp\.(\d+)\.(.+)$", name)
    if m:
        i = cfg.num_hidden_layers + int(m.group(1))
        for hf, ours in MTP_MAP:
            if m.group(2) == ours:
                return [f"model.layers.{i}." + hf]
    raise CheckpointError(f"nanoseek parameter {name!r} has no entry in the mapping table")


# --- FP8 block dequantization (DeepSeek-V3 official layout)
def dequant_fp8(weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int] = (128, 128),
                dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """W = fp8 block * its scale: scale_inv[r, c] multiplies weight[r*128:(r+1)*128, c*128:(c+1)*128]."""
    M, N = weight.shape
    br, bc = block
    if scale_inv.shape != ((M + br - 1) // br, (N + bc - 1) // bc):
        raise CheckpointError(f"weight_scale_inv shape {tuple(scale_inv.shape)} does not tile a "
                              f"{(M, N)} weight in {block} blocks")
    s = scale_inv.float().repeat_interleave(br, 0)[:M].repeat_interleave(bc, 1)[:, :N]
    return (weight.float() * s).to(dtype)


# --- loading
def _fp8_scale(f, keys: set[str], key: str, shard: Path, path: Path, weight_map: dict[str, str],
               opened: dict) -> torch.Tensor:
    """The block scales of FP8 tensor `key`: beside it in its shard, or in the shard the index's `weight_map`
    names for them (DeepSeek's own fp8_cast_bf16.py looks them up across files too). `opened`: the caller's
    other shards opened so far."""
    sk = key + "_scale_inv"
    if sk in keys:
        return f.get_tensor(sk)
    other = weight_map.get(sk)
    if other is None:
        raise CheckpointError(f"{shard}: FP8 tensor {key!r} has no {sk!r}")
    try:
        if other not in opened:
            opened[other] = safe_open(str(path / other), framework="pt", device="cpu")
        return opened[other].get_tensor(sk)
    except Exception as e:      # the index names a shard or tensor that is not there
        raise CheckpointError(f"{path / other}: the scales {sk!r} of FP8 tensor {key!r} cannot be read ({e})") from None


def _shard_files(path: Path) -> tuple[list[Path], dict[str, str]]:
    """The model's safetensors files, and the index's tensor -> file map ({} without an index)."""
    weight_map: dict[str, str] = {}
    index = path / "model.safetensors.index.json"
    if index.exists():
        weight_map = read_json_object(index, CheckpointError).get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index}: malformed index (no \"weight_map\" object of tensor name -> file)")
        for k, v in weight_map.items():
            # a shard is a file of this folder (as save_pretrained and HF write them): no path that leads elsewhere
            if not isinstance(v, str) or not v or Path(v).name != v or v in (".", ".."):
                raise CheckpointError(f"{index}: malformed index (weight_map[{k!r}] is {v!r}, not a file name "
                                      "in the model folder)")
        files = sorted(set(weight_map.values()))
    else:
        files = sorted(p.name for p in path.glob("*.safetensors"))
        if not files:
            raise CheckpointError(f"{path}: no model.safetensors or model.safetensors.index.json")
    out = []
    for f in files:
        p = path / f
        if not p.exists():
            raise CheckpointError(f"{p}: shard listed in the index is missing")
        out.append(p)
    return out, weight_map


def _all_keys(shards: list[Path]) -> list[str]:
    keys: list[str] = []
    for shard in shards:
        try:
            with safe_open(str(shard), framework="pt", device="cpu") as f:
                keys.extend(f.keys())
        except Exception as e:
            raise CheckpointError(f"{shard}: cannot read safetensors file ({e})") from None
    return keys


def read_config(cfg_path: str | Path) -> tuple[dict, ModelConfig]:
    """A model folder's config.json as (the JSON object, its ModelConfig). CheckpointError naming the file for
    one that is not a JSON object or lacks a shape; ModelConfig's ValueError naming the field for a bad value."""
    cfg_path = Path(cfg_path)
    raw = read_json_object(cfg_path, CheckpointError)
    # the shapes: every DeepSeek config.json (save_pretrained's, transformers', DeepSeek's own) names them, and
    # a default in their place would only show up later as tensors of the wrong shape
    missing = [k for k in SHAPE_FIELDS if k not in raw]
    if missing:
        raise CheckpointError(f"{cfg_path}: no {', '.join(missing)} (not a DeepSeek V2/V3 config.json)")
    return raw, ModelConfig.from_dict(raw)


def load_pretrained(path: str | Path, dtype: torch.dtype | None = None,
                    device: torch.device | str | None = None, strict: bool = True) -> Transformer:
    """Build a Transformer from a HF directory. dtype None: the config's torch_dtype (fp32 if absent)."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: not a model directory")
    cfg_path = path / "config.json"
    if not cfg_path.exists():
        raise CheckpointError(f"{path}: config.json is missing")
    raw, cfg = read_config(cfg_path)
    quant = raw.get("quantization_config") or {}
    if not isinstance(quant, dict):
        raise CheckpointError(f"{cfg_path}: quantization_config must be an object (got {quant!r})")
    block = quant.get("weight_block_size") or (128, 128)
    if not (isinstance(block, (list, tuple)) and len(block) == 2
            and all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in block)):
        raise CheckpointError(f"{cfg_path}: quantization_config.weight_block_size must be two positive integers "
                              f"(got {block!r})")
    block = tuple(block)
    dtype_key = "torch_dtype" if raw.get("torch_dtype") else "dtype"      # (transformers 5 writes dtype)
    saved_dtype = raw.get(dtype_key)
    if saved_dtype is not None and not isinstance(saved_dtype, str):
        raise CheckpointError(f"{cfg_path}: {dtype_key} must be a name such as \"bfloat16\" (got {saved_dtype!r})")
    if dtype is None:
        dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(saved_dtype, torch.float32)
    device = torch.device(device or "cpu")
    shards, weight_map = _shard_files(path)
    if cfg.num_nextn_predict_layers:
        # transformers saves DeepseekV3 without its MTP layer (it drops model.layers.61.*): load such a
        # directory as a model without MTP rather than failing. A partly present MTP layer still fails below.
        first_mtp = f"model.layers.{cfg.num_hidden_layers}."
        if not any(k.startswith(first_mtp) for k in _all_keys(shards)):
            warnings.warn(f"{path}: config has num_nextn_predict_layers={cfg.num_nextn_predict_layers} but the "
                          "checkpoint has no MTP weights; loading without MTP")
            cfg = cfg.replace(num_nextn_predict_layers=0)
    with torch.device("meta"):
        model = Transformer(cfg)
    model = model.to_empty(device=device).to(dtype)
    params = dict(model.named_parameters())
    params.update({n: b for n, b in model.named_buffers() if n.endswith("gate.bias")})
    filled: dict[str, int] = {}   # name -> number of expert slices (or 1) written
    opened: dict = {}             # shards holding FP8 scales of another shard's weights (_fp8_scale)
    for shard in shards:
        try:
            f = safe_open(str(shard), framework="pt", device="cpu")
        except Exception as e:  # truncated or corrupt file: safetensors raises its own error type
            raise CheckpointError(f"{shard}: cannot read safetensors file ({e})") from None
        with f:
            keys = set(f.keys())
            for key in sorted(keys):
                if key.endswith("weight_scale_inv"):
                    continue
                if key.endswith("rotary_emb.inv_freq"):
                    continue
                target = hf_to_nanoseek(key, cfg)
                if target is None:
                    continue
                name, j = target
                if name not in params:
                    if strict:
                        raise CheckpointError(f"unexpected tensor {key!r} (maps to {name!r}, which this config lacks)")
                    continue
                try:
                    t = f.get_tensor(key)
                except Exception as e:
                    raise CheckpointError(f"{shard}: tensor {key!r} cannot be read ({e})") from None
                if t.dtype == torch.float8_e4m3fn:
                    t = dequant_fp8(t, _fp8_scale(f, keys, key, shard, path, weight_map, opened), block, torch.float32)
                dst = params[name]
                if j is not None and j >= dst.shape[0]:       # expert j of a config with fewer experts
                    raise CheckpointError(f"unexpected tensor {key!r}: expert {j} is beyond the config's "
                                          f"{dst.shape[0]} for {name!r}")
                dst_slice = dst[j] if j is not None else dst
                if tuple(t.shape) != tuple(dst_slice.shape):
                    raise CheckpointError(f"tensor {key!r} has shape {tuple(t.shape)}, expected "
                                          f"{tuple(dst_slice.shape)} for {name!r}")
                with torch.no_grad():
                    dst_slice.copy_(t.to(dst_slice.dtype))
                filled[name] = filled.get(name, 0) + 1
    missing = []
    for name, p in params.items():
        need = p.shape[0] if name.endswith(("experts.w1", "experts.w2", "experts.w3")) else 1
        if filled.get(name, 0) < need:
            if name == "head.weight" and cfg.tie_word_embeddings:
                continue
            missing.append(name)
    if missing:
        hf = [nanoseek_to_hf(n, cfg, 1)[0] for n in missing[:5]]
        raise CheckpointError(f"{path}: {len(missing)} tensors missing, e.g. {hf}")
    if cfg.tie_word_embeddings:
        model.head.weight = model.embed.weight
    return model.eval()


# --- saving
def hf_state_dict(model: Transformer) -> dict[str, torch.Tensor]:
    cfg = model.config
    out: dict[str, torch.Tensor] = {}
    tensors = dict(model.named_parameters())
    tensors.update({n: b for n, b in model.named_buffers() if n.endswith("gate.bias")})
    for name, t in tensors.items():
        if name == "head.weight" and cfg.tie_word_embeddings:
            continue
        t = t.detach()
        hf_names = nanoseek_to_hf(name, cfg, t.shape[0])
        if len(hf_names) > 1 or name.endswith(("experts.w1", "experts.w2", "experts.w3")):
            for j, hf in enumerate(hf_names):
                out[hf] = t[j].contiguous()
        else:
            out[hf_names[0]] = t.contiguous()
    shared = dict(model.named_parameters(remove_duplicate=False))     # a tied head.weight is embed.weight
    for k in range(cfg.num_nextn_predict_layers):
        i = cfg.num_hidden_layers + k
        for hf, ours in MTP_SHARED.items():
            out[f"model.layers.{i}.{hf}"] = shared[ours].detach().clone()
    return out


def save_pretrained(model: Transformer, path: str | Path, max_shard_bytes: int = 2 * 1024**3,
                    generation_config: dict | None = None, files: dict[str, bytes] | None = None) -> None:
    """Write config.json, generation_config.json and sharded safetensors (+ index) to `path`, and `files`
    ({"tokenizer.json": contents, ...}) beside them.

    Written into a temporary sibling directory first and renamed, so an interrupted save never
    leaves a half-written model where a good one was.
    """
    path = Path(path)
    cfg = model.config
    sd = hf_state_dict(model)
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for k, t in sd.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][k] = t
        size += nbytes
    weight_map = {}
    total = 0
    for n, shard in enumerate(shards):
        fname = "model.safetensors" if len(shards) == 1 else f"model-{n + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file({k: v.cpu() for k, v in shard.items()}, str(tmp / fname), metadata={"format": "pt"})
        for k, v in shard.items():
            weight_map[k] = fname
            total += v.numel() * v.element_size()
    if len(shards) > 1:
        (tmp / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    dtype = next(model.parameters()).dtype
    hf_cfg = cfg.to_hf_dict()
    hf_cfg["torch_dtype"] = str(dtype).removeprefix("torch.")
    (tmp / "config.json").write_text(json.dumps(hf_cfg, indent=2, sort_keys=True) + "\n")
    gen = {"bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id, "do_sample": False}
    gen.update(generation_config or {})
    (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    for name, data in (files or {}).items():
        (tmp / name).write_bytes(data)
    # keep files that are not ours (tokenizer.json, trainer state, ...) already in the target
    if path.exists():
        for p in path.iterdir():
            if not (tmp / p.name).exists() and not p.name.startswith("model") and p.name != "config.json":
                if p.is_dir():
                    shutil.copytree(p, tmp / p.name)
                else:
                    shutil.copy2(p, tmp / p.name)
        old = path.with_name(path.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, path)
