"""GRPO: a short run raises the reward; old log-probs make the ratio start at 1; every variant updates;
dynamic sampling and overlong filtering do what DAPO says; the command writes a complete run folder."""

from __future__ import annotations

import json

import pytest
import torch

from nanoseek.infer.engine import Engine, SamplingParams
from nanoseek.model import Transformer, preset
from nanoseek.tokenizer import Tokenizer
from nanoseek.train.grpo import GRPO, GRPOConfig, Rollouts, chat_prompts, completion_logprobs, pack
from nanoseek.train.losses import RL_VARIANTS, policy_loss, token_logprobs

from helpers import arith, arith_tokenizer, eos_heavy_model_dir, tiny_model


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return arith_tokenizer()


def short_prompts(tok: Tokenizer, n: int) -> tuple[list[list[int]], list]:
    """Bare "What is a+b?" chat prompts (~15 tokens): the test is about RL, not the instruction."""
    ex = arith.examples(n, 0, n_digits=1, ops="+")
    return chat_prompts(tok, lambda e: [{"role": "user", "content": e.prompt}], ex), ex


def digit_reward(tok: Tokenizer, T: int):
    """Fraction of the T token budget spent on all-digit tokens: a dense "answer in digits" reward a
    random policy scores ~0.4 on (a BPE vocab trained on arithmetic is full of number tokens), with
    a lot of room above it."""
    digit = torch.tensor([tok.decode([i]).isdigit() for i in range(tok.vocab_size)])

    def reward(c, ex) -> dict:
        r = float(digit[torch.tensor(c.token_ids, dtype=torch.long)].sum()) / T if c.token_ids else 0.0
        return {"total": r, "accuracy": r, "format": 0.0}
    return reward


def make_trainer(tok, model, cfg: GRPOConfig, P: int, T: int, lr: float = 1e-2, ref=None):
    engine = Engine(model, tok, max_batch=P * cfg.group_size, max_seq_len=64)
    params = SamplingParams(max_tokens=T, temperature=1.0)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    trainer = GRPO(model, opt, lambda ps: engine.generate(ps, params), digit_reward(tok, T), cfg,
                   ref_model=ref, pad_id=tok.pad_id)
    prompts, ex = short_prompts(tok, 40)
    cursor = [0]

    def next_prompts():
        i = cursor[0]
        cursor[0] = (i + P) % len(prompts)
        return prompts[i:i + P], ex[i:i + P]
    return trainer, next_prompts


def test_short_grpo_run_raises_reward(tok):
    # 4 prompts x 8 completions x 8 tokens, 12 steps: the reward climbs from ~0.4 to ~1
    # (seeds 0-3 all reach >= 0.98 by the last step; the margins below leave room for platform noise)
    model = tiny_model(tok, seed=0)
    trainer, next_prompts = make_trainer(tok, model, GRPOConfig(variant="grpo", group_size=8, max_new_tokens=8),
                                         P=4, T=8, lr=3e-2)
    rewards = [trainer.step(next_prompts)["reward"] for _ in range(12)]
    start, end = sum(rewards[:2]) / 2, sum(rewards[-3:]) / 3
    assert end > start + 0.4 and end > 0.85, f"reward did not rise enough: {rewards}"


def test_ratio_starts_at_one_and_every_variant_updates(tok):
    for variant in RL_VARIANTS:
        model = tiny_model(tok, seed=1)
        before = [p.detach().clone() for p in model.parameters()]
        cfg = GRPOConfig(variant=variant, group_size=4, max_new_tokens=6)
        trainer, next_prompts = make_trainer(tok, model, cfg, P=3, T=6, lr=1e-3)
        batch, _ = trainer.collect(next_prompts)
        stats = trainer.update(batch)
        # one pass, one minibatch: old log-probs come from the same weights, so nothing is clipped
        assert stats["ratio_mean"] == pytest.approx(1.0, abs=1e-5), variant
        assert stats["clip_frac"] == 0.0, variant
        assert stats["updates"] == 1 and torch.isfinite(torch.tensor(stats["loss"]))
        moved = sum(float((p.detach() - b).abs().sum()) for p, b in zip(model.parameters(), before))
        assert moved > 0, f"{variant}: no parameter changed"


def test_separate_old_logprobs_pass_starts_the_ratio_at_one(tok, monkeypatch):
    # two passes: the old log-probs come from the no-grad pass before any update, so the first
    # optimizer step's ratio is exactly 1 and the second's is not
    import nanoseek.train.grpo as grpo_mod

    seen = []
    real = grpo_mod.policy_loss

    def recording(*a, **kw):
        loss, st = real(*a, **kw)
        seen.append({k: float(v) for k, v in st.items()})
        return loss, st

    monkeypatch.setattr(grpo_mod, "policy_loss", recording)
    model = tiny_model(tok, seed=1)
    cfg = GRPOConfig(variant="grpo", group_size=4, max_new_tokens=6, epochs_per_batch=2, split=1)
    trainer, next_prompts = make_trainer(tok, model, cfg, P=3, T=6, lr=1e-2)
    batch, _ = trainer.collect(next_prompts)
    assert trainer.update(batch)["updates"] == 2 and len(seen) == 2
    assert seen[0]["ratio_mean"] == pytest.approx(1.0, abs=1e-6) and seen[0]["clip_frac"] == 0.0
    assert seen[1]["ratio_mean"] != pytest.approx(1.0, abs=1e-4)


def test_old_logprobs_pass_matches_the_training_forward(tok):
    # the no-grad pass (used when a batch gets several optimizer steps) gives the numbers the
    # training forward computes at the same weights, whatever the micro-batching: ratio 1 at the start
    model = tiny_model(tok, seed=4)
    trainer, next_prompts = make_trainer(tok, model, GRPOConfig(variant="grpo", group_size=4, max_new_tokens=6),
                                         P=3, T=6)
    batch, _ = trainer.collect(next_prompts)
    x = pack(batch, tok.pad_id)
    old = trainer._no_grad_logprobs(model, x, torch.arange(3), micro=1)
    logp, _ = completion_logprobs(model, x)
    m = x.mask.bool()
    assert torch.allclose(old[m], logp.detach()[m], atol=1e-5)


def test_skipping_the_old_logprobs_pass_gives_the_same_loss_and_gradients():
    # one optimizer step per batch: the update uses its own forward, detached, as the old log-probs
    # (ratio exp(logp - logp.detach()) = 1, gradient A * grad logp); a separate no-grad pass gives the same
    torch.manual_seed(0)
    model = Transformer(preset("tiny", vocab_size=64))
    model.init_weights()
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(3, 64, (n,), generator=g).tolist() for n in (6, 3)]
    comps = [torch.randint(3, 64, (n,), generator=g).tolist() for n in (5, 2, 7, 4)]
    batch = rollouts(prompts, comps, G=2)
    x = pack(batch, pad_id=2)
    adv = torch.tensor([1.0, -0.5, 0.25, -1.0])
    trainer = GRPO(model, torch.optim.SGD(model.parameters(), lr=0.0), None, None, GRPOConfig(group_size=2))
    separate = trainer._no_grad_logprobs(model, x, torch.arange(2), micro=1)
    for variant in RL_VARIANTS:
        results = []
        for skip in (True, False):
            model.zero_grad()
            logp, _ = completion_logprobs(model, x)
            loss, st = policy_loss(logp, logp.detach() if skip else separate, adv, x.mask, variant=variant,
                                   max_len=8)
            loss.backward()
            results.append((loss.detach(), st["ratio_mean"],
                            torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])))
        (l1, r1, g1), (l2, r2, g2) = results
        assert r1 == 1.0 and r2 == pytest.approx(1.0, abs=1e-5), variant
        assert torch.allclose(l1, l2, atol=1e-6), variant
        assert g1.abs().sum() > 0 and torch.allclose(g1, g2, atol=1e-6, rtol=1e-4), variant


def test_several_epochs_move_the_ratio_and_kl_sees_the_reference(tok):
    model = tiny_model(tok, seed=2)
    ref = tiny_model(tok, seed=2).eval().requires_grad_(False)
    cfg = GRPOConfig(variant="dapo", group_size=4, max_new_tokens=6, epochs_per_batch=3, minibatches=2, beta=0.1,
                     micro_batch=5)
    trainer, next_prompts = make_trainer(tok, model, cfg, P=3, T=6, lr=3e-2, ref=ref)
    stats = trainer.step(next_prompts)
    assert stats["updates"] == 6                       # 3 passes x 2 minibatches
    assert stats["kl"] > 0                             # the policy moved away from the frozen reference
    assert stats["ratio_mean"] != pytest.approx(1.0, abs=1e-6)
    with pytest.raises(ValueError, match="reference"):
        GRPO(model, trainer.optimizer, trainer.generate, trainer.reward_fn, cfg, ref_model=None)


def rollouts(prompts: list[list[int]], completions: list[list[int]], G: int, truncated=None) -> Rollouts:
    B = len(completions)
    return Rollouts(prompt_ids=[p for p in prompts for _ in range(G)], completion_ids=completions, texts=[""] * B,
                    truncated=torch.zeros(B, dtype=torch.bool) if truncated is None else truncated,
                    rewards=torch.arange(B, dtype=torch.float32).view(-1, G) % 3, accuracy=torch.zeros(B // G, G),
                    format=torch.zeros(B // G, G), examples=[None] * (B // G))


def test_zero_advantage_groups_are_skipped_and_the_update_is_the_same(monkeypatch):
    # beta = 0: a group whose rewards are all equal has advantages exactly 0, so no loss and no gradient.
    # Its forward/backward is skipped; the weights, the logged loss and the clip fraction are as without.
    import copy

    import nanoseek.train.grpo as grpo_mod

    forwarded = []
    real = grpo_mod.completion_logprobs

    def counting(model, part, **kw):
        forwarded.append(part.completions.shape[0])
        return real(model, part, **kw)

    monkeypatch.setattr(grpo_mod, "completion_logprobs", counting)
    torch.manual_seed(0)
    base = Transformer(preset("tiny", vocab_size=64))
    base.init_weights()
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, 64, (n,), generator=g).tolist() for n in (6, 3, 5, 4)]
    comps = [torch.randint(3, 64, (n,), generator=g).tolist() for n in (5, 2, 7, 4, 3, 6, 2, 5, 4, 4, 6, 1, 7, 3, 2, 5)]
    mixed = rollouts(prompts, comps, G=4)
    mixed.rewards = torch.tensor([[1.0, 0.0, 0.5, 0.0], [1.0] * 4, [0.0, 0.2, 0.0, 0.0], [0.0] * 4])
    flat = Rollouts(**{**mixed.__dict__, "rewards": torch.full((4, 4), 0.5)})
    full = Rollouts(**{**mixed.__dict__, "rewards": torch.rand(4, 4, generator=g)})

    def run(variant, skip, batches, opt_fn, **cfg):
        model = copy.deepcopy(base)
        trainer = GRPO(model, opt_fn(model), None, None,
                       GRPOConfig(variant=variant, group_size=4, max_new_tokens=8, split=1,
                                  skip_zero_advantage=skip, **cfg))
        forwarded.clear()
        stats = [trainer.update(b) for b in batches]
        return model, stats, sum(forwarded)

    sgd = lambda m: torch.optim.SGD(m.parameters(), lr=0.5)          # noqa: E731
    for variant in RL_VARIANTS:
        for extra in ({}, {"epochs_per_batch": 2, "minibatches": 2}):
            (m1, s1, rows1), (m0, s0, rows0) = (run(variant, skip, [mixed], sgd, **extra) for skip in (True, False))
            # without the skip: every group's rows (several epochs: also the old log-probs pass first)
            assert rows0 == (48 if extra else 16) and rows1 <= rows0 - (16 if extra else 8), (variant, extra, rows1)
            for k in ("loss", "clip_frac", "grad_norm"):
                assert s1[0][k] == pytest.approx(s0[0][k], rel=1e-4, abs=1e-7), (variant, extra, k)
            moved = sum(float((p - q).detach().abs().sum()) for p, q in zip(m0.parameters(), base.parameters()))
            assert moved > 0
            for p, q in zip(m1.parameters(), m0.parameters()):
                assert torch.allclose(p, q, atol=1e-6, rtol=1e-5), (variant, extra)
    # a batch with no signal at all still steps the optimizer (AdamW's momentum and weight decay move
    # the weights) exactly as the full update does: one group runs, for its zero gradients
    adamw = lambda m: torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=0.1)    # noqa: E731
    (m1, s1, rows1), (m0, s0, rows0) = (run("grpo", skip, [full, flat], adamw) for skip in (True, False))
    assert rows1 == 16 + 4 and rows0 == 32
    assert s1[1]["loss"] == 0.0 and s1[1]["grad_norm"] == 0.0 == s0[1]["grad_norm"]
    for p, q in zip(m1.parameters(), m0.parameters()):
        assert torch.equal(p, q)
    # the same with several optimizer steps per batch (the old log-probs pass has no group to run)
    (m1, s1, _), (m0, s0, _) = (run("grpo", skip, [full, flat], adamw, epochs_per_batch=2, minibatches=2)
                                for skip in (True, False))
    assert s1[1]["updates"] == 4 and s1[1]["grad_norm"] == 0.0
    for p, q in zip(m1.parameters(), m0.parameters()):
        assert torch.allclose(p, q, atol=1e-6)
    # with a reference model (beta > 0) the KL term has a gradient everywhere: nothing is skipped
    ref = copy.deepcopy(base).requires_grad_(False)
    model = copy.deepcopy(base)
    forwarded.clear()
    GRPO(model, sgd(model), None, None, GRPOConfig(group_size=4, beta=0.1, split=1), ref_model=ref).update(mixed)
    assert forwarded == [16, 16]          # the reference's pass and the training forward, every group


def test_minibatches_are_whole_groups_and_as_many_as_asked():
    # 6 groups in 4 minibatches: 4 optimizer steps (2, 2, 1, 1 groups), not torch.chunk's 3; with fewer
    # groups than minibatches, one step per group
    torch.manual_seed(0)
    model = Transformer(preset("tiny", vocab_size=64))
    model.init_weights()
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(3, 64, (4,), generator=g).tolist() for _ in range(6)]
    comps = [torch.randint(3, 64, (3,), generator=g).tolist() for _ in range(12)]
    b = rollouts(prompts, comps, G=2)
    b.rewards = torch.tensor([[1.0, 0.0]] * 6)
    for minibatches, groups, steps in ((4, 6, 4), (3, 6, 3), (4, 2, 2)):
        part = b.select(torch.arange(6) < groups)
        cfg = GRPOConfig(group_size=2, minibatches=minibatches, split=1)
        stats = GRPO(model, torch.optim.SGD(model.parameters(), lr=0.0), None, None, cfg).update(part)
        assert stats["updates"] == steps, (minibatches, groups)


def test_pack_pads_right_and_masks_the_completion_tokens():
    x = pack(rollouts([[5, 6, 7], [8]], [[9, 10], [11], [12, 13, 14], []], G=2), pad_id=2)
    assert x.prompts.tolist() == [[5, 6, 7], [8, 2, 2]] and x.prompt_lens.tolist() == [3, 1]
    assert x.completions.tolist() == [[9, 10, 2], [11, 2, 2], [12, 13, 14], [2, 2, 2]]
    assert x.mask.tolist() == [[1, 1, 0], [1, 0, 0], [1, 1, 1], [0, 0, 0]]
    part = x.take(torch.tensor([1]))
    assert part.prompts.tolist() == [[8]] and part.completions.tolist() == [[12, 13, 14], [2, 2, 2]]


@pytest.mark.parametrize("one_pass", [False, True])      # prompt forward then completion forward, or one
@pytest.mark.parametrize("lens", [((5, 9, 2), (4, 7, 1, 6, 3, 7)), ((5, 3, 2), (4, 12, 1, 6, 3, 7))])
def test_shared_prefix_forward_equals_the_plain_forward_with_gradients(one_pass, lens):
    torch.manual_seed(0)
    model = Transformer(preset("tiny", vocab_size=64))
    model.init_weights()
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, 64, (n,), generator=g).tolist() for n in lens[0]]
    comps = [torch.randint(3, 64, (n,), generator=g).tolist() for n in lens[1]]
    x = pack(rollouts(prompts, comps, G=2), pad_id=2)
    grads = []
    for shared in (True, False):
        model.zero_grad()
        logp, ent = completion_logprobs(model, x, shared_prefix=shared, one_pass=one_pass)
        (logp * x.mask).sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
        if shared:
            ref = torch.where(x.mask.bool(), logp, 0.0).detach()
            ref_ent = torch.where(x.mask.bool(), ent, 0.0)
    assert torch.allclose(ref, torch.where(x.mask.bool(), logp, 0.0).detach(), atol=1e-5)
    assert torch.allclose(ref_ent, torch.where(x.mask.bool(), ent, 0.0), atol=1e-5)
    # the plain forward by hand for one row: prompt 1 + completion 3 as a single sequence
    seq = torch.tensor([prompts[1] + comps[3]])
    by_hand = token_logprobs(model(seq[:, :-1]), seq[:, 1:])[0, len(prompts[1]) - 1:]
    assert torch.allclose(ref[3, :6], by_hand.detach(), atol=1e-5)
    assert torch.allclose(grads[0], grads[1], atol=1e-5, rtol=1e-4)
    # rollouts sampled at temperature 2: the log-probs are of logits / 2, the policy that sampled them
    hot, _ = completion_logprobs(model, x, shared_prefix=True, one_pass=one_pass, temperature=2.0)
    assert torch.allclose(hot[3, :6].detach(), token_logprobs(model(seq[:, :-1]) / 2, seq[:, 1:])[0, len(prompts[1]) - 1:]
                          .detach(), atol=1e-5)


def test_dynamic_sampling_trains_only_on_groups_with_signal(tok):
    model = tiny_model(tok, seed=3)
    cfg = GRPOConfig(variant="dapo", group_size=4, max_new_tokens=6, dynamic_sampling=True, max_sampling_rounds=3)
    trainer, next_prompts = make_trainer(tok, model, cfg, P=4, T=6)
    digit = trainer.reward_fn
    constant = {e.prompt for e in short_prompts(tok, 40)[1][::2]}   # every other problem: reward 1 whatever

    def reward(c, ex):
        return {"total": 1.0, "accuracy": 1.0, "format": 0.0} if ex.prompt in constant else digit(c, ex)
    trainer.reward_fn = reward
    batch, sampled = trainer.collect(next_prompts)
    assert len(sampled.examples) > len(batch.examples)          # it had to sample more than one batch
    assert all(e.prompt not in constant for e in batch.examples)
    assert bool((batch.rewards.amax(1) > batch.rewards.amin(1)).all())
    assert len(batch.examples) <= 4


def test_overlong_filter_gives_truncated_completions_no_gradient():
    torch.manual_seed(0)
    model = Transformer(preset("tiny", vocab_size=64))
    model.init_weights()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    rollouts = Rollouts(prompt_ids=[[0, 3, 4]] * 4, completion_ids=[[5, 6, 7], [8, 9, 10], [11, 12, 13], [14, 15, 1]],
                        texts=[""] * 4, truncated=torch.tensor([True, True, True, False]),
                        rewards=torch.tensor([[1.0, 0.0, 0.5, 0.2]]), accuracy=torch.zeros(1, 4),
                        format=torch.zeros(1, 4), examples=[None])
    # other tokens in the truncated completions: with the filter they change nothing (no loss, no
    # gradient comes from them); without it they do. The completion that ended by itself still trains.
    other = Rollouts(**{**rollouts.__dict__, "completion_ids": [[20, 21, 22], [23, 24, 25], [26, 27, 28], [14, 15, 1]]})
    for flag in (True, False):
        cfg = GRPOConfig(variant="dapo", group_size=4, max_new_tokens=3, overlong_filter=flag)
        a, b = (GRPO(model, opt, None, None, cfg).update(r) for r in (rollouts, other))
        assert a["grad_norm"] > 0
        if flag:
            assert (a["loss"], a["grad_norm"]) == pytest.approx((b["loss"], b["grad_norm"]), rel=1e-6)
        else:
            assert a["grad_norm"] != pytest.approx(b["grad_norm"], rel=1e-3)
    all_cut = Rollouts(**{**rollouts.__dict__, "truncated": torch.ones(4, dtype=torch.bool)})
    cfg = GRPOConfig(variant="dapo", group_size=4, max_new_tokens=3, overlong_filter=True)
    assert GRPO(model, opt, None, None, cfg).update(all_cut)["grad_norm"] == 0.0


def test_grpo_command_writes_metrics_plots_and_model(tok, tmp_path):
    from nanoseek.commands import grpo as grpo_cmd

    base = tmp_path / "base"
    eos_heavy_model_dir(tok, base)
    out = tmp_path / "run"
    grpo_cmd.main(["--model", str(base), "--task", "arithmetic", "--task-arg", "n_digits=1", "--out", str(out),
                   "--steps", "2", "--group-size", "4", "--prompts-per-step", "2", "--max-new-tokens", "6",
                   "--eval-problems", "4", "--eval-every", "1", "--variant", "dapo", "--beta", "0.01",
                   "--overlong-penalty", "2", "--lr", "1e-3", "--device", "cpu"])
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if "reward" in r]
    assert [r["step"] for r in train] == [1, 2]
    for key in ("reward", "reward_std", "accuracy", "frac_zero_std", "clip_frac", "kl", "entropy", "response_length"):
        assert key in train[0], key
    assert [r["step"] for r in rows if "heldout_accuracy" in r] == [0, 1, 2]
    assert train[0]["reward_std"] > 0 and train[0]["grad_norm"] > 1e-3      # a real update, not rounding noise
    for png in ("reward.png", "response_length.png", "diagnostics.png"):
        assert (out / "plots" / png).stat().st_size > 1000
    reloaded = Transformer.from_pretrained(out / "model")
    assert (out / "model" / "tokenizer.json").exists() and "held-out accuracy" in (out / "report.md").read_text()
    assert any(not torch.equal(a, b) for a, b in zip(reloaded.state_dict().values(),
                                                     Transformer.from_pretrained(base).state_dict().values()))
    with pytest.raises(SystemExit, match="already holds a run"):
        grpo_cmd.main(["--model", str(base), "--task", "arithmetic", "--out", str(out), "--device", "cpu"])


GRPO_FLAGS = ["--task", "arithmetic", "--task-arg", "n_digits=1", "--group-size", "2", "--prompts-per-step", "2",
              "--max-new-tokens", "4", "--device", "cpu"]


def test_grpo_command_ctrl_c_names_the_checkpoint(tok, tmp_path, monkeypatch, capsys):
    from nanoseek.commands import grpo as grpo_cmd

    base = tmp_path / "base"
    eos_heavy_model_dir(tok, base)
    real, calls = GRPO.step, []

    def interrupted_at_3(self, next_prompts):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(self, next_prompts)

    monkeypatch.setattr(GRPO, "step", interrupted_at_3)
    flags = ["--model", str(base), *GRPO_FLAGS, "--steps", "4", "--eval-problems", "0"]
    with pytest.raises(SystemExit) as e:
        grpo_cmd.main([*flags, "--out", str(tmp_path / "a"), "--save-every", "2"])
    assert e.value.code == 130
    assert (f"interrupted during step 3; resume with --resume {tmp_path / 'a'} (checkpoint step_000002)"
            in capsys.readouterr().err)
    Transformer.from_pretrained(tmp_path / "a" / "checkpoints" / "step_000002" / "model")
    with pytest.raises(SystemExit, match="holds a run's checkpoints .*go on with --resume"):
        grpo_cmd.main([*flags, "--out", str(tmp_path / "a")])
    calls.clear()
    with pytest.raises(SystemExit):
        grpo_cmd.main([*flags, "--out", str(tmp_path / "b")])
    assert "interrupted during step 3; no checkpoint was saved" in capsys.readouterr().err


def test_grpo_resume_takes_the_steps_an_unbroken_run_takes(tok, tmp_path, monkeypatch):
    """4 steps in one go against 2 steps, then --resume to 4: the same rollouts, losses and weights (the data
    stream, the optimizer state, the sampler's and the trainer's random streams and the reference model all
    come back), with the held-out evaluations and the KL term on."""
    from nanoseek.commands import grpo as grpo_cmd
    from nanoseek.commands.pretrain import main as pretrain_main

    base = tmp_path / "base"
    eos_heavy_model_dir(tok, base)
    flags = ["--model", str(base), *GRPO_FLAGS, "--save-every", "2", "--eval-every", "2", "--eval-problems", "4",
             "--beta", "0.01", "--variant", "dapo", "--lr", "1e-3", "--minibatches", "2"]
    grpo_cmd.main([*flags, "--out", str(tmp_path / "whole"), "--steps", "4"])
    grpo_cmd.main([*flags, "--out", str(tmp_path / "parts"), "--steps", "2"])
    with pytest.raises(SystemExit, match="only --steps, .* may be given \\(got --lr\\)"):
        grpo_cmd.main(["--resume", str(tmp_path / "parts"), "--steps", "4", "--lr", "1"])
    with pytest.raises(SystemExit, match="already at step 2"):
        grpo_cmd.main(["--resume", str(tmp_path / "parts"), "--steps", "2"])
    with pytest.raises(SystemExit, match="is a grpo checkpoint .*nanoseek grpo --resume"):
        pretrain_main(["--resume", str(tmp_path / "parts")])
    with (tmp_path / "parts" / "metrics.jsonl").open("a") as f:
        f.write('{"step": 3, "lr": 0.0')                # a line cut short by a crash
    # from inside the checkpoint folder: the run folder is still the one that holds it
    monkeypatch.chdir(tmp_path / "parts" / "checkpoints" / "step_000002")
    grpo_cmd.main(["--resume", ".", "--steps", "4"])
    monkeypatch.chdir(tmp_path)
    assert not (tmp_path / "parts" / "checkpoints" / "step_000002" / "checkpoints").exists()

    def train_rows(run):
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        return {r["step"]: r for r in rows if "reward" in r}

    whole, parts = train_rows(tmp_path / "whole"), train_rows(tmp_path / "parts")
    assert sorted(parts) == [1, 2, 3, 4]
    for step in (3, 4):
        for key in ("reward", "loss", "kl", "grad_norm", "response_length"):
            assert parts[step][key] == pytest.approx(whole[step][key], rel=1e-5, abs=1e-7), (step, key)
    assert whole[4]["grad_norm"] > 0
    a = Transformer.from_pretrained(tmp_path / "whole" / "model").state_dict()
    b = Transformer.from_pretrained(tmp_path / "parts" / "model").state_dict()
    assert all(torch.allclose(a[k], b[k], rtol=1e-5, atol=1e-7) for k in a)
    assert any(not torch.equal(a[k], v) for k, v in Transformer.from_pretrained(base).state_dict().items())
    assert (tmp_path / "parts" / "checkpoints" / "latest").read_text().strip() == "step_000004"
    # an older checkpoint than the run's latest would roll the run back; a finished run needs a larger --steps
    with pytest.raises(SystemExit, match="the run went on to step_000004; resuming the older step_000002"):
        grpo_cmd.main(["--resume", str(tmp_path / "whole" / "checkpoints" / "step_000002"), "--steps", "6"])
    with pytest.raises(SystemExit, match="already at step 4"):
        grpo_cmd.main(["--resume", str(tmp_path / "whole")])
    # the --beta reference is the starting model: one that is not this run's model is named
    other = Transformer(preset("tiny", vocab_size=tok.vocab_size, num_hidden_layers=2))
    other.init_weights()
    other.save_pretrained(base)
    with pytest.raises(SystemExit, match="is not the model this run trained"):
        grpo_cmd.main(["--resume", str(tmp_path / "whole"), "--steps", "6"])


@pytest.mark.parametrize("variant", ["grpo", "dapo"])
def test_update_split_over_threads_equals_one_chunk(variant):
    # the micro-batch's groups as chunks in CPU threads (train.parallel.split_backward): the same step
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, 64, (n,), generator=g).tolist() for n in (6, 3, 5)]
    comps = [torch.randint(3, 64, (n,), generator=g).tolist() for n in (5, 2, 7, 4, 1, 6)]
    batch = rollouts(prompts, comps, G=2)
    deltas, stats = [], []
    torch.set_num_threads(2)
    try:
        for split in (1, 2):   # 2: one group in one thread, two in the other
            torch.manual_seed(0)
            model = Transformer(preset("tiny", vocab_size=64))
            model.init_weights()
            before = [p.detach().clone() for p in model.parameters()]
            cfg = GRPOConfig(variant=variant, group_size=2, clip_grad=0.0, split=split)
            trainer = GRPO(model, torch.optim.SGD(model.parameters(), lr=1.0), None, None, cfg, pad_id=2)
            stats.append(trainer.update(batch))
            assert torch.get_num_threads() == 2
            deltas.append(torch.cat([(b - p.detach()).flatten() for b, p in zip(before, model.parameters())]))
    finally:
        torch.set_num_threads(1)
    assert deltas[0].abs().sum() > 0
    torch.testing.assert_close(deltas[1], deltas[0], rtol=1e-4, atol=1e-7)
    assert stats[0].keys() == stats[1].keys()
    for k in stats[0]:
        assert stats[1][k] == pytest.approx(stats[0][k], rel=1e-5, abs=1e-7), k
