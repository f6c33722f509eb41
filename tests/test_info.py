"""`nanoseek info` prints DeepSeek's published sizes (built on the meta device, so instant)."""

import json

from nanoseek.__main__ import main


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
    from nanoseek.model import ModelConfig
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
