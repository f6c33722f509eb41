"""Parity with transformers' DeepseekV3/V2 (built offline from configs, nothing downloaded):
HF model -> save_pretrained -> nanoseek from_pretrained gives the same fp32 logits, and back."""

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import DeepseekV2Config, DeepseekV2ForCausalLM, DeepseekV3Config, DeepseekV3ForCausalLM  # noqa: E402

from nanoseek.model import ModelConfig, Transformer  # noqa: E402

YARN = {"type": "yarn", "factor": 4.0, "beta_fast": 32, "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707,
        "original_max_position_embeddings": 512}
V3_CASES = {
    "base": {},
    "no_q_lora": dict(q_lora_rank=None),
    "groups_4_keep_2": dict(n_routed_experts=16, n_group=4, topk_group=2, num_experts_per_tok=3),
    # HF recomputes factor = max_position_embeddings / original when both are given: keep them consistent
    "yarn": dict(rope_scaling=YARN, max_position_embeddings=2048),
    "no_norm_topk": dict(norm_topk_prob=False),
    "dense_first_2": dict(num_hidden_layers=4, first_k_dense_replace=2),
}
V2_CASES = {
    "v2_group_limited": dict(n_group=2, topk_group=1, topk_method="group_limited_greedy", q_lora_rank=None),
    "v2_greedy_yarn": dict(n_group=1, topk_group=1, topk_method="greedy", rope_scaling=YARN,
                           max_position_embeddings=2048),
}


def hf_model(cfg: ModelConfig, seed: int = 0, bias_std: float = 0.05):
    torch.manual_seed(seed)
    d = cfg.to_hf_dict()
    if cfg.model_type == "deepseek_v2":
        model = DeepseekV2ForCausalLM(DeepseekV2Config(**d))
    else:
        model = DeepseekV3ForCausalLM(DeepseekV3Config(**d))
    with torch.no_grad():
        for p in model.parameters():  # move every tensor off its init value so a wrong mapping shows
            p.add_(torch.randn_like(p) * 0.05)
        for m in model.modules():
            if hasattr(m, "e_score_correction_bias"):
                m.e_score_correction_bias.copy_(torch.randn_like(m.e_score_correction_bias) * bias_std)
    return model.eval()


def v2_config(**kw) -> ModelConfig:
    return ModelConfig(model_type="deepseek_v2", scoring_func="softmax", norm_topk_prob=False,
                       routed_scaling_factor=1.0, num_nextn_predict_layers=0, **kw)


def compare(hf, ours, vocab, T=24):
    ids = torch.randint(0, vocab, (2, T))
    with torch.no_grad():
        return (hf(ids).logits - ours(ids)).abs().max().item()


@pytest.mark.parametrize("case", sorted(V3_CASES))
def test_v3_logits_match_transformers(case, tmp_path):
    cfg = ModelConfig(**V3_CASES[case])
    hf = hf_model(cfg)
    hf.save_pretrained(tmp_path)
    with pytest.warns(UserWarning, match="no MTP weights"):  # transformers drops the MTP layer
        ours = Transformer.from_pretrained(tmp_path)
    assert ours.config.first_k_dense_replace == cfg.first_k_dense_replace
    assert compare(hf, ours, cfg.vocab_size) <= 1e-4


@pytest.mark.parametrize("case", sorted(V2_CASES))
def test_v2_logits_match_transformers(case, tmp_path):
    cfg = v2_config(**V2_CASES[case])
    hf = hf_model(cfg)
    hf.save_pretrained(tmp_path)
    ours = Transformer.from_pretrained(tmp_path)
    assert ours.config.model_type == "deepseek_v2" and ours.config.scoring_func == "softmax"
    assert compare(hf, ours, cfg.vocab_size) <= 1e-4


@pytest.mark.parametrize("cfg", [ModelConfig(), ModelConfig(q_lora_rank=None, rope_scaling=YARN,
                                                              max_position_embeddings=2048)])
def test_nanoseek_save_loads_in_transformers(cfg, tmp_path):
    torch.manual_seed(1)
    ours = Transformer(cfg)
    ours.init_weights(0.05)
    for g in (b.ffn.gate for b in ours.layers if hasattr(b.ffn, "gate")):
        g.bias.normal_(0, 0.05)
    ours.eval().save_pretrained(tmp_path)
    hf = DeepseekV3ForCausalLM.from_pretrained(tmp_path).eval()
    assert compare(hf, ours, cfg.vocab_size) <= 1e-4
    # and nanoseek reads its own output back with the MTP layer kept
    again = Transformer.from_pretrained(tmp_path)
    for (n, a), (_, b) in zip(ours.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), n


def test_group_mask_is_neg_inf_as_in_the_reference(tmp_path):
    """DeepSeek's reference masks losing groups with -inf. Older transformers (and its V2 gate today)
    used 0.0, which lets an expert of a losing group win once biased scores are negative.
    transformers 5.23's V3 gate uses -inf: with every biased score < 0 both agree, and a 0.0 mask
    would have chosen differently."""
    cfg = ModelConfig(n_routed_experts=16, n_group=4, topk_group=1, num_experts_per_tok=2)
    hf = hf_model(cfg, bias_std=0.0)
    with torch.no_grad():
        for m in hf.modules():
            if hasattr(m, "e_score_correction_bias"):
                m.e_score_correction_bias.fill_(-2.0)  # every biased score < 0
    hf.save_pretrained(tmp_path)
    with pytest.warns(UserWarning):
        ours = Transformer.from_pretrained(tmp_path)
    assert compare(hf, ours, cfg.vocab_size) <= 1e-4
    gate = ours.layers[1].ffn.gate
    x = torch.randn(128, cfg.hidden_size)
    r = gate(x)
    groups = r.indices // 4
    assert (groups == groups[:, :1]).all()   # both experts from the single winning group
    # the 0.0-mask variant picks experts outside the winning group
    biased = (r.scores + gate.bias).view(128, 4, 4)
    keep = biased.topk(2, -1).values.sum(-1).topk(1, -1).indices
    lose = torch.ones(128, 4, dtype=torch.bool).scatter_(1, keep, False)
    zero_masked = biased.masked_fill(lose[..., None], 0.0).flatten(1).topk(2, -1).indices
    assert ((zero_masked // 4) != keep).any()
