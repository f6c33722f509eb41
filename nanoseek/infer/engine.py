"""Inference engine: paged latent KV cache, continuous batching, sampling, streaming, MTP speculation.

    engine = Engine(model, tokenizer)
    [c] = engine.generate([prompt_ids], SamplingParams(max_tokens=64, temperature=0))   # blocking batch
    for ev in engine.add_request(prompt_ids, params): print(ev.text, end="")             # streaming
    async for ev in engine.stream(prompt_ids, params): ...                                # FastAPI

One scheduler iteration (`step`):
  1. cancelled requests leave (their cache blocks go back to the pool at once);
  2. waiting requests join while a batch row and cache blocks for their prompt are free, and are
     prefilled: prompts of different lengths padded into one forward on the clear MLA path, long
     ones in chunks of `max_prefill_tokens`; identical prompts admitted together (GRPO's G samples per
     problem, OpenAI's n) are prefilled once and share their full cache blocks;
  3. every running request decodes one token together on the absorbed MLA path; with `speculative`
     the MTP module's draft is verified instead (two positions per row, up to two tokens per step).
     On CPU the decode step of one row runs `OneRowDecoder` (infer/one_row.py) and of several rows of
     a tiny fp32 model `BatchDecoder` (infer/batch_rows.py) where they apply: the model's math in
     fewer ops, tested equal to its forward.
When a running request needs a block and none is free, the most recently admitted one is preempted
(blocks freed, recomputed from its tokens later), so a full cache queues work and never crashes.

Sampled tokens go through the stop checks and an incremental detokenizer and out as StreamEvents.
One host sync per decode step (the sampled ids); the cache indices and mask are built on the host.
"""

from __future__ import annotations

import asyncio
import atexit
import itertools
import operator
import queue
import random
import threading
import time
import traceback
import uuid
import weakref
from collections import deque
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field

import numpy as np
import torch

from nanoseek.infer import sampling as smp
from nanoseek.infer.kv_cache import PagedCache
from nanoseek.infer.batch_rows import BatchDecoder
from nanoseek.infer.one_row import OneRowDecoder


GREEDY_BELOW = 1e-5      # SamplingParams: a temperature below this is greedy


@dataclass
class SamplingParams:
    max_tokens: int = 256
    temperature: float = 1.0          # 0 = greedy
    top_k: int = 0                    # 0 = off
    top_p: float = 1.0
    min_p: float = 0.0
    seed: int | None = None           # per-request generator: same seed -> same output, whatever the batch,
                                      # preemption or speculation
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    stop: list[str] = field(default_factory=list)          # stop strings (not included in the output text)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None       # None: no logprobs; n >= 0: chosen-token logprob plus top-n

    def __post_init__(self) -> None:
        # a temperature this small samples the argmax anyway, and divides fp32 logits into inf/NaN:
        # greedy (vLLM's rule, _SAMPLING_EPS)
        if isinstance(self.temperature, (int, float)) and 0 < self.temperature < GREEDY_BELOW:
            self.temperature = 0.0

    def validate(self) -> None:
        def bad(name: str, why: str):
            raise ValueError(f"SamplingParams.{name}={getattr(self, name)!r}: {why}")
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            bad("max_tokens", "must be an integer >= 1")
        if not 0 <= self.temperature < float("inf"):
            bad("temperature", "must be a finite number >= 0")
        if not isinstance(self.top_k, int) or not 0 <= self.top_k < 2**31:
            bad("top_k", "must be an integer in [0, 2**31) (0 = off)")
        if not 0 < self.top_p <= 1:
            bad("top_p", "must be in (0, 1]")
        if not 0 <= self.min_p <= 1:
            bad("min_p", "must be in [0, 1]")
        if not 1e-6 <= self.repetition_penalty <= 1e6:     # (fp32 logits: 1e-45 became a division by 0)
            bad("repetition_penalty", "must be in [1e-6, 1e6] (1 = off)")
        for name in ("frequency_penalty", "presence_penalty"):
            if not -2 <= getattr(self, name) <= 2:
                bad(name, "must be in [-2, 2] (OpenAI's range)")
        if not isinstance(self.stop, (list, tuple)) or not all(isinstance(s, str) and s for s in self.stop):
            bad("stop", "must be a list of non-empty strings")
        if not all(isinstance(t, int) and t >= 0 for t in self.stop_token_ids):
            bad("stop_token_ids", "must be a list of token ids")
        if self.logprobs is not None and (not isinstance(self.logprobs, int) or self.logprobs < 0):
            bad("logprobs", "must be None or an integer >= 0")
        if self.seed is not None and (not isinstance(self.seed, int) or not -2**63 <= self.seed < 2**64):
            bad("seed", "must be an integer in [-2**63, 2**64) or None")


@dataclass
class StreamEvent:
    text: str                         # new text since the previous event (whole UTF-8 characters; a tail
                                      # that could still become a stop string is held back)
    token_ids: list[int]              # tokens this event covers
    logprobs: list[float] | None
    top_logprobs: list[list[tuple[int, float]]] | None   # per token: (token id, logprob), most likely first
    finished: bool
    finish_reason: str | None         # "stop" (eos, stop token or stop string), "length", "abort"
    prompt_tokens: int
    completion_tokens: int


@dataclass
class Completion:
    prompt_ids: list[int]
    token_ids: list[int]              # every sampled token, a final eos / stop token included
    text: str                         # without the stop string or the eos / stop token's text
    finish_reason: str
    logprobs: list[float] | None


class Request:
    """Handle returned by `Engine.add_request`. Iterating blocks until the next event (and drives the
    engine itself when no background thread runs); it ends after the finished event."""

    def __init__(self, engine: Engine, prompt_ids: list[int], params: SamplingParams, sink=None,
                 keep_events: bool = True):
        self.id = uuid.uuid4().hex[:16]
        self.prompt_ids = prompt_ids
        self.params = params
        self.completion: Completion | None = None
        self.error: BaseException | None = None
        self._engine = engine
        self._events: queue.SimpleQueue[StreamEvent] = queue.SimpleQueue()
        self._sink = sink
        self._keep = keep_events
        self._cancelled = False
        self._done = threading.Event()

    @property
    def finished(self) -> bool:
        return self._done.is_set()

    def cancel(self) -> None:
        """Stop generating; the slot and its cache blocks are freed at the next step."""
        self._cancelled = True
        self._engine._wake()

    def __iter__(self) -> Iterator[StreamEvent]:
        while True:
            ev = self._next_event()
            if ev.finished:
                self._raise_if_failed()
            yield ev
            if ev.finished:
                return

    def _raise_if_failed(self) -> None:
        """A request the engine aborted on an error ends in that error, not in a normal-looking event."""
        if self.error is not None:
            raise RuntimeError(f"request {self.id} failed in the engine "
                               f"({type(self.error).__name__}: {self.error})") from self.error

    def result(self) -> Completion:
        """Block until the request is done."""
        while not self._done.is_set():
            self._wait_or_drive(lambda: self._done.is_set())
        self._raise_if_failed()
        return self.completion

    def _next_event(self) -> StreamEvent:
        while True:
            try:
                return self._events.get_nowait()
            except queue.Empty:
                pass
            if self._done.is_set() and self._events.empty():
                raise RuntimeError(f"request {self.id}: no more events (consumed elsewhere)")
            self._wait_or_drive(lambda: not self._events.empty())

    def _wait_or_drive(self, ready) -> None:
        eng = self._engine
        if eng.running_in_background:
            with eng._cv:
                eng._cv.wait_for(lambda: ready() or not eng.running_in_background, timeout=0.5)
        else:
            try:
                more = eng.step()
            except Exception as e:      # as the background loop does: the requests in flight fail with it
                eng._abort_all(e)
                raise
            if not more and not ready():
                raise RuntimeError(f"request {self.id}: the engine has no work left but the request is not done")

    def _emit(self, ev: StreamEvent) -> None:
        if self._keep:
            self._events.put(ev)
        if self._sink is not None:
            self._sink(ev)
        if ev.finished:
            self._done.set()


def _argmax(logits: torch.Tensor) -> torch.Tensor:
    """logits.argmax(-1). On CPU through numpy (the first of equal maxima, as torch's): ~5x faster on
    fp32 (8192 logits: 3 vs 14 us), ~40x on bf16 widened first (16 x 8192: ~30 us vs 1.3 ms)."""
    if logits.device.type == "cpu" and logits.dtype in (torch.float32, torch.bfloat16):
        return torch.from_numpy(logits.float().numpy().argmax(-1))
    return logits.argmax(-1)


class _Detokenizer:
    """Incremental detokenization (the window scheme of HF TGI / vLLM): decode a short window of ids
    before and after the new token and take the difference, holding back text that ends in an
    incomplete UTF-8 character (byte-level BPE decodes a partial character to U+FFFD).
    pieces: a cache of one-token decodes shared by the engine's requests (the window before the new
    token is usually the previous token alone)."""

    def __init__(self, tokenizer, context: list[int], pieces: dict[int, str] | None = None):
        self.tok = tokenizer
        self.ids = list(context)
        self.prefix = 0
        self.read = len(self.ids)
        self.pieces = {} if pieces is None else pieces

    def _decode(self, ids: list[int]) -> str:
        if len(ids) != 1:
            return self.tok.decode(ids)
        text = self.pieces.get(ids[0])
        if text is None:
            text = self.pieces[ids[0]] = self.tok.decode(ids)
        return text

    def step(self, token: int) -> str:
        self.ids.append(token)
        before = self._decode(self.ids[self.prefix:self.read])
        after = self.tok.decode(self.ids[self.prefix:])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.prefix, self.read = self.read, len(self.ids)
            return after[len(before):]
        return ""

    def flush(self) -> str:
        before = self._decode(self.ids[self.prefix:self.read])
        after = self.tok.decode(self.ids[self.prefix:])
        self.prefix = self.read = len(self.ids)
        return after[len(before):]


class _Seq:
    """Engine-side state of one request."""

    def __init__(self, req: Request, eng: Engine):
        p = req.params
        self.req, self.params = req, p
        self.prompt_len = len(req.prompt_ids)
        self.tokens = list(req.prompt_ids)            # prompt + generated; tokens[-1] is fed next
        self.blocks: list[int] = []
        self.cached = 0                               # tokens whose latent is in the cache
        self.prefilled = False
        self.slot = -1                                # batch row slot (penalty counts, draft distribution)
        self.order = 0                                # admission order: the newest is preempted first
        self.draft: int | None = None
        self.leader: _Seq | None = None               # same prompt, admitted alongside: it prefills for both
        self.followers: list[_Seq] = []               # requests waiting for this one's prefill
        # a seeded request draws from its own generator (the same tokens whatever shares its batch);
        # unseeded ones draw from the engine's, all rows in one call
        self.gen: torch.Generator | None = None
        if p.seed is not None and p.temperature > 0:
            self.gen = torch.Generator(device=eng.device)
            self.gen.manual_seed(p.seed)
        self._uniforms: list[float] = []              # gen's uniforms from number _u0 on, drawn 64 at a time
        self._u0 = 0
        self.penalized = p.repetition_penalty != 1 or p.frequency_penalty != 0 or p.presence_penalty != 0
        self.detok = (_Detokenizer(eng.tokenizer, req.prompt_ids[-4:], eng._pieces)
                      if eng.tokenizer is not None else None)
        # nobody reads this request's text before it finishes (generate(): no stream, no stop strings):
        # its tokens are decoded once at the end instead of one window per token
        self.lazy_text = self.detok is not None and not p.stop and req._sink is None and not req._keep
        # what _append does for such a request is a few appends and a length check (Engine._decode inlines it)
        self.plain = self.lazy_text and p.logprobs is None and not self.penalized and not p.stop_token_ids
        self.text = ""                                # output text so far (stop string cut off)
        self.sent = 0                                 # characters of `text` already emitted
        self.logprobs: list[float] | None = [] if p.logprobs is not None else None
        self.finish_reason: str | None = None
        # what the next event covers
        self.new_ids: list[int] = []
        self.new_lps: list[float] = []
        self.new_tops: list[list[tuple[int, float]]] = []

    def uniform(self, k: int | None = None) -> float:
        """U[0, 1) number k (default: the next token's, n_out) of this request's own generator (seeded
        requests), the one that draws its generated token k; one tensor call per 64 of them. It depends on
        the seed and k alone: MTP speculation reads it for the draft of token k and again to draw token k,
        so a seeded request gets the tokens plain decoding gives it, alone, batched or preempted."""
        n = self.n_out
        k = n if k is None else k
        if k < n:
            raise ValueError(f"uniform {k} of a request at token {n}: tokens already drawn draw no more")
        if n - self._u0 >= 64:          # those of the tokens already drawn are read no more
            del self._uniforms[:n - self._u0]
            self._u0 = n
        while k - self._u0 >= len(self._uniforms):
            self._uniforms += torch.rand(64, generator=self.gen, dtype=torch.float64, device=self.gen.device).tolist()
        return self._uniforms[k - self._u0]

    @property
    def out(self) -> list[int]:
        return self.tokens[self.prompt_len:]

    @property
    def n_out(self) -> int:
        return len(self.tokens) - self.prompt_len


_order = operator.attrgetter("order")


# Engines whose background thread runs. Stopped when the interpreter exits (atexit runs before daemon threads
# are cut off): a daemon thread cut off inside a torch op aborts the process ("terminate called without an
# active exception", exit status 134), e.g. when `nanoseek generate ... | head` leaves while it streams.
_BACKGROUND: weakref.WeakSet = weakref.WeakSet()


@atexit.register
def _stop_background_engines() -> None:
    for engine in list(_BACKGROUND):
        engine.stop()


class Engine:
    def __init__(self, model, tokenizer=None, *, max_batch: int = 32, max_seq_len: int | None = None,
                 block_size: int = 16, num_blocks: int | None = None, speculative: bool = False,
                 device=None, dtype=None, max_prefill_tokens: int = 2048, cache_bytes: int = 1 << 30,
                 cache_dtype: torch.dtype | None = None, one_row: bool = True, batch_rows: bool = True):
        """model: a nanoseek Transformer (moved to device/dtype when given). num_blocks defaults to room
        for max_batch sequences of max_seq_len, capped at `cache_bytes`, never below one full sequence.
        cache_dtype: the latents' dtype, which decode attention computes in. Default: the model's, except
        fp32 for a 16-bit model on CPU, where fp32 attention is both faster (MKL against oneDNN's fixed
        cost per bf16 bmm: small preset, bf16, one thread, batch 1: 11.6 -> 10.7 ms a step) and rounds less.
        one_row: a step that decodes a single row on CPU runs `OneRowDecoder` (the same math in about half
        the ops) where it supports the model; False always runs the model's forward.
        batch_rows: a decode step of several rows on CPU runs `BatchDecoder` (infer/batch_rows.py) where it
        supports the model and the batch; False always runs the model's forward."""
        if device is not None or dtype is not None:
            model.to(device=device, dtype=dtype)
        param = next(model.parameters())
        self.model, self.tokenizer = model, tokenizer
        self.device, self.dtype = param.device, param.dtype
        if cache_dtype is None:
            cache_dtype = torch.float32 if self.device.type == "cpu" and param.element_size() < 4 else self.dtype
        self.cache_dtype = cache_dtype
        cfg = self.config = model.config
        if speculative and cfg.num_nextn_predict_layers < 1:
            raise ValueError("speculative=True needs a model with an MTP module (num_nextn_predict_layers >= 1)")
        self.speculative = speculative
        self.one_row = OneRowDecoder(model) if one_row and OneRowDecoder.supports(model, cache_dtype) else None
        self.batch_rows = (BatchDecoder(model) if batch_rows and BatchDecoder.supports(model, cache_dtype)
                           else None)
        self.max_batch = max_batch
        if max_seq_len is not None and (not isinstance(max_seq_len, int) or max_seq_len < 2):
            raise ValueError(f"max_seq_len {max_seq_len!r}: a context window needs at least 2 positions")
        self.max_seq_len = int(max_seq_len or cfg.max_position_embeddings)
        self.max_prefill_tokens = max(max_prefill_tokens, 1)
        self.vocab_size = cfg.vocab_size
        eos = tokenizer.eos_id if tokenizer is not None and tokenizer.eos_id is not None else cfg.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, (list, tuple)) else [] if eos is None else [eos])
        layers = cfg.num_hidden_layers + (1 if speculative else 0)     # MTP depth 1 keeps its own latents
        if num_blocks is None:
            per_block = layers * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * block_size * cache_dtype.itemsize
            one_seq = -(-self.max_seq_len // block_size)
            num_blocks = max(min(max_batch * one_seq, cache_bytes // per_block), one_seq) + 1
        self.cache = PagedCache(cfg, num_blocks, block_size, dtype=cache_dtype, device=self.device, layers=layers)
        self.stats = dict(drafted=0, accepted=0, steps=0, prefill_tokens=0, generated_tokens=0, preempted=0,
                          shared_prefills=0)
        self._gen = torch.Generator(device=self.device)        # unseeded requests' noise
        self._gen.manual_seed(random.getrandbits(63))

        self._inbox: list[_Seq] = []
        self._finished: list[_Seq] = []
        self.waiting: deque[_Seq] = deque()
        self.running: list[_Seq] = []
        self._free_slots = list(range(max_batch - 1, -1, -1))
        self._admitted = itertools.count()
        self._counts: torch.Tensor | None = None       # (max_batch, V) output-token counts for penalties
        self._prompt_seen: torch.Tensor | None = None  # (max_batch, V) bool
        self._draft_q: torch.Tensor | None = None      # (max_batch, V) draft distributions (speculative sampling)
        self._pieces: dict[int, str] = {}              # token id -> its text alone (detokenizer windows)
        self._params_cache: dict[str, tuple[list[_Seq], smp.BatchParams | None]] = {}
        self._info: tuple | None = None                # _rows_info's rows and what it found
        self._step_lock = threading.RLock()
        self._cv = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False

    # --- public API
    def validate(self, prompt_ids: list[int], params: SamplingParams) -> None:
        """Raise ValueError naming what is wrong with a request (the server turns it into a 400)."""
        params.validate()
        if not isinstance(prompt_ids, (list, tuple)) or not prompt_ids:
            raise ValueError("prompt_ids must be a non-empty list of token ids")
        # plain ints (the usual case) checked with C-level builtins; anything else element by element
        plain = set(map(type, prompt_ids)) == {int} and 0 <= min(prompt_ids) and max(prompt_ids) < self.vocab_size
        if not plain and not all(isinstance(t, (int, np.integer)) and not isinstance(t, bool)
                                 and 0 <= t < self.vocab_size for t in prompt_ids):
            raise ValueError(f"prompt_ids must be integers in [0, {self.vocab_size})")
        n = len(prompt_ids)
        if n > self.max_seq_len:
            raise ValueError(f"prompt is {n} tokens, longer than the context window of {self.max_seq_len}")
        if n + params.max_tokens > self.max_seq_len:
            raise ValueError(f"prompt ({n} tokens) + max_tokens ({params.max_tokens}) = {n + params.max_tokens} "
                             f"exceeds the context window of {self.max_seq_len}")
        if self.cache.blocks_for(n + params.max_tokens) > self.cache.num_blocks - 1:
            raise ValueError(f"prompt + max_tokens = {n + params.max_tokens} tokens exceeds the KV cache "
                             f"({(self.cache.num_blocks - 1) * self.cache.block_size} tokens)")
        if params.stop and self.tokenizer is None:
            raise ValueError("stop strings need an engine with a tokenizer; use stop_token_ids")

    def add_request(self, prompt_ids: list[int], params: SamplingParams | None = None) -> Request:
        """Queue a request (thread-safe); it joins the running batch at the next step."""
        return self._add(prompt_ids, params or SamplingParams())

    def generate(self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams]) -> list[Completion]:
        """Run a batch to completion through the same continuous-batching scheduler."""
        plist = list(params) if isinstance(params, (list, tuple)) else [params] * len(prompts)
        if len(plist) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(plist)} SamplingParams")
        for p, sp in zip(prompts, plist):
            self.validate(p, sp)
        reqs = [self._add(p, sp, keep_events=False, checked=True) for p, sp in zip(prompts, plist)]
        return [r.result() for r in reqs]

    async def stream(self, prompt_ids: list[int], params: SamplingParams | None = None) -> AsyncIterator[StreamEvent]:
        """Async events of one request (starts the background thread). Closing or cancelling the
        generator cancels the request. A bad request raises ValueError at the first iteration."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[StreamEvent] = asyncio.Queue()

        def sink(ev: StreamEvent) -> None:
            try:
                loop.call_soon_threadsafe(events.put_nowait, ev)
            except RuntimeError:      # the event loop is gone; the request is cancelled below
                pass

        req = self._add(prompt_ids, params or SamplingParams(), sink=sink, keep_events=False)
        self.start()
        try:
            while True:
                ev = await events.get()
                if ev.finished:
                    req._raise_if_failed()
                yield ev
                if ev.finished:
                    return
        finally:
            if not req.finished:
                req.cancel()

    @property
    def running_in_background(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._stopping

    def start(self) -> None:
        """Run step() in a background thread while work exists (idempotent)."""
        with self._cv:
            if self.running_in_background:
                return
            self._stopping = False
            self._thread = threading.Thread(target=self._loop, name="nanoseek-engine", daemon=True)
            self._thread.start()
            _BACKGROUND.add(self)

    def stop(self) -> None:
        """End the background thread. Requests still in flight then fail (their stream() consumers would
        wait for events nobody makes), unless a start() from another thread took over meanwhile."""
        with self._cv:
            thread, self._thread = self._thread, None    # a thread that is no longer self._thread ends (_loop)
            self._stopping = True
            self._cv.notify_all()
        if thread is not None and thread is not threading.current_thread():
            thread.join()
        with self._cv:
            stopped = self._thread is None
        if stopped:
            _BACKGROUND.discard(self)
            if self.has_work():
                self._abort_all(RuntimeError("the engine was stopped with this request in flight"))

    def has_work(self) -> bool:
        return bool(self._inbox or self.waiting or self.running)

    def step(self) -> bool:
        """One scheduler iteration; returns whether work remains."""
        with self._step_lock, torch.inference_mode():
            self._take_inbox()
            self._reap_cancelled()
            self._admit()
            prefill = [s for s in self.running if not s.prefilled]
            if prefill:
                self._prefill(prefill)
            decode = [s for s in self.running if s.prefilled and s.finish_reason is None]
            if decode:
                (self._verify if self.speculative else self._decode)(decode)
            self._flush()
            with self._cv:
                self._cv.notify_all()
            return self.has_work()

    # --- queueing
    def _add(self, prompt_ids, params, sink=None, keep_events=True, checked=False) -> Request:
        """checked: validate() passed on these very arguments already (generate checks all first)."""
        if isinstance(prompt_ids, torch.Tensor):
            prompt_ids = prompt_ids.tolist()
        if not checked:
            self.validate(prompt_ids, params)
        req = Request(self, list(map(int, prompt_ids)), params, sink=sink, keep_events=keep_events)
        seq = _Seq(req, self)
        with self._cv:
            self._inbox.append(seq)
            self._cv.notify_all()
        return req

    def _wake(self) -> None:
        with self._cv:
            self._cv.notify_all()

    def _loop(self) -> None:
        me = threading.current_thread()
        while True:
            with self._cv:
                idle = not self.has_work()
                self._cv.wait_for(lambda: self._stopping or self._thread is not me or self.has_work())
                if self._stopping or self._thread is not me:    # stopped, or a later start() replaced it
                    return
            if idle:
                # woken from idle by the first request of what is often a burst (a server request's n
                # choices are queued one after another): let the rest arrive, so that they are admitted,
                # and their shared prompt prefilled, together
                time.sleep(0.001)
            try:
                self.step()
            except Exception as e:  # never die silently: fail the requests in flight, keep serving
                traceback.print_exc()
                self._abort_all(e)

    def _abort_all(self, error: BaseException) -> None:
        with self._step_lock:
            self._take_inbox()
            for s in list(self.running) + list(self.waiting):
                s.req.error = error
                self._finish(s, "abort")
            self._flush()

    def _take_inbox(self) -> None:
        with self._cv:
            new, self._inbox = self._inbox, []
        self.waiting.extend(new)

    def _reap_cancelled(self) -> None:
        for s in [s for s in self.running if s.req._cancelled] + [s for s in self.waiting if s.req._cancelled]:
            self._finish(s, "abort")

    def _admit(self) -> None:
        """Waiting requests join while a batch slot and blocks are free. A request whose tokens equal
        those of one admitted with it (the same prompt n times: GRPO groups, OpenAI's n) is prefilled
        by that one (its leader): it holds the leader's full blocks by reference and its own block for
        the partly filled last one, which the leader's prefill is copied into (vLLM's n > 1 sampling).
        Not with speculation: the MTP layer's latent at the last prompt position depends on the
        sampled token."""
        # keep ~1% of the blocks for running sequences to grow into (vLLM's watermark), so that a new
        # request is not admitted only to be preempted again at the next decode step
        watermark = max(1, (self.cache.num_blocks - 1) // 100)
        leaders: dict[tuple[int, ...], _Seq] = {}
        if self.waiting and not self.speculative:
            leaders = {tuple(s.tokens): s for s in self.running
                       if not s.prefilled and s.cached == 0 and s.leader is None}
        while self.waiting and self._free_slots:
            s = self.waiting[0]
            key = tuple(s.tokens) if not self.speculative else None
            leader = leaders.get(key)
            shared = len(s.tokens) // self.cache.block_size if leader is not None else 0
            need = self.cache.blocks_for(len(s.tokens)) - shared
            if need + (watermark if self.running else 0) > self.cache.num_free:
                break
            self.waiting.popleft()
            if leader is not None:
                s.blocks = self.cache.share(leader.blocks[:shared]) + self.cache.allocate(need)
                s.leader = leader
                leader.followers.append(s)
            else:
                s.blocks = self.cache.allocate(need)
                if key is not None:
                    leaders.setdefault(key, s)
            s.slot = self._free_slots.pop()
            s.order = next(self._admitted)
            s.cached, s.prefilled, s.draft = 0, False, None
            if s.penalized:
                self._init_penalty_row(s)
            self.running.append(s)

    def _release(self, s: _Seq) -> None:
        if s.leader is not None:          # leaves before its leader's prefill
            s.leader.followers.remove(s)
            s.leader = None
        if s.followers:                   # leaves before its prefill: the first follower prefills itself
            new, *rest = s.followers      # (into the full blocks it shares) for the others
            new.leader, new.followers = None, rest
            for f in rest:
                f.leader = new
            s.followers = []
        self.cache.release(s.blocks)
        s.blocks = []
        if s.slot >= 0:
            self._free_slots.append(s.slot)
            s.slot = -1
        if s in self.running:
            self.running.remove(s)

    def _preempt(self, s: _Seq) -> None:
        """Give back s's blocks; it is recomputed from its tokens (prompt + output) when readmitted."""
        self._release(s)
        s.cached, s.prefilled, s.draft = 0, False, None
        self.waiting.appendleft(s)
        self.stats["preempted"] += 1

    def _reserve(self, rows: list[_Seq], ahead: int) -> list[_Seq]:
        """Make sure every row has blocks for `ahead` more positions, preempting the newest
        requests when the pool runs dry. Returns the rows still running, in order."""
        rows = sorted(rows, key=_order)
        bs = self.cache.block_size
        needs = [(s.cached + ahead + bs - 1) // bs - len(s.blocks) for s in rows]
        if sum(n for n in needs if n > 0) <= self.cache.num_free:     # no preemption: every row grows
            for s, n in zip(rows, needs):
                if n > 0:
                    s.blocks += self.cache.allocate(n)
            return rows
        kept: list[_Seq] = []
        while rows:
            s = rows.pop(0)
            need = self.cache.blocks_for(s.cached + ahead) - len(s.blocks)
            while need > self.cache.num_free:
                victims = [v for v in self.running if v is not s and v.order > s.order]
                victim = max(victims, key=lambda v: v.order) if victims else s
                if victim in rows:
                    rows.remove(victim)
                self._preempt(victim)
                if victim is s:
                    break
            else:
                if need > 0:
                    s.blocks += self.cache.allocate(need)
                kept.append(s)
        return kept

    # --- forwards
    def _bind(self, rows: list[_Seq], lengths: list[int], T: int):
        return self.cache.bind([s.blocks for s in rows], [s.cached for s in rows], lengths, T)

    def _prefill(self, seqs: list[_Seq]) -> None:
        budget = self.max_prefill_tokens
        rows, lens, T = [], [], 0
        for s in sorted((s for s in seqs if s.leader is None), key=lambda s: s.order):
            n = min(len(s.tokens) - s.cached, budget)
            if rows and (len(rows) + 1) * max(T, n) > budget:
                break
            rows.append(s)
            lens.append(n)
            T = max(T, n)
        B = len(rows)
        ids = torch.zeros(B, T, dtype=torch.long)
        for b, (s, n) in enumerate(zip(rows, lens)):
            ids[b, :n] = torch.tensor(s.tokens[s.cached:s.cached + n])
        ids = ids.to(self.device)
        positions, mask = self._bind(rows, lens, T)
        if all(s.cached == 0 for s in rows) and all(n == T for n in lens):
            mask = None     # fresh prompts of one length: plain causal attention (SDPA's is_causal kernel)
        logits = hidden = None
        if self.batch_rows is not None and not self.speculative and all(s.cached == 0 for s in rows):
            logits = self.batch_rows.prefill(ids, lens, self.cache)     # fresh prompts: the lean step
        if logits is None:
            last_pos = torch.tensor(lens, device=self.device)[:, None] - 1            # (B, 1)
            out = self.model(ids, cache=self.cache, positions=positions, mask=mask, absorb=False,
                             return_hidden=self.speculative, logits_at=last_pos)   # head at one position per row
            logits, hidden = (out["logits"], out["hidden"]) if self.speculative else (out, None)
        self.stats["prefill_tokens"] += sum(lens)
        starts = [s.cached for s in rows]
        for s, n in zip(rows, lens):
            s.cached += n
        done, done_rows = [], []
        for b, s in enumerate(rows):
            if s.cached == len(s.tokens):
                for f in [s] + s.followers:   # followers sample from the leader's logits, each its own way
                    done.append(b)
                    done_rows.append(f)
                self._handover(s)
        if done:
            last = logits[torch.tensor(done, device=self.device), 0]                    # (D, V)
            tokens, lps, tops = self._sample(done_rows, last)
            for s, t, lp, top in zip(done_rows, tokens, lps, tops):
                s.prefilled = True
                self._append(s, t, lp, top)
        if self.speculative:
            # the MTP module keeps its own latents for the same positions: run it over the chunk with
            # the tokens one step ahead (the just-sampled one last) and draft from the last position
            alive = [b for b, s in enumerate(rows) if s.finish_reason is None]
            if alive:
                nxt = torch.zeros(len(alive), T, dtype=torch.long)
                for i, b in enumerate(alive):
                    s, n, st = rows[b], lens[b], starts[b]
                    nxt[i, :n] = torch.tensor(s.tokens[st + 1:st + n + 1])
                self._mtp([rows[b] for b in alive], hidden[alive], nxt, starts=[starts[b] for b in alive],
                          lengths=[lens[b] for b in alive], draft_at=[lens[b] - 1 for b in alive], absorb=False)

    def _handover(self, s: _Seq) -> None:
        """s's prefill is complete: its followers hold the same cached tokens. Each gets its own copy
        of the partly filled last block (copy-on-write: before anyone decodes into it)."""
        bs = self.cache.block_size
        k = s.cached // bs
        if s.cached % bs and s.followers:
            self.cache.copy_blocks([s.blocks[k]] * len(s.followers), [f.blocks[k] for f in s.followers])
        for f in s.followers:
            f.cached, f.leader = s.cached, None
            self.stats["shared_prefills"] += 1
        s.followers = []

    def _decode(self, seqs: list[_Seq]) -> None:
        rows = self._reserve(seqs, 1)
        if not rows:
            return
        logits = None
        if self.one_row is not None and len(rows) == 1:
            # one row: the lean step, no ids, positions or mask tensors (infer/one_row.py)
            s = rows[0]
            if not self.cache.bind_one(s.blocks, s.cached):
                self._bind(rows, [1], 1)
            logits = self.one_row.step(s.tokens[-1], s.cached, self.cache)
        elif self.batch_rows is not None and len(rows) > 1:
            # several rows: the lean batched step on a dense copy of their context (infer/batch_rows.py)
            def room():     # the most steps any row may still take (sizes the context buffer)
                return max(min(s.params.max_tokens - s.n_out, self.max_seq_len - len(s.tokens)) for s in rows)
            logits = self.batch_rows.step([s.tokens[-1] for s in rows], [s.cached for s in rows],
                                          [s.blocks for s in rows], self.cache, rows, room)
        if logits is None:
            ids = torch.tensor([[s.tokens[-1]] for s in rows], device=self.device)     # (B, 1)
            positions, mask = self._bind(rows, [1] * len(rows), 1)
            if len({s.cached for s in rows}) == 1:
                mask = None     # every row sees all S cached positions: no masking op in any layer
            logits = self.model(ids, cache=self.cache, positions=positions, mask=mask, absorb=True)[:, 0]
        tokens, lps, tops = self._sample(rows, logits)
        self.stats["steps"] += 1
        eos, max_len, n = self.eos_ids, self.max_seq_len, 0
        for s, t, lp, top in zip(rows, tokens, lps, tops):
            s.cached += 1
            if s.plain and (s.params.ignore_eos or t not in eos):
                # _append for a request nobody reads before it finishes (no stop, logprobs or penalties;
                # no events either: new_ids stays empty, _flush passes over it)
                s.tokens.append(t)
                s.detok.ids.append(t)
                n += 1
                if len(s.tokens) - s.prompt_len >= s.params.max_tokens or len(s.tokens) >= max_len:
                    self._finish(s, "length", flush=True)
            else:
                self._append(s, t, lp, top)
        self.stats["generated_tokens"] += n

    def _verify(self, seqs: list[_Seq]) -> None:
        """Speculative step: feed [last token, MTP draft] at positions L, L+1. The logits at L decide the
        draft (accept with min(1, p/q), else resample from norm(max(0, p - q)); greedy: accept iff it is
        the argmax); if accepted, the logits at L+1 give a bonus token. Then the MTP module drafts again."""
        rows = self._reserve(seqs, 2)
        if not rows:
            return
        B = len(rows)
        dev = self.device
        drafts = torch.tensor([s.draft for s in rows], device=dev)                  # (B,)
        starts = [s.cached for s in rows]
        positions, mask = self._bind(rows, [2] * B, 2)
        lean = None
        if self.one_row is not None and B == 1:     # one sequence: the lean few-row path (infer/one_row.py)
            lean = self.one_row.verify([rows[0].tokens[-1], rows[0].draft], starts[0], self.cache)
        if lean is not None:
            logits, hidden = lean[0][None], lean[1][None]                          # (1, 2, V), (1, 2, dim)
        else:
            ids = torch.stack([torch.tensor([s.tokens[-1] for s in rows], device=dev), drafts], dim=1)  # (B, 2)
            out = self.model(ids, cache=self.cache, positions=positions, mask=mask, absorb=True, return_hidden=True)
            logits, hidden = out["logits"], out["hidden"]                           # (B, 2, V), (B, 2, dim)
        bp = self._batch_params(rows, "verify")
        if bp is None:
            first, bonus = _argmax(logits).unbind(1)
            accepted = first == drafts
        else:
            p0 = self._distribution(rows, bp, logits[:, 0])
            p1 = self._distribution(rows, bp, logits[:, 1], counting=drafts)   # the draft is output by then
            q = torch.zeros_like(p0).scatter_(1, drafts[:, None], 1.0)       # greedy drafts: one-hot
            if not bp.all_greedy:
                q = torch.where(bp.greedy[:, None], q, self._draft_q[[s.slot for s in rows]])
            # greedy rows draw too: q and p are one-hot there, and u < p(d) for any u < 1 iff p(d) = 1
            first, accepted = smp.speculative_accept(p0, q, drafts, self._uniform(rows), self._uniform(rows))
            bonus = smp.sample_cdf(p1, self._uniform(rows))
            seeded = self._rows_info(rows)[1]
            if seeded:
                # a seeded row's token k is the inverse-CDF draw with its uniform k, as in plain decoding; the
                # draft was drawn from q with the same uniform, and is kept when it is that token (a coupling
                # that keeps fewer drafts than the accept/resample rule, and gives the plain tokens)
                sel = torch.tensor(seeded, device=dev)
                u0, u1 = (torch.tensor([rows[b].uniform(rows[b].n_out + j) for b in seeded], dtype=torch.float64,
                                       device=dev) for j in (0, 1))
                mine = smp.sample_cdf(p0[sel], u0)
                first[sel], accepted[sel], bonus[sel] = mine, mine == drafts[sel], smp.sample_cdf(p1[sel], u1)
        want_lp = [s.params.logprobs for s in rows if s.params.logprobs is not None]
        if want_lp:
            lp0 = self._logprobs(logits[:, 0], first, rows)
            lp1 = self._logprobs(logits[:, 1], bonus, rows)
        first_l, bonus_l, acc_l = torch.stack([first, bonus, accepted.long()]).tolist()   # the host sync
        self.stats["steps"] += 1
        self.stats["drafted"] += B
        self.stats["accepted"] += sum(acc_l)
        alive, h_rows, nxt, lengths = [], [], [], []
        for b, s in enumerate(rows):
            s.cached += 1 + acc_l[b]
            new = [first_l[b], bonus_l[b]] if acc_l[b] else [first_l[b]]
            for j, t in enumerate(new):
                lp, top = (lp0 if j == 0 else lp1)[b] if want_lp else (None, None)
                self._append(s, t, lp, top)
                if s.finish_reason is not None:
                    break
            if s.finish_reason is None:
                alive.append(s)
                h_rows.append(b)
                nxt.append(new + [0] * (2 - len(new)))
                lengths.append(len(new))
        if alive:
            self._mtp(alive, hidden[h_rows], torch.tensor(nxt), starts=[starts[b] for b in h_rows],
                      lengths=lengths, draft_at=[n - 1 for n in lengths], absorb=True, lean=lean is not None)

    def _mtp(self, rows: list[_Seq], hidden: torch.Tensor, next_ids: torch.Tensor, *, starts: list[int],
             lengths: list[int], draft_at: list[int], absorb: bool, lean: bool = False) -> None:
        """MTP depth 1 over positions starts[b] .. +lengths[b]: h_i and the embedding of token i+1 ->
        its latents into cache layer num_hidden_layers, and a draft for the token after next.
        lean: one sequence whose verify step took OneRowDecoder.verify: so does this."""
        T = hidden.shape[1]
        last = None
        if lean:
            n = lengths[0]
            self.cache.bind([rows[0].blocks], starts, [n], n)
            last = self.one_row.mtp(hidden[0, :n], next_ids[0, :n].tolist(), starts[0], self.cache)   # (1, V)
        if last is None:
            positions, mask = self.cache.bind([s.blocks for s in rows], starts, lengths, T)
            if all(st == 0 for st in starts) and all(n == T for n in lengths):
                mask = None
            draft_pos = torch.tensor(draft_at, device=self.device)[:, None]              # (B, 1)
            logits, _, _ = self.model.mtp_step(hidden, next_ids.to(self.device), depth=0, cache=self.cache,
                                               positions=positions, mask=mask, absorb=absorb, logits_at=draft_pos)
        needs = [b for b, s in enumerate(rows) if s.prefilled]      # not a prompt chunk short of the end
        if not needs:
            return
        dev = self.device
        sel = [rows[b] for b in needs]
        if last is None:
            last = logits[torch.tensor(needs, device=dev), 0]                         # (D, V)
        bp = self._batch_params(sel, "draft")
        if bp is None:
            drafts = _argmax(last)
        else:
            q = self._distribution(sel, bp, last)
            drafts = smp.sample_cdf(q, self._uniform(sel))
            if not bp.all_greedy:       # speculative sampling needs q again at verification
                if self._draft_q is None:
                    self._draft_q = torch.zeros(self.max_batch, self.vocab_size, device=dev)
                self._draft_q[[s.slot for s in sel]] = q
        for s, d in zip(sel, drafts.tolist()):
            s.draft = d

    # --- sampling
    def _sample(self, rows: list[_Seq], logits: torch.Tensor):
        """logits (B, V) -> (tokens, chosen logprobs, top logprobs) as Python lists (one host sync)."""
        bp = self._batch_params(rows, "sample")
        if bp is None:
            chosen = _argmax(logits)
        else:
            probs = self._distribution(rows, bp, logits)
            chosen = smp.sample_cdf(probs, self._uniform(rows))
        want_lp = self._rows_info(rows)[0]
        tokens = chosen.tolist()
        if want_lp is None:
            return tokens, [None] * len(rows), [None] * len(rows)
        per_row = self._logprobs(logits, chosen, rows)
        return tokens, [r[0] for r in per_row], [r[1] for r in per_row]

    def _logprobs(self, logits: torch.Tensor, chosen: torch.Tensor,
                  rows: list[_Seq]) -> list[tuple[float, list[tuple[int, float]]]]:
        """Each row's chosen-token logprob and its own number of top (token id, logprob) pairs (the batch
        computes the largest number any row asks for; each row keeps its own). By id, not by text: tokens
        that decode alike (each part of one UTF-8 character decodes to U+FFFD) stay apart."""
        want = [s.params.logprobs or 0 for s in rows]
        lp, top_v, top_i = smp.logprobs(logits, chosen, max(want))
        lp = lp.tolist()
        if top_v is None:
            return [(x, []) for x in lp]
        top_v, top_i = top_v.tolist(), top_i.tolist()
        return [(lp[b], list(zip(top_i[b][:want[b]], top_v[b][:want[b]]))) for b in range(len(lp))]

    def _batch_params(self, rows: list[_Seq], site: str) -> smp.BatchParams | None:
        """The rows' sampling parameters as tensors, or None when argmax of the raw logits is all they
        need. Built again only when the rows change (a decode step's rows are usually the previous
        step's): one entry per call site."""
        last = self._params_cache.get(site)
        if last is not None and last[0] == rows:      # list ==: element identity (_Seq has no __eq__)
            return last[1]
        if all(s.params.temperature == 0 and not s.penalized for s in rows):
            bp = None
        else:
            bp = smp.batch_params([s.params for s in rows], self.device)
        self._params_cache[site] = (list(rows), bp)
        return bp

    def _distribution(self, rows: list[_Seq], bp: smp.BatchParams, logits: torch.Tensor,
                      counting: torch.Tensor | None = None) -> torch.Tensor:
        """What each row samples from (B, V): penalties, temperature, filters; one-hot for greedy rows.
        `counting` (B,): one more output token per row for the penalties (the draft, at the bonus position)."""
        counts = seen = None
        if bp.any_penalty:
            slots = torch.tensor([s.slot for s in rows], device=self.device)
            counts, seen = self._counts[slots], self._prompt_seen[slots]
            if counting is not None:
                counts[torch.arange(len(rows), device=self.device), counting] += 1
        return smp.probabilities(smp.process_logits(logits, bp, counts, seen), bp.greedy, bp.any_greedy)

    def _uniform(self, rows: list[_Seq]) -> torch.Tensor:
        """U[0, 1) per row (B,) in fp64: the unseeded rows' in one draw from the engine's generator, a
        seeded row's from its own, the one of its next token (_Seq.uniform). Greedy rows draw too
        (harmless: their distribution is one-hot)."""
        dev = self.device
        u = torch.rand(len(rows), generator=self._gen, dtype=torch.float64, device=dev)
        seeded = self._rows_info(rows)[1]
        if seeded:
            u[seeded] = torch.tensor([rows[b].uniform() for b in seeded], dtype=torch.float64, device=dev)
        return u

    def _rows_info(self, rows: list[_Seq]) -> tuple[int | None, list[int]]:
        """(the most top logprobs any row asks for, None if no row wants logprobs; the indices of the rows
        with their own generator), made again only when the rows change."""
        info = self._info
        if info is None or info[0] != rows:
            want = [s.params.logprobs for s in rows if s.params.logprobs is not None]
            info = self._info = (list(rows), max(want) if want else None,
                                 [b for b, s in enumerate(rows) if s.gen is not None])
        return info[1], info[2]

    def _init_penalty_row(self, s: _Seq) -> None:
        if self._counts is None:
            self._counts = torch.zeros(self.max_batch, self.vocab_size, device=self.device)
            self._prompt_seen = torch.zeros(self.max_batch, self.vocab_size, dtype=torch.bool, device=self.device)
        self._counts[s.slot] = torch.bincount(torch.tensor(s.out, dtype=torch.long),
                                              minlength=self.vocab_size)[:self.vocab_size].to(self.device)
        self._prompt_seen[s.slot] = False
        self._prompt_seen[s.slot, torch.tensor(s.tokens[:s.prompt_len], device=self.device)] = True

    # --- output
    def _append(self, s: _Seq, t: int, lp: float | None, top: list | None) -> None:
        """Add one sampled token: stop checks, detokenization, what the next event carries."""
        p = s.params
        s.tokens.append(t)
        s.new_ids.append(t)
        self.stats["generated_tokens"] += 1
        if s.logprobs is not None:
            s.logprobs.append(lp)
            s.new_lps.append(lp)
            s.new_tops.append(top if p.logprobs else [])
        if s.penalized:
            self._counts[s.slot, t] += 1
        if t in p.stop_token_ids or (not p.ignore_eos and t in self.eos_ids):
            self._finish(s, "stop", flush=True)
            return
        if s.lazy_text:
            s.detok.ids.append(t)
        elif s.detok is not None:
            delta = s.detok.step(t)
            if delta:
                old = len(s.text)
                s.text += delta
                if p.stop:
                    cut = self._find_stop(s.text, p.stop, max(0, old - max(map(len, p.stop)) + 1))
                    if cut is not None:
                        s.text = s.text[:cut]
                        self._finish(s, "stop")
                        return
        if s.n_out >= p.max_tokens or len(s.tokens) >= self.max_seq_len:
            self._finish(s, "length", flush=True)

    @staticmethod
    def _find_stop(text: str, stops: list[str], start: int) -> int | None:
        hits = [i for i in (text.find(st, start) for st in stops) if i >= 0]
        return min(hits) if hits else None

    @staticmethod
    def _held(text: str, sent: int, stops: list[str]) -> int:
        """Length of the longest tail of text[sent:] that could still grow into a stop string."""
        tail = len(text) - sent
        hold = 0
        for st in stops:
            for k in range(min(len(st) - 1, tail), hold, -1):
                if text.endswith(st[:k]):
                    hold = k
                    break
        return hold

    def _finish(self, s: _Seq, reason: str, flush: bool = False) -> None:
        if s.finish_reason is not None:
            return
        if (flush or s.lazy_text) and s.detok is not None:
            rest = s.detok.flush()
            if rest and s.params.stop:
                old = len(s.text)
                s.text += rest
                cut = self._find_stop(s.text, s.params.stop, max(0, old - max(map(len, s.params.stop)) + 1))
                if cut is not None:
                    s.text, reason = s.text[:cut], "stop"
            else:
                s.text += rest
        s.finish_reason = reason
        if s in self.waiting:
            self.waiting.remove(s)
        self._release(s)
        self._finished.append(s)

    def _flush(self) -> None:
        """One event per request that got tokens (or finished) in this step."""
        for s in list(self.running) + [s for s in self.waiting if s.new_ids] + self._finished:
            if not s.new_ids and s.finish_reason is None:
                continue
            done = s.finish_reason is not None
            if not done and s.req._sink is None and not s.req._keep:     # nobody reads it (generate)
                s.new_ids, s.new_lps, s.new_tops = [], [], []
                continue
            end = len(s.text) if done else len(s.text) - self._held(s.text, s.sent, s.params.stop)
            text = s.text[s.sent:end]
            s.sent = max(s.sent, end)
            if done:
                s.req.completion = Completion(prompt_ids=s.req.prompt_ids, token_ids=s.out, text=s.text,
                                              finish_reason=s.finish_reason, logprobs=s.logprobs)
            want = s.logprobs is not None
            s.req._emit(StreamEvent(text=text, token_ids=s.new_ids, logprobs=s.new_lps if want else None,
                                    top_logprobs=s.new_tops if want else None, finished=done,
                                    finish_reason=s.finish_reason, prompt_tokens=s.prompt_len,
                                    completion_tokens=s.n_out))
            s.new_ids, s.new_lps, s.new_tops = [], [], []
        self._finished = []
