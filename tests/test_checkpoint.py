"""HF directory round trips, the name-mapping table, FP8 block dequantization and clear load errors."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from nanoseek.checkpoint import CheckpointError, dequant_fp8, hf_to_nanoseek, nanoseek_to_hf
from nanoseek.model import ModelConfig, Transformer


def tiny(seed=0, **kw) -> Transformer:
    torch.manual_seed(seed)
    m = Transformer(ModelConfig(**kw))
    m.init_weights(0.05)
    return m.eval()


def test_mapping_table_round_trip():
    for kw in ({}, dict(q_lora_rank=None), dict(num_nextn_predict_layers=2, first_k_dense_replace=2)):
        m = tiny(**kw)
        names = [n for n, _ in m.named_parameters()] + [n for n, _ in m.named_buffers() if n.endswith("gate.bias")]
        for name in names:
            n_exp = m.config.n_routed_experts if ".experts." in name else 0
            hf_names = nanoseek_to_hf(name, m.config, n_exp)
            for j, hf in enumerate(hf_names):
                back, idx = hf_to_nanoseek(hf, m.config)
                assert back == name and idx == (j if n_exp else None), (name, hf)


def test_hf_names_are_the_official_ones(tmp_path):
    m = tiny()
    m.save_pretrained(tmp_path)
    keys = set(load_file(tmp_path / "model.safetensors"))
    assert "model.layers.1.mlp.experts.7.down_proj.weight" in keys
    assert "model.layers.1.mlp.gate.e_score_correction_bias" in keys
    assert "model.layers.0.self_attn.kv_a_proj_with_mqa.weight" in keys
    # MTP at model.layers.{num_hidden_layers}, with the official shared copies
    assert {"model.layers.3.eh_proj.weight", "model.layers.3.enorm.weight", "model.layers.3.hnorm.weight",
            "model.layers.3.shared_head.norm.weight", "model.layers.3.shared_head.head.weight",
            "model.layers.3.embed_tokens.weight"} <= keys
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["rope_scaling"] is None and cfg["rope_parameters"]["rope_type"] == "default"
    assert cfg["architectures"] == ["DeepseekV3ForCausalLM"] and cfg["num_nextn_predict_layers"] == 1


def test_sharded_round_trip_keeps_mtp_and_other_files(tmp_path):
    m = tiny()
    (tmp_path / "tokenizer.json").parent.mkdir(exist_ok=True)
    m.save_pretrained(tmp_path, max_shard_bytes=200_000)
    (tmp_path / "tokenizer.json").write_text("{}")
    m.save_pretrained(tmp_path, max_shard_bytes=200_000)          # overwrite in place
    assert (tmp_path / "tokenizer.json").read_text() == "{}"
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    again = Transformer.from_pretrained(tmp_path)
    ids = torch.randint(0, 512, (2, 9))
    with torch.no_grad():
        a, b = m(ids, return_mtp=True), again(ids, return_mtp=True)
    assert torch.equal(a["logits"], b["logits"]) and torch.equal(a["mtp_logits"][0], b["mtp_logits"][0])


def test_bf16_load_keeps_selection_bias_fp32(tmp_path):
    tiny().save_pretrained(tmp_path)
    m = Transformer.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert m.embed.weight.dtype == torch.bfloat16
    assert m.layers[1].ffn.gate.bias.dtype == torch.float32


# --- FP8
def quantize_fp8(w: torch.Tensor, block: int = 128):
    M, N = w.shape
    R, C = -(-M // block), -(-N // block)
    scale = torch.empty(R, C)
    q = torch.empty(M, N, dtype=torch.float8_e4m3fn)
    for r in range(R):
        for c in range(C):
            blk = w[r * block:(r + 1) * block, c * block:(c + 1) * block]
            s = blk.abs().max().clamp(min=1e-12) / 448.0
            scale[r, c] = s
            q[r * block:(r + 1) * block, c * block:(c + 1) * block] = (blk / s).to(torch.float8_e4m3fn)
    return q, scale


def test_fp8_dequant_matches_block_rule():
    torch.manual_seed(0)
    w = torch.randn(300, 200) * 3
    q, s = quantize_fp8(w)
    got = dequant_fp8(q, s, (128, 128), torch.float32)
    # direct reimplementation: element (i, j) times scale_inv[i // 128, j // 128]
    i = torch.arange(300)[:, None] // 128
    j = torch.arange(200)[None, :] // 128
    want = q.float() * s[i, j]
    assert torch.equal(got, want)
    assert (got - w).abs().max() < 0.1 * w.abs().max()  # e4m3 keeps ~2 significant digits
    with pytest.raises(CheckpointError, match="scale_inv"):
        dequant_fp8(q, s[:1], (128, 128))


def test_fp8_checkpoint_loads_dequantized(tmp_path):
    m = tiny(hidden_size=128, q_lora_rank=128, kv_lora_rank=128)
    m.save_pretrained(tmp_path)
    sd = load_file(tmp_path / "model.safetensors")
    name = "model.layers.0.self_attn.q_b_proj.weight"
    q, s = quantize_fp8(sd[name])
    sd[name], sd[name + "_scale_inv"] = q, s
    save_file(sd, tmp_path / "model.safetensors")
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                  "weight_block_size": [128, 128]}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    loaded = Transformer.from_pretrained(tmp_path)
    assert torch.equal(loaded.layers[0].attn.wq_b.weight, dequant_fp8(q, s, (128, 128), torch.float32))
    # the scales in another shard than their weight, as the index says: found there
    scales = {name + "_scale_inv": sd.pop(name + "_scale_inv")}
    save_file(sd, tmp_path / "model-00001-of-00002.safetensors")
    save_file(scales, tmp_path / "model-00002-of-00002.safetensors")
    (tmp_path / "model.safetensors").unlink()
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        **dict.fromkeys(sd, "model-00001-of-00002.safetensors"), **dict.fromkeys(scales, "model-00002-of-00002.safetensors")}}))
    split = Transformer.from_pretrained(tmp_path)
    assert torch.equal(split.layers[0].attn.wq_b.weight, loaded.layers[0].attn.wq_b.weight)


# --- errors name the tensor or file
def test_missing_unexpected_misshaped_truncated(tmp_path):
    m = tiny()
    m.save_pretrained(tmp_path)
    f = tmp_path / "model.safetensors"
    good = load_file(f)

    sd = dict(good)
    del sd["model.layers.2.self_attn.kv_b_proj.weight"]
    save_file(sd, f)
    with pytest.raises(CheckpointError, match="kv_b_proj"):
        Transformer.from_pretrained(tmp_path)

    sd = dict(good)
    sd["model.layers.0.mlp.mystery.weight"] = torch.zeros(2)
    save_file(sd, f)
    with pytest.raises(CheckpointError, match="mystery"):
        Transformer.from_pretrained(tmp_path)

    sd = dict(good)
    sd["model.norm.weight"] = torch.ones(65)
    save_file(sd, f)
    with pytest.raises(CheckpointError, match=r"model\.norm\.weight.*\(65,\)"):
        Transformer.from_pretrained(tmp_path)

    save_file(good, f)
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        Transformer.from_pretrained(tmp_path)


def test_bad_config_and_missing_shard(tmp_path):
    m = tiny()
    m.save_pretrained(tmp_path, max_shard_bytes=200_000)
    shards = sorted(tmp_path.glob("model-*.safetensors"))
    shards[-1].unlink()
    with pytest.raises(CheckpointError, match=shards[-1].name):
        Transformer.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="config.json"):
        Transformer.from_pretrained(tmp_path)
    good = m.config.to_hf_dict()
    (tmp_path / "config.json").write_text(json.dumps({**good, "n_routed_experts": 6, "n_group": 4}))
    with pytest.raises(ValueError, match="n_group"):
        Transformer.from_pretrained(tmp_path)
    # a config.json without the shapes: named, not left to defaults that mismatch the weights later
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="no vocab_size, hidden_size, .*v_head_dim"):
        Transformer.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({k: v for k, v in good.items() if k != "vocab_size"}))
    with pytest.raises(CheckpointError, match=r"config.json: no vocab_size \(not a DeepSeek"):
        Transformer.from_pretrained(tmp_path)


def test_nothing_is_unpickled(tmp_path):
    """A pickle-based checkpoint is refused rather than loaded."""
    m = tiny()
    m.save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    torch.save(m.state_dict(), tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        Transformer.from_pretrained(tmp_path)


def test_more_experts_than_the_config_is_a_checkpoint_error(tmp_path):
    """A config.json edited to fewer routed experts than the weights hold: CheckpointError naming the expert
    (it was an IndexError)."""
    m = tiny()
    m.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["n_routed_experts"] = cfg["n_routed_experts"] // 2
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="expert .* is beyond the config's"):
        Transformer.from_pretrained(tmp_path)


def test_a_json_file_that_cannot_be_read_names_the_file(tmp_path):
    """An unreadable config.json (a folder, a link to /proc/1/mem: PermissionError even as root) was an OSError
    traceback; a JSON file nested past Python's recursion limit was a RecursionError."""
    import os

    from nanoseek.common import read_json_object

    (tmp_path / "config.json").mkdir()
    with pytest.raises(CheckpointError, match=r"config\.json: cannot read \("):
        Transformer.from_pretrained(tmp_path)
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(ValueError, match=r"deep\.json: not valid JSON \(nested too deeply\)"):
        read_json_object(deep)
    if os.path.exists("/proc/1/mem"):
        (tmp_path / "mem.json").symlink_to("/proc/1/mem")
        with pytest.raises(ValueError, match=r"mem\.json: cannot read \("):
            read_json_object(tmp_path / "mem.json")
    with pytest.raises(FileNotFoundError):        # a missing file stays FileNotFoundError, as documented
        read_json_object(tmp_path / "none.json")


def test_malformed_index_names_the_file(tmp_path):
    """model.safetensors.index.json must be an object with a weight_map of tensor name -> file name: [1] and
    {"weight_map": {"a": 5}} were TypeErrors, a non-UTF-8 index a message naming no file."""
    tiny().save_pretrained(tmp_path, max_shard_bytes=200_000)
    index = tmp_path / "model.safetensors.index.json"
    for data, says in [(b"[1]", "expected a JSON object"),
                       (b'{"weight_map": [1]}', 'no "weight_map" object'),
                       (b'{"metadata": {}}', 'no "weight_map" object'),
                       (b'{"weight_map": {"a": 5}}', r"weight_map\['a'\] is 5, not a file name"),
                       (b'{"weight_map": {"a": null}}', r"weight_map\['a'\] is None, not a file name"),
                       (b'{"weight_map": {"a": "../x.safetensors"}}', r"is '../x.safetensors', not a file name in"),
                       (b'{"weight_map": {"a": "/etc/x.safetensors"}}', r"is '/etc/x.safetensors', not a file name"),
                       (b'{"weight_map": {"a": "\xff"}}', "not valid JSON")]:
        index.write_bytes(data)
        with pytest.raises(CheckpointError, match=r"model\.safetensors\.index\.json: .*" + says):
            Transformer.from_pretrained(tmp_path)


def test_quantization_config_and_dtype_of_the_wrong_kind_name_the_file(tmp_path):
    """They were TypeError / AttributeError tracebacks ("torch_dtype": [1] an unhashable key, a
    quantization_config of 5 has no .get); weight_block_size [0, 0] would divide by zero on an FP8 tensor."""
    tiny().save_pretrained(tmp_path)
    good = json.loads((tmp_path / "config.json").read_text())
    for extra, says in [({"torch_dtype": [1]}, "torch_dtype must be a name"),
                        ({"torch_dtype": None, "dtype": {}}, "dtype must be a name"),
                        ({"quantization_config": 5}, "quantization_config must be an object"),
                        ({"quantization_config": {"weight_block_size": 5}}, "weight_block_size must be two positive"),
                        ({"quantization_config": {"weight_block_size": [0, 0]}}, "weight_block_size must be two"),
                        ({"quantization_config": {"weight_block_size": [128, True]}}, "weight_block_size must be")]:
        (tmp_path / "config.json").write_text(json.dumps({**good, **extra}))
        with pytest.raises(CheckpointError, match=r"config\.json: .*" + says):
            Transformer.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**good, "quantization_config": {"weight_block_size": None}}))
    Transformer.from_pretrained(tmp_path)          # null (was a TypeError too): the default 128 x 128


def test_tied_embeddings_with_mtp_save_and_reload(tmp_path):
    """The MTP layer repeats the shared embedding and head: with tie_word_embeddings the head is the embedding
    (named once among the parameters), and saving one such model was a KeyError after its training."""
    torch.manual_seed(0)
    m = Transformer(ModelConfig(tie_word_embeddings=True, num_nextn_predict_layers=1))
    m.init_weights()
    m.save_pretrained(tmp_path)
    back = Transformer.from_pretrained(tmp_path)
    x = torch.randint(0, 512, (2, 9))
    with torch.no_grad():
        assert torch.equal(m(x), back(x))
        assert torch.equal(m(x, return_mtp=True)["mtp_logits"][0], back(x, return_mtp=True)["mtp_logits"][0])


def test_config_with_rotate_half_rope_is_refused_and_a_bare_model_is_finite():
    with pytest.raises(ValueError, match="rope_interleave: false"):
        ModelConfig.from_dict({**ModelConfig().to_hf_dict(), "rope_interleave": False})
    bare = Transformer(ModelConfig())        # before init_weights: no uninitialized memory in the experts or gate
    assert all(torch.isfinite(p).all() for p in bare.parameters())
