"""GRPO and its variants as reusable pieces: rollout -> scoring -> group advantages -> clipped updates.

    trainer = GRPO(model, optimizer, generate, reward_fn, GRPOConfig(variant="dapo", group_size=8))
    stats = trainer.step(next_prompts)     # one batch of rollouts, then epochs x minibatches optimizer steps
    result = evaluate(generate_greedy, prompts, examples, reward, extract_answer, n_samples=1, k=1)

`generate(prompt_ids_list) -> completions` is the inference engine's batch call with its sampling
parameters bound (train/ does not import infer/; the command wires them): each completion has
`token_ids` (a final eos included when the model stopped), `text` and `finish_reason`.
`reward_fn(completion, example) -> {"total", "accuracy", "format", ...}` scores one completion.
The loss math is in losses.py (group_advantages, policy_loss, k3_kl); this file moves data between
the engine, the verifier and those functions (equations: shared/reference/r1-recipes.md section 7).

One step (DeepSeekMath's GRPO; mu passes and minibatches per batch of rollouts as in R1):
  1. rollout: G completions per prompt from the current policy, through the engine (batched, paged
     latent cache, the same code that serves). The engine shares the model object, so weights are
     never copied between "trainer" and "sampler".
  2. scoring: the task's verifier per completion; DAPO's dynamic sampling drops groups whose rewards
     are all equal and samples more prompts; overlong filtering masks completions cut at the limit.
  3. advantages: (r - mean) / std per group (Dr. GRPO: r - mean).
  4. old log-probs: a no-grad forward of the same weights, before any update (not the engine's
     sampled log-probs: the cached decode path differs from the training forward by rounding, and
     the ratio must start at exactly 1), plus the frozen reference's when beta > 0. With one
     optimizer step per batch, the update's own forward, detached, gives the same numbers.
  5. update: epochs_per_batch passes, each split into `minibatches` optimizer steps, the clipped
     ratio loss from a forward with gradients (micro-batched for memory, weighted so the sum is the
     loss of the whole minibatch). The forward runs each group's prompt once and its G completions
     against the stored prompt latents (`completion_logprobs`; the plain per-row forward beside it).
     With beta = 0, groups whose advantages are all 0 (all rewards equal) carry no loss and no
     gradient: they are counted in the normalizers but not run (GRPOConfig.skip_zero_advantage), so
     the update is the same at a fraction of the cost (the bench's random policy: 5 of 8 groups).
     entropy and ratio_mean are then the trained groups' (loss and clip_frac stay exact).

Under torchrun each process rolls out its share of a step's prompts with its own engine on its own
replica of the policy; the loss normalizers are the global ones (all ranks' sequences or tokens), the
gradients are summed over the ranks before each optimizer step, so every replica takes the same step
as one process would on the whole batch, and the logged statistics are the global batch's. With
dynamic sampling the ranks' shares may differ (even be empty): the normalizers are all-reduced, every
rank takes the same number of optimizer steps, and a rank without rows gets zero gradients.

Not applied in RL, deliberately: DeepSeek-V3's aux-loss-free router bias update (rollouts from one
task are a skewed sample of token types; the balance from pretraining is kept, the bias frozen) and
the MTP loss (a denser pretraining signal; here the objective is the reward alone). The MTP module
is left as pretraining made it, so speculative decoding may accept fewer drafts after RL.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from nanoseek.eval_metrics import cons_at_k, pass_at_k
from nanoseek.train.losses import (RL_VARIANTS, dynamic_sampling_mask, group_advantages, overlong_filter_mask,
                                   policy_loss)
from nanoseek.train.parallel import (all_reduce_grads_, all_reduce_sum_, counts_by_rank, cpu_split, is_distributed,
                                     split_backward)
from nanoseek.train.rl_forward import linear_logprobs
from nanoseek.train.step import autocast

Generate = Callable[[list[list[int]]], Sequence[Any]]
RewardFn = Callable[[Any, Any], dict]


@dataclass
class GRPOConfig:
    variant: str = "grpo"                 # grpo | dr_grpo | dapo | gspo (losses.RL_VARIANTS)
    group_size: int = 8                   # G completions per prompt
    epochs_per_batch: int = 1             # mu: passes over each batch of rollouts
    minibatches: int = 1                  # optimizer steps per pass (R1: 16)
    micro_batch: int = 0                  # completions per forward/backward; 0 = a whole minibatch
    split: int = 0                        # CPU: a micro-batch's groups as this many chunks in as many threads
                                          # (train.parallel.split_backward); 0 = one per thread, 1 = off
    eps_low: float | None = None          # None: the variant's paper value (losses.DEFAULT_EPS)
    eps_high: float | None = None
    beta: float = 0.0                     # k3 KL weight to the frozen reference (R1: 0.001)
    dynamic_sampling: bool = False        # DAPO: drop zero-std groups, sample more prompts
    max_sampling_rounds: int = 4          # generation rounds per step at most, with dynamic sampling
    overlong_filter: bool = False         # DAPO: truncated completions get no loss
    max_new_tokens: int = 256             # Dr. GRPO's constant normalizer L
    temperature: float = 1.0              # the rollouts' sampling temperature: the log-probs of the ratio (and of
                                          # the KL) are of logits / temperature, the policy that sampled (as TRL)
    clip_grad: float = 1.0                # max gradient norm (0: off)
    skip_zero_advantage: bool = True      # beta = 0: no forward/backward for groups whose advantages are all 0
    seed: int = 0                         # minibatch shuffling

    def __post_init__(self) -> None:
        if self.variant not in RL_VARIANTS:
            raise ValueError(f"variant must be one of {RL_VARIANTS}, got {self.variant!r}")
        for name in ("group_size", "epochs_per_batch", "minibatches", "max_sampling_rounds", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"GRPOConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.beta < 0 or self.micro_batch < 0 or self.split < 0:
            raise ValueError("GRPOConfig: beta, micro_batch and split must be >= 0")
        if not self.temperature > 0:
            raise ValueError(f"GRPOConfig: temperature must be > 0 (the rollouts sample), got {self.temperature}")

    @property
    def scale_rewards(self) -> str:
        """Dr. GRPO drops the std normalization; the others divide by the group's std."""
        return "none" if self.variant == "dr_grpo" else "std"


# --- rollouts and scoring
@dataclass
class Rollouts:
    """One batch of groups. B = groups * G completions, group g at rows g*G .. g*G + G - 1."""
    prompt_ids: list[list[int]]           # (B,) prompt tokens, each prompt repeated G times
    completion_ids: list[list[int]]       # (B,) generated tokens, final eos included
    texts: list[str]                      # (B,)
    truncated: torch.Tensor               # (B,) bool: cut at the length limit
    rewards: torch.Tensor                 # (groups, G) total reward
    accuracy: torch.Tensor                # (groups, G)
    format: torch.Tensor                  # (groups, G)
    examples: list = field(default_factory=list)   # (groups,)

    @property
    def group_size(self) -> int:
        return self.rewards.shape[1]

    def select(self, keep: torch.Tensor) -> Rollouts:
        """The groups where keep (groups,) is True."""
        G = self.group_size
        groups = keep.nonzero().flatten().tolist()
        rows = [g * G + i for g in groups for i in range(G)]
        return Rollouts([self.prompt_ids[r] for r in rows], [self.completion_ids[r] for r in rows],
                        [self.texts[r] for r in rows], self.truncated[rows], self.rewards[groups],
                        self.accuracy[groups], self.format[groups], [self.examples[g] for g in groups])

    @staticmethod
    def cat(parts: list[Rollouts]) -> Rollouts:
        return Rollouts([p for r in parts for p in r.prompt_ids], [c for r in parts for c in r.completion_ids],
                        [t for r in parts for t in r.texts], torch.cat([r.truncated for r in parts]),
                        torch.cat([r.rewards for r in parts]), torch.cat([r.accuracy for r in parts]),
                        torch.cat([r.format for r in parts]), [e for r in parts for e in r.examples])


def rollout(generate: Generate, prompts: list[list[int]], examples: Sequence[Any], reward_fn: RewardFn,
            group_size: int) -> Rollouts:
    """G completions per prompt in one engine batch, each scored by reward_fn."""
    if len(prompts) != len(examples):
        raise ValueError(f"{len(prompts)} prompts but {len(examples)} examples")
    flat = [p for p in prompts for _ in range(group_size)]
    completions = generate(flat)
    if len(completions) != len(flat):
        raise RuntimeError(f"generate returned {len(completions)} completions for {len(flat)} prompts")
    scores = [reward_fn(c, examples[i // group_size]) for i, c in enumerate(completions)]

    def grid(key: str) -> torch.Tensor:
        return torch.tensor([s.get(key, 0.0) for s in scores], dtype=torch.float32).view(-1, group_size)

    return Rollouts(prompt_ids=flat, completion_ids=[list(c.token_ids) for c in completions],
                    texts=[c.text for c in completions],
                    truncated=torch.tensor([c.finish_reason == "length" for c in completions]),
                    rewards=grid("total"), accuracy=grid("accuracy"), format=grid("format"),
                    examples=list(examples))


@dataclass
class Packed:
    """A batch of groups as tensors. Group g's prompt is prompts[g]; its G completions are rows g*G...
    Right padding everywhere, so every real token sits at its true position."""
    prompts: torch.Tensor                 # (groups, Lp) prompt ids
    prompt_lens: torch.Tensor             # (groups,) long
    completions: torch.Tensor             # (B, Tc) completion ids
    mask: torch.Tensor                    # (B, Tc) float, 1 on real completion tokens (the loss's tokens)
    group_size: int

    def rows(self, groups: torch.Tensor) -> torch.Tensor:
        """Completion rows of the given groups, in group order."""
        G = self.group_size
        return (groups[:, None] * G + torch.arange(G)).flatten()

    def take(self, groups: torch.Tensor) -> Packed:
        """The given groups, trimmed to their longest prompt and completion."""
        rows = self.rows(groups)
        Lp = int(self.prompt_lens[groups].max())
        Tc = max(int(self.mask[rows].sum(1).max()), 1)
        return Packed(self.prompts[groups, :Lp], self.prompt_lens[groups], self.completions[rows, :Tc],
                      self.mask[rows, :Tc], self.group_size)


def pack(batch: Rollouts, pad_id: int, device: torch.device | str = "cpu") -> Packed:
    G = batch.group_size
    prompts = batch.prompt_ids[::G]
    plens = [len(p) for p in prompts]
    clens = [len(c) for c in batch.completion_ids]
    Lp, Tc = max(plens, default=1), max(max(clens, default=0), 1)      # (no groups: a rank's empty share)
    # padded on the host: one tensor call per table (not one per row)
    prompt_t = torch.tensor([list(p) + [pad_id] * (Lp - len(p)) for p in prompts], dtype=torch.long).view(-1, Lp)
    comp_t = torch.tensor([list(c) + [pad_id] * (Tc - len(c)) for c in batch.completion_ids],
                          dtype=torch.long).view(-1, Tc)
    mask = (torch.arange(Tc)[None] < torch.tensor(clens)[:, None]).float()
    return Packed(prompt_t.to(device), torch.tensor(plens).to(device), comp_t.to(device), mask.to(device), G)


class _SharedPrefix:
    """The `cache` of a training forward in two calls: first the groups' prompts (their latents are
    kept, with their autograd history), then the completions, whose rows see their group's prompt
    latents repeated G times ahead of their own. The model's attention only calls `update`."""

    def __init__(self, group_size: int):
        self.G = group_size
        self.prefix: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def update(self, layer: int, kv: torch.Tensor, k_pe: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if layer not in self.prefix:                                  # the prompt pass
            self.prefix[layer] = (kv, k_pe)
            return kv, k_pe
        p_kv, p_pe = self.prefix[layer]                               # (groups, Lp, c), (groups, Lp, rope)
        return (torch.cat([p_kv.repeat_interleave(self.G, 0), kv], dim=1),      # (B, Lp + T, c)
                torch.cat([p_pe.repeat_interleave(self.G, 0), k_pe], dim=1))    # (B, Lp + T, rope)


class _OnePassPrefix:
    """The `cache` of a training forward in one call: the batch holds the groups' prompts (rows :P, the
    first Lp columns) and then their completions (rows P:). Every row's keys are [its group's prompt
    latents, taken from the prompt rows of the same layer | its own row's]; a prompt row's prefix
    columns are masked (it sees its own row only). The model's attention only calls `update`."""

    def __init__(self, groups: int, group_size: int, Lp: int, device: torch.device):
        self.Lp, self.P = Lp, groups
        g = torch.arange(groups, device=device)
        self.idx = torch.cat([g, g.repeat_interleave(group_size)])      # (P + B,) whose prompt each row sees

    def update(self, layer: int, kv: torch.Tensor, k_pe: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        P, Lp = self.P, self.Lp
        pre_kv = kv[:P, :Lp].index_select(0, self.idx)                  # (P + B, Lp, c)
        pre_pe = k_pe[:P, :Lp].index_select(0, self.idx)
        return torch.cat([pre_kv, kv], dim=1), torch.cat([pre_pe, k_pe], dim=1)   # (P + B, Lp + W, .)


def _prefix_mask(seen: torch.Tensor, Lp: int, T: int) -> torch.Tensor:
    """(R, T, Lp + T) bool: row r's T queries see the first seen[r] of Lp prefix keys, then their own
    row causally."""
    see_prompt = torch.arange(Lp, device=seen.device)[None, None] < seen[:, None, None]   # (R, 1, Lp)
    see_own = torch.ones(T, T, dtype=torch.bool, device=seen.device).tril()[None]        # (1, T, T)
    R = seen.shape[0]
    return torch.cat([see_prompt.expand(R, T, Lp), see_own.expand(R, T, T)], dim=2)


ONE_PASS_MAX_PAD = 1.15      # one forward for prompts and completions while it pads at most 15% more tokens


def completion_logprobs(model: nn.Module, x: Packed, shared_prefix: bool = True,
                        one_pass: bool | None = None, temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """log pi(completion token t | prompt, completion tokens < t) and the policy's entropy there:
    -> logp (B, Tc) with gradient, entropy (B, Tc) detached. temperature: of the policy that sampled
    (log_softmax(logits / temperature)).

    shared_prefix=True runs each group's prompt once and its G completions against it
    (a group shares one prompt, so this saves G - 1 prompt passes per group);
    shared_prefix=False is the plain version, one causal forward over prompt + completion per row.
    With shared_prefix, one_pass runs the prompts and the completions as rows of one forward (padded
    to one width; the completions see their group's prompt latents from the same layer) rather than
    a prompt forward and then a completion forward; None: when the padding costs little.
    The two agree to float rounding (tests/test_grpo.py checks it, gradients included). Either way
    the head and the log-softmax run fused, one row block at a time (rl_forward.linear_logprobs).
    """
    G, dev = x.group_size, x.completions.device
    B, Tc = x.completions.shape
    head = model.head.weight
    if not shared_prefix:
        plens = x.prompt_lens.repeat_interleave(G)                     # (B,)
        Lp = x.prompts.shape[1]
        ids = torch.cat([x.prompts.repeat_interleave(G, 0), torch.zeros_like(x.completions)], dim=1)  # (B, Lp+Tc)
        cols = plens[:, None] + torch.arange(Tc, device=dev)           # (B, Tc) where each completion goes
        ids = ids.scatter(1, cols, x.completions)
        h = model(ids[:, :Lp + Tc - 1], logits_at=cols - 1, head=False)   # (B, Tc, dim) only where a target is
        return linear_logprobs(h if temperature == 1.0 else h / temperature, head, x.completions)
    Lp = x.prompts.shape[1]
    plens = x.prompt_lens.repeat_interleave(G)                         # (B,)
    P, T = x.prompts.shape[0], Tc - 1                                  # the last token is a target only
    W = max(Lp, T)
    if one_pass is None:    # prompts and completions in one forward when padding both to W costs little
        one_pass = T > 0 and (P + B) * W <= ONE_PASS_MAX_PAD * (P * Lp + B * T)
    if one_pass and T > 0:
        # rows :P the prompts, rows P: the completions (minus their last token), each padded to W
        # columns: one forward with half the ops of two (the update is bound by op count at tiny sizes)
        ids = x.prompts.new_full((P + B, W), 0)
        ids[:P, :Lp] = x.prompts
        ids[P:, :T] = x.completions[:, :T]
        cols = torch.arange(W, device=dev)
        pos = torch.cat([cols.expand(P, W), plens[:, None] + cols])    # (P + B, W)
        mask = _prefix_mask(torch.cat([plens.new_zeros(P), plens]), Lp, W)   # prompt rows see no prefix
        h = model(ids, cache=_OnePassPrefix(P, G, Lp, dev), positions=pos, mask=mask, absorb=False,
                  head=False)                                          # (P + B, W, dim)
        first = h[torch.arange(P, device=dev), x.prompt_lens - 1].repeat_interleave(G, 0)   # (B, dim) -> token 0
        h = torch.cat([first[:, None], h[P:, :T]], dim=1)                # (B, Tc, dim)
        return linear_logprobs(h if temperature == 1.0 else h / temperature, head, x.completions)
    cache = _SharedPrefix(G)
    causal = torch.ones(Lp, Lp, dtype=torch.bool, device=dev).tril()[None]                # (1, Lp, Lp)
    h = model(x.prompts, cache=cache, positions=torch.arange(Lp, device=dev)[None], mask=causal, absorb=False,
              logits_at=(x.prompt_lens - 1)[:, None], head=False)  # (P, 1, dim): predicts completion token 0
    h = h.repeat_interleave(G, 0)                                      # (B, 1, dim)
    if Tc > 1:
        pos = plens[:, None] + torch.arange(T, device=dev)             # (B, T)
        mask = _prefix_mask(plens, Lp, T)                              # (B, T, Lp+T)
        h_c = model(x.completions[:, :T], cache=cache, positions=pos, mask=mask, absorb=False, head=False)
        h = torch.cat([h, h_c], dim=1)                                 # (B, Tc, dim)
    return linear_logprobs(h if temperature == 1.0 else h / temperature, head, x.completions)


# --- the trainer
class GRPO:
    """Holds the policy, its optimizer, the rollout function and the verifier; `step` does one batch.

    The caller sets the learning rate (optimizer.param_groups) before each step. ref_model, when
    beta > 0, is a frozen copy of the starting policy (the caller makes it; no grad, eval mode).
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, generate: Generate,
                 reward_fn: RewardFn, cfg: GRPOConfig, *, ref_model: nn.Module | None = None, pad_id: int = 0,
                 dtype: torch.dtype = torch.float32):
        if cfg.beta > 0 and ref_model is None:
            raise ValueError("beta > 0 needs a reference model (a frozen copy of the starting policy)")
        self.model, self.optimizer, self.generate, self.reward_fn, self.cfg = model, optimizer, generate, reward_fn, cfg
        self.ref_model = ref_model if cfg.beta > 0 else None
        self.pad_id, self.dtype = pad_id, dtype
        self.device = next(model.parameters()).device
        self.gen = torch.Generator().manual_seed(cfg.seed)

    # --- 1-2: rollouts, scoring, dynamic sampling
    def collect(self, next_prompts: Callable[[], tuple[list[list[int]], list]]) -> tuple[Rollouts, Rollouts]:
        """Roll out prompts from next_prompts() (one call = one batch of prompts).

        Returns (batch to train on, everything sampled). With dynamic sampling, only groups whose
        rewards differ are kept and more batches are drawn until as many groups as one batch holds
        are kept, or max_sampling_rounds is reached (DAPO samples until full; a cap keeps a step's
        cost bounded when the task is all-solved or all-failed).
        Under torchrun each rank rolls out its share of every round, and the rounds go on until the
        ranks together keep a global batch's worth (want x world groups); each rank keeps up to want,
        and ranks with more make up for ranks with fewer, so the shares may differ (update() takes
        uneven shares).
        """
        cfg = self.cfg
        prompts, examples = next_prompts()
        want = len(prompts)
        sampled = [rollout(self.generate, prompts, examples, self.reward_fn, cfg.group_size)]
        if not cfg.dynamic_sampling:
            return sampled[0], sampled[0]
        kept = [sampled[0].select(dynamic_sampling_mask(sampled[0].rewards))]
        counts, rank = counts_by_rank(len(kept[0].examples), self.device)   # every rank's kept groups
        world = len(counts)
        while sum(counts) < want * world and len(sampled) < cfg.max_sampling_rounds:
            prompts, examples = next_prompts()
            sampled.append(rollout(self.generate, prompts, examples, self.reward_fn, cfg.group_size))
            kept.append(sampled[-1].select(dynamic_sampling_mask(sampled[-1].rewards)))
            counts, _ = counts_by_rank(sum(len(k.examples) for k in kept), self.device)
        batch = Rollouts.cat(kept)
        # a global batch's worth at most: each rank keeps up to its own share (want), then the ranks in
        # order make up what others lacked from their surplus (the same arithmetic on every rank)
        base = [min(c, want) for c in counts]
        left = want * world - sum(base)
        mine = base[rank]
        for r in range(world):
            extra = min(counts[r] - base[r], left)
            mine += extra if r == rank else 0
            left -= extra
        if len(batch.examples) > mine:
            batch = batch.select(torch.arange(len(batch.examples)) < mine)
        return batch, Rollouts.cat(sampled)

    # --- 3-5: advantages, old log-probs, updates
    def update(self, batch: Rollouts) -> dict[str, float]:
        """epochs_per_batch x minibatches optimizer steps on one batch; returns mean stats.

        Minibatches and micro-batches are made of whole groups (a group shares its prompt pass), so a
        pass takes min(minibatches, groups) steps. Under torchrun the minibatches are slices of one
        permutation of the global batch's groups (rank 0's groups first, then rank 1's, ...), the same
        on every rank: each rank trains its groups of each slice, and the steps are one process's.
        """
        cfg, model = self.cfg, self.model
        n_groups = len(batch.examples)
        counts, rank = counts_by_rank(n_groups, self.device)            # every rank's share (may be uneven)
        total, first = sum(counts), sum(counts[:rank])                  # global groups; this rank's first
        if total == 0:
            return {"updates": 0}
        x = pack(batch, self.pad_id, self.device)
        if cfg.overlong_filter:
            x.mask = x.mask * overlong_filter_mask(batch.truncated).to(x.mask)[:, None]
        adv_g = group_advantages(batch.rewards, cfg.scale_rewards)                           # (groups, G)
        adv = adv_g.flatten().to(self.device)                                                # (B,)
        micro = max(1, cfg.micro_batch // cfg.group_size if cfg.micro_batch else n_groups)   # groups per forward
        all_groups = torch.arange(n_groups)
        # With beta = 0 the loss is the policy term alone, A_i * (a function of the ratio), so a group whose
        # advantages are all exactly 0 (its rewards all equal: every group of an all-solved or all-failed
        # prompt) has a gradient of exactly 0 and a loss of exactly 0. Its forward and backward are skipped;
        # the normalizers still count it, so the update is the same. (DAPO's dynamic sampling drops such
        # groups and samples others instead; this keeps them in the batch, at no cost.)
        skip = cfg.skip_zero_advantage and self.ref_model is None
        signal = adv_g.ne(0).any(dim=1) if skip else torch.ones(n_groups, dtype=torch.bool)   # (groups,)

        # Old log-probs: the policy that sampled = the current weights, before any update. With a
        # single optimizer step per batch they are exactly the detached log-probs of that step's own
        # forward (same weights, same inputs), so the separate no-grad pass is skipped (as TRL does).
        single = cfg.epochs_per_batch == 1 and cfg.minibatches == 1
        old_logp = None if single else self._no_grad_logprobs(model, x, all_groups[signal], micro)
        ref_logp = None if self.ref_model is None else self._no_grad_logprobs(self.ref_model, x, all_groups, micro)

        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        split = cfg.split or cpu_split(self.device, n_groups)
        # running weighted sums of the logged stats, kept as 0-dim device tensors: one host sync per update
        # (every name from the start: under torchrun each rank reduces the same list, even one with no groups)
        zero = torch.zeros((), device=self.device)
        sums: dict[str, torch.Tensor] = dict.fromkeys(("loss", "clip_frac", "kl", "ratio_mean", "entropy",
                                                      "grad_norm"), zero)
        weights: dict[str, torch.Tensor] = dict(sums)

        def add(name: str, value: torch.Tensor, w: torch.Tensor | float) -> None:
            sums[name] = sums.get(name, zero) + value.detach().float() * w
            weights[name] = weights.get(name, zero) + w

        per_seq = ("clip_frac", "ratio_mean") if cfg.variant == "gspo" else ()
        n_updates = 0
        for epoch in range(cfg.epochs_per_batch):
            order = torch.randperm(total, generator=self.gen)       # global group ids (the same on every rank)
            for piece in torch.tensor_split(order, min(cfg.minibatches, total)):
                mb = piece[(piece >= first) & (piece < first + n_groups)] - first     # this rank's, local ids
                mb_rows = x.rows(mb)
                # the minibatch's normalizers over every process's share
                mb_tokens = all_reduce_sum_(x.mask[mb_rows].sum()).clamp(min=1)
                mb_seqs = len(piece) * cfg.group_size
                keep = signal[mb]
                if not keep.any():
                    # one group still runs (its gradient is exactly 0): every parameter the forward reaches
                    # gets a zero gradient, not None, so the optimizer steps them as it would without the
                    # skip (under torchrun all_reduce_grads_ also fills in zeros for a rank with none)
                    keep = torch.arange(len(mb)) == 0
                if not keep.all():
                    # the skipped groups' share of the logged loss (exactly 0) and of the clip fraction (0)
                    rest = x.rows(mb[~keep])
                    n_rest = x.mask[rest].sum()
                    w_rest = n_rest / mb_tokens if cfg.variant == "dapo" else len(rest) / mb_seqs
                    add("loss", n_rest.new_zeros(()), w_rest)
                    add("clip_frac", n_rest.new_zeros(()), len(rest) if per_seq else n_rest)
                for groups in mb[keep].split(micro) if len(mb) else ():
                    def chunk(_rows_weight: float, groups: torch.Tensor):
                        part, rows = x.take(groups), x.rows(groups)
                        Tc = part.mask.shape[1]
                        with autocast(self.device, self.dtype):
                            logp, entropy = completion_logprobs(model, part, temperature=cfg.temperature)
                        # (a zero-advantage group run only for its zero gradient has no old log-probs)
                        old = logp.detach() if old_logp is None or not signal[groups].all() else old_logp[rows, :Tc]
                        loss, st = policy_loss(logp, old, adv[rows], part.mask, variant=cfg.variant,
                                               eps_low=cfg.eps_low, eps_high=cfg.eps_high,
                                               ref_logp=None if ref_logp is None else ref_logp[rows, :Tc],
                                               beta=cfg.beta, max_len=cfg.max_new_tokens)
                        # each variant's normalizer is over the whole minibatch: DAPO's is its token count,
                        # the others' its sequence count, so weight the micro-batch (chunk) losses accordingly
                        n_tok = part.mask.sum()
                        w = n_tok / mb_tokens if cfg.variant == "dapo" else len(rows) / mb_seqs
                        return loss * w, (loss, w, st, n_tok, entropy, part.mask)
                    # the groups as `split` chunks in as many CPU threads (one chunk: a plain backward)
                    for loss, w, st, n_tok, entropy, mask in split_backward(
                            chunk, params, min(split, len(groups)), groups):
                        add("loss", loss, w)
                        for k, v in st.items():     # GSPO's clip_frac and ratio_mean are per sequence
                            add(k, v, mask.shape[0] if k in per_seq else n_tok)
                        if epoch == 0:     # mean policy entropy over the valid tokens
                            add("entropy", (entropy * mask).sum() / n_tok.clamp(min=1), n_tok)
                all_reduce_grads_(params)      # torchrun: the ranks' shares summed (no-op in one process)
                max_norm = cfg.clip_grad if cfg.clip_grad > 0 else float("inf")
                add("grad_norm", torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm), 1.0)
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
                n_updates += 1
        names = sorted(sums)      # the same order on every rank
        total = all_reduce_sum_(torch.stack([sums[k] for k in names] + [weights[k] for k in names]))
        means = total[:len(names)] / total[len(names):].clamp(min=1e-12)
        out: dict[str, float] = dict(zip(names, means.tolist()))
        out["updates"] = n_updates
        return out

    @torch.no_grad()
    def _no_grad_logprobs(self, model: nn.Module, x: Packed, groups: torch.Tensor, micro: int) -> torch.Tensor:
        """log-probs (B, Tc) of the completions under `model`, micro-batched by groups."""
        out = torch.zeros_like(x.mask)
        for g in groups.split(micro) if len(groups) else ():
            part = x.take(g)
            with autocast(self.device, self.dtype):
                out[x.rows(g), :part.mask.shape[1]] = completion_logprobs(
                    model, part, temperature=self.cfg.temperature)[0].float()
        return out

    def step(self, next_prompts: Callable[[], tuple[list[list[int]], list]]) -> dict[str, float]:
        """Rollout, score, update. Returns the step's metrics (rewards over everything sampled)."""
        t0 = time.perf_counter()
        batch, sampled = self.collect(next_prompts)
        t1 = time.perf_counter()
        upd = self.update(batch)
        t2 = time.perf_counter()
        n = len(sampled.completion_ids)
        lengths = torch.tensor([len(c) for c in sampled.completion_ids], dtype=torch.float32)
        r = sampled.rewards
        if is_distributed():     # the global batch's statistics: sums over the ranks' shares
            sums = all_reduce_sum_(torch.stack([
                torch.tensor(float(n)), r.sum(), (r.double() ** 2).sum().float(), sampled.accuracy.sum(),
                sampled.format.sum(), lengths.sum(), sampled.truncated.float().sum(),
                (~dynamic_sampling_mask(r)).float().sum(), torch.tensor(float(r.shape[0])),
                torch.tensor(float(len(batch.examples)))]).to(self.device)).tolist()
            n_all, groups = sums[0], sums[8]
            mean = sums[1] / n_all
            stats = {"reward": mean, "reward_std": max(sums[2] - n_all * mean**2, 0.0) ** 0.5 / max(n_all - 1, 1) ** 0.5,
                     "accuracy": sums[3] / n_all, "format": sums[4] / n_all, "frac_zero_std": sums[7] / groups,
                     "response_length": sums[5] / n_all, "truncated": sums[6] / n_all,
                     "groups_trained": int(sums[9]), "completions": int(n_all)}
        else:
            stats = {"reward": r.mean().item(), "reward_std": r.std().item() if r.numel() > 1 else 0.0,
                     "accuracy": sampled.accuracy.mean().item(), "format": sampled.format.mean().item(),
                     "frac_zero_std": (~dynamic_sampling_mask(r)).float().mean().item(),
                     "response_length": lengths.mean().item(), "truncated": sampled.truncated.float().mean().item(),
                     "groups_trained": len(batch.examples), "completions": n}
        return {**stats, **upd, "time_rollout": t1 - t0, "time_update": t2 - t1,
                "completions_per_s": stats["completions"] / max(t2 - t0, 1e-9)}


# --- evaluation (held-out accuracy during GRPO, and `nanoseek eval`)
def chat_prompts(tokenizer, messages: Callable[[Any], list[dict]], examples: Sequence[Any]) -> list[list[int]]:
    """Each example's chat prompt, ending with the generation prompt ("<｜Assistant｜><think>\\n")."""
    return [tokenizer.render_chat(messages(ex), add_generation_prompt=True)[0] for ex in examples]


def evaluate(generate: Generate, prompts: list[list[int]], examples: Sequence[Any],
             reward: Callable[[str, Any], dict], extract_answer: Callable[[str], str | None], *,
             n_samples: int = 1, k: int = 1) -> dict:
    """n_samples completions per problem, scored by the verifier.

    pass@1 is the mean accuracy over all samples (greedy when generate is greedy and n_samples 1);
    pass@k the unbiased estimator 1 - C(n-c, k)/C(n, k) averaged over problems; cons@k the
    majority vote of the first k samples' extracted answers. Returns the aggregates and, under
    "problems", each problem's prompt, gold answer, correct count and first sample.
    """
    if not 1 <= k <= n_samples:
        raise ValueError(f"need 1 <= k <= n_samples, got k={k}, n_samples={n_samples}")
    flat = [p for p in prompts for _ in range(n_samples)]
    completions = generate(flat)
    problems, p1, pk, ck, fmt, length = [], [], [], [], [], []
    for i, ex in enumerate(examples):
        outs = completions[i * n_samples:(i + 1) * n_samples]
        scores = [reward(c.text, ex) for c in outs]
        correct = [s["accuracy"] == 1.0 for s in scores]
        c = sum(correct)
        p1.append(c / n_samples)
        pk.append(pass_at_k(n_samples, c, k))
        ck.append(cons_at_k([extract_answer(o.text) for o in outs], correct, k))
        fmt.extend(s["format"] for s in scores)
        length.extend(len(o.token_ids) for o in outs)
        problems.append({"prompt": getattr(ex, "prompt", None), "answer": getattr(ex, "answer", None),
                         "correct": c, "samples": n_samples, "first_sample": outs[0].text})
    n = max(len(examples), 1)
    return {"n_problems": len(examples), "n_samples": n_samples, "k": k,
            "pass@1": sum(p1) / n, f"pass@{k}": sum(pk) / n, f"cons@{k}": sum(ck) / n,
            "format": sum(fmt) / max(len(fmt), 1), "response_length": sum(length) / max(len(length), 1),
            "problems": problems}


def merge_evaluations(parts: list[dict]) -> dict:
    """evaluate() results of the ranks' shares (rank r took problems r, r + world, ...) as one: the
    means weighted by problem counts (each problem has the same number of samples), the problems
    back in their order. For torchrun, after all_gather_object."""
    if len(parts) == 1:
        return parts[0]
    total = sum(p["n_problems"] for p in parts)
    out = {key: parts[0][key] for key in ("n_samples", "k")}
    out["n_problems"] = total
    for key in parts[0]:
        if key not in out and key != "problems":
            out[key] = sum(p[key] * p["n_problems"] for p in parts) / max(total, 1)
    world = len(parts)
    out["problems"] = [parts[i % world]["problems"][i // world] for i in range(total)]
    return out


# --- plots
def plot_grpo(metrics: str | Path, out_dir: str | Path) -> list[Path]:
    """reward.png (mean +- std, accuracy, held-out accuracy), response_length.png and
    diagnostics.png (zero-std groups, clip fraction, KL, entropy) from a GRPO metrics.jsonl."""
    import matplotlib

    matplotlib.use("Agg")   # files only, never a window
    import matplotlib.pyplot as plt

    from nanoseek.train.plots import read_metrics

    def save(fig, path: Path) -> Path:
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
        return path

    rows = read_metrics(metrics)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    train = [r for r in rows if "reward" in r]
    held = [r for r in rows if "heldout_accuracy" in r]
    steps = [r["step"] for r in train]

    def series(name: str) -> list[float]:
        return [r.get(name, float("nan")) for r in train]

    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        mean, std = torch.tensor(series("reward")), torch.tensor(series("reward_std"))
        ax.plot(steps, mean.tolist(), label="reward (mean)")
        ax.fill_between(steps, (mean - std).tolist(), (mean + std).tolist(), alpha=0.2, label="reward +- std")
        ax.plot(steps, series("accuracy"), label="train accuracy")
    if held:
        ax.plot([r["step"] for r in held], [r["heldout_accuracy"] for r in held], "o-", label="held-out accuracy")
    ax.set(xlabel="step", title="reward and accuracy")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    written = [save(fig, out_dir / "reward.png")]

    fig, ax = plt.subplots(figsize=(7, 3))
    ax.plot(steps, series("response_length"))
    ax.set(xlabel="step", ylabel="tokens", title="mean response length")
    ax.grid(alpha=0.3)
    written.append(save(fig, out_dir / "response_length.png"))

    fig, axes = plt.subplots(2, 2, figsize=(9, 6))
    for ax, (name, title) in zip(axes.flat, [("frac_zero_std", "fraction of zero-std groups"),
                                             ("clip_frac", "clip fraction"), ("kl", "k3 KL to reference"),
                                             ("entropy", "policy entropy (nats)")]):
        ax.plot(steps, series(name))
        ax.set(xlabel="step", title=title)
        ax.grid(alpha=0.3)
    written.append(save(fig, out_dir / "diagnostics.png"))
    return written
