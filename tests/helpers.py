"""Builders shared by the RL-side tests (importable: pytest puts tests/ on sys.path)."""

from __future__ import annotations

from nanoseek.common import seed_everything
from nanoseek.model import Transformer, preset
from nanoseek.tasks import get_task
from nanoseek.tokenizer import Tokenizer

arith = get_task("arithmetic")


def arith_tokenizer(extra: tuple[str, ...] = ()) -> Tokenizer:
    """A 512-token BPE trained on arithmetic equations and worked chat solutions (plus `extra` texts)."""
    ex = arith.examples(50, 0)
    texts = arith.corpus(1000, 0) + [m["content"] for e in ex for m in arith.sft_messages(e)]
    return Tokenizer.train(texts + list(extra), vocab_size=512)


def tiny_model(tok: Tokenizer, seed: int = 0) -> Transformer:
    """The tiny preset (MLA + MoE + MTP) with `tok`'s vocabulary, initialized from `seed`."""
    seed_everything(seed)
    model = Transformer(preset("tiny", vocab_size=tok.vocab_size))
    model.init_weights()
    return model


def eos_heavy_model_dir(tok: Tokenizer, path) -> None:
    """A tiny model saved with its tokenizer, eos often near the top: completion lengths vary, so a
    short GRPO run with DAPO's overlong shaping gives its groups a reward signal."""
    import torch

    model = tiny_model(tok)
    with torch.no_grad():
        model.head.weight[tok.eos_id] *= 10
    model.save_pretrained(path)
    tok.save(path)
