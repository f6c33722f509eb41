"""Supervised fine-tuning on chat conversations, shared by `nanoseek sft` and `nanoseek distill`.

    ds = SFTDataset(conversations, tokenizer, seq_len=256)          # data/sft.py: packing + loss mask
    rows = sft_train(model, ds, optimizer, steps=200, batch_size=16, lr=1e-3, device=dev, log=print)

The loss is next-token cross-entropy on the assistant tokens only (their content and closing eos):
prompts, system text, role markers and padding are inputs, never targets. `sft_loss` applies the
loss mask itself rather than trusting that ignored targets were already replaced by -100, so a
target outside the mask cannot leak into the loss whatever the caller passes.

R1's third stage (rejection sampling) lives here too: `rejection_sample` has a teacher sample k
traces per prompt and keeps only those the task's verifier accepts, as chat conversations for SFT.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from nanoseek.common import DistInfo
from nanoseek.data.sft import IGNORE_INDEX, SFTDataset
from nanoseek.model import Transformer
from nanoseek.tokenizer import Tokenizer
from nanoseek.train import parallel
from nanoseek.train.optim import lr_at
from nanoseek.train.step import autocast


def sft_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss_mask: torch.Tensor,
             reduction: str = "mean") -> torch.Tensor:
    """Mean (or with reduction="sum", summed) cross-entropy over the target tokens where loss_mask is True.

    x, y, loss_mask: (B, T). Targets outside the mask are ignored whatever their value. The MTP
    modules are not trained here (SFT teaches the main head; R1's SFT stages do not mention MTP).
    """
    logits = model(x)                                                 # (B, T, V)
    targets = torch.where(loss_mask.bool(), y, IGNORE_INDEX)
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX,
                           reduction=reduction)


def sft_train(model: nn.Module, dataset: SFTDataset, optimizer: torch.optim.Optimizer, *, steps: int,
              batch_size: int, lr: float, min_lr: float | None = None, warmup: int = 0, clip: float = 1.0,
              device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32, seed: int = 0,
              log: Callable[[dict], Any] | None = None, log_every: int = 1, dist: DistInfo | None = None) -> list[dict]:
    """`steps` optimizer steps over `dataset` (reshuffled each epoch), cosine lr from `lr` to `min_lr`.

    Returns the logged rows ({"step", "loss", "lr", "grad_norm", "tokens", "tok_per_s"}); `log` gets
    each row as it is made. Raises if the loss stops being finite. The router's aux-loss-free bias
    is left as it is: SFT data are few and skewed, and the balance learned in pretraining should stay.

    Under torchrun (`dist` enabled) every rank draws the same global batch of `batch_size` rows and
    trains on its share (rows rank::world) in DDP; each rank's summed loss over the global token count
    (times world, as DDP averages) makes the step equal to the one-process step on the global batch.
    The MTP modules, which SFT does not train, are frozen meanwhile (DDP needs every trained parameter
    to get a gradient).
    """
    if steps <= 0 or batch_size <= 0:
        raise ValueError(f"steps ({steps}) and batch_size ({batch_size}) must be > 0")
    dist = dist or DistInfo()
    batch_size = min(batch_size, len(dataset))   # a small set still trains (one batch per epoch)
    if batch_size < dist.world_size:
        raise ValueError(f"a batch of {batch_size} rows cannot give each of {dist.world_size} processes one")
    min_lr = lr / 10 if min_lr is None else min_lr
    device = torch.device(device)
    model.train()
    frozen = [p for p in model.mtp.parameters() if p.requires_grad] if dist.enabled else []
    for p in frozen:
        p.requires_grad_(False)
    net = parallel.wrap_model(model, dist, device)
    rows: list[dict] = []
    epoch, batches = 0, dataset.batches(batch_size, epoch=0, seed=seed)
    t0 = time.perf_counter()
    try:
        for step in range(steps):
            try:
                x, y, m = next(batches)
            except StopIteration:
                epoch += 1
                batches = dataset.batches(batch_size, epoch=epoch, seed=seed)
                x, y, m = next(batches)
            tokens = m.sum().to(device)          # the global batch's target tokens (every rank has the batch)
            per_token = 1 / tokens.clamp(min=1)
            if dist.enabled:
                x, y, m = x[dist.rank::dist.world_size], y[dist.rank::dist.world_size], m[dist.rank::dist.world_size]
            x, y, m = x.to(device), y.to(device), m.to(device)
            cur_lr = lr_at(step, lr=lr, min_lr=min_lr, warmup=warmup, total=steps)
            for group in optimizer.param_groups:
                group["lr"] = cur_lr
            with autocast(device, dtype):
                loss_sum = sft_loss(net, x, y, m, reduction="sum")
            (loss_sum * (dist.world_size * per_token)).backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip if clip > 0 else float("inf"))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if (step + 1) % log_every == 0 or step + 1 == steps:
                value = (parallel.all_reduce_sum_(loss_sum.detach().clone()) * per_token).item()
                if not math.isfinite(value):    # the first loss is the loaded weights' own, before any update
                    raise FloatingPointError(f"SFT loss is {value} at step {step + 1}; " + (
                        "the model's outputs are not finite before any update (damaged weights?)" if step == 0
                        else "lower the learning rate"))
                dt = time.perf_counter() - t0
                row = {"step": step + 1, "epoch": epoch, "loss": value, "lr": cur_lr,
                       "grad_norm": float(grad_norm), "tokens": int(tokens), "time": dt}
                rows.append(row)
                if log is not None:
                    log(row)
    finally:
        for p in frozen:
            p.requires_grad_(True)
    return rows


@torch.no_grad()
def sft_eval_loss(model: nn.Module, dataset: SFTDataset, batch_size: int, device: torch.device | str = "cpu",
                  dtype: torch.dtype = torch.float32) -> float:
    """Token-weighted mean assistant-token loss over the whole dataset (no shuffling)."""
    device = torch.device(device)
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(dataset), batch_size):
        rows = [dataset[j] for j in range(i, min(i + batch_size, len(dataset)))]
        x, y, m = (torch.stack(t).to(device) for t in zip(*rows))
        n = int(m.sum())
        if n == 0:
            continue
        with autocast(device, dtype):
            total += sft_loss(model, x, y, m).item() * n
        count += n
    model.train(was_training)
    return total / max(count, 1)


# --- loading (shared by sft, distill, grpo and eval)
def load_model(model_dir: str | Path, device: torch.device, tokenizer_dir: str | Path | None = None,
               ) -> tuple[Transformer, Tokenizer]:
    """An HF-format checkpoint directory and its tokenizer (beside the weights unless tokenizer_dir),
    fp32 master weights on `device`. Errors name the directory and what is missing."""
    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"{model_dir}: not a model directory (no config.json); pass a folder "
                                "written by save_pretrained, e.g. runs/NAME/model")
    tok_dir = Path(tokenizer_dir) if tokenizer_dir else model_dir
    if not (tok_dir / "tokenizer.json").is_file():
        raise FileNotFoundError(f"{tok_dir}: no tokenizer.json; pass --tokenizer DIR")
    tokenizer = Tokenizer.from_dir(tok_dir)
    model = Transformer.from_pretrained(model_dir, dtype=torch.float32, device=device)
    if tokenizer.vocab_size > model.config.vocab_size:
        raise ValueError(f"tokenizer in {tok_dir} has {tokenizer.vocab_size} tokens but the model's vocab_size "
                         f"is {model.config.vocab_size}: they do not belong together")
    return model, tokenizer


def save_model(model: Transformer, tokenizer: Tokenizer, path: str | Path) -> Path:
    """An HF directory with the weights and the tokenizer, atomic: written beside, then renamed (an
    interrupted save leaves the previous directory, never one without its tokenizer)."""
    path = Path(path)
    model.save_pretrained(path, files=tokenizer_files(tokenizer))
    return path


def tokenizer_files(tokenizer: Tokenizer) -> dict[str, bytes]:
    """The files Tokenizer.save writes, as {name: contents}."""
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        tokenizer.save(d)
        return {f.name: f.read_bytes() for f in Path(d).iterdir()}


def task_knobs(pairs: Sequence[str] | None, examples: Callable | None = None) -> dict[str, Any]:
    """["n_digits=3", "ops=+-"] -> {"n_digits": 3, "ops": "+-"} (ints and floats converted). With the
    task's `examples` function, each key must be one of its keyword knobs and each value of its
    default's kind (an int knob takes an int, a float knob a number)."""
    out = _parse_knobs(pairs)
    if examples is not None:
        import inspect

        knobs = {name: p.default for name, p in inspect.signature(examples).parameters.items()
                 if p.kind is inspect.Parameter.KEYWORD_ONLY}
        for key, value in out.items():
            if key not in knobs:
                raise ValueError(f"unknown task option {key!r}; this task has {', '.join(knobs) or 'none'}")
            default = knobs[key]
            if isinstance(default, bool):       # "False" is a non-empty string: read it as a truth value
                truth = {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}
                if str(value).strip().lower() not in truth:
                    raise ValueError(f"task option {key}={value!r}: expected true or false")
                out[key] = truth[str(value).strip().lower()]
                continue
            if default is None:
                continue
            if isinstance(default, int) and not isinstance(value, int):
                raise ValueError(f"task option {key}={value!r}: expected an integer")
            if isinstance(default, float) and not isinstance(value, (int, float)):
                raise ValueError(f"task option {key}={value!r}: expected a number")
    return out


def _parse_knobs(pairs: Sequence[str] | None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for pair in pairs or []:
        key, eq, value = pair.partition("=")
        if not eq or not key.strip():
            raise ValueError(f"task option {pair!r}: expected KEY=VALUE, e.g. n_digits=3")
        for conv in (int, float):
            try:
                out[key.strip()] = conv(value)
                break
            except ValueError:
                continue
        else:
            out[key.strip()] = value
    return out


# --- rejection sampling (R1's third stage)
def rejection_sample(generate: Callable[[list[list[int]]], Sequence[Any]], tokenizer, examples: Sequence[Any],
                     messages: Callable[[Any], list[dict]], reward: Callable[[str, Any], dict], k: int,
                     dedupe: bool = True) -> tuple[list[list[dict]], dict]:
    """Sample k traces per example with `generate` and keep the verified ones as SFT conversations.

    generate: prompt token ids -> completions with `.text` and `.finish_reason` (the engine's
    Completion), one per prompt; the prompts are each example's chat prompt with the generation
    prompt ("<｜Assistant｜><think>\\n"), repeated k times. A trace is kept when the verifier
    finds it correct and well-formed (reward accuracy 1 and format 1: the student should not learn
    a right answer in a broken layout) and it ended by itself (not cut at the length limit); the
    kept conversation is messages(ex) plus the assistant turn "<think>\\n" + text, exactly what the
    teacher produced after the prompt. dedupe drops identical traces of the same prompt.

    Returns (conversations, stats) with stats: sampled, verified (correct and well-formed), kept,
    prompts_with_a_trace.
    """
    if k <= 0:
        raise ValueError(f"k must be > 0, got {k}")
    prefix = _generation_prefix(tokenizer)
    prompts = [tokenizer.render_chat(messages(ex), add_generation_prompt=True)[0] for ex in examples]
    flat = [p for p in prompts for _ in range(k)]
    completions = generate(flat)
    if len(completions) != len(flat):
        raise RuntimeError(f"generate returned {len(completions)} completions for {len(flat)} prompts")
    kept: list[list[dict]] = []
    seen: set[tuple[int, str]] = set()
    verified = 0
    for i, c in enumerate(completions):
        ex = examples[i // k]
        score = reward(c.text, ex)
        ok = score["accuracy"] == 1.0 and score.get("format", 1.0) == 1.0
        verified += ok
        if not ok or c.finish_reason == "length" or (dedupe and (i // k, c.text) in seen):
            continue
        seen.add((i // k, c.text))
        kept.append(messages(ex) + [{"role": "assistant", "content": prefix + c.text}])
    stats = {"sampled": len(flat), "verified": verified, "kept": len(kept),
             "prompts_with_a_trace": len({j for j, _ in seen})}
    return kept, stats


def _generation_prefix(tokenizer) -> str:
    """What the generation prompt puts after "<｜Assistant｜>" ("<think>\\n" with an R1 tokenizer),
    so a kept trace is the assistant turn as a whole."""
    ids, _ = tokenizer.render_chat([], add_generation_prompt=True)
    return tokenizer.decode(ids[ids.index(tokenizer.assistant_id) + 1:])
