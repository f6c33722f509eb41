"""ModelConfig: one flat dataclass whose field names are the Hugging Face config.json fields.

Reads DeepSeek's own config.json (`rope_scaling`, `scoring_func`, `topk_method`), the shape
transformers 5 writes (`rope_parameters`, no `scoring_func`), and `model_type: deepseek_v2`
configs (softmax scoring, greedy / group_limited_greedy top-k, no selection bias).
Defaults are the `tiny` preset used by the tests.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

from nanoseek.common import read_json_object

TOPK_METHODS = ("noaux_tc", "greedy", "group_limited_greedy")
SCORING_FUNCS = ("sigmoid", "softmax")


@dataclass
class ModelConfig:
    model_type: str = "deepseek_v3"
    vocab_size: int = 512
    hidden_size: int = 64
    intermediate_size: int = 160          # dense FFN width (first_k_dense_replace layers)
    moe_intermediate_size: int = 32       # width of one routed / shared expert
    num_hidden_layers: int = 3
    num_attention_heads: int = 4
    num_key_value_heads: int = 4          # MLA: kept equal to the head count (HF field)
    q_lora_rank: int | None = 32          # None (or 0): no query compression (V2-Lite)
    kv_lora_rank: int = 32
    qk_nope_head_dim: int = 16
    qk_rope_head_dim: int = 8
    v_head_dim: int = 16
    n_routed_experts: int | None = 8      # None: every layer dense
    n_shared_experts: int = 1
    num_experts_per_tok: int = 2
    n_group: int = 2
    topk_group: int = 1
    topk_method: str = "noaux_tc"
    scoring_func: str = "sigmoid"
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 2.5
    first_k_dense_replace: int = 1
    moe_layer_freq: int = 1
    num_nextn_predict_layers: int = 1
    hidden_act: str = "silu"
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None      # DeepSeek's shape: {"type": "yarn", "factor": ...}
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 2048
    initializer_range: float = 0.02
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    bos_token_id: int | None = 0
    eos_token_id: int | list[int] | None = 1
    pad_token_id: int | None = None
    aux_loss_alpha: float = 1e-4          # sequence-wise balance loss weight (V3 paper alpha)
    torch_dtype: str = "float32"

    def __post_init__(self) -> None:
        # 0 means "none" (false is no 0 here: validate refuses a bool where a count belongs)
        if self.q_lora_rank == 0 and not isinstance(self.q_lora_rank, bool):
            self.q_lora_rank = None
        if self.n_routed_experts == 0 and not isinstance(self.n_routed_experts, bool):
            self.n_routed_experts = None
        if self.rope_scaling is not None:
            self.rope_scaling = _normalize_rope_scaling(self.rope_scaling)
        self.validate()

    # --- derived sizes
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def use_selection_bias(self) -> bool:
        """V3's aux-loss-free bias (`e_score_correction_bias`) exists only with noaux_tc."""
        return self.topk_method == "noaux_tc"

    def is_moe_layer(self, layer_idx: int) -> bool:
        return (self.n_routed_experts is not None and layer_idx >= self.first_k_dense_replace
                and layer_idx % self.moe_layer_freq == 0)

    @property
    def yarn(self) -> dict | None:
        rs = self.rope_scaling
        return rs if rs is not None and rs.get("type") == "yarn" else None

    @property
    def softmax_scale(self) -> float:
        """qk_head_dim^-0.5, times mscale^2 under YaRN (V3 inference/model.py; HF yarn_apply_mscale)."""
        scale = self.qk_head_dim ** -0.5
        if self.yarn is not None and self.yarn.get("mscale_all_dim"):
            m = yarn_get_mscale(self.yarn["factor"], self.yarn["mscale_all_dim"])
            scale = scale * m * m
        return scale

    # --- validation: every error names the field
    def validate(self) -> None:
        def bad(name: str, why: str) -> None:
            raise ValueError(f"ModelConfig.{name}: {why} (got {getattr(self, name)!r})")

        if self.model_type not in ("deepseek_v3", "deepseek_v2"):
            bad("model_type", "nanoseek reads deepseek_v3 and deepseek_v2 configs")
        # kinds first (a config.json is hand-editable): the checks below compare them as numbers
        for name in ("num_key_value_heads", "num_experts_per_tok", "n_group", "topk_group", "first_k_dense_replace",
                     "moe_layer_freq", "num_nextn_predict_layers", "moe_intermediate_size", "n_shared_experts"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool):
                bad(name, "must be an integer")
        for name in ("norm_topk_prob", "tie_word_embeddings", "attention_bias"):
            if not isinstance(getattr(self, name), bool):
                bad(name, "must be true or false")
        for name, positive in (("rms_norm_eps", True), ("rope_theta", True), ("routed_scaling_factor", True),
                               ("initializer_range", False), ("aux_loss_alpha", False)):
            v = getattr(self, name)
            if (not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v)
                    or (v <= 0 if positive else v < 0)):
                bad(name, "must be a number > 0" if positive else "must be a number >= 0")
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                     "kv_lora_rank", "qk_rope_head_dim", "v_head_dim", "intermediate_size",
                     "max_position_embeddings"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                bad(name, "must be a positive integer")
        if not _is_int(self.qk_nope_head_dim) or self.qk_nope_head_dim < 0:
            bad("qk_nope_head_dim", "must be a non-negative integer")
        if self.q_lora_rank is not None and (not _is_int(self.q_lora_rank) or self.q_lora_rank < 0):
            bad("q_lora_rank", "must be null or a positive integer")
        if self.n_routed_experts is not None and (not _is_int(self.n_routed_experts) or self.n_routed_experts < 1):
            bad("n_routed_experts", "must be a positive integer or null")
        for name in ("bos_token_id", "pad_token_id"):
            if getattr(self, name) is not None and not _is_int(getattr(self, name)):
                bad(name, "must be null or a token id (an integer)")
        eos = self.eos_token_id
        if eos is not None and not _is_int(eos) and not (isinstance(eos, list) and all(_is_int(i) for i in eos)):
            bad("eos_token_id", "must be null, a token id (an integer) or a list of token ids")
        if self.qk_rope_head_dim % 2:
            bad("qk_rope_head_dim", "RoPE rotates pairs of dimensions, so it must be even")
        if self.num_key_value_heads != self.num_attention_heads:
            bad("num_key_value_heads", "MLA has one latent per token; it must equal num_attention_heads")
        if self.hidden_act != "silu":
            bad("hidden_act", "DeepSeek's SwiGLU uses silu")
        if self.scoring_func not in SCORING_FUNCS:
            bad("scoring_func", f"unknown scoring function, choose one of {SCORING_FUNCS}")
        if self.topk_method not in TOPK_METHODS:
            bad("topk_method", f"unknown top-k method, choose one of {TOPK_METHODS}")
        if self.num_nextn_predict_layers < 0:
            bad("num_nextn_predict_layers", "must be >= 0")
        if self.first_k_dense_replace < 0:
            bad("first_k_dense_replace", "must be >= 0")
        if self.moe_layer_freq < 1:
            bad("moe_layer_freq", "must be >= 1")
        if self.n_routed_experts is not None:
            E = self.n_routed_experts
            if not 1 <= self.num_experts_per_tok <= E:
                bad("num_experts_per_tok", f"top-k must lie in [1, n_routed_experts={E}]")
            if self.moe_intermediate_size <= 0:
                bad("moe_intermediate_size", "must be a positive integer")
            if self.n_shared_experts < 0:
                bad("n_shared_experts", "must be >= 0")
            if self.n_group < 1 or E % self.n_group:
                bad("n_group", f"n_routed_experts={E} must divide into n_group groups")
            if not 1 <= self.topk_group <= self.n_group:
                bad("topk_group", f"must lie in [1, n_group={self.n_group}]")
            per_group = E // self.n_group
            if self.n_group > 1 and self.topk_method != "greedy":
                if self.topk_group * per_group < self.num_experts_per_tok:
                    bad("topk_group", f"topk_group * experts per group < num_experts_per_tok={self.num_experts_per_tok}")
                if self.topk_method == "noaux_tc" and per_group < 2:
                    bad("n_group", "noaux_tc scores a group by its top-2 experts: need >= 2 experts per group")
            if self.topk_method == "noaux_tc" and self.scoring_func != "sigmoid":
                bad("scoring_func", "noaux_tc (V3) routing uses sigmoid scores")
        if self.rope_scaling is not None and self.rope_scaling["type"] == "yarn":
            if not self.rope_scaling.get("factor", 0) > 0:        # (not <= 0: NaN passes that)
                raise ValueError(f"ModelConfig.rope_scaling: yarn needs factor > 0 (got {self.rope_scaling!r})")
            if self.rope_theta == 1:
                bad("rope_theta", "yarn's correction range divides by ln(rope_theta), so it must not be 1")

    # --- config.json in and out
    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        d = dict(d)
        known = {f.name for f in fields(cls)}
        model_type = d.get("model_type", "deepseek_v3")
        # transformers 5 writes rope_parameters (rope_theta inside, rope_type instead of type).
        rp = d.pop("rope_parameters", None)
        if rp is not None and not isinstance(rp, dict):
            raise ValueError(f'ModelConfig.rope_parameters: must be null or an object such as {{"rope_type": '
                             f'"default", "rope_theta": 10000}} (got {rp!r})')
        if rp:
            rp = dict(rp)
            if "rope_theta" in rp:
                d.setdefault("rope_theta", rp.pop("rope_theta"))
            if rp.get("rope_type", rp.get("type", "default")) not in ("default", None) and d.get("rope_scaling") is None:
                # (a null rope_scaling beside it, as some writers leave it, is no scaling: the parameters say)
                d["rope_scaling"] = _normalize_rope_scaling(rp, "rope_parameters")   # its errors name the field
        if model_type == "deepseek_v2":
            # V2: softmax gate, greedy / group_limited_greedy, no selection bias, no MTP.
            d.setdefault("scoring_func", "softmax")
            d.setdefault("topk_method", "greedy")
            d.setdefault("norm_topk_prob", False)
            d.setdefault("num_nextn_predict_layers", 0)
            d.setdefault("routed_scaling_factor", 1.0)
        else:
            d.setdefault("scoring_func", "sigmoid")
        d.setdefault("n_group", 1)
        d.setdefault("topk_group", 1)
        for k in ("n_group", "topk_group"):
            if d.get(k) is None:
                d[k] = 1
        if "n_shared_experts" in d and d["n_shared_experts"] is None:      # (a dense model's config may say null)
            d["n_shared_experts"] = 0
        if d.get("num_nextn_predict_layers") is None:
            d["num_nextn_predict_layers"] = d.get("num_mtp_layers", 0) or 0
        if d.get("rope_interleave", True) is False:
            # transformers' flag for checkpoints whose rope rows are pre-permuted for rotate-half RoPE; DeepSeek's
            # (and ours) rotate adjacent pairs, the only layout this model computes: refused, not misread
            raise ValueError("ModelConfig.rope_interleave: false (rotate-half RoPE on permuted weights) is not supported; "
                             "nanoseek rotates adjacent pairs, as DeepSeek's checkpoints are laid out")
        kwargs = {k: v for k, v in d.items() if k in known}
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_hf_dict(self) -> dict[str, Any]:
        """config.json for transformers / vLLM: DeepSeek's own fields plus transformers 5's rope_parameters."""
        d = self.to_dict()
        arch = "DeepseekV3ForCausalLM" if self.model_type == "deepseek_v3" else "DeepseekV2ForCausalLM"
        d["architectures"] = [arch]
        d["qk_head_dim"] = self.qk_head_dim
        d["head_dim"] = self.qk_rope_head_dim
        d["rope_interleave"] = True
        d["use_cache"] = True
        d["attention_dropout"] = 0.0
        rp: dict[str, Any] = {"rope_theta": self.rope_theta, "rope_type": "default"}
        if self.rope_scaling is not None:
            rp.update({k: v for k, v in self.rope_scaling.items() if k != "type"})
            rp["rope_type"] = self.rope_scaling["type"]
        d["rope_parameters"] = rp
        if self.n_routed_experts is None:
            d["n_routed_experts"] = 0 if self.model_type == "deepseek_v3" else None
        return d

    @classmethod
    def from_json(cls, path: str | Path) -> "ModelConfig":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no config.json there")
        return cls.from_dict(read_json_object(path))

    def save_json(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_hf_dict(), indent=2, sort_keys=True) + "\n")

    def replace(self, **changes: Any) -> "ModelConfig":
        return replace(self, **changes)


def _is_int(v: Any) -> bool:
    """An integer in config.json's sense: JSON's true / false are Python ints, but never a count or an id."""
    return isinstance(v, int) and not isinstance(v, bool)


def yarn_get_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN attention temperature: sqrt(t) = 0.1 * mscale * ln(s) + 1 (V2/V3 papers)."""
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _normalize_rope_scaling(rs: Any, field: str = "rope_scaling") -> dict:
    """config.json's rope_scaling (or transformers 5's rope_parameters) as {"type": "default"} or the full
    yarn dict with float / int values. A value of the wrong kind is a ValueError naming `field`."""
    def bad(why: str, got: Any) -> ValueError:
        return ValueError(f"ModelConfig.{field}: {why} (got {got!r})")

    if not isinstance(rs, dict):
        raise bad('must be null or an object such as {"type": "yarn", "factor": 40}', rs)
    rs = dict(rs)
    kind = rs.pop("type", None) or rs.pop("rope_type", None)
    rs.pop("rope_type", None)
    rs.pop("rope_theta", None)
    if kind not in ("yarn", "default", None):
        raise ValueError(f"ModelConfig.{field}: only 'yarn' scaling is supported (got type {kind!r})")
    if kind in ("default", None):
        return {"type": "default"} if not rs else {"type": "default", **rs}

    def number(key: str, default: float, low: float, strict: bool) -> float:
        v = rs.get(key, default)
        if (not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v)
                or (v <= low if strict else v < low)):
            raise bad(f"yarn {key} must be a number {'>' if strict else '>='} {low:g}", v)
        return float(v)

    orig = rs.get("original_max_position_embeddings", 4096)
    if (not isinstance(orig, (int, float)) or isinstance(orig, bool) or not math.isfinite(orig)
            or orig != int(orig) or orig <= 0):
        raise bad("yarn original_max_position_embeddings must be a positive integer", orig)
    # beta_* are rotation counts under a logarithm and mscale_* scale a temperature of 1 + 0.1 * m * ln(s):
    # a zero beta or a negative mscale would only fail (or divide by zero) when the model is built
    return {"type": "yarn", "factor": number("factor", 1.0, 0, True),
            "beta_fast": number("beta_fast", 32, 0, True), "beta_slow": number("beta_slow", 1, 0, True),
            "mscale": number("mscale", 1.0, 0, False), "mscale_all_dim": number("mscale_all_dim", 0.0, 0, False),
            "original_max_position_embeddings": int(orig)}


# --- presets: a plain dict. `tiny` is the dataclass default.
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {},
    # ~53M total / ~24M active: MoE in 7 of 8 layers; benchmarks use it.
    "small": dict(vocab_size=8192, hidden_size=512, intermediate_size=1536, moe_intermediate_size=192,
                  num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=8, q_lora_rank=256,
                  kv_lora_rank=128, qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64,
                  n_routed_experts=16, n_shared_experts=1, num_experts_per_tok=2, n_group=4, topk_group=2,
                  first_k_dense_replace=1, max_position_embeddings=4096, routed_scaling_factor=2.5),
    "deepseek-v2-lite": dict(model_type="deepseek_v2", vocab_size=102400, hidden_size=2048,
                             intermediate_size=10944, moe_intermediate_size=1408, num_hidden_layers=27,
                             num_attention_heads=16, num_key_value_heads=16, q_lora_rank=None,
                             kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
                             n_routed_experts=64, n_shared_experts=2, num_experts_per_tok=6, n_group=1,
                             topk_group=1, topk_method="greedy", scoring_func="softmax", norm_topk_prob=False,
                             routed_scaling_factor=1.0, first_k_dense_replace=1, num_nextn_predict_layers=0,
                             max_position_embeddings=163840, bos_token_id=100000, eos_token_id=100001,
                             aux_loss_alpha=0.001, torch_dtype="bfloat16",
                             rope_scaling={"type": "yarn", "factor": 40, "beta_fast": 32, "beta_slow": 1,
                                           "mscale": 0.707, "mscale_all_dim": 0.707,
                                           "original_max_position_embeddings": 4096}),
    "deepseek-v3": dict(vocab_size=129280, hidden_size=7168, intermediate_size=18432, moe_intermediate_size=2048,
                        num_hidden_layers=61, num_attention_heads=128, num_key_value_heads=128, q_lora_rank=1536,
                        kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
                        n_routed_experts=256, n_shared_experts=1, num_experts_per_tok=8, n_group=8, topk_group=4,
                        routed_scaling_factor=2.5, first_k_dense_replace=3, num_nextn_predict_layers=1,
                        max_position_embeddings=163840, initializer_range=0.006, torch_dtype="bfloat16",
                        rope_scaling={"type": "yarn", "factor": 40, "beta_fast": 32, "beta_slow": 1,
                                      "mscale": 1.0, "mscale_all_dim": 1.0,
                                      "original_max_position_embeddings": 4096}),
}
PRESETS["deepseek-r1"] = PRESETS["deepseek-v3"]


def preset(name: str, **overrides: Any) -> ModelConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return ModelConfig(**{**PRESETS[name], **overrides})


__all__ = ["ModelConfig", "PRESETS", "preset", "yarn_get_mscale"]
