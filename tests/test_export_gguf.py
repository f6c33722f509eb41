"""GGUF export, checked by llama.cpp itself (llama-cpp-python): same greedy tokens, f32 logits within 1e-4.

Tiny random models (nonzero selection bias) in the configurations the exporter must get right:
V3 sigmoid routing with groups, no query compression with V2 softmax routing, YaRN both ways.
Configurations llama.cpp cannot represent must fail with a ValueError naming the field.
"""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from nanoseek.commands.export import main as export_main
from nanoseek.export import check_representable, export_gguf
from nanoseek.model import Transformer, preset
from nanoseek.tokenizer import Tokenizer

try:
    import llama_cpp
except ImportError:  # the `test` extra installs it; without it only the llama.cpp checks skip
    llama_cpp = None
needs_llama = pytest.mark.skipif(llama_cpp is None, reason="llama-cpp-python is not installed (pip install '.[test]')")

TEXT = ("The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs! "
        "How vexingly quick daft zebras jump; 12 + 34 = 46, and 1,000 is a thousand.\n") * 30
PROMPTS = [[5, 17, 200, 33, 90], [260, 4, 4, 411, 77, 13, 350, 12, 98, 101, 6, 500], [42]]
NEW_TOKENS = 8


def save_tokenizer(path: Path) -> Tokenizer:
    tok = Tokenizer.train([TEXT], vocab_size=320)                      # embedding rows 320..511 stay unused
    tok.save(path)
    return tok


def make_model_dir(path: Path, seed: int = 0, **overrides) -> Transformer:
    torch.manual_seed(seed)
    cfg = preset("tiny", **overrides)
    model = Transformer(cfg)
    # std 0.1 rather than 0.02: logits and router scores far enough apart that 1e-6 rounding flips nothing
    model.init_weights(std=0.1)
    with torch.no_grad():
        for block in model.layers:
            gate = getattr(block.ffn, "gate", None)
            if gate is not None and gate.bias is not None:
                gate.bias.normal_(0.0, 0.05)
    model.eval()
    model.save_pretrained(path)
    save_tokenizer(path)
    return model


@torch.inference_mode()
def nanoseek_greedy(model: Transformer, prompt: list[int], n: int) -> tuple[list[int], np.ndarray]:
    ids = list(prompt)
    for _ in range(n):
        ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    logits = model(torch.tensor([ids]))[0].float().numpy()           # (T, vocab), full forward
    return ids[len(prompt):], logits


def llama_greedy(llm, prompt: list[int], n: int) -> tuple[list[int], np.ndarray]:
    llm.reset()
    llm.eval(prompt)
    out = []
    for _ in range(n):
        tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        out.append(tok)
        llm.eval([tok])                                               # incremental decode with the KV cache
    return out, np.array(llm.scores[: llm.n_tokens])


def open_llama(path: Path):
    """llama.cpp without its "extra" CPU buffer types (`llama-cli --no-repack`): built on a CPU with
    AMX, it repacks f16 and q8_0 weights for AMX and then aborts on deepseek2's 3-D attn_k_b
    (GGML_ASSERT(*cur_backend_id != -1), llama-cpp-python 0.3.36; f32 and bf16 files load)."""
    lib = llama_cpp.llama_cpp
    default = lib.llama_model_default_params

    def without_extra_bufts():
        params = default()
        params.use_extra_bufts = False
        return params
    lib.llama_model_default_params = without_extra_bufts        # Llama() reads its model params here
    try:
        return llama_cpp.Llama(model_path=str(path), n_ctx=64, logits_all=True, type_k=0, type_v=0,
                               n_threads=1, verbose=False)
    finally:
        lib.llama_model_default_params = default


CONFIGS = {
    "v3-sigmoid-groups": {},   # tiny: q_lora 32, sigmoid + bias, 8 experts in 2 groups (top-1 group), MTP 1
    "v2-softmax-no-qlora": dict(model_type="deepseek_v2", q_lora_rank=None, scoring_func="softmax",
                                topk_method="greedy", norm_topk_prob=False, routed_scaling_factor=1.5,
                                num_nextn_predict_layers=0),
    "v3-yarn": dict(max_position_embeddings=1024,
                    rope_scaling={"type": "yarn", "factor": 4.0, "beta_fast": 32, "beta_slow": 1, "mscale": 1.0,
                                  "mscale_all_dim": 1.0, "original_max_position_embeddings": 256}),
    # V2-Lite's YaRN (mscale = mscale_all_dim = 0.707) with its softmax router and no query compression
    "v2-lite-yarn": dict(model_type="deepseek_v2", q_lora_rank=None, scoring_func="softmax", topk_method="greedy",
                         norm_topk_prob=False, routed_scaling_factor=1.0, num_nextn_predict_layers=0,
                         n_shared_experts=2, max_position_embeddings=1024,
                         rope_scaling={"type": "yarn", "factor": 8.0, "beta_fast": 32, "beta_slow": 1,
                                       "mscale": 0.707, "mscale_all_dim": 0.707,
                                       "original_max_position_embeddings": 128}),
    # YaRN without mscale_all_dim (HF's rule: cos/sin scaled, softmax scale untouched): a negative log multiplier
    "yarn-no-mscale-all-dim": dict(max_position_embeddings=1024,
                                   rope_scaling={"type": "yarn", "factor": 4.0,
                                                 "original_max_position_embeddings": 256}),
}


@needs_llama
@pytest.mark.parametrize("name", list(CONFIGS))
def test_llama_cpp_matches_nanoseek(tmp_path, name):
    model = make_model_dir(tmp_path / "hf", **CONFIGS[name])
    out = export_gguf(tmp_path / "hf", tmp_path / "model.gguf", dtype="f32", log=lambda s: None)
    llm = open_llama(out)
    try:
        worst = 0.0
        for prompt in PROMPTS:
            ours, ours_logits = nanoseek_greedy(model, prompt, NEW_TOKENS)
            theirs, their_logits = llama_greedy(llm, prompt, NEW_TOKENS)
            assert theirs == ours, f"{name}: greedy tokens differ for prompt {prompt}"
            assert their_logits.shape == ours_logits.shape
            worst = max(worst, float(np.abs(their_logits - ours_logits).max()))
        print(f"{name}: max |logit diff| llama.cpp vs nanoseek = {worst:.2e}")
        assert worst < 1e-4, f"{name}: logits differ by {worst:.2e}"
    finally:
        llm.close()


@needs_llama
def test_cli_export_tokenizer_and_chat_template(tmp_path):
    make_model_dir(tmp_path / "hf")
    tok = Tokenizer.from_dir(tmp_path / "hf")
    out = tmp_path / "cli.gguf"
    export_main(["--model", str(tmp_path / "hf"), "--format", "gguf", "--out", str(out)])
    llm = open_llama(out)
    try:
        for text in ("The quick brown fox jumps over the lazy dog.", "How vexingly quick daft zebras jump; 12 + 34 = 46"):
            assert llm.tokenize(text.encode(), add_bos=False) == tok.encode(text)
        assert (llm.token_bos(), llm.token_eos()) == (tok.bos_id, tok.eos_id)
        # the chat template travels in the file: llama.cpp's Jinja rendering gives render_chat's ids
        messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "12 + 34?"},
                    {"role": "assistant", "content": "46"}, {"role": "user", "content": "and 1,000?"}]
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        template = llm.metadata["tokenizer.chat_template"]
        prompt = Jinja2ChatFormatter(template, eos_token=tok.decode([tok.eos_id]),
                                     bos_token=tok.decode([tok.bos_id]))(messages=messages).prompt
        ids, _ = tok.render_chat(messages, add_generation_prompt=True)
        assert llm.tokenize(prompt.encode(), add_bos=False, special=True) == ids
    finally:
        llm.close()


@needs_llama
@pytest.mark.parametrize("dtype", ["bf16", "q8_0"])
def test_reduced_precision_exports_run(tmp_path, dtype):
    """bf16 / q8_0 load and decode in llama.cpp; the router stays f32 and q8_0 rows too short for a
    32-value block (the 16-wide attn_k_b here) fall back to f16. Logits are not compared: random routers
    flip experts under rounding."""
    make_model_dir(tmp_path / "hf")
    out = export_gguf(tmp_path / "hf", tmp_path / f"{dtype}.gguf", dtype=dtype, log=lambda s: None)
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(out).tensors}
    assert types["blk.1.ffn_gate_inp.weight"] == gguf.GGMLQuantizationType.F32
    assert types["blk.1.attn_norm.weight"] == gguf.GGMLQuantizationType.F32
    expect = gguf.GGMLQuantizationType.BF16 if dtype == "bf16" else gguf.GGMLQuantizationType.Q8_0
    assert types["blk.1.ffn_gate_exps.weight"] == expect
    if dtype == "q8_0":
        assert types["blk.1.attn_k_b.weight"] == gguf.GGMLQuantizationType.F16
    llm = open_llama(out)
    try:
        _, logits = llama_greedy(llm, PROMPTS[0], 4)
        assert np.isfinite(logits).all() and logits.std() > 0
    finally:
        llm.close()


def test_metadata_llama_cpp_needs(tmp_path):
    """Keys whose absence llama.cpp does not report but silently changes the model."""
    make_model_dir(tmp_path / "hf", q_lora_rank=None)
    out = export_gguf(tmp_path / "hf", tmp_path / "m.gguf", log=lambda s: None)
    fields = gguf.GGUFReader(out).fields
    val = lambda k: fields[k].contents()
    assert val("deepseek2.attention.q_lora_rank") == 0                       # else "key not found"
    assert val("deepseek2.expert_gating_func") == gguf.ExpertGatingFuncType.SIGMOID.value  # else softmax
    assert (val("deepseek2.expert_group_count"), val("deepseek2.expert_group_used_count")) == (2, 1)
    assert val("deepseek2.attention.key_length_mla") == 24 and val("deepseek2.attention.value_length_mla") == 16
    assert val("tokenizer.ggml.pre") == "gpt-2" and val("tokenizer.ggml.model") == "gpt2"
    names = {t.name for t in gguf.GGUFReader(out).tensors}
    assert "blk.0.attn_q.weight" in names and "blk.1.exp_probs_b.bias" in names
    assert not any("blk.3." in n for n in names)                              # the MTP layer is left out


@pytest.mark.parametrize("overrides, field", [
    (dict(attention_bias=True), "attention_bias"),
    (dict(model_type="deepseek_v2", scoring_func="softmax", topk_method="group_limited_greedy",
          n_routed_experts=8, n_group=4, topk_group=2, num_nextn_predict_layers=0), "topk_method"),
    (dict(rope_scaling={"type": "yarn", "factor": 4.0, "beta_fast": 16, "beta_slow": 1,
                        "original_max_position_embeddings": 256}), "rope_scaling"),
    (dict(num_hidden_layers=4, moe_layer_freq=2), "moe_layer_freq"),
    (dict(num_hidden_layers=27), "q_lora_rank"),
    (dict(routed_scaling_factor=0.0), "routed_scaling_factor"),
])
def test_unrepresentable_configs_are_refused(overrides, field):
    with pytest.raises(ValueError, match=rf"ModelConfig\.{field}"):
        check_representable(preset("tiny", **overrides))


def test_representable_edge_cases_pass():
    check_representable(preset("tiny", num_hidden_layers=27, q_lora_rank=None))        # V2-Lite's shape
    check_representable(preset("tiny", n_group=4, topk_group=4))                       # groups keep everything
    check_representable(preset("tiny", model_type="deepseek_v2", scoring_func="softmax", topk_method="greedy",
                               n_group=4, topk_group=2, num_nextn_predict_layers=0))   # greedy ignores groups


def test_bad_tokenizer_is_refused_before_writing(tmp_path):
    make_model_dir(tmp_path / "hf")
    path = tmp_path / "hf" / "tokenizer.json"
    tok = json.loads(path.read_text())
    tok["pre_tokenizer"] = {"type": "Whitespace"}
    path.write_text(json.dumps(tok))
    out = tmp_path / "m.gguf"
    with pytest.raises(ValueError, match="pre_tokenizer"):
        export_gguf(tmp_path / "hf", out, log=lambda s: None)
    assert not out.exists() and not out.with_name("m.gguf.tmp").exists()
    tok["pre_tokenizer"] = {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True}
    tok["model"]["merges"] = []
    path.write_text(json.dumps(tok))
    with pytest.raises(ValueError, match="merges"):
        export_gguf(tmp_path / "hf", out, log=lambda s: None)
    path.unlink()
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        export_gguf(tmp_path / "hf", out, log=lambda s: None)


def test_export_names_a_tokenizer_file_of_another_shape(tmp_path):
    make_model_dir(tmp_path / "hf")
    tok_path, cfg_path = tmp_path / "hf" / "tokenizer.json", tmp_path / "hf" / "tokenizer_config.json"
    good = json.loads(tok_path.read_text())
    for damage in ({"model": "x"}, {"model": {**good["model"], "vocab": [1, 2]}}, {"added_tokens": [{"content": "a"}]}):
        tok_path.write_text(json.dumps({**good, **damage}))
        with pytest.raises(SystemExit, match="is not shaped as the tokenizers library writes it"):
            export_main(["--model", str(tmp_path / "hf"), "--out", str(tmp_path / "m.gguf")])
    tok_path.write_text(json.dumps(good))
    cfg_path.write_text("{not json")
    with pytest.raises(SystemExit, match="tokenizer_config.json: not valid JSON"):
        export_main(["--model", str(tmp_path / "hf"), "--out", str(tmp_path / "m.gguf")])
    (tmp_path / "hf" / "config.json").write_text("{}")      # read as the loader reads it: shapes are required
    with pytest.raises(SystemExit, match=r"config.json: no vocab_size, hidden_size"):
        export_main(["--model", str(tmp_path / "hf"), "--out", str(tmp_path / "m.gguf")])
    assert not (tmp_path / "m.gguf").exists()


def test_export_never_overwrites_the_model_and_asks_before_replacing(tmp_path):
    make_model_dir(tmp_path / "hf")
    weights = tmp_path / "hf" / "model.safetensors"
    before = weights.read_bytes()
    with pytest.raises(SystemExit, match="the model's own files use"):     # not even with --force
        export_main(["--model", str(tmp_path / "hf"), "--out", str(weights), "--force"])
    assert weights.read_bytes() == before
    # nor a name the loader would read there later (the index of sharded weights)
    index = tmp_path / "hf" / "model.safetensors.index.json"
    with pytest.raises(SystemExit, match="the model's own files use"):
        export_main(["--model", str(tmp_path / "hf"), "--out", str(index)])
    assert not index.exists()
    # a file beside --out named as the temporary file used to be is left alone
    (tmp_path / "keep.gguf.tmp").write_text("mine")
    export_gguf(tmp_path / "hf", tmp_path / "keep.gguf", log=lambda s: None)
    assert (tmp_path / "keep.gguf.tmp").read_text() == "mine"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("keep.gguf.") and p.name != "keep.gguf.tmp"]
    with pytest.raises(SystemExit, match="is a file, not a folder"):
        export_main(["--model", str(tmp_path / "hf"), "--out", str(tmp_path / "keep.gguf" / "x.gguf")])
    with pytest.raises(SystemExit, match="is a directory"):
        export_main(["--model", str(tmp_path / "hf"), "--out", str(tmp_path)])
    out = export_gguf(tmp_path / "hf", tmp_path / "m.gguf", log=lambda s: None)
    first = out.read_bytes()
    with pytest.raises(SystemExit, match="--force"):
        export_main(["--model", str(tmp_path / "hf"), "--out", str(out), "--dtype", "f16"])
    assert out.read_bytes() == first
    export_main(["--model", str(tmp_path / "hf"), "--out", str(out), "--dtype", "f16", "--force"])
    assert gguf.GGUFReader(out).fields["general.file_type"].parts[-1][0] == gguf.LlamaFileType.MOSTLY_F16
