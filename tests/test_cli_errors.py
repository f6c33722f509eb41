"""Bad command-line values and damaged files give one line from `nanoseek`, not a traceback, and
nothing is loaded or written first."""

from __future__ import annotations

import pytest
import torch

from nanoseek.__main__ import main as nanoseek
from nanoseek.common import UsageError, pick_device, pick_dtype
from nanoseek.infer.engine import Engine, SamplingParams
from nanoseek.model import Transformer, preset
from nanoseek.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("model")
    tok = Tokenizer.train([f"hello world {i}" for i in range(200)], vocab_size=300)
    model = Transformer(preset("tiny", vocab_size=tok.vocab_size))
    model.init_weights()
    model.save_pretrained(d)
    tok.save(d)
    return d


def one_line(excinfo, start: str) -> str:
    msg = str(excinfo.value.code)
    assert msg.startswith(start) and "\n" not in msg, msg
    return msg


def test_device_and_dtype_values():
    with pytest.raises(UsageError, match="not a device"):
        pick_device("foo")
    if not torch.cuda.is_available():
        with pytest.raises(UsageError, match="no CUDA device"):
            pick_device("cuda")
    with pytest.raises(UsageError, match="unknown dtype"):
        pick_dtype("int8")
    assert pick_device("cpu").type == "cpu" and pick_dtype("bf16") == torch.bfloat16


def test_generate_into_a_pipe_closed_early_stops_quietly(model_dir):
    """`nanoseek generate ... | head -c 1`: exit status 141 (as cat's), no traceback, and no abort of the
    engine's thread cut off at exit (it was "terminate called without an active exception", status 134)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    proc = subprocess.Popen([sys.executable, "-m", "nanoseek", "generate", "--model", str(model_dir), "--prompt",
                             "hello", "--max-tokens", "1500", "--ignore-eos", "--device", "cpu"], cwd=repo,
                            env={**os.environ, "PYTHONPATH": str(repo)}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    assert proc.stdout.read(1)
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141, err
    assert "Traceback" not in err and "terminate called" not in err, err


def test_generate_prompt_that_is_not_utf8(model_dir):
    with pytest.raises(SystemExit) as e:      # argv bytes the locale cannot decode arrive as surrogate escapes
        nanoseek(["generate", "--model", str(model_dir), "--prompt", "ab\udcffcd", "--device", "cpu"])
    assert "--prompt is not valid UTF-8" in one_line(e, "nanoseek generate: ")


def test_export_without_the_gguf_package_says_how_to_install_it():
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    code = ("import sys; sys.modules['gguf'] = None\n"        # as if the export extra were not installed
            "from nanoseek.__main__ import main\n"
            "try:\n    main(['--help'])\nexcept SystemExit as e:\n    assert e.code == 0\n"
            "main(['export', '--model', 'm', '--out', 'x.gguf'])")
    proc = subprocess.run([sys.executable, "-c", code], cwd=repo, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "export" in proc.stdout, proc.stderr
    assert proc.stderr.strip() == "nanoseek export: needs the gguf package: .venv/bin/pip install -e '.[export]'"


def test_ctrl_c_is_one_line_with_status_130(monkeypatch, capsys):
    import nanoseek.commands.info as info

    def interrupted(argv):
        raise KeyboardInterrupt

    monkeypatch.setattr(info, "main", interrupted)
    with pytest.raises(SystemExit) as e:
        nanoseek(["info", "--preset", "tiny"])
    assert e.value.code == 130 and capsys.readouterr().err == "\nnanoseek info: interrupted\n"


@pytest.mark.parametrize("flags, says", [(["--device", "foo"], "--device 'foo'"), (["--dtype", "int8"], "unknown dtype")])
def test_generate_bad_flags_are_one_line(model_dir, flags, says):
    with pytest.raises(SystemExit) as e:
        nanoseek(["generate", "--model", str(model_dir), "--prompt", "hi", *flags])
    assert says in one_line(e, "nanoseek generate: ")


def test_generate_tokenizer_that_is_not_the_models(model_dir, tmp_path):
    import shutil

    other = tmp_path / "m"
    shutil.copytree(model_dir, other)
    Tokenizer.train([f"quite another text {i} {chr(97 + i % 26)}" * 3 for i in range(400)],
                    vocab_size=400).save(other)
    with pytest.raises(SystemExit) as e:
        nanoseek(["generate", "--model", str(other), "--prompt", "hi", "--device", "cpu"])
    assert "do not belong together" in one_line(e, "nanoseek generate: ")
    (other / "tokenizer.json").unlink()
    with pytest.raises(SystemExit) as e:
        nanoseek(["generate", "--model", str(other), "--prompt-ids", "0,5", "--stop", "x", "--device", "cpu"])
    assert "--stop strings cannot be matched" in one_line(e, "nanoseek generate: ")


def test_generate_empty_prompt_ids(model_dir):
    with pytest.raises(SystemExit) as e:
        nanoseek(["generate", "--model", str(model_dir), "--prompt-ids", ""])
    one_line(e, "nanoseek generate: --prompt-ids")


@pytest.mark.parametrize("flags", [["--temperature", "-1"], ["--max-tokens", "0"], ["--top-p", "2"], ["--seed", str(2**64)]])
def test_chat_checks_its_sampling_options_before_loading(tmp_path, flags):
    # the model directory does not even exist: the options are refused first
    with pytest.raises(SystemExit) as e:
        nanoseek(["chat", "--model", str(tmp_path / "none"), *flags])
    assert "SamplingParams" in one_line(e, "nanoseek chat: ")


def test_damaged_tokenizer_is_one_line_everywhere(model_dir, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in model_dir.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    (bad / "tokenizer.json").write_text("garbage")
    with pytest.raises(ValueError, match="not a tokenizer file"):
        Tokenizer.from_dir(bad)
    for cmd in (["generate", "--prompt", "hi"], ["serve"]):
        with pytest.raises(SystemExit) as e:
            nanoseek([cmd[0], "--model", str(bad), *cmd[1:]])
        assert "not a tokenizer file" in one_line(e, f"nanoseek {cmd[0]}: ")


def test_serve_context_window_flag(model_dir):
    for value, says in (("0", "must be >= 2"), ("100000", "max_position_embeddings")):
        with pytest.raises(SystemExit) as e:
            nanoseek(["serve", "--model", str(model_dir), "--max-seq-len", value])
        assert says in one_line(e, "nanoseek serve: ")


def test_serve_address_and_key_flags_are_one_line(model_dir):
    """An empty --api-key (no authentication) or --host (every address), a port in use and a host that does
    not resolve: one line before the model loads (uvicorn printed its log lines after a serving banner)."""
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = str(busy.getsockname()[1])
        for flags, says in ((["--port", port], f"cannot listen on 127.0.0.1:{port}"),
                            (["--host", "999.1.1.1"], "--host '999.1.1.1' does not resolve"),
                            (["--api-key", " "], "--api-key is empty"), (["--host", ""], "--host is empty")):
            with pytest.raises(SystemExit) as e:
                nanoseek(["serve", "--model", str(model_dir), *flags])
            assert says in one_line(e, "nanoseek serve: "), flags


def test_engine_and_sampling_ranges(model_dir):
    model = Transformer.from_pretrained(model_dir)
    with pytest.raises(ValueError, match="at least 2 positions"):
        Engine(model, None, max_seq_len=1)
    with pytest.raises(ValueError, match="seed"):
        SamplingParams(seed=2**64).validate()
    SamplingParams(seed=2**64 - 1).validate()
    SamplingParams(seed=-2**63).validate()


@pytest.mark.parametrize("cmd, flags, says", [
    ("eval", ["--batch", "0"], "--batch must be >= 1"),                      # used to hang
    ("eval", ["--temperature", "-1", "--k", "2"], "temperature"),
    ("distill", ["--batch", "0"], "--batch must be >= 1"),
    ("distill", ["--lr=-1"], "--lr must be a number > 0"),
    ("distill", ["--max-new-tokens", "0"], "max_tokens"),
    ("grpo", ["--group-size", "1"], "--group-size must be >= 2"),
    ("grpo", ["--lr", "nan"], "--lr must be a number > 0"),
    ("grpo", ["--temperature=-1"], "temperature"),
    ("grpo", ["--top-k=-5"], "top_k"),
    ("grpo", ["--eps-low", "1.5"], "--eps-low must be in [0, 1)"),
    ("grpo", ["--micro-batch", "3"], "whole groups"),
    ("grpo", ["--eval-problems=-3"], "--eval-problems must be a number >= 0"),
    ("grpo", ["--micro-batch=-2"], "--micro-batch must be a number >= 0"),
    ("grpo", ["--temperature", "inf"], "temperature"),
    ("grpo", ["--max-new-tokens", "100000"], "max_position_embeddings (2048)"),
    ("eval", ["--max-new-tokens", "100000"], "max_position_embeddings (2048)"),
    ("eval", ["--samples", "0"], "--samples >= --k"),
    ("distill", ["--seq-len", "100000"], "max_position_embeddings 2048"),
    ("distill", ["--max-new-tokens", "100000"], "max_position_embeddings (2048)"),
    ("sft", ["--val-frac", "1"], "--val-frac must be in [0, 1)"),
    ("sft", ["--weight-decay=-1"], "--weight-decay"),
    ("sft", ["--n", "0"], "--n must be >= 1"),
])
def test_training_commands_check_values_before_writing(model_dir, tmp_path, cmd, flags, says):
    out = tmp_path / "run"
    base = {"eval": ["--model", str(model_dir), "--task", "arithmetic"],
            "distill": ["--teacher", str(model_dir), "--student", str(model_dir), "--task", "arithmetic"],
            "grpo": ["--model", str(model_dir), "--task", "arithmetic"],
            "sft": ["--model", str(model_dir), "--task", "arithmetic"]}[cmd]
    with pytest.raises(SystemExit) as e:
        nanoseek([cmd, *base, *flags, "--out", str(out / "e.json" if cmd == "eval" else out)])
    assert says in one_line(e, f"nanoseek {cmd}: ")
    assert not out.exists()


@pytest.mark.parametrize("cmd", ["grpo", "distill", "eval"])
def test_out_under_a_file_is_one_line(model_dir, tmp_path, cmd):
    (tmp_path / "afile").write_text("x")
    base = {"eval": ["--model", str(model_dir), "--task", "arithmetic"],
            "distill": ["--teacher", str(model_dir), "--student", str(model_dir), "--task", "arithmetic"],
            "grpo": ["--model", str(model_dir), "--task", "arithmetic"]}[cmd]
    with pytest.raises(SystemExit) as e:
        nanoseek([cmd, *base, "--out", str(tmp_path / "afile" / "sub" / ("e.json" if cmd == "eval" else "run"))])
    assert "is a file, not a folder" in one_line(e, f"nanoseek {cmd}: ")


@pytest.mark.parametrize("cmd", ["grpo", "distill", "sft"])
def test_out_that_is_a_model_folder_is_refused(model_dir, cmd):
    """A run folder is not a model folder: the run's files (and its model/) would land among the model's."""
    before = sorted(p.name for p in model_dir.iterdir())
    model_flags = ["--teacher", str(model_dir), "--student", str(model_dir)] if cmd == "distill" else [
        "--model", str(model_dir)]
    with pytest.raises(SystemExit) as e:
        nanoseek([cmd, *model_flags, "--task", "arithmetic", "--out", str(model_dir)])
    assert "is a model folder (it holds config.json)" in one_line(e, f"nanoseek {cmd}: ")
    assert sorted(p.name for p in model_dir.iterdir()) == before


def test_a_task_without_problems_is_one_line(model_dir, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    task = ["--task", "gsm8k", "--task-arg", f"path={empty}"]
    with pytest.raises(SystemExit) as e:
        nanoseek(["distill", "--teacher", str(model_dir), "--student", str(model_dir), *task, "--out",
                  str(tmp_path / "run")])
    assert "task gsm8k: its training split has no problems" in one_line(e, "nanoseek distill: ")
    with pytest.raises(SystemExit) as e:
        nanoseek(["eval", "--model", str(model_dir), *task, "--out", str(tmp_path / "e.json")])
    assert "task gsm8k: its held-out split has no problems" in one_line(e, "nanoseek eval: ")
    with pytest.raises(SystemExit) as e:
        nanoseek(["grpo", "--model", str(model_dir), *task, "--out", str(tmp_path / "run")])
    assert "task gsm8k: its training split has no problems" in one_line(e, "nanoseek grpo: ")
    with pytest.raises(SystemExit) as e:
        nanoseek(["sft", "--model", str(model_dir), *task, "--out", str(tmp_path / "run")])
    assert "gsm8k" in one_line(e, "nanoseek sft: ")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty.jsonl"]


def test_eval_out_directory_and_task_options(model_dir, tmp_path):
    with pytest.raises(SystemExit) as e:
        nanoseek(["eval", "--model", str(model_dir), "--task", "arithmetic", "--out", str(tmp_path)])
    assert "is a directory" in one_line(e, "nanoseek eval: ")
    for arg, says in (("bogus=3", "unknown task option 'bogus'"), ("n_digits=abc", "expected an integer"),
                      ("n_digits=2.5", "expected an integer")):
        with pytest.raises(SystemExit) as e:
            nanoseek(["eval", "--model", str(model_dir), "--task", "arithmetic", "--task-arg", arg,
                      "--out", str(tmp_path / "e.json")])
        assert says in one_line(e, "nanoseek eval: ")


def test_sft_data_file_errors_name_the_line(tmp_path):
    from nanoseek.data.sft import load_conversations

    path = tmp_path / "c.jsonl"
    good = '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}'
    for line, says in (('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": 5}]}',
                        "content is int"),
                       ('{"messages": [{"role": "wizard", "content": "hi"}]}', "role 'wizard'")):
        path.write_text(good + "\n" + line + "\n")
        with pytest.raises(ValueError, match=f"c.jsonl:2: .*{says}"):
            load_conversations(path)
    path.write_bytes(good.encode() + b"\n\xff\xfe\n")
    with pytest.raises(ValueError, match="c.jsonl:2: not UTF-8"):
        load_conversations(path)
    path.write_text(good + "\n")
    assert load_conversations(path) == [[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]]


# --- pretraining data, tokenizer and resume
TEXT = "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n" * 120
RUN = ["--preset", "tiny", "--steps", "4", "--batch-size", "2", "--seq-len", "32", "--save-every", "2",
       "--eval-every", "2", "--eval-steps", "1", "--sample-tokens", "0", "--device", "cpu"]


def test_tokenizer_and_data_never_replace_good_files_with_bad(tmp_path):
    (tmp_path / "a.txt").write_text(TEXT)
    (tmp_path / "bad.txt").write_bytes(b"ok\xff\xfe")
    nanoseek(["tokenizer", "--data", str(tmp_path / "a.txt"), "--vocab-size", "300", "--out", str(tmp_path / "tok")])
    with pytest.raises(SystemExit) as e:
        nanoseek(["tokenizer", "--data", str(tmp_path / "a.txt"), "--vocab-size", "280", "--out", str(tmp_path / "tok")])
    assert "already holds a tokenizer.json" in one_line(e, "nanoseek tokenizer: ")
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(SystemExit, match="no text"):
        nanoseek(["tokenizer", "--data", str(tmp_path / "empty.txt"), "--out", str(tmp_path / "t2")])
    shards = tmp_path / "shards"
    nanoseek(["data", "--input", str(tmp_path / "a.txt"), "--tokenizer", str(tmp_path / "tok"), "--out", str(shards)])
    kept = {f.name: f.read_bytes() for f in shards.iterdir() if f.is_file()}
    for flags in (["--input", str(tmp_path / "bad.txt")], ["--input", str(tmp_path / "a.txt"), "--shard-tokens", "0"]):
        with pytest.raises(SystemExit) as e:
            nanoseek(["data", *flags, "--tokenizer", str(tmp_path / "tok"), "--out", str(shards)])
        one_line(e, "nanoseek data: ")
        assert {f.name: f.read_bytes() for f in shards.iterdir() if f.is_file()} == kept
        assert not (shards / ".staging").exists()


def test_resume_goes_on_in_the_folder_it_is_given(tmp_path):
    import shutil

    (tmp_path / "a.txt").write_text(TEXT)
    run1, copy = tmp_path / "run1", tmp_path / "copy"
    nanoseek(["pretrain", *RUN, "--data", str(tmp_path / "a.txt"), "--out", str(run1)])
    shutil.copytree(run1, copy)
    before = sorted(p.name for p in (run1 / "checkpoints").iterdir())
    nanoseek(["pretrain", "--resume", str(copy), "--steps", "6", "--device", "cpu"])
    assert (copy / "checkpoints" / "step_000006").is_dir()
    assert sorted(p.name for p in (run1 / "checkpoints").iterdir()) == before      # the original is untouched
    shutil.rmtree(run1)       # the copy reads its own tokenized text (RUN/data), not the original's
    nanoseek(["pretrain", "--resume", str(copy), "--steps", "8", "--device", "cpu"])
    assert (copy / "checkpoints" / "step_000008").is_dir() and not run1.exists()
    # a damaged trainer state is one line that names an earlier checkpoint to resume from
    (copy / "checkpoints" / "step_000008" / "trainer" / "optimizer.pt").write_bytes(b"not a zip")
    with pytest.raises(SystemExit) as e:
        nanoseek(["pretrain", "--resume", str(copy), "--steps", "10", "--device", "cpu"])
    assert "resume from an earlier one" in one_line(e, "nanoseek pretrain: ")
    with pytest.raises(SystemExit) as e:
        nanoseek(["pretrain", *RUN, "--data", str(tmp_path / "a.txt"), "--out", str(tmp_path / "r2"), "--lr=-1"])
    assert "--lr must be a number > 0" in one_line(e, "nanoseek pretrain: ")
    assert not (tmp_path / "r2").exists()


@pytest.mark.parametrize("cmd", ["grpo", "distill", "eval", "pretrain"])
def test_seed_dtype_and_lr_range_are_one_line(model_dir, tmp_path, cmd):
    """A seed outside [0, 2**32) (numpy and torch refuse it deep inside), fp16 training (no loss scaling)
    and a --min-lr above --lr (the 'decay' would raise the rate) are refused before anything is written."""
    out = tmp_path / "run"
    args = {"grpo": ["grpo", "--model", str(model_dir), "--task", "arithmetic", "--out", str(out)],
            "distill": ["distill", "--teacher", str(model_dir), "--student", str(model_dir), "--task", "arithmetic",
                        "--out", str(out)],
            "eval": ["eval", "--model", str(model_dir), "--task", "arithmetic", "--out", str(out)],
            "pretrain": ["pretrain", "--data", str(tmp_path / "none.txt"), "--out", str(out)]}[cmd]
    cases = [(["--seed", "-1"], "--seed must be in [0, 2**32)"), (["--seed", str(2**32)], "--seed must be in")]
    if cmd != "eval":
        cases.append((["--dtype", "fp16"], "fp16 needs loss scaling"))
    if cmd == "pretrain":
        cases.append((["--lr", "1e-3", "--min-lr", "1e-2"], "--min-lr 0.01 is above --lr 0.001"))
    for flags, says in cases:
        with pytest.raises(SystemExit) as e:
            nanoseek([*args, *flags, "--device", "cpu"])
        assert says in one_line(e, f"nanoseek {cmd}: "), flags
    assert not out.exists()


def test_pretrain_flags_and_resume_settings_are_one_line(tmp_path):
    """Audit findings: each was a traceback (or a segfault, or a silently ignored value) and is now one line
    before anything is written; on resume, what the checkpoint fixed cannot be changed."""
    text = tmp_path / "t.txt"
    text.write_text(" ".join(f"w{i % 37}" for i in range(4000)))
    (tmp_path / "afile").write_text("x")
    bad = tmp_path / "shards"
    bad.mkdir()
    (bad / "meta.json").write_text("{")
    run = tmp_path / "run"
    fast = ["--batch-size", "4", "--seq-len", "16", "--sample-tokens", "0", "--eval-steps", "0", "--peak-flops", "1e11",
            "--device", "cpu"]
    for flags, says in [(["--threads", "-1"], "--threads must be in [1, 1024]"),
                        (["--threads", "100000"], "--threads must be in [1, 1024]"),
                        (["--peak-flops", "-1"], "--peak-flops must be a number > 0"),
                        (["--split", "5"], "--split 5 is more chunks than the 4 rows"),
                        (["--fsdp", "--optimizer", "muon"], "Muon needs whole matrices and FSDP2 shards them"),
                        (["--out", str(tmp_path / "afile")], "is a file"),
                        (["--out", str(tmp_path / "afile" / "sub")], "is a file, not a folder"),
                        (["--data", str(tmp_path), "--out", str(tmp_path / "d")], "is a folder without meta.json"),
                        (["--data", str(bad), "--out", str(tmp_path / "e" / "f")], "no tokenizer.json there"),
                        (["--batch-size", "64", "--eval-steps", "1", "--out", str(tmp_path / "v")],   # after tokenizing
                         "(or --eval-steps 0: no validation loss)")]:
        with pytest.raises(SystemExit) as e:
            nanoseek(["pretrain", "--data", str(text), "--out", str(run), "--steps", "2", *fast, *flags])
        assert says in one_line(e, "nanoseek pretrain: "), flags
    assert not run.exists() and not (tmp_path / "d").exists() and not (tmp_path / "e").exists()   # none left made
    nanoseek(["pretrain", "--data", str(text), "--out", str(run), "--steps", "2", *fast])
    for flags, says in [(["--optimizer", "muon"], "was trained with adamw"),
                        (["--preset", "small"], "was trained with tiny"),
                        (["--steps", "1"], "already at step 2")]:
        with pytest.raises(SystemExit) as e:
            nanoseek(["pretrain", "--resume", str(run), *flags, "--device", "cpu"])
        assert says in one_line(e, "nanoseek pretrain: "), flags
    # a shard damaged after the run began (ids beyond the vocabulary): one line naming the checkpoint to resume from
    shard = sorted((run / "data").glob("train_*.bin"))[0]
    shard.write_bytes(b"\xff" * shard.stat().st_size)
    with pytest.raises(SystemExit) as e:
        nanoseek(["pretrain", "--resume", str(run), "--steps", "4", "--device", "cpu"])
    assert "token id" in one_line(e, "nanoseek pretrain: ") and "resume with --resume" in str(e.value.code)


def info_on(tmp_path, drop=(), **changes) -> str:
    """`nanoseek info --model DIR` on the tiny preset's config.json with `changes`, less the keys in `drop`:
    the one line it exits with."""
    import json

    from nanoseek.model import ModelConfig

    cfg = {k: v for k, v in {**ModelConfig().to_hf_dict(), **changes}.items() if k not in drop}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(SystemExit) as e:
        nanoseek(["info", "--model", str(tmp_path)])
    return one_line(e, "nanoseek info: ")


YARN = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 256}


@pytest.mark.parametrize("changes, says", [
    (dict(rope_scaling=5), "ModelConfig.rope_scaling: must be null or an object"),
    (dict(rope_scaling=[1]), "ModelConfig.rope_scaling: must be null or an object"),
    (dict(rope_scaling="yarn"), "ModelConfig.rope_scaling: must be null or an object"),
    (dict(rope_scaling={"type": "yarn", "factor": None}), "ModelConfig.rope_scaling: yarn factor must be a number > 0"),
    (dict(rope_scaling={"type": "yarn", "factor": "x"}), "ModelConfig.rope_scaling: yarn factor must be a number > 0"),
    (dict(rope_scaling={"type": "yarn", "factor": float("nan")}), "yarn factor must be a number > 0 (got nan)"),
    (dict(rope_scaling={**YARN, "original_max_position_embeddings": None}),
     "ModelConfig.rope_scaling: yarn original_max_position_embeddings must be a positive integer"),
    (dict(rope_scaling={**YARN, "beta_fast": 0}), "ModelConfig.rope_scaling: yarn beta_fast must be a number > 0"),
    (dict(rope_scaling={**YARN, "mscale": -1}), "ModelConfig.rope_scaling: yarn mscale must be a number >= 0"),
    (dict(rope_scaling=YARN, rope_theta=1), "ModelConfig.rope_theta:"),
    (dict(rope_parameters=5), "ModelConfig.rope_parameters: must be null or an object"),
    (dict(drop=["rope_scaling"], rope_parameters={"rope_type": "yarn", "factor": None}),
     "ModelConfig.rope_parameters: yarn factor must be a number > 0"),
])
def test_rope_scaling_of_the_wrong_kind_is_one_line_naming_the_field(tmp_path, changes, says):
    """Audit findings: each was a TypeError traceback, a message naming no field, or (NaN) silently accepted."""
    assert says in info_on(tmp_path, **changes)


@pytest.mark.parametrize("field, value", [("q_lora_rank", True), ("q_lora_rank", False), ("qk_nope_head_dim", True),
                                          ("n_routed_experts", True), ("n_routed_experts", False),
                                          ("num_hidden_layers", True), ("n_group", True), ("bos_token_id", True),
                                          ("pad_token_id", "0"), ("eos_token_id", [1, True]), ("eos_token_id", {})])
def test_a_bool_or_other_kind_where_an_integer_belongs_is_one_line(tmp_path, field, value):
    """JSON's true is a Python int: "q_lora_rank": true passed validation and failed in torch.nn.Linear (false
    silently meant "none"); token ids were not checked at all."""
    assert f"ModelConfig.{field}: must be" in info_on(tmp_path, **{field: value})
