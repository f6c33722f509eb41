"""Pydantic models of the OpenAI API subset nanoseek serves: requests (validated strictly, so a wrong
type is an error rather than a silent coercion) and responses (plus DeepSeek's `reasoning_content`).

Ranges follow OpenAI's documented limits. Fields OpenAI clients may send that we do not use (user,
metadata, ...) are ignored. vLLM-style extras are accepted too: top_k, min_p, repetition_penalty,
ignore_eos, and `chat_template_kwargs={"think": false}` to answer without the <think> block.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_serializer

MAX_STOP = 4   # OpenAI's limit on stop sequences


class _Strict(BaseModel):
    # strict: "1" is not an int, true is not 1; extra fields are ignored (clients send many); NaN and
    # infinity are not numbers a knob takes (JSON parsers accept the NaN literal)
    model_config = ConfigDict(strict=True, extra="ignore", allow_inf_nan=False)


def _unicode(text: str, what: str) -> str:
    """JSON may carry a lone UTF-16 surrogate ("\\ud800"), which is no Unicode text a tokenizer takes."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(f"{what} is not valid Unicode (a lone surrogate)") from None
    return text


def _check_stop(v: Any) -> list[str]:
    if v is None:
        return []
    if isinstance(v, str):
        v = [v]
    if not isinstance(v, list) or not all(isinstance(s, str) for s in v):
        raise ValueError("stop must be a string or a list of strings")
    if len(v) > MAX_STOP:
        raise ValueError(f"stop has {len(v)} entries; at most {MAX_STOP} are allowed")
    if any(s == "" for s in v):
        raise ValueError("stop strings must not be empty")
    return [_unicode(s, "stop") for s in v]


class StreamOptions(_Strict):
    include_usage: bool = False


class _Sampling(_Strict):
    """What both endpoints share: the model, how many choices, and the sampling knobs."""
    model: str
    n: int = Field(1, ge=1, le=128)
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, ge=0.0, le=1.0)
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    seed: int | None = Field(None, ge=-2**63, lt=2**64)    # what torch.Generator.manual_seed takes
    stop: list[str] = Field(default_factory=list)
    stream: bool = False
    stream_options: StreamOptions | None = None
    # vLLM-style extras (the openai client sends them with extra_body=...)
    top_k: int = Field(0, ge=0, lt=2**31)                   # the engine's limits, stated where clients read them
    min_p: float = Field(0.0, ge=0.0, le=1.0)
    repetition_penalty: float = Field(1.0, ge=1e-6, le=10.0)
    ignore_eos: bool = False

    _stop = field_validator("stop", mode="before")(_check_stop)


class ChatMessage(_Strict):
    # "developer" is OpenAI's newer name for system. reasoning_content sent back by a client is
    # ignored (extra field), as DeepSeek's API asks: earlier reasoning is not part of the context.
    role: Literal["system", "developer", "user", "assistant"]
    content: str = ""   # a list of text parts is joined; null (an assistant turn) is ""

    @field_validator("content", mode="before")
    @classmethod
    def _content(cls, v: Any) -> Any:
        if v is None:
            return ""
        if isinstance(v, list):
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in v):
                raise ValueError('content parts must be {"type": "text", "text": "..."}; nothing else is supported')
            return _unicode("".join(p["text"] for p in v), "content")
        if not isinstance(v, str):
            raise ValueError("content must be a string or a list of text parts")
        return _unicode(v, "content")


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)   # OpenAI's newer name for max_tokens
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    chat_template_kwargs: dict[str, Any] = Field(default_factory=dict)

    # field validators rather than one model validator, so that an error names its parameter
    @field_validator("messages")
    @classmethod
    def _last_not_assistant(cls, v: list[ChatMessage]) -> list[ChatMessage]:
        if v[-1].role == "assistant":
            raise ValueError("the last message is from the assistant; end with a user message")
        return v

    @field_validator("top_logprobs")
    @classmethod
    def _needs_logprobs(cls, v: int | None, info: ValidationInfo) -> int | None:
        if v is not None and not info.data.get("logprobs"):
            raise ValueError("top_logprobs needs logprobs=true")
        return v

    @field_validator("chat_template_kwargs")
    @classmethod
    def _think(cls, v: dict[str, Any]) -> dict[str, Any]:
        if not isinstance(v.get("think", True), bool):
            raise ValueError("chat_template_kwargs.think must be true or false")
        return v


class CompletionRequest(_Sampling):
    # a string, a list of token ids, or a batch of either (one set of n choices per prompt)
    prompt: str | list[int] | list[str] | list[list[int]]
    logprobs: int | None = Field(None, ge=0, le=5)
    echo: bool = False

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompt(cls, v: Any) -> Any:
        def ids(x: Any) -> bool:
            return isinstance(x, list) and len(x) > 0 and all(type(i) is int for i in x)
        ok = (isinstance(v, str) or ids(v) or
              (isinstance(v, list) and len(v) > 0 and (all(isinstance(p, str) for p in v) or all(ids(p) for p in v))))
        if not ok:
            raise ValueError("prompt must be a string, a non-empty list of token ids, or a non-empty list of either")
        for p in [v] if isinstance(v, str) else v:
            if isinstance(p, str):
                _unicode(p, "prompt")
        return v

    @field_validator("echo")
    @classmethod
    def _echo(cls, v: bool) -> bool:
        if v:
            raise ValueError("echo is not supported")
        return v

    def prompts(self) -> list[str | list[int]]:
        p = self.prompt
        if isinstance(p, str) or (p and isinstance(p[0], int)):
            return [p]
        return list(p)


# --- responses

def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())


class ErrorDetail(BaseModel):
    message: str
    type: str = "invalid_request_error"
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=now)
    owned_by: str = "nanoseek"
    max_model_len: int | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class CompletionTokensDetails(BaseModel):
    reasoning_tokens: int = 0


class Usage(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    completion_tokens_details: CompletionTokensDetails | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprob]


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str
    reasoning_content: str | None = None


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=now)
    model: str
    choices: list[ChatChoice]
    usage: Usage


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    reasoning_content: str | None = None

    @model_serializer(mode="wrap")
    def _drop_none(self, handler: Any) -> dict:
        # a delta carries only what changed; every other null stays (finish_reason: null, ...)
        return {k: v for k, v in handler(self).items() if v is not None}


class ChatChunkChoice(BaseModel):
    index: int
    delta: Delta
    logprobs: ChoiceLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int = Field(default_factory=now)
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class CompletionLogprobs(BaseModel):
    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float] = Field(default_factory=list)
    top_logprobs: list[dict[str, float]] | None = None
    text_offset: list[int] = Field(default_factory=list)


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=now)
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
