"""`nanoseek info` prints DeepSeek's published sizes (built on the meta device, so instant)."""

import json

import pytest

from nanoseek.__main__ import main
from nanoseek.commands.info import count_parameters_of
from nanoseek.model import ModelConfig, preset


def run(capsys, *argv):
    main(["info", *argv, "--json"])
    return json.loads(capsys.readouterr().out)


def test_deepseek_v3_published_sizes(capsys):
    d = run(capsys, "--preset", "deepseek-v3")
    assert 670e9 < d["total"] < 672e9            # "671B"
    assert 36.5e9 < d["active"] < 38e9           # "37B activated"
    assert 11e9 < d["mtp"] < 14.5e9              # "14B" MTP incl. its embedding/head copies (13.5B)
    assert d["kv_bytes_per_token_mla_bf16"] == 61 * 576 * 2   # 70,272 B
    assert d["kv_ratio"] > 50


def test_v2_lite_and_small(capsys):
    d = run(capsys, "--preset", "deepseek-v2-lite")
    assert 15.5e9 < d["total"] < 16.0e9 and 2.3e9 < d["active"] < 2.8e9   # "16B / 2.4B"
    s = run(capsys, "--preset", "small")
    assert 30e6 <= s["total"] <= 60e6 and s["moe_layers"] >= s["layers"] - 1


def test_model_dir(capsys, tmp_path):
    ModelConfig().save_json(tmp_path / "config.json")
    d = run(capsys, "--model", str(tmp_path))
    # against the module itself: every parameter outside MTP, and all but the idle experts' active
    import torch
    from nanoseek.model import Transformer
    with torch.device("meta"):
        model = Transformer(ModelConfig())
    cfg = model.config
    assert d["total"] == sum(p.numel() for n, p in model.named_parameters() if not n.startswith("mtp."))
    moe_layers = cfg.num_hidden_layers - cfg.first_k_dense_replace
    per_expert = 3 * cfg.hidden_size * cfg.moe_intermediate_size
    idle = moe_layers * (cfg.n_routed_experts - cfg.num_experts_per_tok) * per_expert
    assert d["active"] == d["total"] - idle


# --- counting without building the model, and bad --model values

@pytest.mark.parametrize("cfg", [
    ModelConfig(), preset("small"), preset("deepseek-v2-lite"),
    ModelConfig(num_hidden_layers=7, first_k_dense_replace=2, moe_layer_freq=2, num_nextn_predict_layers=3),
    ModelConfig(num_hidden_layers=4, first_k_dense_replace=4, num_nextn_predict_layers=2),   # MoE only in MTP
    ModelConfig(n_routed_experts=None, tie_word_embeddings=True, q_lora_rank=None, num_nextn_predict_layers=0),
    ModelConfig(n_shared_experts=0, first_k_dense_replace=0, attention_bias=True, qk_nope_head_dim=0),
], ids=["tiny", "small", "v2-lite", "freq2-mtp3", "dense-then-mtp-moe", "dense-tied", "all-moe-no-shared"])
def test_count_without_building_matches_the_model(cfg):
    import torch

    from nanoseek.model import Transformer, count_parameters
    with torch.device("meta"):
        model = Transformer(cfg)
    assert count_parameters_of(cfg) == count_parameters(model)


def test_absurd_layer_counts_answer_at_once(capsys, tmp_path):
    """info built the model layer by layer: 20000 layers took 29 s and 10^8 did not finish."""
    import time

    from nanoseek.commands.info import describe
    t = time.perf_counter()
    d = describe(ModelConfig(num_hidden_layers=20_000), "x")
    assert time.perf_counter() - t < 5 and d["moe_layers"] == 19_999
    one = describe(ModelConfig(num_hidden_layers=2), "x")
    big = describe(ModelConfig(num_hidden_layers=10**9, num_nextn_predict_layers=10**8), "x")
    per_moe_layer = d["total"] - describe(ModelConfig(num_hidden_layers=19_999), "x")["total"]
    assert big["total"] == one["total"] + (10**9 - 2) * per_moe_layer and big["moe_layers"] == 10**9 - 1
    assert big["mtp"] == 10**8 * one["mtp"]
    cfg = ModelConfig().to_hf_dict()
    for change, says in [({"hidden_size": 2**62}, "sizes too large to count: a tensor would take 2**63 bytes"),
                         ({"hidden_size": 10**30}, "ModelConfig.hidden_size is too large to count")]:
        (tmp_path / "config.json").write_text(json.dumps({**cfg, **change}))
        with pytest.raises(SystemExit) as e:
            main(["info", "--model", str(tmp_path)])
        assert str(e.value.code).startswith(f"nanoseek info: {tmp_path}: {says}") and "\n" not in str(e.value.code)


def test_model_path_forms_and_a_config_without_shapes(capsys, tmp_path, monkeypatch):
    """--model DIR, DIR/config.json and '' (the current folder) all read DIR/config.json (they looked for
    DIR/config.json/config.json and /config.json); a config.json without the shapes is refused as the checkpoint
    loader refuses it (it printed the tiny preset's sizes)."""
    ModelConfig(num_hidden_layers=5).save_json(tmp_path / "config.json")
    assert run(capsys, "--model", str(tmp_path / "config.json"))["layers"] == 5
    monkeypatch.chdir(tmp_path)
    assert run(capsys, "--model", "")["layers"] == 5
    for model, says in [(tmp_path / "none", f"--model {tmp_path / 'none'}: no such folder"),
                        (tmp_path / "sub", f"{tmp_path / 'sub'}: config.json is missing")]:
        (tmp_path / "sub").mkdir(exist_ok=True)
        with pytest.raises(SystemExit) as e:
            main(["info", "--model", str(model)])
        assert e.value.code == f"nanoseek info: {says}"
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(SystemExit) as e:
        main(["info", "--model", str(tmp_path)])
    assert e.value.code == (f"nanoseek info: {tmp_path / 'config.json'}: no vocab_size, hidden_size, "
                            "intermediate_size, num_hidden_layers, num_attention_heads, kv_lora_rank, qk_nope_head_dim, "
                            "qk_rope_head_dim, v_head_dim (not a DeepSeek V2/V3 config.json)")
