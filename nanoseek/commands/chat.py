"""Multi-turn chat with a model in the terminal: streaming, the <think> part dimmed and apart.

    nanoseek chat --model runs/sft/model
    nanoseek chat --model runs/grpo/model --temperature 0.6 --speculative

Type a message and press Enter. /exit (or Ctrl-D) quits, /reset forgets the conversation.
As in DeepSeek-R1's chat template, earlier answers go back into the context without their reasoning.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from nanoseek.common import pick_device, pick_dtype

THINK, END_THINK = "<think>", "</think>"
DIM, RESET = "\x1b[2m", "\x1b[0m"


class ThinkSplitter:
    """Splits streamed text into ("think", s) and ("answer", s) pieces at <think> / </think>, holding
    back a tail that may be the start of a tag split across events."""

    def __init__(self, thinking: bool):
        self.thinking = thinking
        self.pending = ""

    def feed(self, text: str, final: bool = False) -> list[tuple[str, str]]:
        out: list[tuple[str, str]] = []
        buf = self.pending + text
        self.pending = ""
        while buf:
            tag = END_THINK if self.thinking else THINK
            i = buf.find(tag)
            if i >= 0:
                if buf[:i]:
                    out.append(("think" if self.thinking else "answer", buf[:i]))
                buf = buf[i + len(tag):]
                self.thinking = not self.thinking
                continue
            keep = 0 if final else next((k for k in range(min(len(tag) - 1, len(buf)), 0, -1)
                                         if buf.endswith(tag[:k])), 0)
            if buf[:len(buf) - keep]:
                out.append(("think" if self.thinking else "answer", buf[:len(buf) - keep]))
            self.pending = buf[len(buf) - keep:]
            break
        return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="nanoseek chat", description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="model directory with tokenizer.json")
    p.add_argument("--system", default=None, help="system prompt")
    p.add_argument("--max-tokens", type=int, default=1024, help="per answer")
    p.add_argument("--temperature", type=float, default=0.6, help="DeepSeek-R1's recommendation; 0 = greedy")
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--no-think", action="store_true", help="do not open a <think> block in the prompt")
    p.add_argument("--color", choices=["auto", "always", "never"], default="auto",
                   help="dim the reasoning with ANSI codes (auto: when stdout is a terminal)")
    p.add_argument("--speculative", action="store_true", help="MTP speculative decoding")
    p.add_argument("--device", default=None, help="cuda if present, else cpu")
    p.add_argument("--dtype", default=None, help="float32 | bfloat16 (default: fp32 on cpu, bf16 on cuda)")
    args = p.parse_args(argv)

    # --- load
    from nanoseek.checkpoint import CheckpointError
    from nanoseek.infer import Engine, SamplingParams
    from nanoseek.model import Transformer
    from nanoseek.tokenizer import Tokenizer

    try:    # the sampling options, checked before anything loads (each answer builds its own)
        SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                       top_k=args.top_k, seed=args.seed).validate()
    except ValueError as e:
        raise SystemExit(f"nanoseek chat: {e}") from None

    device = pick_device(args.device)
    dtype = pick_dtype(args.dtype, device)
    model_dir = Path(args.model)
    try:
        model = Transformer.from_pretrained(model_dir, dtype=dtype, device=device)
        tokenizer = Tokenizer.from_dir(model_dir)
        engine = Engine(model, tokenizer, max_batch=1, speculative=args.speculative)
        engine.start()      # steps run in a thread: Ctrl-C stops the answer, never a step half-done
    except (FileNotFoundError, CheckpointError, ValueError) as e:
        raise SystemExit(f"nanoseek chat: cannot load {model_dir}: {e}")
    color = args.color == "always" or (args.color == "auto" and sys.stdout.isatty())
    dim, reset = (DIM, RESET) if color else ("", "")
    think = not args.no_think and tokenizer.think_id is not None
    messages: list[dict] = [{"role": "system", "content": args.system}] if args.system else []
    print(f"nanoseek chat: {model_dir} ({device}, {dtype}). /exit or Ctrl-D quits, /reset starts over.")

    # --- conversation
    while True:
        try:
            line = input("\nyou> ")
        except (EOFError, KeyboardInterrupt):
            print()
            break
        text = line.strip()
        if text in ("/exit", "/quit"):
            break
        if text == "/reset":
            messages = messages[:1] if args.system else []
            print("(conversation cleared)")
            continue
        if not text:
            continue
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:         # bytes the terminal's encoding could not decode (surrogate escapes)
            print("(that line is not valid UTF-8; type it again)")
            continue
        messages.append({"role": "user", "content": text})
        ids, _ = tokenizer.render_chat(messages, add_generation_prompt=True, think=think)
        # keep the newest turns that fit the context window with room for an answer (of --max-tokens, but at
        # most half the window: a --max-tokens as large as the window would leave no room for any history)
        room = min(args.max_tokens, engine.max_seq_len // 2)
        while len(ids) + room > engine.max_seq_len and len(messages) > 1 + bool(args.system):
            del messages[bool(args.system):bool(args.system) + 2]
            ids, _ = tokenizer.render_chat(messages, add_generation_prompt=True, think=think)
        max_tokens = min(args.max_tokens, engine.max_seq_len - len(ids))
        if max_tokens < 1:
            print(f"(message too long: {len(ids)} tokens, the context window is {engine.max_seq_len})")
            messages.pop()
            continue
        params = SamplingParams(max_tokens=max_tokens, temperature=args.temperature, top_p=args.top_p,
                                top_k=args.top_k, seed=args.seed)

        # --- stream the answer: reasoning dimmed, then the answer on its own line
        print("\nassistant> ", end="", flush=True)
        split = ThinkSplitter(thinking=think)
        answer: list[str] = []
        shown = None
        request = engine.add_request(ids, params)
        try:
            for ev in request:
                for kind, piece in split.feed(ev.text, final=ev.finished):
                    if kind != shown:
                        if shown == "think":
                            print(reset + "\n", end="")
                        if kind == "think":
                            print(dim + "[thinking] ", end="")
                        shown = kind
                    if kind == "answer":
                        piece = piece.lstrip("\n") if not answer else piece
                        answer.append(piece)
                    print(piece, end="", flush=True)
        except KeyboardInterrupt:          # Ctrl-C stops this answer, not the chat
            request.cancel()
            request.result()
        if shown == "think":
            print(reset, end="")
        print(flush=True)
        messages.append({"role": "assistant", "content": "".join(answer).strip()})
    engine.stop()
