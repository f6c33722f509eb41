"""The OpenAI-compatible server against real uvicorn servers on 127.0.0.1 with tiny models.

Two models: a random tiny Transformer (varied, prompt-dependent output: batching and streaming checks)
and a *scripted* one, a real Transformer whose weights make greedy decoding after the chat prompt
write a fixed reasoning, "</think>", a fixed answer and eos (so reasoning_content / content can be
checked exactly). Clients: the official `openai` package and httpx.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest
import torch
import uvicorn

from nanoseek.infer.engine import Engine, SamplingParams
from nanoseek.model import Transformer, preset
from nanoseek.serve.app import ReasoningSplitter, create_app
from nanoseek.tokenizer import Tokenizer

REASONING = "Let me count the apples"
ANSWER = "There are seven."
WORDS = ("Let me count the apples There are seven friend one two three four five six eight nine ten red green "
         "blue big small cat dog house tree river stone light dark happy quick slow").split()
CONTEXT = 512          # the random server's context window


# --- helpers (test_chat_page.py imports these)

def make_tokenizer() -> Tokenizer:
    rng = random.Random(0)
    texts = [" ".join(rng.choice(WORDS) for _ in range(12)) + "." for _ in range(150)]   # ~9 KB
    return Tokenizer.train(texts, vocab_size=512)


def random_model(seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(preset("tiny"))
    model.init_weights()
    return model.eval()


def scripted_model(tok: Tokenizer, reasoning: str = REASONING, answer: str = ANSWER) -> Transformer:
    """A tiny Transformer whose greedy output after "<think>\\n" is reasoning, </think>, answer, eos.

    Every block's output projections are zero, so the final hidden state is the current token's
    embedding and the model is a bigram table: chain tokens get orthonormal embeddings and the head
    row of each token's successor points along its predecessor's embedding."""
    chain = [tok.encode("\n")[-1], *tok.encode(reasoning), tok.end_think_id, *tok.encode(answer), tok.eos_id]
    assert len(set(chain[:-1])) == len(chain) - 1, "scripted chain needs distinct tokens (a bigram has one successor)"
    model = random_model(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith("layers.") and name.endswith(("attn.wo.weight", "w2.weight", "experts.w2")):
                p.zero_()
        dim = model.config.hidden_size
        basis, _ = torch.linalg.qr(torch.randn(dim, len(chain)))                # (dim, n) orthonormal columns
        model.head.weight.zero_()
        model.norm.weight.fill_(1.0)
        for k, t in enumerate(chain):
            model.embed.weight[t] = basis[:, k] * dim ** 0.5                     # RMS 1: unchanged by the norm
        for k in range(len(chain) - 1):
            model.head.weight[chain[k + 1]] = basis[:, k] * 10.0                 # logit 10*sqrt(dim) vs ~0
    return model


class Server:
    """uvicorn running `create_app(...)` in a thread, on a free port of 127.0.0.1."""

    def __init__(self, engine: Engine, tok: Tokenizer, name: str, api_key: str | None = None):
        self.engine, self.name = engine, name
        self.app = create_app(engine, tok, name, api_key=api_key)
        # proto IPPROTO_TCP, as getaddrinfo gives uvicorn: asyncio sets TCP_NODELAY only then (with proto 0,
        # Nagle holds each response body until the client's delayed ACK, 40 ms per request)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.base = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(self.app, log_level="warning", lifespan="off", timeout_graceful_shutdown=2)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> Server:
        self.thread.start()
        deadline = time.time() + 20
        while not self.server.started:
            assert time.time() < deadline and self.thread.is_alive(), "uvicorn did not start"
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        self.sock.close()

    def client(self, api_key: str = "none", **kw) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.base + "/v1", api_key=api_key, max_retries=0, timeout=60, **kw)


def wait_idle(engine: Engine, free_blocks: int, timeout: float = 5.0) -> None:
    """Until the engine has no request left and every cache block is back in the pool."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if not engine.running and not engine.waiting and not engine._inbox and engine.cache.num_free == free_blocks:
            return
        time.sleep(0.01)
    raise AssertionError(f"engine not idle after {timeout}s: {len(engine.running)} running, {len(engine.waiting)} "
                         f"waiting, {engine.cache.num_free}/{free_blocks} blocks free")


def sse(lines) -> list[dict]:
    """Parse `data: ...` lines of an SSE stream; checks it ends with [DONE]."""
    out, done = [], False
    for line in lines:
        if not line:
            continue
        assert line.startswith("data: "), line
        assert not done, "data after [DONE]"
        if line == "data: [DONE]":
            done = True
        else:
            out.append(json.loads(line[6:]))
    assert done, "stream did not end with data: [DONE]"
    return out


def split_think(text: str) -> tuple[str, str]:
    """What the server must answer for raw model text after "<think>\\n": (reasoning, content)."""
    if "</think>" not in text:
        return text, ""
    r, c = text.split("</think>", 1)
    return r, c.lstrip()


def chat_ids(tok: Tokenizer, messages: list[dict]) -> list[int]:
    return tok.render_chat(messages, add_generation_prompt=True)[0]


# --- fixtures

@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return make_tokenizer()


@pytest.fixture(scope="module")
def server(tok):
    engine = Engine(random_model(), tok, max_batch=32, max_seq_len=CONTEXT)
    engine.start()
    try:
        with Server(engine, tok, "tiny") as srv:
            srv.free_blocks = engine.cache.num_free
            yield srv
    finally:
        engine.stop()


@pytest.fixture(scope="module")
def scripted(tok):
    engine = Engine(scripted_model(tok), tok, max_batch=8, max_seq_len=256)
    engine.start()
    try:
        with Server(engine, tok, "scripted") as srv:
            yield srv
    finally:
        engine.stop()


# --- reasoning split (pure)

def test_reasoning_splitter_holds_back_a_split_tag_and_strips_the_gap():
    sp = ReasoningSplitter(thinking=True)
    parts = [sp.feed(d) for d in ["Let me", " think</", "thi", "nk>", "\n\n", "An", "swer </think> x"]]
    parts.append(sp.feed("", final=True))
    reasoning = "".join(r for r, _ in parts)
    content = "".join(c for _, c in parts)
    assert reasoning == "Let me think"
    assert content == "Answer </think> x"       # only the first tag switches; later text is content
    assert all("</" not in r for r, _ in parts)
    sp = ReasoningSplitter(thinking=True)        # never closed: everything is reasoning, the held tail too
    assert sp.feed("abc</th") == ("abc", "")
    assert sp.feed("", final=True) == ("</th", "")
    assert ReasoningSplitter(thinking=False).feed("a</think>b") == ("", "a</think>b")


# --- OpenAI client against the random model

def test_models_health_and_page(server):
    models = server.client().models.list()
    assert [m.id for m in models.data] == ["tiny"]
    assert models.data[0].model_extra["max_model_len"] == CONTEXT
    assert httpx.get(server.base + "/health").json()["status"] == "ok"
    page = httpx.get(server.base + "/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "<details" in page.text and "/v1/chat/completions" in page.text


def test_chat_completion_matches_engine_and_stream(server, tok):
    client = server.client()
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "the cat and the dog"}]
    ids = chat_ids(tok, messages)
    [ref] = server.engine.generate([ids], SamplingParams(max_tokens=12, temperature=0))
    want_reasoning, want_content = split_think(ref.text)

    r = client.chat.completions.create(model="tiny", messages=messages, max_tokens=12, temperature=0)
    msg = r.choices[0].message
    assert (msg.reasoning_content, msg.content) == (want_reasoning, want_content)
    assert r.choices[0].finish_reason == ref.finish_reason
    assert r.usage.prompt_tokens == len(ids)
    assert r.usage.completion_tokens == len(ref.token_ids)
    assert r.usage.total_tokens == len(ids) + len(ref.token_ids)
    assert r.id.startswith("chatcmpl-") and r.object == "chat.completion" and r.model == "tiny"

    stream = client.chat.completions.create(model="tiny", messages=messages, max_completion_tokens=12,
                                            temperature=0, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    reasoning = "".join(getattr(c.choices[0].delta, "reasoning_content", None) or "" for c in chunks if c.choices)
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert (reasoning, content) == (want_reasoning, want_content)
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [ref.finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(ref.token_ids)
    assert len({c.id for c in chunks}) == 1


def test_chat_n_seed_and_logprobs(server):
    client = server.client()
    kw = dict(model="tiny", messages=[{"role": "user", "content": "red green blue"}], max_tokens=6,
              temperature=1.0, seed=1234, n=3, logprobs=True, top_logprobs=3)
    a = client.chat.completions.create(**kw)
    b = client.chat.completions.create(**kw)
    assert [c.index for c in a.choices] == [0, 1, 2]
    texts = [c.message.reasoning_content + c.message.content for c in a.choices]
    assert texts == [c.message.reasoning_content + c.message.content for c in b.choices]   # seeded: reproducible
    assert len(set(texts)) > 1                                                            # seed+i per choice
    top = dict(kw, seed=2**64 - 1, n=2)           # the last seed: choice 1 takes seed 0 (wraps, not refused)
    last = [c.message.content for c in client.chat.completions.create(**top).choices]
    assert last == [c.message.content for c in client.chat.completions.create(**top).choices] and len(last) == 2
    assert a.usage.completion_tokens == sum(len(c.logprobs.content) for c in a.choices)
    for c in a.choices:
        for t in c.logprobs.content:
            tops = [x.logprob for x in t.top_logprobs]
            assert t.logprob <= 0 and len(tops) == 3 and tops == sorted(tops, reverse=True)
            assert tops[0] >= t.logprob - 1e-5                       # the best one is at least as likely
            assert bytes(t.bytes).decode("utf-8", "replace") == t.token


def test_chat_logprobs_keep_tokens_that_decode_alike_apart_with_their_own_bytes(server, tok):
    """A token holding part of a UTF-8 character reads U+FFFD as text; its bytes are its own, and
    alternatives that read alike are separate entries (they were merged when keyed by text)."""
    r = server.client().chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "héllo wörld"}], max_tokens=12, temperature=1.0,
        seed=7, logprobs=True, top_logprobs=20)
    partial = 0
    for t in r.choices[0].logprobs.content:
        assert len(t.top_logprobs) == 20
        for x in [t, *t.top_logprobs]:
            raw = bytes(x.bytes)
            assert raw.decode("utf-8", "replace") == x.token
            if not raw:             # an id past the tokenizer (the model's vocabulary is larger): no text
                assert x.token == ""
                continue
            ids = [i for i in range(tok.vocab_size) if tok.token_bytes(i) == raw]
            assert len(ids) == 1 and tok.decode(ids) == x.token             # the bytes name one token
            try:
                raw.decode()
            except UnicodeDecodeError:
                partial += 1
                assert "\ufffd" in x.token
    assert partial > 0          # the test saw tokens whose bytes are not whole characters


def test_completions_text_ids_stream_and_logprobs(server, tok):
    client = server.client()
    prompt = "the quick cat"
    ids = tok.encode(prompt, add_bos=True)
    [ref] = server.engine.generate([ids], SamplingParams(max_tokens=10, temperature=0))

    r = client.completions.create(model="tiny", prompt=prompt, max_tokens=10, temperature=0, logprobs=2)
    assert r.choices[0].text == ref.text and r.choices[0].finish_reason == ref.finish_reason
    assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == len(ref.token_ids)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(ref.token_ids)
    assert all(len(top) <= 2 for top in lp.top_logprobs) and all(x <= 0 for x in lp.token_logprobs)
    assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)

    by_ids = client.completions.create(model="tiny", prompt=ids, max_tokens=10, temperature=0)
    assert by_ids.choices[0].text == ref.text

    chunks = list(client.completions.create(model="tiny", prompt=prompt, max_tokens=10, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == ref.text
    assert chunks[-1].usage.completion_tokens == len(ref.token_ids)

    batch = client.completions.create(model="tiny", prompt=[prompt, "dog house"], max_tokens=10, temperature=0, n=2)
    assert [c.index for c in batch.choices] == [0, 1, 2, 3]
    assert batch.choices[0].text == batch.choices[1].text == ref.text
    assert batch.usage.prompt_tokens == len(ids) + len(tok.encode("dog house", add_bos=True))


# --- the scripted model: reasoning_content, content, stop strings, finish reasons

def test_reasoning_content_split(scripted, tok):
    client = scripted.client()
    messages = [{"role": "user", "content": "how many apples?"}]
    r = client.chat.completions.create(model="scripted", messages=messages, temperature=0)
    msg = r.choices[0].message
    assert msg.reasoning_content == REASONING and msg.content == ANSWER
    assert r.choices[0].finish_reason == "stop"
    n_reason = len(tok.encode(REASONING)) + 1                     # + the </think> token
    assert r.usage.completion_tokens == n_reason + len(tok.encode(ANSWER)) + 1   # + eos
    assert r.usage.completion_tokens_details.reasoning_tokens == n_reason

    kinds, reasoning, content = [], "", ""
    for c in client.chat.completions.create(model="scripted", messages=messages, temperature=0, stream=True):
        d = c.choices[0].delta
        r_part = getattr(d, "reasoning_content", None)
        if r_part:
            kinds.append("r")
            reasoning += r_part
        if d.content:
            kinds.append("c")
            content += d.content
    assert (reasoning, content) == (REASONING, ANSWER)
    assert kinds == sorted(kinds, reverse=True) and "r" in kinds and "c" in kinds   # all reasoning, then content

    stopped = client.chat.completions.create(model="scripted", messages=messages, temperature=0, stop=[" seven"])
    assert stopped.choices[0].message.content == "There are" and stopped.choices[0].finish_reason == "stop"
    # completions: each token's text_offset is where its own text starts, also while text is held back
    text = client.completions.create(model="scripted", prompt="how many apples?", max_tokens=12, temperature=0,
                                     logprobs=1, stop=["zzqq", "e t"])
    lp = text.choices[0].logprobs
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:k]) for k in range(len(lp.tokens))]
    # a stop string spanning </think> holds the tag back: the event that finally carries it also carries the
    # answer's first token, which is not a reasoning token
    held = client.chat.completions.create(model="scripted", messages=messages, temperature=0, stop=["</think>The"])
    assert held.usage.completion_tokens_details.reasoning_tokens == n_reason

    short = client.chat.completions.create(model="scripted", messages=messages, temperature=0, max_tokens=3)
    assert short.choices[0].finish_reason == "length" and short.choices[0].message.content == ""
    assert REASONING.startswith(short.choices[0].message.reasoning_content)

    plain = client.chat.completions.create(model="scripted", messages=messages, max_tokens=3,
                                           extra_body={"chat_template_kwargs": {"think": False}})
    assert getattr(plain.choices[0].message, "reasoning_content", None) is None
    assert plain.usage.prompt_tokens == len(tok.render_chat(messages, add_generation_prompt=True, think=False)[0])


def test_multi_turn_history_drops_reasoning(scripted, tok):
    client = scripted.client()
    first = [{"role": "user", "content": "how many apples?"}]
    r1 = client.chat.completions.create(model="scripted", messages=first, temperature=0)
    history = first + [{"role": "assistant", "content": r1.choices[0].message.content,
                        "reasoning_content": r1.choices[0].message.reasoning_content},   # ignored, as DeepSeek's API does
                       {"role": "user", "content": "and pears?"}]
    r2 = client.chat.completions.create(model="scripted", messages=history, temperature=0)
    want = tok.render_chat([first[0], {"role": "assistant", "content": ANSWER}, history[2]],
                           add_generation_prompt=True)[0]
    assert r2.usage.prompt_tokens == len(want)
    assert r2.choices[0].message.content == ANSWER


# --- bad input

LONG = " ".join(["apples"] * (CONTEXT + 10))
GOOD = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
BAD = [  # (name, path, body: dict -> JSON, bytes -> raw, status, param)
    ("malformed json", "/v1/chat/completions", b'{"model": "tiny", "messages": [', 400, None),
    ("body not an object", "/v1/chat/completions", [1, 2], 400, None),
    ("body a JSON string", "/v1/completions", b'"s"', 400, None),
    ("unknown model", "/v1/chat/completions", {**GOOD, "model": "gpt-17"}, 404, "model"),
    ("missing model", "/v1/chat/completions", {"messages": GOOD["messages"]}, 400, "model"),
    ("missing messages", "/v1/chat/completions", {"model": "tiny"}, 400, "messages"),
    ("empty messages", "/v1/chat/completions", {**GOOD, "messages": []}, 400, "messages"),
    ("messages not a list", "/v1/chat/completions", {**GOOD, "messages": "hi"}, 400, "messages"),
    ("unknown role", "/v1/chat/completions", {**GOOD, "messages": [{"role": "wizard", "content": "x"}]}, 400,
     "messages[0].role"),
    ("content wrong type", "/v1/chat/completions", {**GOOD, "messages": [{"role": "user", "content": 5}]}, 400,
     "messages[0].content"),
    ("image content part", "/v1/chat/completions",
     {**GOOD, "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, 400,
     "messages[0].content"),
    ("ends with assistant", "/v1/chat/completions", {**GOOD, "messages": [{"role": "assistant", "content": "x"}]},
     400, "messages"),
    ("n zero", "/v1/chat/completions", {**GOOD, "n": 0}, 400, "n"),
    ("n too big", "/v1/chat/completions", {**GOOD, "n": 129}, 400, "n"),
    ("n a string", "/v1/chat/completions", {**GOOD, "n": "2"}, 400, "n"),
    ("max_tokens zero", "/v1/chat/completions", {**GOOD, "max_tokens": 0}, 400, "max_tokens"),
    ("max_tokens float", "/v1/chat/completions", {**GOOD, "max_tokens": 1.5}, 400, "max_tokens"),
    ("max_tokens past context", "/v1/chat/completions", {**GOOD, "max_tokens": CONTEXT}, 400, "max_tokens"),
    ("temperature high", "/v1/chat/completions", {**GOOD, "temperature": 2.5}, 400, "temperature"),
    ("temperature negative", "/v1/chat/completions", {**GOOD, "temperature": -0.1}, 400, "temperature"),
    ("temperature a string", "/v1/chat/completions", {**GOOD, "temperature": "hot"}, 400, "temperature"),
    ("top_p high", "/v1/chat/completions", {**GOOD, "top_p": 1.5}, 400, "top_p"),
    ("top_p negative", "/v1/chat/completions", {**GOOD, "top_p": -0.5}, 400, "top_p"),
    ("stream not bool", "/v1/chat/completions", {**GOOD, "stream": "yes"}, 400, "stream"),
    ("five stops", "/v1/chat/completions", {**GOOD, "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    ("stop not strings", "/v1/chat/completions", {**GOOD, "stop": [1, 2]}, 400, "stop"),
    ("empty stop", "/v1/chat/completions", {**GOOD, "stop": [""]}, 400, "stop"),
    ("top_logprobs without logprobs", "/v1/chat/completions", {**GOOD, "top_logprobs": 2}, 400, "top_logprobs"),
    ("top_logprobs too big", "/v1/chat/completions", {**GOOD, "logprobs": True, "top_logprobs": 21}, 400,
     "top_logprobs"),
    ("prompt past context", "/v1/chat/completions", {**GOOD, "messages": [{"role": "user", "content": LONG}]},
     400, "messages"),
    # megabytes of text: refused by its length before any tokenizing (which held the event loop for seconds)
    ("huge message", "/v1/chat/completions", {**GOOD, "messages": [{"role": "user", "content": "red " * 500_000}]},
     400, "messages"),
    ("huge completion prompt", "/v1/completions", {"model": "tiny", "prompt": "red " * 500_000}, 400, "prompt"),
    ("completion prompt missing", "/v1/completions", {"model": "tiny"}, 400, "prompt"),
    ("too many choices", "/v1/completions", {"model": "tiny", "prompt": ["a"] * 600, "n": 2}, 400, "n"),
    ("too many prompts", "/v1/completions", {"model": "tiny", "prompt": [[7]] * 1025}, 400, "prompt"),
    ("completion prompt empty list", "/v1/completions", {"model": "tiny", "prompt": []}, 400, "prompt"),
    ("completion prompt a dict", "/v1/completions", {"model": "tiny", "prompt": {"a": 1}}, 400, "prompt"),
    ("completion token id out of vocab", "/v1/completions", {"model": "tiny", "prompt": [1, 10**6]}, 400, "prompt"),
    ("completion negative token id", "/v1/completions", {"model": "tiny", "prompt": [-1]}, 400, "prompt"),
    ("completion prompt past context", "/v1/completions", {"model": "tiny", "prompt": [7] * (CONTEXT + 1)}, 400,
     "prompt"),
    ("completion logprobs too big", "/v1/completions", {"model": "tiny", "prompt": "x", "logprobs": 6}, 400,
     "logprobs"),
    ("completion unknown model", "/v1/completions", {"model": "nope", "prompt": "x"}, 404, "model"),
    # valid JSON that is no valid Unicode / no number (a lone surrogate, the NaN literal), and a seed
    # torch.Generator cannot take
    ("lone surrogate in content", "/v1/chat/completions",
     json.dumps({**GOOD, "messages": [{"role": "user", "content": "\ud800"}]}).encode(), 400, "messages[0].content"),
    ("lone surrogate in prompt", "/v1/completions", b'{"model": "tiny", "prompt": ["ok", "\\udc00"]}', 400, "prompt"),
    ("temperature NaN", "/v1/chat/completions", json.dumps({**GOOD, "temperature": float("nan")}).encode(), 400,
     "temperature"),
    ("seed past 64 bits", "/v1/chat/completions", {**GOOD, "seed": 2**64}, 400, "seed"),
    # a check the engine makes (top_k below 2**31), named as the request's field
    ("top_k past 31 bits", "/v1/chat/completions", {**GOOD, "top_k": 2**40}, 400, "top_k"),
    ("body not UTF-8", "/v1/chat/completions", b'{"model": "tiny", "messages": "\xff\xfe"}', 400, None),
    ("nested past the parser's limit", "/v1/completions", b"[" * 100_000 + b"]" * 100_000, 400, None),
]


def test_bad_requests_get_openai_errors_while_others_are_served(server):
    client = server.client()
    # a long streaming request runs through all the bad ones and must finish intact
    box = {}
    def bystander():
        chunks = list(client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "one two three"}], max_tokens=60, temperature=0,
            stream=True, extra_body={"ignore_eos": True}, stream_options={"include_usage": True}))
        box["usage"], box["finish"] = chunks[-1].usage, [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    th = threading.Thread(target=bystander)
    th.start()
    with httpx.Client(base_url=server.base, timeout=30) as http:
        for name, path, body, status, param in BAD:
            if isinstance(body, bytes):
                r = http.post(path, content=body, headers={"Content-Type": "application/json"})
            else:
                r = http.post(path, json=body)
            assert r.status_code == status, (name, r.status_code, r.text)
            err = r.json()["error"]
            assert set(err) == {"message", "type", "param", "code"}, name
            assert err["code"] is not None, (name, err)
            assert err["type"] == "invalid_request_error" and err["message"], name
            assert err["param"] == param, (name, err)
            assert http.get("/health").status_code == 200
        r = http.post("/v1/completions", content=b'"{}"', headers={"Content-Type": "application/json"})
        assert r.json()["error"]["message"] == "the request body must be a JSON object"   # not "not valid JSON"
        r = http.post("/v1/chat/completions", content=json.dumps(GOOD))          # no Content-Type header
        assert r.status_code == 400 and "Content-Type" in r.json()["error"]["message"]
        r = http.get("/v1/nothing-here")
        assert r.status_code == 404 and "error" in r.json()
        r = http.get("/v1/chat/completions")
        assert r.status_code == 405 and "error" in r.json()
        assert "messages" in http.post("/v1/chat/completions", json={"model": "tiny"}).json()["error"]["message"]
        # the OpenAI client sees them as typed errors
        with pytest.raises(openai.BadRequestError):
            client.chat.completions.create(model="tiny", messages=[], max_tokens=2)
        with pytest.raises(openai.NotFoundError):
            client.chat.completions.create(model="gpt-17", messages=GOOD["messages"])
        ok = http.post("/v1/chat/completions", json=GOOD)
        assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] >= 1
    th.join(30)
    assert box["usage"].completion_tokens == 60 and box["finish"] == ["length"]
    wait_idle(server.engine, server.free_blocks)


def test_api_key(tok):
    engine = Engine(random_model(), tok, max_batch=4, max_seq_len=64)
    try:
        with Server(engine, tok, "tiny", api_key="sk-test") as srv, httpx.Client(base_url=srv.base) as http:
            for path, method, kw in [("/v1/models", "GET", {}), ("/v1/chat/completions", "POST", {"json": GOOD}),
                                     ("/v1/completions", "POST", {"json": {"model": "tiny", "prompt": "x"}}),
                                     ("/v1/chat/completions", "POST", {"content": b"{oops"})]:
                for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "sk-test"}):
                    r = http.request(method, path, headers=headers, **kw)
                    assert r.status_code == 401, (path, headers)
                    assert r.json()["error"]["code"] == "invalid_api_key"
            assert http.get("/health").status_code == 200 and http.get("/").status_code == 200
            # the scheme in any case (RFC 9110); two Authorization headers are refused, whichever comes last
            assert http.get("/v1/models", headers={"Authorization": "bearer sk-test"}).status_code == 200
            two = http.get("/v1/models", headers=[("Authorization", "Bearer wrong"),
                                                  ("Authorization", "Bearer sk-test")])
            assert two.status_code == 401 and "more than one" in two.json()["error"]["message"]
            # unknown routes and methods carry a code like every other error
            key = {"Authorization": "Bearer sk-test"}
            assert http.get("/v1/nope", headers=key).json()["error"]["code"] == "not_found"
            assert http.get("/v1/models/tiny", headers=key).json()["id"] == "tiny"
            assert http.get("/v1/models/other", headers=key).json()["error"]["code"] == "model_not_found"
            assert http.delete("/v1/models", headers=key).json()["error"]["code"] == "method_not_allowed"
            with pytest.raises(openai.AuthenticationError):
                srv.client("wrong").models.list()
            r = srv.client("sk-test").chat.completions.create(model="tiny", messages=GOOD["messages"], max_tokens=2)
            assert r.usage.completion_tokens == 2
    finally:
        engine.stop()


# --- many clients, disconnects

def test_disconnect_frees_the_slot_at_once(server):
    engine = server.engine
    body = {"model": "tiny", "messages": [{"role": "user", "content": "tree river"}], "max_tokens": 480,
            "temperature": 0, "ignore_eos": True}
    # streaming: read a few chunks, then hang up
    with httpx.Client(base_url=server.base, timeout=30) as http:
        with http.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as r:
            lines = r.iter_lines()
            got = [line for _, line in zip(range(6), lines)]
            assert any("reasoning_content" in line for line in got)
            assert engine.running                     # still generating when we leave
    t0 = time.time()
    wait_idle(engine, server.free_blocks, timeout=2)
    assert time.time() - t0 < 1.0
    # non-streaming: the client times out (and closes the connection) long before 480 tokens are done
    # (paced: the tiny model's one-row steps alone would finish them in ~0.2 s)
    decoded = engine.stats["generated_tokens"]
    pace = engine.model.register_forward_pre_hook(lambda module, args: time.sleep(0.002))
    try:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(server.base + "/v1/chat/completions", json=body, timeout=0.4)
        wait_idle(engine, server.free_blocks, timeout=2)
    finally:
        pace.remove()
    assert engine.stats["generated_tokens"] - decoded < 480


def test_a_client_that_leaves_first_is_client_gone_not_an_asgi_error():
    """_unless_disconnected when the hang-up wins: the work was only asked to cancel (not done yet),
    so reading its result would raise InvalidStateError; it must be ClientGone (a 499)."""
    from nanoseek.serve.app import ClientGone, _unless_disconnected

    class Request:
        def __init__(self, gone: bool):
            self.gone = gone

        async def receive(self):
            if not self.gone:
                await asyncio.sleep(3600)
            return {"type": "http.disconnect"}

    async def work(seconds: float):
        await asyncio.sleep(seconds)
        return 7

    async def stream():
        await asyncio.sleep(3600)
        yield 1

    async def main():
        with pytest.raises(ClientGone):
            await _unless_disconnected(Request(gone=True), work(3600))
        assert await _unless_disconnected(Request(gone=False), work(0)) == 7
        # a hang-up while waiting for a stream's first event: the cancelled __anext__ has landed when ClientGone
        # comes, so the caller can close the stream ("asynchronous generator is already running" before)
        gen = stream()
        with pytest.raises(ClientGone):
            await _unless_disconnected(Request(gone=True), gen.__anext__())
        await gen.aclose()

    asyncio.run(main())


def test_32_concurrent_streaming_clients(server):
    """24 clients stream to the end, 8 hang up midway; every complete stream equals the same request run
    alone (greedy), every cut one is a prefix of it; afterwards no request and no cache block is left."""
    engine = server.engine
    topics = [" ".join(random.Random(i).choice(WORDS) for _ in range(1 + i % 9)) for i in range(32)]

    def request(i: int) -> tuple[str, dict]:
        hang_up = i % 4 == 3
        common = {"model": "tiny", "temperature": 0, "stream": True, "max_tokens": 40 if hang_up else 8}
        if i % 2:
            return "/v1/completions", {**common, "prompt": topics[i]}
        return "/v1/chat/completions", {**common, "messages": [{"role": "user", "content": topics[i]}]}

    async def run(http: httpx.AsyncClient, i: int, chunk_limit: int | None, start: asyncio.Event | None):
        path, body = request(i)
        if start is not None:
            await start.wait()
        text, events = "", []
        async with http.stream("POST", path, json=body) as r:
            assert r.status_code == 200
            async for line in r.aiter_lines():
                if not line.startswith("data: {"):
                    continue
                ch = json.loads(line[6:])["choices"]
                if ch:
                    d = ch[0].get("delta", {})
                    text += ch[0].get("text", "") + (d.get("reasoning_content") or "") + (d.get("content") or "")
                    events.append(ch[0].get("finish_reason"))
                if chunk_limit is not None and len(events) >= chunk_limit:
                    break                              # leaving the block closes the connection
        return text, events

    async def main():
        limits = httpx.Limits(max_connections=64)
        async with httpx.AsyncClient(base_url=server.base, timeout=60, limits=limits) as http:
            decoded = engine.stats["generated_tokens"]
            alone = [await run(http, i, None, None) for i in range(32)]
            wait_idle(engine, server.free_blocks)
            alone_tokens = engine.stats["generated_tokens"] - decoded
            start = asyncio.Event()
            tasks = [asyncio.create_task(run(http, i, 4 if i % 4 == 3 else None, start)) for i in range(32)]
            await asyncio.sleep(0.05)
            peak = 0
            start.set()
            while not all(t.done() for t in tasks):
                peak = max(peak, len(engine.running))
                await asyncio.sleep(0.005)
            wait_idle(engine, server.free_blocks)
            return (alone, [t.result() for t in tasks], peak, alone_tokens,
                    engine.stats["generated_tokens"] - decoded - alone_tokens)

    alone, together, peak, alone_tokens, together_tokens = asyncio.run(main())
    wait_idle(engine, server.free_blocks)
    for i, ((ref, ref_ev), (got, ev)) in enumerate(zip(alone, together)):
        if i % 4 == 3:
            assert ref.startswith(got) and len(ev) == 4 and None in ev, i     # cut before the end
        else:
            assert (got, ev[-1]) == (ref, ref_ev[-1]), i
    assert peak > 8                                  # they really ran in one batch
    assert together_tokens < alone_tokens            # the hang-ups stopped generating early


# --- the command

def test_serve_command(server, tok, tmp_path):
    """`nanoseek serve` as a user runs it: a saved model directory, an API key, MTP speculation."""
    from nanoseek.commands.serve import main
    with pytest.raises(SystemExit, match="config.json not found"):
        main(["--model", str(tmp_path / "missing")])

    model_dir = tmp_path / "tiny-model"
    random_model().save_pretrained(model_dir)          # the same weights as the `server` fixture's model
    tok.save(model_dir)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "nanoseek", "serve", "--model", str(model_dir), "--port", str(port),
                             "--api-key", "sk-cmd", "--max-batch", "4", "--speculative", "--device", "cpu",
                             "--log-level", "warning"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 90
        while True:
            assert proc.poll() is None, proc.stdout.read()
            assert time.time() < deadline, "nanoseek serve did not come up"
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            time.sleep(0.2)
        assert httpx.get(f"http://127.0.0.1:{port}/v1/models").status_code == 401
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="sk-cmd", max_retries=0)
        assert [m.id for m in client.models.list().data] == ["tiny-model"]
        messages = [{"role": "user", "content": "big red house"}]
        got = client.chat.completions.create(model="tiny-model", messages=messages, max_tokens=10, temperature=0)
        ref = server.client().chat.completions.create(model="tiny", messages=messages, max_tokens=10, temperature=0)
        assert got.choices[0].message.model_extra == ref.choices[0].message.model_extra   # reasoning_content
        assert got.choices[0].message.content == ref.choices[0].message.content
        assert got.usage.completion_tokens == ref.usage.completion_tokens
    finally:
        proc.send_signal(signal.SIGINT)                  # uvicorn's graceful shutdown, then engine.stop()
        try:
            out, _ = proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
    assert proc.returncode == 0, out
    assert f"127.0.0.1:{port}" in out


def test_openapi_spec_states_the_errors_and_the_stream(server):
    """The spec listed 200 and FastAPI's 422 alone: the server answers 400/401/404/500 as OpenAI-style errors
    and streams text/event-stream (a schemathesis run flagged each)."""
    with httpx.Client(base_url=server.base, timeout=30) as http:
        spec = http.get("/openapi.json").json()
    for path, body in (("/v1/chat/completions", "ChatCompletion"), ("/v1/completions", "Completion")):
        r = spec["paths"][path]["post"]["responses"]
        assert r["200"]["content"]["application/json"]["schema"]["$ref"].endswith("/" + body)
        assert "text/event-stream" in r["200"]["content"]
        for code in ("400", "401", "404", "500"):
            assert r[code]["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorResponse"), (path, code)
