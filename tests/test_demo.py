"""`nanoseek demo --quick`: every stage runs and writes every artifact; the report, the metrics and the
per-problem file agree; the final checkpoint is the model that was evaluated; a rerun is identical.

Whether GRPO improves accuracy is not asserted: the quick model is barely trained (the full demo's
gain is in its report and the README)."""

from __future__ import annotations

import json
import re

import pytest
import torch

from nanoseek.commands import demo
from nanoseek.infer.engine import Engine, SamplingParams
from nanoseek.model import Transformer
from nanoseek.tasks import arithmetic
from nanoseek.tokenizer import Tokenizer

PNG = b"\x89PNG\r\n\x1a\n"


def run_quick(out, seed: int = 0) -> None:
    demo.main(["--quick", "--out", str(out), "--seed", str(seed), "--threads", "1", "--device", "cpu"])


def rows_of(run) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "run"
    run_quick(out)
    return out


def test_every_artifact_is_written(run):
    for name in ("report.md", "metrics.jsonl", "run.json", "heldout.jsonl", "data/corpus.jsonl",
                 "data/tokenizer/tokenizer.json"):
        assert (run / name).is_file() and (run / name).stat().st_size > 0, name
    for name in ("loss.png", "reward.png", "accuracy.png", "response_length.png"):
        assert (run / "plots" / name).read_bytes()[:8] == PNG, name
    for model_dir in ("base", "final"):
        for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
            assert (run / model_dir / name).is_file(), f"{model_dir}/{name}"
    cfg = json.loads((run / "run.json").read_text())
    assert cfg["settings"] == json.loads(json.dumps(demo.QUICK)) and cfg["args"]["seed"] == 0


def test_every_stage_logged(run):
    rows = rows_of(run)
    stages = [r["stage"] for r in rows]
    S = demo.QUICK
    assert stages.count("pretrain") == S["pretrain"]["steps"]
    assert stages.count("grpo") == S["grpo"]["steps"]
    assert [r["tag"] for r in rows if r["stage"] == "eval_sampled"] == ["before", "after"]
    assert stages[-1] == "summary"
    grpo = [r for r in rows if r["stage"] == "grpo"]
    assert all(r["completions"] == S["grpo"]["group_size"] * S["grpo"]["prompts_per_step"] for r in grpo)
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in rows if r["stage"] == "pretrain")
    summary = rows[-1]
    assert summary["wall_s"]["total"] == pytest.approx(sum(v for k, v in summary["wall_s"].items() if k != "total"))
    assert set(summary["wall_s"]) >= {"data", "pretrain", "eval_before", "grpo", "eval_after", "save_and_report"}


def test_report_metrics_and_heldout_file_agree(run):
    rows = rows_of(run)
    summary = rows[-1]
    greedy = {r["tag"]: r for r in rows if r["stage"] == "eval" and r["tag"] in ("before", "after")}
    sampled = {r["tag"]: r for r in rows if r["stage"] == "eval_sampled"}
    held = [json.loads(line) for line in (run / "heldout.jsonl").read_text().splitlines()]
    k = demo.QUICK["eval"]["samples"]
    assert len(held) == summary["heldout_problems"] == demo.QUICK["eval"]["problems"]
    for tag in ("before", "after"):
        assert summary[f"accuracy_{tag}"] == greedy[tag]["accuracy"]
        assert sum(h[f"{tag}_correct"] for h in held) / len(held) == pytest.approx(greedy[tag]["accuracy"])
        assert sum(h[f"{tag}_correct_of_{k}"] for h in held) / (k * len(held)) == pytest.approx(sampled[tag]["pass@1"])
        # the verifier's verdict on the stored greedy answer is the recorded one
        assert all(h[f"{tag}_correct"] == arithmetic.reward(h[tag], arithmetic.Example(h["prompt"], h["answer"]))["accuracy"]
                   for h in held)
    gain = summary["accuracy_after"] - summary["accuracy_before"]
    assert summary["gain"] == pytest.approx(gain)
    lo, hi = summary["gain_ci95"]
    assert lo <= gain + 1e-9 and gain - 1e-9 <= hi

    report = (run / "report.md").read_text()
    line = next(ln for ln in report.splitlines() if ln.startswith("| **accuracy, greedy**"))
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert cells[1].startswith(demo._pct(summary["accuracy_before"]))
    assert cells[2].startswith(demo._pct(summary["accuracy_after"]))
    assert f"{100 * gain:+.1f} pts [{100 * lo:+.1f}, {100 * hi:+.1f}]" in cells[3]
    assert re.search(rf"\| {len(held)} held-out problems \| base \(pretrained\) \| after GRPO \|", report)
    for stage in ("pretrain", "grpo"):
        assert f"{summary['wall_s'][stage]:.1f} s" in report
    assert "nanoseek chat --model" in report and "nanoseek serve --model" in report


def test_final_checkpoint_is_the_evaluated_model(run):
    model = Transformer.from_pretrained(run / "final")
    tok = Tokenizer.from_dir(run / "final")
    cfg = model.config
    assert cfg.kv_lora_rank > 0 and cfg.n_routed_experts and cfg.n_shared_experts >= 1
    assert cfg.num_nextn_predict_layers == 1 and len(model.mtp) == 1
    assert cfg.vocab_size == tok.vocab_size
    held = [json.loads(line) for line in (run / "heldout.jsonl").read_text().splitlines()][:8]
    prompts = [tok.render_chat(arithmetic.messages(arithmetic.Example(h["prompt"], h["answer"])),
                               add_generation_prompt=True)[0] for h in held]
    outs = Engine(model, tok, max_batch=8).generate(
        prompts, SamplingParams(max_tokens=demo.QUICK["eval"]["max_new_tokens"], temperature=0))
    assert [o.text for o in outs] == [h["after"] for h in held]
    base = Transformer.from_pretrained(run / "base")
    assert any(not torch.equal(p, q) for p, q in zip(base.parameters(), model.parameters())), "GRPO changed nothing"


def test_same_seed_same_run_and_no_overwrite(run, tmp_path):
    run_quick(tmp_path / "again")
    first, again = rows_of(run), rows_of(tmp_path / "again")
    keys = ("stage", "step", "tag", "loss", "ce", "reward", "accuracy", "pass@1", "response_length")
    strip = [[{k: r[k] for k in keys if k in r} for r in rows if r["stage"] != "summary"] for rows in (first, again)]
    assert strip[0] == strip[1]
    assert (run / "heldout.jsonl").read_text() == (tmp_path / "again" / "heldout.jsonl").read_text()

    before = (run / "metrics.jsonl").read_bytes()
    with pytest.raises(SystemExit, match="already holds a run"):
        run_quick(run)
    assert (run / "metrics.jsonl").read_bytes() == before


def test_bad_values_are_one_line_before_anything_runs(tmp_path):
    (tmp_path / "afile").write_text("x")
    (tmp_path / "crashed" / "base").mkdir(parents=True)          # a run that stopped after its first stage
    for flags, says in [(["--seed", "-1"], "--seed must be in [0, 2**32)"),
                        (["--seed", str(10**20)], "--seed must be in [0, 2**32)"),
                        (["--threads", str(2**40)], "--threads must be in [1, 1024]"),
                        (["--out", str(tmp_path / "afile")], "is a file"),
                        (["--out", str(tmp_path / "afile" / "sub")], "is a file, not a folder"),
                        (["--out", str(tmp_path / "crashed")], "holds an unfinished run (base")]:
        with pytest.raises(SystemExit) as e:
            demo.main(["--quick", "--device", "cpu", "--out", str(tmp_path / "new"), *flags])
        msg = str(e.value.code)
        assert says in msg and "\n" not in msg, (flags, msg)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "crashed"]
    assert [p.name for p in (tmp_path / "crashed").iterdir()] == ["base"]
