"""GGUF export for llama.cpp's `deepseek2` architecture, written with the `gguf` package's GGUFWriter.

    export_gguf("runs/demo/final", "demo.gguf", dtype="f32")

Targets the llama.cpp bundled with llama-cpp-python 0.3.36 (src/models/deepseek2.cpp,
src/llama-graph.cpp build_moe_ffn, src/llama-context.cpp). What that code reads, and so what we write:
- MLA in its absorbed form: llama.cpp runs attention as MQA over [latent | k_pe] (head_count_kv = 1,
  key_length = kv_lora + rope, value_length = kv_lora) and needs the real head sizes under the `_mla`
  keys. kv_b is stored split: attn_k_b (H, kv_lora, nope) = W_UK transposed, attn_v_b (H, v, kv_lora).
- RoPE: deepseek2 uses ggml's "normal" rope mode, which rotates adjacent pairs (2i, 2i+1), the layout
  DeepSeek's weights (and nanoseek) use, so no q/k row permutation (llama.cpp's converter does none).
- MoE: stacked experts, the selection bias as exp_probs_b (added to the scores for top-k only), the
  gating function (absent means softmax: V3 must say sigmoid), weights norm and scale, and V3's
  group-limited routing (groups scored by the sum of their top-2 biased scores, losers masked -inf).
  Every layer from leading_dense_block_count on is MoE and has shared experts.
- YaRN: llama.cpp derives the cos/sin factor and the softmax mscale from rope.scaling.factor,
  rope.scaling.yarn_log_multiplier (read back divided by 0.1) and rope.scaling.attn_factor, with
  beta_fast = 32 and beta_slow = 1 fixed. `_yarn_keys` solves for the keys that reproduce nanoseek's
  two factors exactly.
- A model without query compression needs deepseek2.attention.q_lora_rank = 0 and attn_q; llama.cpp
  skips reading q_lora_rank (and so requires attn_q) for 26- or 27-layer models, which it takes for V2-Lite.
Anything llama.cpp would compute differently is refused up front with a ValueError naming the field.
MTP modules are skipped: llama.cpp's deepseek2 graph does not run them.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Callable

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType as Q
from gguf import MODEL_TENSOR as T

from nanoseek.checkpoint import read_config
from nanoseek.common import check_writable, read_json_object
from nanoseek.model import ModelConfig, Transformer
from nanoseek.model.layers import rope_inv_freq

ARCH = "deepseek2"
# --dtype -> (GGML type of the matrices, general.file_type)
FILE_TYPES: dict[str, tuple[Q, gguf.LlamaFileType]] = {
    "f32": (Q.F32, gguf.LlamaFileType.ALL_F32),
    "f16": (Q.F16, gguf.LlamaFileType.MOSTLY_F16),
    "bf16": (Q.BF16, gguf.LlamaFileType.MOSTLY_BF16),
    "q8_0": (Q.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0),
}
MAX_EXPERTS = 1024          # LLAMA_MAX_EXPERTS
LITE_LAYER_COUNTS = (26, 27)  # deepseek2.cpp `is_lite` (also 48 layers with vocab 128256): q_lora_rank unread

# --- the mapping table: nanoseek parameter (inside layers.{i}.) -> llama.cpp tensor.
# attn.wkv_b.weight is split into ATTN_K_B / ATTN_V_B (see _split_kv_b); experts are stacked already.
BLOCK_MAP: dict[str, T] = {
    "attn_norm.weight": T.ATTN_NORM,
    "attn.wq.weight": T.ATTN_Q,                 # q_lora_rank null
    "attn.wq_a.weight": T.ATTN_Q_A,
    "attn.q_norm.weight": T.ATTN_Q_A_NORM,
    "attn.wq_b.weight": T.ATTN_Q_B,
    "attn.wkv_a.weight": T.ATTN_KV_A_MQA,       # rows [latent | k_pe], as llama.cpp views it
    "attn.kv_norm.weight": T.ATTN_KV_A_NORM,
    "attn.wo.weight": T.ATTN_OUT,
    "ffn_norm.weight": T.FFN_NORM,
    "ffn.w1.weight": T.FFN_GATE,                # dense FFN (leading blocks)
    "ffn.w3.weight": T.FFN_UP,
    "ffn.w2.weight": T.FFN_DOWN,
    "ffn.gate.weight": T.FFN_GATE_INP,
    "ffn.gate.bias": T.FFN_EXP_PROBS_B,
    "ffn.experts.w1": T.FFN_GATE_EXP,           # (E, inter, dim)
    "ffn.experts.w3": T.FFN_UP_EXP,
    "ffn.experts.w2": T.FFN_DOWN_EXP,           # (E, dim, inter)
    "ffn.shared.w1.weight": T.FFN_GATE_SHEXP,
    "ffn.shared.w3.weight": T.FFN_UP_SHEXP,
    "ffn.shared.w2.weight": T.FFN_DOWN_SHEXP,
}
TOP_MAP: dict[str, T] = {"embed.weight": T.TOKEN_EMBD, "norm.weight": T.OUTPUT_NORM, "head.weight": T.OUTPUT}
ALWAYS_F32 = (T.FFN_GATE_INP,)  # the router stays f32 in every file type (llama.cpp's converter does the same)

# Pre-tokenizers llama.cpp implements natively, by its tokenizer.ggml.pre name. Each is the list of
# regexes `tokenizers` applies before byte-level BPE (after JSON decoding, so \r \n are real characters).
GPT2_REGEX = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
PRETOKENIZERS: dict[str, list[str]] = {
    "gpt-2": [GPT2_REGEX],
    "deepseek-v3": [  # DeepSeek-V3's own tokenizer.json (llama-vocab.cpp LLAMA_VOCAB_PRE_TYPE_DEEPSEEK3_LLM)
        r"\p{N}{1,3}",
        "[\u4e00-\u9fa5\u3040-\u309f\u30a0-\u30ff]+",
        "[!\"#$%&'()*+,\\-./:;<=>?@\\[\\\\\\]^_`{|}~][A-Za-z]+|[^\r\n\\p{L}\\p{P}\\p{S}]?[\\p{L}\\p{M}]+"
        "| ?[\\p{P}\\p{S}]+[\r\n]*|\\s*[\r\n]+|\\s+(?!\\S)|\\s+",
    ],
}


def _bad(field: str, value, why: str) -> ValueError:
    return ValueError(f"cannot export to GGUF: ModelConfig.{field}={value!r}: {why}")


# --- what llama.cpp can represent
def check_representable(cfg: ModelConfig) -> None:
    """Raise ValueError naming the field for any config llama.cpp's deepseek2 would run differently."""
    L = cfg.num_hidden_layers
    if cfg.attention_bias:
        raise _bad("attention_bias", True, "llama.cpp's deepseek2 loads no attention biases")
    if cfg.qk_nope_head_dim < 1:
        raise _bad("qk_nope_head_dim", cfg.qk_nope_head_dim, "llama.cpp asserts n_embd_head_qk_nope >= 1")
    if cfg.q_lora_rank is not None and (L in LITE_LAYER_COUNTS or (L == 48 and cfg.vocab_size == 128256)):
        raise _bad("q_lora_rank", cfg.q_lora_rank, f"llama.cpp takes a {L}-layer deepseek2 model for V2-Lite "
                   "and ignores q_lora_rank (it would look for attn_q); use another layer count")
    lead = _leading_dense(cfg)
    dense_inside = [i for i in range(lead, L) if not cfg.is_moe_layer(i)]
    if dense_inside:
        raise _bad("moe_layer_freq", cfg.moe_layer_freq, "llama.cpp makes every layer after the leading dense "
                   f"blocks an MoE layer, but layers {dense_inside} are dense here")
    if lead < L:
        E = cfg.n_routed_experts
        if E > MAX_EXPERTS:
            raise _bad("n_routed_experts", E, f"llama.cpp allows at most {MAX_EXPERTS} experts")
        if cfg.routed_scaling_factor == 0:
            raise _bad("routed_scaling_factor", 0.0, "llama.cpp treats a weights scale of 0 as 'no scaling'")
        _expert_groups(cfg)  # raises for routing llama.cpp does not implement
    if cfg.yarn is not None:
        for key, fixed in (("beta_fast", 32.0), ("beta_slow", 1.0)):
            if cfg.yarn[key] != fixed:
                raise _bad("rope_scaling", cfg.rope_scaling, f"llama.cpp's deepseek2 does not read YaRN {key} "
                           f"from the file and always uses {fixed:g}")


def _leading_dense(cfg: ModelConfig) -> int:
    if cfg.n_routed_experts is None:
        return cfg.num_hidden_layers
    return min(cfg.first_k_dense_replace, cfg.num_hidden_layers)


def _expert_groups(cfg: ModelConfig) -> tuple[int, int]:
    """(expert_group_count, expert_group_used_count) for llama.cpp; (0, 0) when routing ignores groups."""
    G, k = cfg.n_group, cfg.topk_group
    per_group = cfg.n_routed_experts // G
    # Groups change nothing if all of them are kept, if V2's greedy ignores them, or if each holds one
    # expert under V2's group_limited_greedy (best-of-group = the expert, so the top-k is the same).
    if G <= 1 or k >= G or cfg.topk_method == "greedy":
        return 0, 0
    if cfg.topk_method == "group_limited_greedy":
        if per_group == 1:
            return 0, 0
        raise _bad("topk_method", cfg.topk_method, f"with n_group={G} > topk_group={k}, V2 scores a group by its "
                   "best expert; llama.cpp only implements V3's top-2-sum group score (noaux_tc)")
    return G, k


def _yarn_keys(cfg: ModelConfig) -> dict[str, float]:
    """rope.scaling.{yarn_log_multiplier, attn_factor} that make llama.cpp's YaRN equal nanoseek's.

    nanoseek multiplies cos/sin by A (rope_inv_freq's attention_factor) and the softmax scale by M^2
    (M = mscale(s, mscale_all_dim), 1 without it). llama.cpp 0.3.36 (llama-context.cpp, deepseek2.cpp) with
    rope.scaling.attn_factor r gives, for factor s > 1 and g = 1 + 0.1 ln s:
      yarn_log_multiplier 0.1*m written (m != 0): cos/sin factor r,   softmax factor (r * (1 + 0.1 m ln s))^2
      not written:                                cos/sin factor r*g, softmax factor (r*g)^2
    V3 (mscale = mscale_all_dim = 1) gives A=1, M=g, so m=1 and r=1: the keys DeepSeek's own GGUFs carry.
    """
    yarn = cfg.yarn
    if yarn is None or yarn["factor"] <= 1:
        return {}  # both factors are 1 on either side
    s = yarn["factor"]
    A = rope_inv_freq(cfg)[1]
    M = math.sqrt(cfg.softmax_scale * math.sqrt(cfg.qk_head_dim))
    if math.isclose(M, A, rel_tol=1e-7):
        keys = {"attn_factor": A / (1 + 0.1 * math.log(s))}
    else:
        m = (M / A - 1) / (0.1 * math.log(s))
        keys = {"yarn_log_multiplier": 0.1 * m, "attn_factor": A}
    if math.isclose(keys["attn_factor"], 1.0, rel_tol=1e-7):
        del keys["attn_factor"]
    return keys


# --- metadata
def _write_hparams(w: gguf.GGUFWriter, cfg: ModelConfig) -> None:
    L, lead = cfg.num_hidden_layers, _leading_dense(cfg)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_block_count(L)
    w.add_vocab_size(cfg.vocab_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(1)  # MLA absorbed = MQA over the latent
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_q_lora_rank(cfg.q_lora_rank or 0)
    w.add_kv_lora_rank(cfg.kv_lora_rank)
    w.add_key_length(cfg.kv_lora_rank + cfg.qk_rope_head_dim)
    w.add_value_length(cfg.kv_lora_rank)
    w.add_key_length_mla(cfg.qk_head_dim)
    w.add_value_length_mla(cfg.v_head_dim)
    w.add_rope_dimension_count(cfg.qk_rope_head_dim)
    w.add_rope_freq_base(cfg.rope_theta)
    if cfg.yarn is not None:
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(cfg.yarn["factor"])
        w.add_rope_scaling_orig_ctx_len(cfg.yarn["original_max_position_embeddings"])
        keys = _yarn_keys(cfg)
        if "yarn_log_multiplier" in keys:
            w.add_rope_scaling_yarn_log_mul(keys["yarn_log_multiplier"])
        if "attn_factor" in keys:
            w.add_rope_scaling_attn_factors(keys["attn_factor"])
    else:
        w.add_rope_scaling_type(gguf.RopeScalingType.NONE)
    w.add_leading_dense_block_count(lead)
    # read unconditionally by llama.cpp, MoE or not
    w.add_expert_feed_forward_length(cfg.moe_intermediate_size)
    w.add_expert_shared_count(max(cfg.n_shared_experts, 1) if lead < L else 0)
    if cfg.n_routed_experts is not None:
        w.add_expert_count(cfg.n_routed_experts)
        w.add_expert_used_count(cfg.num_experts_per_tok)
        w.add_expert_weights_scale(cfg.routed_scaling_factor)
        w.add_expert_weights_norm(cfg.norm_topk_prob)
        w.add_expert_gating_func(gguf.ExpertGatingFuncType.SIGMOID if cfg.scoring_func == "sigmoid"
                                 else gguf.ExpertGatingFuncType.SOFTMAX)
        groups, used = _expert_groups(cfg)
        if groups:
            w.add_expert_group_count(groups)
            w.add_expert_group_used_count(used)


def _load_tokenizer(model_dir: Path) -> tuple[dict, dict]:
    path = model_dir / "tokenizer.json"
    if not path.exists():
        raise FileNotFoundError(f"{path}: llama.cpp needs the vocabulary; save the tokenizer into the model directory")
    tok = read_json_object(path)
    cfg_path = model_dir / "tokenizer_config.json"
    tok_cfg = read_json_object(cfg_path) if cfg_path.exists() else {}
    return tok, tok_cfg


def _pretokenizer_name(tok: dict) -> str:
    """tokenizer.ggml.pre for a tokenizer.json, or ValueError: llama.cpp has no general regex engine hook."""
    pre = tok.get("pre_tokenizer")
    if tok.get("normalizer") not in (None, {"type": "Sequence", "normalizers": []}):
        raise ValueError(f"tokenizer.json normalizer {tok['normalizer']!r}: llama.cpp's BPE applies no normalizer")
    steps = pre.get("pretokenizers", []) if pre and pre.get("type") == "Sequence" else [pre] if pre else []
    regexes: list[str] = []
    for i, step in enumerate(steps):
        kind = step.get("type")
        last = i == len(steps) - 1
        if kind == "ByteLevel" and last and not step.get("add_prefix_space", False):
            if step.get("use_regex", True):
                regexes.append(GPT2_REGEX)
            break
        if kind == "Split" and "Regex" in step.get("pattern", {}) and step.get("behavior") == "Isolated" \
                and not step.get("invert", False):
            regexes.append(step["pattern"]["Regex"])
            continue
        regexes = []
        break
    else:
        regexes = []  # no final ByteLevel step: not a byte-level BPE
    for name, known in PRETOKENIZERS.items():
        if regexes == known:
            return name
    raise ValueError(f"tokenizer.json pre_tokenizer {json.dumps(pre)[:300]}: llama.cpp implements only the "
                     f"byte-level pre-tokenizers {sorted(PRETOKENIZERS)} (a GGUF with another would tokenize differently)")


def _write_tokenizer(w: gguf.GGUFWriter, cfg: ModelConfig, model_dir: Path) -> None:
    tok, tok_cfg = _load_tokenizer(model_dir)
    bpe = tok.get("model", {})
    if bpe.get("type") != "BPE":
        raise ValueError(f"{model_dir}/tokenizer.json: model type {bpe.get('type')!r}, expected byte-level 'BPE'")
    pre = _pretokenizer_name(tok)
    n = cfg.vocab_size
    tokens: list[str | None] = [None] * n
    types = [gguf.TokenType.UNUSED] * n
    entries = [(i, t, gguf.TokenType.NORMAL) for t, i in bpe["vocab"].items()]
    entries += [(a["id"], a["content"], gguf.TokenType.CONTROL if a.get("special") else gguf.TokenType.USER_DEFINED)
                for a in tok.get("added_tokens", [])]
    for i, text, kind in entries:
        if not 0 <= i < n:
            raise ValueError(f"{model_dir}/tokenizer.json: token {text!r} has id {i}, outside "
                             f"ModelConfig.vocab_size={n}")
        tokens[i], types[i] = text, kind
    tokens = [t if t is not None else f"[PAD{i}]" for i, t in enumerate(tokens)]  # embedding rows no token uses
    merges = [m if isinstance(m, str) else " ".join(m) for m in bpe.get("merges", [])]
    if not merges:  # GGUFWriter drops empty arrays and llama.cpp then refuses the file
        raise ValueError(f"{model_dir}/tokenizer.json has no BPE merges; llama.cpp needs at least one")
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)

    # special ids: tokenizer_config.json names them by text; config.json gives bos/eos ids
    ids = {t: i for i, t in enumerate(tokens)}

    def special(key: str, fallback: int | list[int] | None) -> int | None:
        v = tok_cfg.get(key)
        v = v.get("content") if isinstance(v, dict) else v
        if isinstance(v, str) and v in ids:
            return ids[v]
        return fallback[0] if isinstance(fallback, list) else fallback

    bos = special("bos_token", cfg.bos_token_id)
    eos = special("eos_token", cfg.eos_token_id)
    pad = special("pad_token", cfg.pad_token_id if cfg.pad_token_id is not None else ids.get("<｜▁pad▁｜>"))
    for name, value, add in (("bos", bos, w.add_bos_token_id), ("eos", eos, w.add_eos_token_id),
                             ("pad", pad, w.add_pad_token_id)):
        if value is not None:
            if not 0 <= value < n:
                raise ValueError(f"{name} token id {value} is outside ModelConfig.vocab_size={n}")
            add(value)
    w.add_add_bos_token(bool(tok_cfg.get("add_bos_token", False)))
    w.add_add_eos_token(bool(tok_cfg.get("add_eos_token", False)))
    template = tok_cfg.get("chat_template")
    if template is None and (model_dir / "chat_template.jinja").exists():
        template = (model_dir / "chat_template.jinja").read_text(encoding="utf-8")
    if template is not None:
        w.add_chat_template(template)


# --- tensors
def _split_kv_b(wkv_b: torch.Tensor, cfg: ModelConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """kv_b (H*(nope+v), kv_lora) -> attn_k_b (H, kv_lora, nope) = W_UK^T, attn_v_b (H, v, kv_lora) = W_UV."""
    H, nope, v = cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.v_head_dim
    kv_b = wkv_b.view(H, nope + v, cfg.kv_lora_rank)                      # (H, nope+v, c)
    return kv_b[:, :nope].transpose(1, 2).contiguous(), kv_b[:, nope:].contiguous()


def _tensor_plan(model: Transformer, log: Callable[[str], None]) -> list[tuple[str, T, Callable[[], torch.Tensor]]]:
    """(gguf name, kind, loader) for every tensor, in file order. Fails on any tensor with no llama.cpp slot."""
    cfg = model.config
    tensors = dict(model.named_parameters(remove_duplicate=False))
    tensors.update({n: b for n, b in model.named_buffers() if n.endswith("gate.bias") and b is not None})
    plan: list[tuple[str, T, Callable[[], torch.Tensor]]] = []

    def add(kind: T, bid: int | None, t: torch.Tensor | Callable[[], torch.Tensor], suffix: str = "weight"):
        name = gguf.TENSOR_NAMES[kind].format(bid=bid) + "." + suffix
        plan.append((name, kind, t if callable(t) else (lambda t=t: t)))

    for ours, kind in TOP_MAP.items():
        if ours == "head.weight" and cfg.tie_word_embeddings:
            continue  # llama.cpp falls back to token_embd
        add(kind, None, tensors[ours])
    mtp = sorted({n.split(".")[1] for n in tensors if n.startswith("mtp.")})
    if mtp:
        log(f"skipping {len(mtp)} MTP module(s) (HF model.layers.{cfg.num_hidden_layers}+): "
            "llama.cpp's deepseek2 does not run them")
    lead = _leading_dense(cfg)
    for i in range(cfg.num_hidden_layers):
        prefix = f"layers.{i}."
        names = sorted(n for n in tensors if n.startswith(prefix))
        for full in names:
            ours = full[len(prefix):]
            if ours == "attn.wkv_b.weight":
                kb = lambda t=tensors[full]: _split_kv_b(t, cfg)[0]
                vb = lambda t=tensors[full]: _split_kv_b(t, cfg)[1]
                add(T.ATTN_K_B, i, kb)
                add(T.ATTN_V_B, i, vb)
            elif ours in BLOCK_MAP:
                add(BLOCK_MAP[ours], i, tensors[full], "bias" if ours.endswith(".bias") else "weight")
            else:
                raise ValueError(f"cannot export to GGUF: tensor {full!r} has no place in llama.cpp's deepseek2")
        if i >= lead and cfg.n_shared_experts == 0:
            # llama.cpp always runs a shared expert in MoE layers: an all-zero one adds exactly 0.
            D, I = cfg.hidden_size, cfg.moe_intermediate_size
            add(T.FFN_GATE_SHEXP, i, torch.zeros(I, D))
            add(T.FFN_UP_SHEXP, i, torch.zeros(I, D))
            add(T.FFN_DOWN_SHEXP, i, torch.zeros(D, I))
    if cfg.n_shared_experts == 0 and lead < cfg.num_hidden_layers:
        log("n_shared_experts=0: writing an all-zero shared expert per MoE layer (llama.cpp always has one)")
    return plan


def _ggml_type(kind: T, shape: tuple[int, ...], qtype: Q) -> Q:
    if len(shape) <= 1 or kind in ALWAYS_F32:
        return Q.F32
    if qtype == Q.Q8_0 and shape[-1] % gguf.GGML_QUANT_SIZES[Q.Q8_0][0]:
        return Q.F16  # rows must hold whole 32-value blocks; llama.cpp's converter falls back to f16 too
    return qtype


# --- the export
def check_output(model_dir: Path, out: Path, overwrite: bool) -> None:
    """Refuse an `out` that is no file name, a directory, under a file, a name the model's loader reads in
    the model's folder (config, weights, index, tokenizer: .json and .safetensors files, present or not),
    an existing file unless overwrite, or a place that cannot be written."""
    if not out.name or out.name in (".", ".."):
        raise ValueError(f"--out {str(out)!r} is not a file name; give one such as model.gguf")
    if out.is_dir():
        raise ValueError(f"--out {out} is a directory; give a file name such as {out / 'model.gguf'}")
    for parent in out.parents:
        if parent.exists() and not parent.is_dir():
            raise ValueError(f"--out {out}: {parent} is a file, not a folder")
    if out.suffix in (".json", ".safetensors") and out.resolve().parent == model_dir.resolve():
        raise ValueError(f"--out {out} is a name the model's own files use in its folder; write the GGUF elsewhere")
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists; give another --out, or --force to overwrite it")
    check_writable(out)


def export_gguf(model_dir: str | Path, out: str | Path, dtype: str = "f32",
                log: Callable[[str], None] = print, overwrite: bool = False) -> Path:
    """Write `out` (a deepseek2 GGUF) from a Hugging Face model directory with tokenizer.json.

    Everything is checked before the first byte is written; the file is written to out.tmp and renamed.
    An existing `out` is replaced only with overwrite=True, and never when it is one of the model's files.
    """
    model_dir, out = Path(model_dir), Path(out)
    check_output(model_dir, out, overwrite)
    if dtype not in FILE_TYPES:
        raise ValueError(f"unknown GGUF dtype {dtype!r}; choose one of {sorted(FILE_TYPES)}")
    qtype, ftype = FILE_TYPES[dtype]
    cfg = read_config(model_dir / "config.json")[1]     # as the loader reads it: no shapes, no model
    check_representable(cfg)

    w = gguf.GGUFWriter(path=None, arch=ARCH)
    w.add_name(model_dir.resolve().name)
    w.add_file_type(ftype)
    if qtype == Q.Q8_0:
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _write_hparams(w, cfg)
    try:
        _write_tokenizer(w, cfg, model_dir)
    except (KeyError, TypeError, AttributeError, IndexError) as e:    # JSON of another shape than tokenizers'
        raise ValueError(f"{model_dir}: tokenizer.json or tokenizer_config.json is not shaped as the tokenizers "
                         f"library writes it ({type(e).__name__}: {e})") from None

    model = Transformer.from_pretrained(model_dir)   # validates names and shapes; keeps the checkpoint dtype
    plan = _tensor_plan(model, log)
    types = []
    for name, kind, load in plan:
        shape = tuple(load().shape)
        t = _ggml_type(kind, shape, qtype)
        types.append(t)
        nbytes = int(np.prod(gguf.quant_shape_to_byte_shape(shape, t)))
        w.add_tensor_info(name, gguf.quant_shape_to_byte_shape(shape, t), np.dtype(np.uint8), nbytes, raw_dtype=t)
    fallback = sum(t == Q.F16 and qtype == Q.Q8_0 for t in types)
    if fallback:
        log(f"{fallback} tensor(s) with rows not a multiple of 32 stay f16 in the q8_0 file")

    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=out.name + ".", suffix=".tmp")   # never a file of the user's
    os.close(fd)
    tmp = Path(tmp)
    try:
        w.write_header_to_file(tmp)
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        with torch.no_grad():
            for (name, kind, load), t in zip(plan, types):
                data = load().detach().to(torch.float32).cpu().numpy()
                w.write_tensor_data(gguf.quants.quantize(data, t))
        w.close()
        umask = os.umask(0)             # mkstemp made it 0600: give it the mode a plain new file gets
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, out)
    except BaseException:
        w.close()
        tmp.unlink(missing_ok=True)
        raise
    log(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB, {len(plan)} tensors, {dtype})")
    return out
