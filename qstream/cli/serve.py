"""`qstream serve` (the server itself is qstream/serve/)."""
from __future__ import annotations

import argparse
import importlib
import sys

from ..errors import QstreamError
from .common import COMMON, add_runtime_args


def _server():
    """qstream.serve imports starlette and uvicorn (the `serve` extra): only `qstream serve` pays for them."""
    try:
        return importlib.import_module("qstream.serve")
    except ModuleNotFoundError as e:
        if e.name in ("starlette", "uvicorn"):
            raise QstreamError(f"qstream serve needs {e.name}: pip install 'qstream[serve]'") from None
        raise


def _cmd_serve(a: argparse.Namespace) -> int:
    if a.devices is not None:
        raise QstreamError("qstream serve runs on one device; --devices works with generate, chat, bench and eval")
    server = _server()
    cfg = server.ServeConfig(path=a.dir, host=a.host, port=a.port, device=a.device, gpu_memory=a.gpu_memory,
                      host_memory=a.host_memory, max_batch=a.max_batch, max_queue=a.max_queue, api_key=a.api_key,
                      max_context=a.max_context, prefill_chunk=a.prefill_chunk, model_id=a.model_name,
                             verify=a.verify)

    def ready(engine) -> None:
        print(f"qstream: serving {engine.model_id} on http://{a.host}:{a.port}/v1 (max batch {a.max_batch}, "
              f"context {engine.max_context}; {engine.model.plan.describe()})", file=sys.stderr, flush=True)

    server.run(cfg, log_level="info" if getattr(a, "verbose", False) else "warning", on_ready=ready)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser("serve", parents=[COMMON], help="serve a shard directory over an OpenAI-compatible HTTP API",
                       description="POST /v1/completions and /v1/chat/completions (streaming or not), GET /v1/models, "
                       "/health and /stats. Concurrent requests share each pass over the weights (continuous batching).")
    add_runtime_args(s)
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--max-batch", type=int, default=8, help="sequences decoded together at most (default 8)")
    s.add_argument("--max-queue", type=int, default=64,
                   help="requests waiting for a batch slot at most; beyond, 503 with Retry-After (default 64)")
    s.add_argument("--max-context", type=int, default=None, metavar="T",
                   help="tokens per sequence, prompt plus completion; KV memory is reserved for max-batch x T "
                   "(default: the model's limit, at most 4096)")
    s.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1 routes")
    s.add_argument("--prefill-chunk", type=int, default=256,
                   help="joining prompts up to this many tokens share one prefill pass; longer ones are prefilled "
                   "alone, this many tokens per pass; each between two decode steps of the batch (default 256)")
    s.add_argument("--model-name", default=None, help="the model id clients send (default: the shard directory's name)")
    s.set_defaults(func=_cmd_serve)
