"""OpenAI-compatible HTTP API over the inference engine, plus the chat page.

    app = create_app(engine, tokenizer, "nanoseek", api_key=None)   # engine already started
    uvicorn.run(app, host="127.0.0.1", port=8000)

GET /v1/models, POST /v1/completions, POST /v1/chat/completions (JSON, or SSE with stream=true,
ending in `data: [DONE]`), GET /health, GET / (the chat page). Every request is one or more
`engine.stream` calls, so all clients share the engine's continuous batch.

What is not obvious from the code alone:
- Reasoning. The chat prompt ends in "<think>\\n" (DeepSeek-R1's template), so the model's text goes
  to `reasoning_content` until it writes "</think>", then to `content`, as DeepSeek's API does.
- Disconnects. A request's engine streams run in tasks owned here; when the client goes away they are
  cancelled, which cancels the engine requests and frees their slots at once. For a streaming
  response Starlette cancels the body iterator on `http.disconnect`; before the first token and for a
  plain JSON response a watcher on `receive()` notices the disconnect.
- Errors. Every error is OpenAI's {"error": {message, type, param, code}}; FastAPI's 422 for an
  invalid body becomes 400, as OpenAI answers. An unknown model is 404 `model_not_found`.
- Auth. With api_key, every /v1/ path needs "Authorization: Bearer KEY" (else 401), checked before
  the body is read. / and /health stay open: the page holds no secret and asks for the key on 401.
- Defaults and limits. A prompt plus max_tokens must fit the context window (else 400
  `context_length_exceeded`, as OpenAI answers); without max_tokens a chat reply may use the rest of
  the window, a completion gets 16 tokens (OpenAI's default). With a seed and n > 1, choice i uses
  seed + i, so the choices differ and each is reproducible. top_p = 0 means greedy.
- The response starts once the first token exists, so that an engine refusal is still a 400.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from nanoseek.infer.engine import SamplingParams, StreamEvent
from nanoseek.serve.schemas import (
    AssistantMessage, ChatChoice, ChatChunkChoice, ChatCompletion, ChatCompletionChunk, ChatCompletionRequest,
    ChoiceLogprobs, Completion, CompletionChoice, CompletionLogprobs, CompletionRequest, CompletionTokensDetails,
    Delta, ErrorDetail, ErrorResponse, ModelCard, ModelList, TokenLogprob, TopLogprob, Usage, new_id,
)

STATIC = Path(__file__).parent / "static"


def _responses(body: type) -> dict:
    """What a generation route answers, for the OpenAPI spec: the body (JSON, or an SSE stream with stream=true)
    and the OpenAI-style errors (validation errors are 400s, not FastAPI's 422)."""
    err = {"model": ErrorResponse}
    return {200: {"model": body, "content": {"text/event-stream": {"schema": {"type": "string"}}}},
            400: {**err, "description": "invalid request"}, 401: {**err, "description": "missing or wrong API key"},
            404: {**err, "description": "unknown model"}, 422: {"description": "not used: an invalid request is a 400"},
            500: {**err, "description": "the engine failed this request"}}

# The most choices (prompts x n) one completions request may ask for: each is a sequence the engine
# queues and a task the server runs; past this a request is refused before anything is tokenized.
MAX_CHOICES = 1024
log = logging.getLogger("nanoseek.serve")
END_THINK = "</think>"


# --- errors

class APIError(Exception):
    """An error the client caused (4xx) or we did (5xx), answered in OpenAI's shape."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


def error_response(status: int, message: str, param: str | None = None, code: str | None = None,
                   headers: dict | None = None) -> JSONResponse:
    kind = ("invalid_request_error" if status < 500 else "server_error")
    body = ErrorResponse(error=ErrorDetail(message=message, type=kind, param=param, code=code))
    return JSONResponse(body.model_dump(), status_code=status, headers=headers)


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    """The first pydantic error as ("param: what is wrong", "param")."""
    err = exc.errors()[0]
    if err["type"] == "json_invalid":
        return f"the request body is not valid JSON ({err.get('ctx', {}).get('error', 'decode error')})", None
    loc = [x for x in err["loc"] if x != "body"]
    param = "".join(f"[{x}]" if isinstance(x, int) else f".{x}" for x in loc).lstrip(".") or None
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "missing":
        msg = "required field is missing" if param else "the request has no body; send a JSON object"
    elif param is None and err["type"] in ("model_attributes_type", "model_type", "dict_type"):
        # FastAPI parses JSON only under Content-Type: application/json; otherwise the body arrives as bytes
        raw = exc.body
        if isinstance(raw, bytes):      # (a str is a body that parsed: a JSON string, not an object)
            try:
                json.loads(raw)
                msg = "send the JSON body with the header 'Content-Type: application/json'"
            except ValueError as e:
                msg = f"the request body is not valid JSON ({e})"
        else:
            msg = "the request body must be a JSON object"
    return (f"{param}: {msg}" if param else msg), param


class BearerAuth:
    """ASGI middleware: /v1/ paths need `Authorization: Bearer <api_key>`."""

    def __init__(self, app: Any, api_key: str):
        self.app, self.expected = app, api_key.encode()

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/v1/"):
            given = [v for k, v in scope["headers"] if k == b"authorization"]
            scheme, _, key = given[0].partition(b" ") if len(given) == 1 else (b"", b"", b"")
            # the scheme is case-insensitive (RFC 9110); two Authorization headers are refused, not one chosen
            ok = scheme.lower() == b"bearer" and secrets.compare_digest(key, self.expected)   # constant time
            if not ok:
                what = ("no API key given" if not given else "more than one Authorization header"
                        if len(given) > 1 else "incorrect API key")
                resp = error_response(401, f"{what}; send the header 'Authorization: Bearer <key>'",
                                      code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
                await resp(scope, receive, send)
                return
        await self.app(scope, receive, send)


# --- engine streams

class ClientGone(Exception):
    pass


async def _merged(engine: Any, jobs: list[tuple[list[int], SamplingParams]]) -> AsyncIterator[tuple[int, StreamEvent]]:
    """Run one engine stream per choice in its own task; yield (choice index, event) as they arrive.

    Leaving this generator any way (done, error, cancelled, closed) cancels the tasks still running,
    and cancelling `engine.stream` cancels its request in the engine.
    """
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, ids: list[int], params: SamplingParams) -> None:
        try:
            async for ev in engine.stream(ids, params):
                queue.put_nowait((i, ev))
            queue.put_nowait((i, None))            # ended (normally after a finished event)
        except Exception as e:                     # noqa: BLE001 -- re-raised by the consumer
            queue.put_nowait((i, e))

    tasks = [asyncio.create_task(pump(i, ids, p)) for i, (ids, p) in enumerate(jobs)]
    try:
        live = len(tasks)
        while live:
            i, item = await queue.get()
            if isinstance(item, Exception):
                raise item
            if item is None:
                live -= 1
                continue
            yield i, item
    finally:
        for t in tasks:      # synchronous on purpose: no await may run in a cancelled scope
            t.cancel()


async def _wait_disconnect(request: Request) -> None:
    # The body has been read, so the next ASGI message can only be http.disconnect.
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _unless_disconnected(request: Request, aw: Any) -> Any:
    """Await `aw`; if the client disconnects first, cancel it and raise ClientGone."""
    work = asyncio.ensure_future(aw)
    watch = asyncio.ensure_future(_wait_disconnect(request))
    try:
        done, _ = await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:
        watch.cancel()
        work.cancel()
        raise
    watch.cancel()
    if work not in done:     # the client left first: cancel() only asks, the task is not done yet
        work.cancel()
        # let the cancellation land: the caller closes the generator `work` is inside of, and closing a
        # generator still running raised "aclose(): asynchronous generator is already running"
        await asyncio.wait({work})
        raise ClientGone
    return work.result()


# --- per-choice bookkeeping

class ReasoningSplitter:
    """Routes streamed text to reasoning until "</think>" appears, then to content.

    A tail that could be the start of "</think>" is held back until the next delta decides it, so
    the tag never leaks into either field even if it arrives in pieces. Whitespace right after the
    tag (R1 writes "</think>\\n\\n") is dropped from the content.
    """

    def __init__(self, thinking: bool):
        self.thinking = thinking
        self.held = ""
        self.strip = False

    def feed(self, text: str, final: bool = False) -> tuple[str, str]:
        reasoning, content = "", text
        if self.thinking:
            s = self.held + text
            self.held = ""
            cut = s.find(END_THINK)
            if cut >= 0:
                self.thinking, self.strip = False, True
                reasoning, content = s[:cut], s[cut + len(END_THINK):]
            else:
                keep = 0 if final else next((k for k in range(len(END_THINK) - 1, 0, -1)
                                             if s.endswith(END_THINK[:k])), 0)
                self.held = s[len(s) - keep:] if keep else ""
                return s[:len(s) - keep], ""
        if self.strip:
            content = content.lstrip()
            self.strip = not content
        return reasoning, content


@dataclass
class _State:
    splitter: ReasoningSplitter
    reasoning: list[str] = field(default_factory=list)
    content: list[str] = field(default_factory=list)
    logprobs: list[Any] = field(default_factory=list)
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    reasoning_tokens: int = 0
    token_len: int = 0                # characters of the tokens' own text so far (completions' text_offset)
    end_think_id: int | None = None   # the </think> token, where the tokenizer has one

    def __post_init__(self) -> None:
        self.thinking_tokens = self.splitter.thinking   # whether the tokens are still before </think>

    def feed(self, ev: StreamEvent) -> tuple[str, str]:
        was_thinking = self.splitter.thinking
        r, c = self.splitter.feed(ev.text, final=ev.finished)
        end = self.end_think_id
        if end is not None and self.thinking_tokens:
            # counted by token, not by the text's split: an event may hold back the tag's text (a possible stop
            # string), or hold the tag and answer tokens after it (held text let go, a speculative step)
            ids = ev.token_ids
            if end in ids:
                self.thinking_tokens = False
            self.reasoning_tokens += ids.index(end) + 1 if end in ids else len(ids)
        elif end is None and was_thinking:
            self.reasoning_tokens += len(ev.token_ids)
        self.reasoning.append(r)
        self.content.append(c)
        self.prompt_tokens, self.completion_tokens = ev.prompt_tokens, ev.completion_tokens
        if ev.finished:
            self.finish_reason = ev.finish_reason
        return r, c


def _usage(states: list[_State], prompt_tokens: int, reasoning: bool) -> Usage:
    completion = sum(s.completion_tokens for s in states)
    details = CompletionTokensDetails(reasoning_tokens=sum(s.reasoning_tokens for s in states)) if reasoning else None
    return Usage(prompt_tokens=prompt_tokens, completion_tokens=completion,
                 total_tokens=prompt_tokens + completion, completion_tokens_details=details)


def _sse(obj: Any) -> str:
    return f"data: {obj.model_dump_json()}\n\n"


def _sse_error(exc: Exception) -> str:
    """A failure after the 200 went out can only be reported inside the stream (as OpenAI does)."""
    log.exception("generation failed mid-stream", exc_info=exc)
    err = ErrorResponse(error=ErrorDetail(message=f"generation failed: {exc}", type="server_error"))
    return f"data: {err.model_dump_json()}\n\n"


# --- the app

def create_app(engine: Any, tokenizer: Any, model_name: str, api_key: str | None = None) -> FastAPI:
    """The server for one started `engine` (nanoseek.infer.engine.Engine) and its tokenizer."""
    app = FastAPI(title="nanoseek", summary="OpenAI-compatible API for a nanoseek model")
    if api_key:
        app.add_middleware(BearerAuth, api_key=api_key)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return error_response(exc.status, exc.message, exc.param, exc.code)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(exc)
        return error_response(400, message, param, code="invalid_value" if param else "invalid_json")

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 400 and exc.detail == "There was an error parsing the body":
            # FastAPI's answer when the body fails to decode other than as a JSON syntax error: bytes that
            # are not UTF-8, or arrays nested past the parser's recursion limit
            return error_response(400, "the request body is not valid JSON (not UTF-8 text, or nested too deeply)",
                                  code="invalid_json")
        message = f"no route {request.method} {request.url.path}" if exc.status_code == 404 else str(exc.detail)
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return error_response(exc.status_code, message, code=code, headers=exc.headers)

    @app.exception_handler(Exception)
    async def _crash(request: Request, exc: Exception) -> JSONResponse:
        log.exception("request failed", exc_info=exc)
        return error_response(500, f"internal error: {type(exc).__name__}: {exc}")

    # --- helpers shared by both endpoints

    def check_model(name: str) -> None:
        if name != model_name:
            raise APIError(404, f"model {name!r} does not exist; this server serves {model_name!r}",
                           param="model", code="model_not_found")

    # no token decodes to more characters than this: a text of more than window x this characters is too long
    # without tokenizing it (a 10 MB message took 5 s of the event loop to tokenize, every stream stalled)
    token_chars = max(len(tokenizer.decode([i])) for i in range(tokenizer.vocab_size))

    def not_beyond_window(chars: int, param: str) -> None:
        limit = engine.max_seq_len
        if chars > limit * token_chars:
            raise APIError(400, f"the prompt is {chars} characters, at least {chars // token_chars} tokens, but this "
                                f"model's context window is {limit} tokens; shorten it",
                           param=param, code="context_length_exceeded")

    def budget(prompt_len: int, max_tokens: int | None, param: str) -> int:
        """max_tokens for a prompt: what was asked if it fits the context window, else a 400."""
        limit = engine.max_seq_len
        if prompt_len >= limit:
            raise APIError(400, f"the prompt is {prompt_len} tokens but this model's context window is {limit} "
                                "tokens (prompt and completion together); shorten it",
                           param=param, code="context_length_exceeded")
        if max_tokens is None:
            return limit - prompt_len
        if prompt_len + max_tokens > limit:
            raise APIError(400, f"this model's context window is {limit} tokens, but {prompt_len + max_tokens} were "
                                f"requested ({prompt_len} in the prompt, {max_tokens} for the completion); "
                                "lower max_tokens or shorten the prompt", param="max_tokens",
                           code="context_length_exceeded")
        return max_tokens

    def params(req: ChatCompletionRequest | CompletionRequest, max_tokens: int, logprobs: int | None,
               choice: int) -> SamplingParams:
        # top_p=0 keeps only the most likely token: greedy. A seed with n>1 gives choice i seed+i (past
        # 2**64 - 1 it wraps to 0), so the n choices differ and each is still reproducible.
        seed = None if req.seed is None else req.seed + choice
        if seed is not None and seed >= 2**64:
            seed -= 2**64
        return SamplingParams(
            max_tokens=max_tokens, temperature=req.temperature if req.top_p > 0 else 0.0, top_k=req.top_k,
            top_p=req.top_p if req.top_p > 0 else 1.0, min_p=req.min_p,
            seed=seed, repetition_penalty=req.repetition_penalty,
            frequency_penalty=req.frequency_penalty, presence_penalty=req.presence_penalty, stop=list(req.stop),
            stop_token_ids=[], ignore_eos=req.ignore_eos, logprobs=logprobs)

    async def start(request: Request, jobs: list[tuple[list[int], SamplingParams]]):
        """Start the streams and wait for the first event, so that an engine refusal (ValueError) is
        still a 400 rather than an error inside a 200 stream."""
        gen = _merged(engine, jobs)
        try:
            first = await _unless_disconnected(request, gen.__anext__())
        except ValueError as e:
            await gen.aclose()
            named = re.match(r"SamplingParams\.(\w+)=", str(e))      # the request field a sampling check names
            raise APIError(400, str(e).removeprefix("SamplingParams."), param=named and named.group(1),
                           code="invalid_value") from None
        except BaseException:
            await gen.aclose()
            raise
        return gen, first

    async def events(gen: AsyncIterator, first: tuple[int, StreamEvent]) -> AsyncIterator[tuple[int, StreamEvent]]:
        yield first
        async for item in gen:
            yield item

    def token_logprobs(ev: StreamEvent) -> list[TokenLogprob]:
        """Chat logprobs: each token's text and its own bytes (a token holding part of a UTF-8 character
        shows U+FFFD as text and its real bytes), its top alternatives the same way, most likely first."""
        def entry(tid: int) -> dict:
            return dict(token=tokenizer.decode([tid]), bytes=list(tokenizer.token_bytes(tid)))

        out = []
        for k, tid in enumerate(ev.token_ids):
            top = ev.top_logprobs[k] if ev.top_logprobs else []
            out.append(TokenLogprob(**entry(tid), logprob=ev.logprobs[k],
                                    top_logprobs=[TopLogprob(**entry(i), logprob=lp) for i, lp in top]))
        return out

    def completion_logprobs(ev: StreamEvent, state: _State, with_top: bool) -> CompletionLogprobs:
        """The event's tokens with their logprobs; each token's text_offset is where its own text starts (the
        sum of the tokens' texts before it: the text sent so far may lag, held back for a stop string)."""
        out = CompletionLogprobs(top_logprobs=[] if with_top else None)
        for k, tid in enumerate(ev.token_ids):
            tok = tokenizer.decode([tid])
            out.tokens.append(tok)
            out.token_logprobs.append(ev.logprobs[k])
            out.text_offset.append(state.token_len)
            state.token_len += len(tok)
            if with_top:     # the legacy format keys by text: tokens that decode alike keep the likeliest
                top: dict[str, float] = {}
                for i, lp in ev.top_logprobs[k] if ev.top_logprobs else ():
                    top.setdefault(tokenizer.decode([i]), lp)
                out.top_logprobs.append(top)
        return out

    # --- routes

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC / "index.html", media_type="text/html")

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "model": model_name}

    @app.get("/v1/models")
    async def models() -> ModelList:
        return ModelList(data=[ModelCard(id=model_name, max_model_len=engine.max_seq_len)])

    @app.get("/v1/models/{model_id}")
    async def model(model_id: str) -> ModelCard:
        check_model(model_id)
        return ModelCard(id=model_name, max_model_len=engine.max_seq_len)

    @app.post("/v1/chat/completions", response_model=None, responses=_responses(ChatCompletion))
    async def chat(req: ChatCompletionRequest, request: Request) -> Response:
        check_model(req.model)
        think = req.chat_template_kwargs.get("think", True)
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.content}
                    for m in req.messages]
        not_beyond_window(sum(len(m["content"]) for m in messages), "messages")
        ids, _ = tokenizer.render_chat(messages, add_generation_prompt=True, think=think)
        thinking = think and tokenizer.think_id is not None      # the prompt opened a <think> block
        max_tokens = budget(len(ids), req.max_completion_tokens or req.max_tokens, "messages")
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
        jobs = [(ids, params(req, max_tokens, logprobs, i)) for i in range(req.n)]
        states = [_State(ReasoningSplitter(thinking), end_think_id=tokenizer.end_think_id) for _ in range(req.n)]
        rid = new_id("chatcmpl")
        try:
            gen, first = await start(request, jobs)
        except ClientGone:
            return Response(status_code=499)

        def choice_logprobs(ev: StreamEvent) -> ChoiceLogprobs | None:
            return ChoiceLogprobs(content=token_logprobs(ev)) if req.logprobs and ev.token_ids else None

        if not req.stream:
            async def collect() -> ChatCompletion:
                async with contextlib.aclosing(gen):
                    async for i, ev in events(gen, first):
                        states[i].feed(ev)
                        if req.logprobs:
                            states[i].logprobs += token_logprobs(ev)
                choices = [ChatChoice(index=i, finish_reason=s.finish_reason,
                                      message=AssistantMessage(content="".join(s.content),
                                                               reasoning_content="".join(s.reasoning) if thinking else None),
                                      logprobs=ChoiceLogprobs(content=s.logprobs) if req.logprobs else None)
                           for i, s in enumerate(states)]
                return ChatCompletion(id=rid, model=model_name, choices=choices,
                                      usage=_usage(states, len(ids), thinking))
            try:
                result = await _unless_disconnected(request, collect())
            except ClientGone:
                return Response(status_code=499)
            return JSONResponse(result.model_dump(mode="json"))

        include_usage = bool(req.stream_options and req.stream_options.include_usage)

        def chunk(i: int, delta: Delta, finish: str | None = None, lp: ChoiceLogprobs | None = None) -> str:
            return _sse(ChatCompletionChunk(id=rid, model=model_name, choices=[
                ChatChunkChoice(index=i, delta=delta, finish_reason=finish, logprobs=lp)]))

        async def body() -> AsyncIterator[str]:
            try:
                async with contextlib.aclosing(gen):
                    for i in range(req.n):
                        yield chunk(i, Delta(role="assistant", content=""))
                    async for i, ev in events(gen, first):
                        r, c = states[i].feed(ev)
                        lp = choice_logprobs(ev)
                        if r or c or lp:
                            yield chunk(i, Delta(reasoning_content=r or None, content=c or None), lp=lp)
                        if ev.finished:
                            yield chunk(i, Delta(), finish=ev.finish_reason)
            except Exception as e:  # noqa: BLE001
                yield _sse_error(e)
            if include_usage:
                yield _sse(ChatCompletionChunk(id=rid, model=model_name, choices=[],
                                               usage=_usage(states, len(ids), thinking)))
            yield "data: [DONE]\n\n"

        return StreamingResponse(body(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    @app.post("/v1/completions", response_model=None, responses=_responses(Completion))
    async def completions(req: CompletionRequest, request: Request) -> Response:
        check_model(req.model)
        given = req.prompts()
        if len(given) * req.n > MAX_CHOICES:
            raise APIError(400, f"{len(given)} prompts x n={req.n} = {len(given) * req.n} choices; one request may ask "
                                f"for at most {MAX_CHOICES}", param="n" if req.n > 1 else "prompt", code="invalid_value")
        prompts = []
        for p in given:
            if isinstance(p, str):
                not_beyond_window(len(p), "prompt")
                prompts.append(tokenizer.encode(p, add_bos=True))
                continue
            bad = [t for t in p if not 0 <= t < tokenizer.vocab_size]
            if bad:
                raise APIError(400, f"prompt: token id {bad[0]} is outside the vocabulary [0, {tokenizer.vocab_size})",
                               param="prompt", code="invalid_value")
            prompts.append(list(p))
        budgets = [budget(len(p), req.max_tokens if req.max_tokens is not None else 16, "prompt") for p in prompts]
        jobs = [(p, params(req, b, req.logprobs, j)) for p, b in zip(prompts, budgets) for j in range(req.n)]
        states = [_State(ReasoningSplitter(False)) for _ in jobs]
        prompt_tokens = sum(len(p) for p in prompts)
        rid = new_id("cmpl")
        try:
            gen, first = await start(request, jobs)
        except ClientGone:
            return Response(status_code=499)
        with_top = bool(req.logprobs)

        if not req.stream:
            async def collect() -> Completion:
                async with contextlib.aclosing(gen):
                    async for i, ev in events(gen, first):
                        if req.logprobs is not None:
                            states[i].logprobs.append(completion_logprobs(ev, states[i], with_top))
                        _, c = states[i].feed(ev)
                choices = []
                for i, s in enumerate(states):
                    lp = None
                    if req.logprobs is not None:
                        lp = CompletionLogprobs(top_logprobs=[] if with_top else None)
                        for part in s.logprobs:
                            lp.tokens += part.tokens
                            lp.token_logprobs += part.token_logprobs
                            lp.text_offset += part.text_offset
                            if with_top:
                                lp.top_logprobs += part.top_logprobs
                    choices.append(CompletionChoice(index=i, text="".join(s.content), logprobs=lp,
                                                    finish_reason=s.finish_reason))
                return Completion(id=rid, model=model_name, choices=choices,
                                  usage=_usage(states, prompt_tokens, False))
            try:
                result = await _unless_disconnected(request, collect())
            except ClientGone:
                return Response(status_code=499)
            return JSONResponse(result.model_dump(mode="json", exclude_none=False))

        include_usage = bool(req.stream_options and req.stream_options.include_usage)

        async def body() -> AsyncIterator[str]:
            try:
                async with contextlib.aclosing(gen):
                    async for i, ev in events(gen, first):
                        s = states[i]
                        lp = completion_logprobs(ev, s, with_top) if req.logprobs is not None else None
                        _, c = s.feed(ev)
                        if c or lp or ev.finished:
                            yield _sse(Completion(id=rid, model=model_name, choices=[
                                CompletionChoice(index=i, text=c, logprobs=lp,
                                                 finish_reason=ev.finish_reason if ev.finished else None)]))
            except Exception as e:  # noqa: BLE001
                yield _sse_error(e)
            if include_usage:
                yield _sse(Completion(id=rid, model=model_name, choices=[],
                                      usage=_usage(states, prompt_tokens, False)))
            yield "data: [DONE]\n\n"

        return StreamingResponse(body(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    return app
