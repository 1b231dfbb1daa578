"""The OpenAI wire format as pure functions: validate a request body into a ``Spec``,
build responses and stream chunks, and errors shaped ``{"error": {message, type, param, code}}``
so that OpenAI clients raise their usual exceptions."""
from __future__ import annotations

import json
import math
import time
import uuid
from dataclasses import dataclass

# OpenAI accepts at most 4 stop sequences and temperatures up to 2; the same limits keep
# clients portable between this server and theirs
MAX_STOP = 4
MAX_TEMPERATURE = 2.0
# the legacy completions endpoint generates 16 tokens when max_tokens is absent (OpenAI's default)
COMPLETIONS_DEFAULT_MAX_TOKENS = 16


class ApiError(Exception):
    """An HTTP error with an OpenAI-style body."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


@dataclass(frozen=True)
class Spec:
    """A validated request; ``prompt`` is text (chat already templated) or token ids."""
    chat: bool
    prompt: str | list[int]
    max_tokens: int | None  # None: the rest of the context
    temperature: float
    top_p: float
    stop: tuple[str, ...]
    seed: int | None
    stream: bool
    include_usage: bool


def parse_json(raw: bytes) -> dict:
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ApiError(400, f"the request body is not valid JSON: {e}") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    return body


def _number(body: dict, key: str, default: float, lo: float, hi: float, *, lo_open: bool = False) -> float:
    v = body.get(key)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise ApiError(400, f"'{key}' must be a number", param=key)
    if v > hi or v < lo or (lo_open and v == lo):
        raise ApiError(400, f"'{key}' must be in {'(' if lo_open else '['}{lo}, {hi}], got {v}", param=key)
    return float(v)


def _int(body: dict, key: str, lo: int) -> int | None:
    v = body.get(key)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int):
        raise ApiError(400, f"'{key}' must be an integer", param=key)
    if v < lo:
        raise ApiError(400, f"'{key}' must be at least {lo}, got {v}", param=key)
    return v


def _text(content, where: str) -> str:
    """Message content: a string, or a list of text parts (images are not supported)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for p in content:
            if not (isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)):
                raise ApiError(400, f"{where}: only text content parts are supported", param="messages")
            parts.append(p["text"])
        return "".join(parts)
    raise ApiError(400, f"{where}: 'content' must be a string or a list of text parts", param="messages")


# one function on purpose: one validation pass over a request, field by field, so every error names its field
def parse(body: dict, *, chat: bool, model_id: str) -> tuple[Spec, list[dict] | None]:
    """Validate a /v1/completions or /v1/chat/completions body. Returns the spec (for chat,
    ``prompt`` is filled in by the caller from the returned messages and the chat template)."""
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise ApiError(400, "'model' is required", param="model")
    if model != model_id:
        raise ApiError(400, f"the model '{model}' does not exist; this server serves '{model_id}'", param="model",
                       code="model_not_found")
    n = body.get("n")
    if n is not None and n != 1:
        raise ApiError(400, "only n=1 is supported", param="n")
    if body.get("logprobs") or body.get("echo") or (body.get("best_of") not in (None, 1)):
        raise ApiError(400, "logprobs, echo and best_of are not supported", param="logprobs")
    messages = None
    prompt: str | list[int] = ""
    if chat:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise ApiError(400, "'messages' must be a non-empty list", param="messages")
        clean = []
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str):
                raise ApiError(400, f"messages[{i}] must be an object with a 'role'", param="messages")
            clean.append({"role": m["role"], "content": _text(m.get("content"), f"messages[{i}]")})
        messages = clean
    else:
        p = body.get("prompt")
        if isinstance(p, list) and len(p) == 1 and isinstance(p[0], (str, list)):
            p = p[0]  # a batch of one prompt
        if isinstance(p, str) and p:
            prompt = p
        elif isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in p):
            prompt = list(p)
        elif isinstance(p, list) and len(p) > 1 and all(isinstance(x, str) for x in p):
            raise ApiError(400, "only one prompt per request is supported (send several requests)", param="prompt")
        else:
            raise ApiError(400, "'prompt' must be a non-empty string or list of token ids", param="prompt")
    key = "max_completion_tokens" if chat and body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = _int(body, key, 1)
    if max_tokens is None and not chat:
        max_tokens = COMPLETIONS_DEFAULT_MAX_TOKENS
    stop = body.get("stop")
    if stop is None:
        stop = ()
    elif isinstance(stop, str):
        stop = (stop,) if stop else ()
    elif isinstance(stop, list) and all(isinstance(x, str) and x for x in stop) and len(stop) <= MAX_STOP:
        stop = tuple(stop)
    else:
        raise ApiError(400, f"'stop' must be a string or a list of at most {MAX_STOP} non-empty strings", param="stop")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise ApiError(400, "'stream' must be a boolean", param="stream")
    opts = body.get("stream_options") or {}
    if not isinstance(opts, dict):
        raise ApiError(400, "'stream_options' must be an object", param="stream_options")
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise ApiError(400, "'seed' must be an integer", param="seed")
    spec = Spec(chat=chat, prompt=prompt, max_tokens=max_tokens,
                temperature=_number(body, "temperature", 1.0, 0.0, MAX_TEMPERATURE),
                top_p=_number(body, "top_p", 1.0, 0.0, 1.0, lo_open=True),
                stop=stop, seed=seed, stream=stream, include_usage=bool(opts.get("include_usage")))
    return spec, messages


# -- responses ---------------------------------------------------------------------
def new_id(chat: bool) -> str:
    return ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def response(rid: str, model: str, chat: bool, text: str, finish: str, use: dict) -> dict:
    if chat:
        choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish, "logprobs": None}
    else:
        choice = {"index": 0, "text": text, "finish_reason": finish, "logprobs": None}
    return {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
            "model": model, "choices": [choice], "usage": use}


def chunk(rid: str, model: str, chat: bool, *, text: str | None = None, role: bool = False, finish: str | None = None,
          use: dict | None = None) -> dict:
    """One streamed chunk; ``use`` alone makes the final usage chunk (no choices)."""
    if use is not None:
        choices = []
    elif chat:
        delta = {"role": "assistant", "content": ""} if role else ({} if text is None else {"content": text})
        choices = [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]
    else:
        choices = [{"index": 0, "text": text or "", "finish_reason": finish, "logprobs": None}]
    d = {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion", "created": int(time.time()),
         "model": model, "choices": choices}
    if use is not None:
        d["usage"] = use
    return d


def sse(obj) -> bytes:
    return b"data: " + (obj if isinstance(obj, bytes) else json.dumps(obj).encode()) + b"\n\n"
