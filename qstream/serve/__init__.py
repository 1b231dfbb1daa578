"""`qstream serve`: an OpenAI-compatible HTTP server with continuous batching.

protocol.py  the OpenAI wire format (validation, responses, stream chunks, errors)
scheduler.py one thread owns the model; sequences join and leave the batch at step boundaries
batch.py     the batched KV cache: merge by left padding, drop rows, trim padding
app.py       the Starlette app, the engine (model + tokenizer + scheduler) and the uvicorn runner
"""
from __future__ import annotations

from .app import Engine, ServeConfig, close_engine, create_app, open_engine, run
from .scheduler import Event, QueueFull, Scheduler, Sequence

__all__ = ["Engine", "Event", "QueueFull", "Scheduler", "Sequence", "ServeConfig", "close_engine", "create_app",
           "open_engine", "run"]
