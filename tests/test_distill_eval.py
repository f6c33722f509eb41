"""Distillation keeps only verified traces (rejection sampling) and trains the student on exactly those;
evaluation's pass@k / cons@k equal their closed forms on a constructed case; both commands run."""

from __future__ import annotations

import json
from math import comb

import pytest
import torch

from nanoseek.data.sft import SFTDataset
from nanoseek.infer.engine import Completion
from nanoseek.model import Transformer
from nanoseek.tokenizer import Tokenizer
from nanoseek.train.grpo import chat_prompts, evaluate
from nanoseek.train.sft import rejection_sample, sft_train

from helpers import arith, arith_tokenizer, tiny_model


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return arith_tokenizer()


def scripted(texts_for: dict[int, list[tuple[str, str]]], tok: Tokenizer, prompts: list[list[int]]):
    """A stand-in teacher: prompt i's j-th sample is texts_for[i][j] (text, finish_reason)."""
    index = {tuple(p): i for i, p in enumerate(prompts)}
    seen: dict[int, int] = {}

    def generate(batch: list[list[int]]) -> list[Completion]:
        out = []
        for p in batch:
            i = index[tuple(p)]
            j = seen.get(i, 0)
            seen[i] = j + 1
            text, reason = texts_for[i][j]
            out.append(Completion(prompt_ids=p, token_ids=tok.encode(text) + [tok.eos_id], text=text,
                                  finish_reason=reason, logprobs=None))
        return out
    return generate


def test_rejection_sampling_keeps_only_verified_traces(tok):
    problems = arith.examples(3, 0)
    prompts = chat_prompts(tok, arith.messages, problems)
    good = [arith.worked(ex).removeprefix("<think>\n") for ex in problems]
    wrong = [g.rsplit("\n", 1)[0] + "\n" + str(int(ex.answer) + 1) for g, ex in zip(good, problems)]
    texts = {
        0: [(good[0], "stop"), (wrong[0], "stop"), (good[0], "stop"), ("no tags " + problems[0].answer, "stop")],
        1: [(wrong[1], "stop"), (wrong[1], "stop"), (good[1], "length"),
            ("</think>\n</think>\n" + problems[1].answer, "stop")],
        2: [(good[2], "stop"), (f"<think>\nguess\n</think>\n{problems[2].answer}", "stop"), (wrong[2], "stop"),
            ("", "stop")],
    }
    convs, stats = rejection_sample(scripted(texts, tok, prompts), tok, problems, arith.messages, arith.reward, k=4)
    # kept: problem 0's good trace once (its duplicate dropped), problem 2's two correct traces;
    # dropped: wrong answers, no </think>, two </think>, empty, and a correct one cut at the limit
    assert stats == {"sampled": 12, "verified": 5, "kept": 3, "prompts_with_a_trace": 2}
    kept_texts = [c[-1]["content"] for c in convs]
    # the assistant turn is the generation prompt's "<think>\n" plus exactly what the teacher wrote
    assert kept_texts == ["<think>\n" + good[0], "<think>\n" + good[2], "<think>\n" + texts[2][1][0]]
    for conv in convs:
        ex = next(e for e in problems if conv[0]["content"] == arith.messages(e)[0]["content"])
        assert arith.reward(conv[-1]["content"], ex)["accuracy"] == 1.0
        assert conv[:-1] == arith.messages(ex)
    # the student trains on exactly these: its loss targets are the kept assistant turns
    ds = SFTDataset(convs, tok, seq_len=256)
    x, y, m = ds[0]
    targets = tok.decode(torch.from_numpy(ds.ids[0, 1:])[m].tolist())
    assert targets == "".join(c[-1]["content"] + "<｜end▁of▁sentence｜>" for c in convs)


def test_evaluate_pass_at_k_and_cons_at_k_match_closed_forms(tok):
    problems = arith.examples(4, 0, split="test")
    prompts = chat_prompts(tok, arith.messages, problems)
    n, k = 6, 3
    correct_counts = [0, 1, 3, 6]
    texts = {}
    for i, (ex, c) in enumerate(zip(problems, correct_counts)):
        right = f"<think>\nx\n</think>\n{ex.answer}"
        wrong = [f"<think>\nx\n</think>\n{int(ex.answer) + d}" for d in (1, 1, 2, 2, 3, 3)]
        # correct samples last, so the first k decide the vote: problem 2 has 0 correct in its first 3
        # but problem 3's first 3 are all correct
        texts[i] = [(t, "stop") for t in wrong[:n - c] + [right] * c]
    res = evaluate(scripted(texts, tok, prompts), prompts, problems, arith.reward, arith.extract_answer,
                   n_samples=n, k=k)
    expect_pass_k = sum(1 - comb(n - c, k) / comb(n, k) for c in correct_counts) / len(problems)
    assert res[f"pass@{k}"] == pytest.approx(expect_pass_k, abs=1e-12)
    assert res["pass@1"] == pytest.approx(sum(correct_counts) / (n * len(problems)))
    # majority of the first 3 samples: wrong (tie of +1 x2) for problems 0-2, right for problem 3
    assert res[f"cons@{k}"] == pytest.approx(0.25)
    assert [p["correct"] for p in res["problems"]] == correct_counts
    with pytest.raises(ValueError, match="k=4, n_samples=3"):
        evaluate(scripted(texts, tok, prompts), prompts, problems, arith.reward, arith.extract_answer,
                 n_samples=3, k=4)


def test_eval_command_table_and_json(tok, tmp_path, capsys, monkeypatch):
    from nanoseek.commands import eval as eval_cmd
    from nanoseek.tasks import get_task

    base = tmp_path / "base"
    tiny_model(tok).save_pretrained(base)
    tok.save(base)
    out = tmp_path / "e.json"
    # a random model solves nothing; a verifier that accepts the samples of even length gives each
    # problem its own mix of right and wrong, so the estimators below are exercised for real
    task = get_task("arithmetic")
    monkeypatch.setattr(task, "reward", lambda text, ex: {"total": 1.0, "accuracy": float(len(text) % 2 == 0),
                                                          "format": 0.0})
    eval_cmd.main(["--model", str(base), "--task", "arithmetic", "--n-problems", "8", "--k", "2", "--samples", "4",
                   "--max-new-tokens", "8", "--out", str(out), "--device", "cpu"])
    res = json.loads(out.read_text())
    assert res["split"] == "test" and res["n_problems"] == 8 and res["n_samples"] == 4
    # the JSON's aggregates are the estimators applied to its own per-problem counts
    cs = [p["correct"] for p in res["problems"]]
    assert len(set(cs)) > 1 and 0 < sum(cs) < 32, cs
    assert res["pass@1"] == pytest.approx(sum(cs) / 32)
    assert res["pass@2"] == pytest.approx(sum(1 - comb(4 - c, 2) / comb(4, 2) for c in cs) / 8)
    assert "pass@2" in capsys.readouterr().out
    held = {e.prompt for e in arith.examples(8, 0, "test")}
    assert {p["prompt"] for p in res["problems"]} == held
    with pytest.raises(SystemExit, match="greedy"):
        eval_cmd.main(["--model", str(base), "--task", "arithmetic", "--k", "4", "--temperature", "0"])
    # the JSON file is checked before anything runs: an earlier evaluation is replaced, nothing else is
    quick = ["--model", str(base), "--task", "arithmetic", "--n-problems", "2", "--max-new-tokens", "2",
             "--device", "cpu"]
    eval_cmd.main([*quick, "--out", str(out), "--samples", "2"])     # several samples: T=1 by default
    assert json.loads(out.read_text())["n_problems"] == 2 and json.loads(out.read_text())["temperature"] == 1.0
    config = (base / "config.json").read_text()
    (tmp_path / "notes.txt").write_text("keep me")
    for target, says in ((base / "config.json", "in the model's folder"),
                         (base / "results.json", "in the model's folder"),
                         (tmp_path / "notes.txt", "not an earlier result")):
        with pytest.raises(SystemExit, match=says):
            eval_cmd.main([*quick, "--out", str(target)])
    assert (base / "config.json").read_text() == config and (tmp_path / "notes.txt").read_text() == "keep me"
    assert not (base / "results.json").exists()
    # a task with no held-out problem is one line, not a traceback
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(SystemExit, match="nanoseek eval: task gsm8k: "):
        eval_cmd.main([*quick[:2], "--task", "gsm8k", "--task-arg", f"path={empty}", "--out", str(tmp_path / "g.json")])


def test_distill_command_keeps_verified_traces_and_trains_the_student(tok, tmp_path):
    from nanoseek.commands import distill as distill_cmd

    # a teacher that has memorized two problems (SFT on their worked solutions), a random student
    problems = arith.examples(2, 0, n_digits=1, ops="+")
    teacher = tiny_model(tok, seed=0)
    ds = SFTDataset([arith.sft_messages(e) for e in problems], tok, seq_len=64)
    sft_train(teacher, ds, torch.optim.AdamW(teacher.parameters(), lr=1e-2), steps=80, batch_size=2, lr=1e-2)
    for name, model in (("teacher", teacher), ("student", tiny_model(tok, seed=1))):
        model.save_pretrained(tmp_path / name)
        tok.save(tmp_path / name)
    out = tmp_path / "run"
    distill_cmd.main(["--teacher", str(tmp_path / "teacher"), "--student", str(tmp_path / "student"),
                      "--task", "arithmetic", "--task-arg", "n_digits=1", "--task-arg", "ops=+",
                      "--n-prompts", "2", "--samples-per-prompt", "4", "--temperature", "0.3",
                      "--max-new-tokens", "16", "--steps", "3", "--batch-size", "2", "--out", str(out),
                      "--device", "cpu"])
    run = json.loads((out / "run.json").read_text())
    traces = [json.loads(line)["messages"] for line in (out / "traces.jsonl").read_text().splitlines()]
    assert run["sampling"]["sampled"] == 8 and run["sampling"]["kept"] == len(traces) >= 1
    for conv in traces:
        ex = next(e for e in problems if arith.messages(e) == conv[:-1])
        score = arith.reward(conv[-1]["content"], ex)
        assert score["accuracy"] == 1.0 and score["format"] == 1.0
    assert len([line for line in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]) == 3
    student = Transformer.from_pretrained(out / "model")
    start = Transformer.from_pretrained(tmp_path / "student")
    assert any(not torch.equal(a, b) for a, b in zip(student.state_dict().values(), start.state_dict().values()))
    assert f"{len(traces)} kept" in (out / "report.md").read_text()

    # a student with another tokenizer is refused before anything is sampled
    other = Tokenizer.train(["something else entirely"] * 10, vocab_size=300)
    tiny_model(other).save_pretrained(tmp_path / "alien")
    other.save(tmp_path / "alien")
    with pytest.raises(SystemExit, match="different tokenizer"):
        distill_cmd.main(["--teacher", str(tmp_path / "teacher"), "--student", str(tmp_path / "alien"),
                          "--task", "arithmetic", "--out", str(tmp_path / "r2"), "--device", "cpu"])
    assert not (tmp_path / "r2").exists()

    # a finished run is never written into, by distill or by sft; a teacher that solves nothing
    # leaves nothing behind, so the retry its message suggests can use the same --out
    common = ["--teacher", str(tmp_path / "teacher"), "--student", str(tmp_path / "student"), "--task",
              "arithmetic", "--task-arg", "n_digits=1", "--task-arg", "ops=+", "--n-prompts", "2", "--steps", "1",
              "--batch-size", "2", "--device", "cpu"]
    before = (out / "model" / "model.safetensors").read_bytes()
    with pytest.raises(SystemExit, match="already holds a run"):
        distill_cmd.main([*common, "--out", str(out)])
    from nanoseek.commands import sft as sft_cmd
    with pytest.raises(SystemExit, match="already holds a run"):
        sft_cmd.main(["--model", str(tmp_path / "student"), "--task", "arithmetic", "--n", "4", "--steps", "1",
                      "--out", str(out), "--device", "cpu"])
    assert (out / "model" / "model.safetensors").read_bytes() == before
    with pytest.raises(SystemExit, match="solved none"):
        distill_cmd.main([*common, "--samples-per-prompt", "1", "--max-new-tokens", "1", "--out", str(tmp_path / "r3")])
    assert not (tmp_path / "r3").exists()
    # a --seq-len too short for any answer token: one line once the traces are in, and nothing written
    with pytest.raises(SystemExit, match="nothing to learn.*--seq-len 8"):
        distill_cmd.main([*common, "--samples-per-prompt", "4", "--temperature", "0.3", "--max-new-tokens", "16",
                          "--seq-len", "8", "--out", str(tmp_path / "r4")])
    assert not (tmp_path / "r4").exists()
