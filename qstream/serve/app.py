"""The HTTP side: an ASGI app (Starlette) whose handlers validate and tokenize a request,
hand it to the scheduler thread and relay its events, whole or as server-sent events.
``Engine`` bundles what the handlers need; ``run`` loads a model and serves it with uvicorn."""
from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import signal
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from ..errors import QstreamError, ShardError
from ..generate import SamplingConfig, eos_ids, load_tokenizer
from ..runtime.build import load
from ..runtime.plan import default_max_seq
from . import protocol as P
from .scheduler import Event, QueueFull, Scheduler, Sequence

log = logging.getLogger(__name__)

# how often a waiting handler checks that the scheduler thread is still alive (a dead one
# would otherwise leave its requests waiting for events that never come)
ALIVE_POLL_S = 0.25
# what a 503 tells the client to wait before retrying: a queue slot frees as soon as any
# running request finishes, typically within a second or two
RETRY_AFTER_S = 1


@dataclass
class Engine:
    """A loaded model and its tokenizer behind a running scheduler."""
    model: object
    tokenizer: object
    scheduler: Scheduler
    model_id: str
    max_context: int
    tok_lock: threading.Lock
    created: int

    def prompt_ids(self, spec: P.Spec, messages: list[dict] | None) -> list[int]:
        """Tokens of the prompt with the conventions of ``generate()``: the chat template and no
        added special tokens for chat, the tokenizer's special tokens for a plain prompt."""
        tok = self.tokenizer
        with self.tok_lock:
            if spec.chat:
                if not getattr(tok, "chat_template", None):
                    raise P.ApiError(400, "this model's tokenizer has no chat template; use /v1/completions", param="messages")
                text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
                return list(tok(text, add_special_tokens=False)["input_ids"])
            if isinstance(spec.prompt, list):
                vocab = self.model.config.vocab_size
                if max(spec.prompt) >= vocab:
                    raise P.ApiError(400, f"token ids must be below the vocabulary size {vocab}", param="prompt")
                return spec.prompt
            return list(tok(spec.prompt, add_special_tokens=True)["input_ids"])

    def sampling(self, spec: P.Spec, n_prompt: int) -> SamplingConfig:
        """Admission: the prompt plus max_tokens must fit the context this server reserved KV memory for."""
        param = "messages" if spec.chat else "prompt"
        if n_prompt == 0:
            raise P.ApiError(400, "the prompt is empty after tokenization", param=param)
        if n_prompt >= self.max_context:
            raise P.ApiError(400, f"the prompt has {n_prompt} tokens; this server's context is {self.max_context} "
                             "tokens, including the completion", param=param, code="context_length_exceeded")
        left = self.max_context - n_prompt
        max_tokens = left if spec.max_tokens is None else spec.max_tokens
        if max_tokens > left:
            raise P.ApiError(400, f"max_tokens {max_tokens} plus the prompt's {n_prompt} tokens exceeds this server's "
                             f"context of {self.max_context} tokens (at most {left} here)", param="max_tokens",
                             code="context_length_exceeded")
        return SamplingConfig(max_new_tokens=max_tokens, temperature=spec.temperature, top_p=spec.top_p, stop=spec.stop,
                              seed=spec.seed, chat=spec.chat)


def _json(obj, status: int = 200, headers: dict | None = None):
    from starlette.responses import JSONResponse

    return JSONResponse(obj, status_code=status, headers=headers)


# one function on purpose: the route handlers are closures over one engine and its scheduler
def create_app(engine: Engine, *, api_key: str | None = None):
    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.responses import StreamingResponse
    from starlette.routing import Route

    sched = engine.scheduler

    def check_key(request) -> None:
        if api_key is None:
            return
        got = request.headers.get("authorization", "")
        if not got.startswith("Bearer ") or not hmac.compare_digest(got[len("Bearer "):].encode(), api_key.encode()):
            raise P.ApiError(401, "missing or wrong API key (send 'Authorization: Bearer KEY')", code="invalid_api_key")

    async def health(request):
        if not sched.alive:
            return _json(P.error_body("the scheduler thread has stopped", "server_error"), 503)
        return _json({"status": "ok", "model": engine.model_id})

    async def stats(request):
        return _json(sched.snapshot())

    async def models(request):
        try:
            check_key(request)
        except P.ApiError as e:
            return _json(e.body(), e.status, e.headers)
        return _json({"object": "list", "data": [{"id": engine.model_id, "object": "model", "created": engine.created,
                                                  "owned_by": "qstream", "max_model_len": engine.max_context}]})

    async def generate(request, chat: bool):
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()

        def sink(ev) -> None:  # runs on the scheduler thread
            try:
                loop.call_soon_threadsafe(queue.put_nowait, ev)
            except RuntimeError:  # the event loop is closed: the server stopped and nobody is listening
                pass

        try:
            check_key(request)
            spec, messages = P.parse(P.parse_json(await request.body()), chat=chat, model_id=engine.model_id)
            ids = await asyncio.to_thread(engine.prompt_ids, spec, messages)
            cfg = engine.sampling(spec, len(ids))
            seq = Sequence(ids, cfg, sink)
            try:
                sched.submit(seq)
            except QueueFull as e:
                raise P.ApiError(503, str(e), type="server_error", code="queue_full",
                                 headers={"Retry-After": str(RETRY_AFTER_S)}) from None
            except QstreamError as e:
                raise P.ApiError(503, str(e), type="server_error") from None
        except P.ApiError as e:
            return _json(e.body(), e.status, e.headers)
        rid, n_prompt = P.new_id(chat), len(ids)
        if spec.stream:
            return StreamingResponse(_stream(queue, seq, rid, chat, spec, n_prompt), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        return await _collect(request, queue, seq, rid, chat, n_prompt)

    async def _collect(request, queue, seq, rid, chat, n_prompt):
        # listen for the client going away the way Starlette's StreamingResponse does: a task
        # that waits for the ASGI http.disconnect message (polling is_disconnected can miss it)
        async def disconnected() -> None:
            while (await request.receive())["type"] != "http.disconnect":
                pass

        gone = asyncio.ensure_future(disconnected())
        parts = []
        try:
            while True:
                get = asyncio.ensure_future(queue.get())
                done, _ = await asyncio.wait({get, gone}, timeout=ALIVE_POLL_S, return_when=asyncio.FIRST_COMPLETED)
                if get not in done:
                    get.cancel()
                    if gone in done:
                        sched.cancel(seq)
                        return _json(P.error_body("client disconnected"), 499)
                    if not sched.alive:
                        return _json(P.error_body("the scheduler thread has stopped", "server_error"), 503)
                    continue
                ev = get.result()
                if ev.kind == "text":
                    parts.append(ev.text)
                elif ev.kind == "done":
                    return _json(P.response(rid, engine.model_id, chat, "".join(parts), ev.finish_reason,
                                            P.usage(n_prompt, ev.completion_tokens)))
                else:
                    return _json(P.error_body(ev.text, "server_error"), 500)
        finally:
            gone.cancel()
            if not seq.finished:  # cancelled by the server shutting down, or an error on our side
                sched.cancel(seq)

    async def _stream(queue, seq, rid, chat, spec, n_prompt):
        # Starlette cancels this generator when the client disconnects; `finally` frees the slot
        model = engine.model_id
        try:
            if chat:
                yield P.sse(P.chunk(rid, model, chat, role=True))
            while True:
                try:
                    ev = await asyncio.wait_for(queue.get(), ALIVE_POLL_S)
                except asyncio.TimeoutError:
                    if sched.alive:
                        continue
                    ev = Event("error", text="the scheduler thread has stopped")
                if ev.kind == "text":
                    yield P.sse(P.chunk(rid, model, chat, text=ev.text))
                    continue
                if ev.kind == "done":
                    yield P.sse(P.chunk(rid, model, chat, finish=ev.finish_reason))
                    if spec.include_usage:
                        yield P.sse(P.chunk(rid, model, chat, use=P.usage(n_prompt, ev.completion_tokens)))
                else:
                    yield P.sse(P.error_body(ev.text, "server_error"))
                yield P.sse(b"[DONE]")
                return
        finally:
            if not seq.finished:
                sched.cancel(seq)

    async def completions(request):
        return await generate(request, chat=False)

    async def chat_completions(request):
        return await generate(request, chat=True)

    async def http_error(request, exc: HTTPException):
        # unknown paths and wrong methods answer in the same error shape as everything else
        return _json(P.error_body(exc.detail, "invalid_request_error"), exc.status_code)

    routes = [
        Route("/health", health, methods=["GET"]),
        Route("/stats", stats, methods=["GET"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
    ]
    return Starlette(routes=routes, exception_handlers={HTTPException: http_error})


@dataclass(frozen=True)
class ServeConfig:
    path: str
    host: str = "127.0.0.1"
    port: int = 8000
    device: str = "auto"
    gpu_memory: str | int | None = None
    host_memory: str | int | None = "auto"
    max_batch: int = 8
    max_queue: int = 64
    api_key: str | None = None
    max_context: int | None = None  # default: the model's limit, capped like qstream.load's max_seq
    prefill_chunk: int = 256
    model_id: str | None = None  # default: the shard directory's name
    verify: bool = False  # full sha256 of every shard file before loading


def open_engine(cfg: ServeConfig) -> Engine:
    path = Path(cfg.path)
    if not (path / "manifest.json").is_file():
        raise ShardError(f"{path}: not a shard directory (no manifest.json); make one with `qstream shard RECIPE`")
    if cfg.max_batch < 1 or cfg.max_queue < 0:
        raise QstreamError("need --max-batch >= 1 and --max-queue >= 0")
    model = load(path, device=cfg.device, gpu_memory=cfg.gpu_memory, host_memory=cfg.host_memory,
                 max_batch=cfg.max_batch, max_seq=cfg.max_context, verify=cfg.verify)
    try:
        limit = model.manifest.max_positions
        max_context = cfg.max_context or default_max_seq(limit)  # what load() reserved KV cache for
        if max_context < 2 or (limit and max_context > limit):
            raise QstreamError(f"--max-context must be in [2, {limit or 'the model limit'}], got {max_context}")
        tok = load_tokenizer(path)
        lock = threading.Lock()
        sched = Scheduler(model, tok, eos=eos_ids(model, tok), max_batch=cfg.max_batch, max_queue=cfg.max_queue,
                          prefill_chunk=cfg.prefill_chunk, tokenizer_lock=lock)
    except BaseException:
        model.close()
        raise
    return Engine(model, tok, sched, cfg.model_id or path.resolve().name, max_context, lock, int(time.time()))


def close_engine(engine: Engine) -> None:
    engine.scheduler.close()
    engine.model.close()


def bind(host: str, port: int) -> socket.socket:
    """Bind before loading the model, so a busy port fails in a second, not after a load.
    SO_REUSEADDR lets a restarted server take the port of a killed one at once (its old
    connections may linger in TIME_WAIT), while a live listener still makes bind fail."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise QstreamError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    sock.listen(2048)  # uvicorn's default backlog
    sock.set_inheritable(True)
    return sock


@contextlib.contextmanager
def _sigterm_exits():
    """uvicorn shuts down gracefully on SIGTERM and then raises the signal again; with the
    default handler that kills the process before the model is closed, so exit normally instead."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(sig, frame):
        raise SystemExit(0)

    old = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def run(cfg: ServeConfig, *, log_level: str = "warning", on_ready=None) -> None:
    """Serve until interrupted (Ctrl-C / SIGTERM), then stop the scheduler and free the model."""
    try:
        import uvicorn
    except ImportError:
        raise QstreamError("qstream serve needs uvicorn and starlette: pip install 'qstream[serve]'") from None
    sock = bind(cfg.host, cfg.port)
    try:
        engine = open_engine(cfg)
        try:
            app = create_app(engine, api_key=cfg.api_key)
            server = uvicorn.Server(uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=5))
            if on_ready is not None:
                on_ready(engine)
            with _sigterm_exits():
                server.run(sockets=[sock])
        finally:
            close_engine(engine)
    finally:
        sock.close()
