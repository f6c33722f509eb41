"""The chat page end to end in headless Chromium (Debian's `chromium`), driven over the DevTools protocol.

A person's path: type, click Send, watch the reply stream in with its reasoning in a foldable block,
ask again (the first turn stays and goes back to the server), reload (the conversation is still
there), and stop a long reply (the server's slot is freed). A screenshot goes to /tmp for a look.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import httpx
import pytest
from websockets.sync.client import connect
from test_serve import ANSWER, REASONING, Server, make_tokenizer, random_model, scripted_model, wait_idle

from nanoseek.infer.engine import Engine

CHROMIUM = "/usr/bin/chromium"
SCREENSHOT = Path(tempfile.gettempdir()) / "nanoseek_chat_page.png"

pytestmark = pytest.mark.skipif(not os.path.exists(CHROMIUM),
                                reason=f"{CHROMIUM} not found: install Debian's chromium (.ci/run does) to run the page test")


class Page:
    """One Chromium tab over the DevTools protocol (JSON messages on a websocket)."""

    def __init__(self, ws):
        self.ws = ws
        self.next_id = 0

    def call(self, method: str, **params) -> dict:
        self.next_id += 1
        self.ws.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:                                  # skip events until our answer
            msg = json.loads(self.ws.recv(timeout=30))
            if msg.get("id") == self.next_id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})

    def js(self, expression: str):
        r = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in r:
            raise RuntimeError(f"{expression!r}: {r['exceptionDetails']}")
        return r["result"].get("value")

    def wait(self, expression: str, timeout: float = 20.0, what: str = ""):
        deadline = time.time() + timeout
        while time.time() < deadline:
            value = self.js(expression)
            if value:
                return value
            time.sleep(0.05)
        text = self.js("document.body.innerText")
        raise AssertionError(f"timed out waiting for {what or expression}; the page shows:\n{text}")

    def goto(self, url: str) -> None:
        self.call("Page.navigate", url=url)
        self.wait("document.readyState === 'complete' && !!document.getElementById('send')", what="page load")

    def click(self, selector: str) -> None:
        """A real mouse click at the element's centre."""
        box = self.js(f"(() => {{ const r = document.querySelector({selector!r}).getBoundingClientRect();"
                      " return [r.x + r.width / 2, r.y + r.height / 2]; })()")
        for kind in ("mousePressed", "mouseReleased"):
            self.call("Input.dispatchMouseEvent", type=kind, x=box[0], y=box[1], button="left", clickCount=1)

    def type(self, selector: str, text: str) -> None:
        self.js(f"document.querySelector({selector!r}).focus()")
        self.call("Input.insertText", text=text)

    def press_enter(self) -> None:
        for kind in ("keyDown", "keyUp"):
            self.call("Input.dispatchKeyEvent", type=kind, key="Enter", code="Enter", windowsVirtualKeyCode=13,
                      **({"text": "\r"} if kind == "keyDown" else {}))


@pytest.fixture(scope="module")
def browser():
    profile = tempfile.mkdtemp(prefix="nanoseek-chromium-")
    proc = subprocess.Popen(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync", "--no-proxy-server",
         f"--user-data-dir={profile}", "--remote-debugging-port=0", "--window-size=1000,760", "about:blank"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        port_file = Path(profile) / "DevToolsActivePort"     # Chromium writes its chosen port here
        deadline = time.time() + 30
        while not (port_file.exists() and port_file.read_text().count("\n") >= 1):
            assert proc.poll() is None, f"chromium exited with {proc.returncode}"
            assert time.time() < deadline, "chromium did not open its DevTools port"
            time.sleep(0.05)
        port = int(port_file.read_text().split()[0])
        targets = httpx.get(f"http://127.0.0.1:{port}/json/list", trust_env=False).json()
        url = next(t for t in targets if t["type"] == "page")["webSocketDebuggerUrl"]
        with connect(url, max_size=None, proxy=None, open_timeout=20) as ws:
            page = Page(ws)
            page.call("Page.enable")
            page.call("Runtime.enable")
            yield page
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
        shutil.rmtree(profile, ignore_errors=True)


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


def paced(model, seconds: float = 0.02):
    """The model with every forward delayed: a tiny model steps in about a millisecond, so several SSE
    chunks would reach the page in one read and land in one DOM update; a real model takes longer."""
    model.register_forward_pre_hook(lambda module, args: time.sleep(seconds))
    return model


def test_chat_page_streams_reasoning_and_keeps_the_conversation(browser, tok):
    engine = Engine(paced(scripted_model(tok)), tok, max_batch=4, max_seq_len=256)
    try:
        with Server(engine, tok, "scripted") as srv:
            page = browser
            page.goto(srv.base + "/")
            page.wait("document.getElementById('model').textContent === 'scripted'", what="model name")
            # record what the page sends and every state of the reasoning text it shows
            page.js("""(() => {
                window.sent = [];
                const f = window.fetch;
                window.fetch = (url, opts) => {
                    if (opts && opts.body) window.sent.push(JSON.parse(opts.body));
                    return f(url, opts);
                };
                window.seen = [];
                new MutationObserver(() => {
                    const r = document.querySelector('.msg.assistant .reasoning-text');
                    if (r && window.seen[window.seen.length - 1] !== r.textContent) window.seen.push(r.textContent);
                }).observe(document.getElementById('messages'), {subtree: true, childList: true, characterData: true});
            })()""")

            # --- first turn: type, click Send
            page.type("#input", "how many apples?")
            page.click("#send")
            page.wait(f"document.querySelector('.msg.assistant .text')?.textContent === {ANSWER!r}"
                      " && !document.getElementById('send').disabled", what="the first answer")
            first = page.js("""(() => {
                const d = document.querySelector('.msg.assistant details.reasoning');
                return {reasoning: d.querySelector('.reasoning-text').textContent, open: d.open, hidden: d.hidden,
                        summary: d.querySelector('summary').textContent,
                        user: document.querySelector('.msg.user .text').textContent, seen: window.seen,
                        input: document.getElementById('input').value};
            })()""")
            assert first["reasoning"] == REASONING and not first["hidden"]
            assert first["open"] is False and first["summary"].startswith("Thought for")   # folded once the answer came
            assert first["user"] == "how many apples?" and first["input"] == ""
            # streamed: the reasoning grew through several intermediate states, each a prefix of the next
            seen = [s for s in first["seen"] if s]
            assert len(seen) >= 3 and seen[-1] == REASONING
            assert all(b.startswith(a) for a, b in zip(seen, seen[1:]))

            # --- second turn with the Enter key: the first turn stays and goes back to the server
            page.type("#input", "and pears?")
            page.press_enter()
            page.wait("document.querySelectorAll('.msg.assistant').length === 2"
                      f" && document.querySelectorAll('.msg.assistant .text')[1].textContent === {ANSWER!r}"
                      " && !document.getElementById('send').disabled", what="the second answer")
            sent = page.js("window.sent.filter(b => b.messages)")
            assert len(sent) == 2 and sent[1]["stream"] is True
            assert sent[1]["messages"] == [{"role": "user", "content": "how many apples?"},
                                           {"role": "assistant", "content": ANSWER},    # reasoning not sent back
                                           {"role": "user", "content": "and pears?"}]
            texts = page.js("[...document.querySelectorAll('.msg .text')].map(e => e.textContent)")
            assert texts == ["how many apples?", ANSWER, "and pears?", ANSWER]

            # --- the conversation survives a reload (localStorage)
            page.call("Page.reload")
            page.wait("document.querySelectorAll('.msg').length === 4", what="restored conversation")
            restored = page.js("[...document.querySelectorAll('.msg .text, .reasoning-text')].map(e => e.textContent)")
            assert restored == ["how many apples?", REASONING, ANSWER, "and pears?", REASONING, ANSWER]

            page.click(".msg.assistant details.reasoning summary")     # unfold the first reasoning
            assert page.js("document.querySelector('.msg.assistant details.reasoning').open") is True
            assert page.js("document.querySelector('.msg.assistant .reasoning-text').offsetHeight") > 0
            assert page.js("document.querySelector('.msg.assistant summary').textContent").startswith("Thought for")
            shot = page.call("Page.captureScreenshot", format="png")
            SCREENSHOT.write_bytes(base64.b64decode(shot["data"]))
            assert SCREENSHOT.stat().st_size > 5000

            page.click("#new")                              # New chat clears it
            assert page.js("document.querySelectorAll('.msg').length") == 0
            assert page.js("localStorage.getItem('nanoseek.chat.v1')") == "[]"
    finally:
        engine.stop()


def test_chat_page_stop_button_frees_the_slot(browser, tok):
    engine = Engine(random_model(), tok, max_batch=4, max_seq_len=512)
    try:
        with Server(engine, tok, "tiny") as srv:
            free = engine.cache.num_free
            page = browser
            page.goto(srv.base + "/")
            page.wait("document.getElementById('model').textContent === 'tiny'", what="model name")
            page.js("document.getElementById('max-tokens').value = '480'")     # far more than we wait for
            # a random model ends with eos within 15 tokens ~3% of the time: ask the server (vLLM's
            # ignore_eos extension) to keep going until the stop button ends it
            page.js("""(() => {
                const f = window.fetch;
                window.fetch = (url, opts) => {
                    if (opts && opts.body) {
                        const body = JSON.parse(opts.body);
                        if (body.messages) opts = {...opts, body: JSON.stringify({...body, ignore_eos: true})};
                    }
                    return f(url, opts);
                };
            })()""")
            page.type("#input", "tell me a long story")
            page.click("#send")
            page.wait("document.querySelector('.msg.assistant .reasoning-text')?.textContent.length > 10",
                      what="streamed text")
            assert page.js("document.getElementById('stop').disabled") is False
            assert engine.running
            page.click("#stop")
            page.wait("document.querySelector('.msg.assistant .note').textContent === 'stopped'"
                      " && !document.getElementById('send').disabled", what="the stopped note")
            wait_idle(engine, free, timeout=3)           # the abort reached the engine: slot and blocks freed
            shown = page.js("document.querySelector('.msg.assistant .reasoning-text').textContent")
            assert 0 < len(shown) and page.js("document.getElementById('stop').disabled") is True
            saved = json.loads(page.js("localStorage.getItem('nanoseek.chat.v1')"))
            assert [m["role"] for m in saved] == ["user", "assistant"] and saved[1]["reasoning"] == shown
    finally:
        engine.stop()
