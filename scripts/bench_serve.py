"""Throughput and latency of `qstream serve` against client concurrency.

Starts the server in this process on a free port of 127.0.0.1, then for each concurrency C
runs C client threads that each send --requests streamed completions (a fixed prompt per
client, greedy, at most --max-tokens tokens; a sequence may end earlier at EOS, and tokens
are counted as the server's `usage` reports them). Measures aggregate completion tokens/s over the
wall time of the round, per-request latency and time to first token, and the server's
mean decode batch. Writes JSON and a README table.

    python scripts/bench_serve.py shards/smollm2-135m-nf4 --concurrency 1,4,16 --out eval/results/serve-cpu
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qstream.eval.results import machine  # noqa: E402
from qstream.serve.app import ServeConfig, bind, close_engine, create_app, open_engine  # noqa: E402

PROMPTS = [  # varied chat prompts so that the batch holds sequences of different lengths
    "Write a short poem about the sea.", "Explain what a CPU cache is.", "List three uses of copper.",
    "Tell me a story about a robot who learns to paint.", "What is the difference between weather and climate?",
    "Describe a sunrise in the mountains.", "Give me tips for learning a new language.", "Why is the sky blue?",
]
HTTP_TIMEOUT_S = 600  # one request, generously bounded: a 16-way round on 2 cores takes minutes


def one_request(url: str, model: str, prompt: str, max_tokens: int, chat: bool = True) -> dict:
    """One streamed greedy request: chat (the chat template) or a plain completion (models without one)."""
    body = {"model": model, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    body.update({"messages": [{"role": "user", "content": prompt}]} if chat else {"prompt": prompt})
    t0 = time.perf_counter()
    ttft = None
    tokens = 0
    path = "/v1/chat/completions" if chat else "/v1/completions"
    with httpx.Client(timeout=HTTP_TIMEOUT_S) as h, h.stream("POST", url + path, json=body) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            d = json.loads(line[6:])
            if "error" in d:
                raise RuntimeError(d["error"]["message"])
            if d.get("usage"):
                tokens = d["usage"]["completion_tokens"]
            elif ttft is None and d["choices"] and (d["choices"][0].get("delta", {}).get("content") or d["choices"][0].get("text")):
                ttft = time.perf_counter() - t0
    return {"latency_s": time.perf_counter() - t0, "ttft_s": ttft, "completion_tokens": tokens}


def round_at(url: str, model: str, conc: int, requests: int, max_tokens: int, chat: bool) -> dict:
    results: list[dict] = []
    errors: list[str] = []
    lock = threading.Lock()

    def client(i: int) -> None:
        for j in range(requests):
            try:
                r = one_request(url, model, PROMPTS[(i + j) % len(PROMPTS)], max_tokens, chat)
            except (httpx.HTTPError, RuntimeError) as e:
                with lock:
                    errors.append(f"client {i}: {e}")
                return
            with lock:
                results.append(r)

    before = httpx.get(url + "/stats", timeout=10).json()
    t0 = time.perf_counter()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(conc)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(HTTP_TIMEOUT_S * requests)
    wall = time.perf_counter() - t0
    after = httpx.get(url + "/stats", timeout=10).json()
    if errors:
        raise SystemExit(f"bench_serve: {len(errors)} requests failed, first: {errors[0]}")
    lat = [r["latency_s"] for r in results]
    ttft = [r["ttft_s"] for r in results if r["ttft_s"] is not None]
    steps = after["decode_steps"] - before["decode_steps"]
    tokens = sum(r["completion_tokens"] for r in results)

    def p(xs, q):
        return statistics.quantiles(xs, n=100)[q - 1] if len(xs) > 1 else xs[0]

    return {
        "concurrency": conc, "requests": len(results), "completion_tokens": tokens, "wall_s": wall,
        "tokens_per_s": tokens / wall,
        "latency_s": {"mean": statistics.mean(lat), "p50": p(lat, 50), "p90": p(lat, 90)},
        "ttft_s": {"mean": statistics.mean(ttft), "p50": p(ttft, 50), "p90": p(ttft, 90)},
        "passes": after["passes"] - before["passes"], "decode_steps": steps,
        "mean_decode_batch": (after["decode_rows"] - before["decode_rows"]) / max(steps, 1),
        "s_per_pass": wall / max(after["passes"] - before["passes"], 1),
    }


def table(res: dict) -> str:
    rows = ["| concurrency | requests | tokens | wall s | aggregate tokens/s | speed-up | mean decode batch | latency mean / p90 s | TTFT mean / p90 s |",
            "|---|---|---|---|---|---|---|---|---|"]
    base = res["rounds"][0]["tokens_per_s"]
    for r in res["rounds"]:
        rows.append(f"| {r['concurrency']} | {r['requests']} | {r['completion_tokens']} | {r['wall_s']:.1f} | "
                    f"{r['tokens_per_s']:.2f} | {r['tokens_per_s'] / base:.2f}x | {r['mean_decode_batch']:.2f} | "
                    f"{r['latency_s']['mean']:.2f} / {r['latency_s']['p90']:.2f} | {r['ttft_s']['mean']:.2f} / {r['ttft_s']['p90']:.2f} |")
    return "\n".join(rows)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dir", help="shard directory")
    ap.add_argument("--concurrency", default="1,4,16")
    ap.add_argument("--requests", type=int, default=2, help="requests per client and round")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--gpu-memory", default=None, help="device memory budget, e.g. 4GiB")
    ap.add_argument("--max-context", type=int, default=512, help="tokens per sequence the server reserves (default 512)")
    ap.add_argument("--out", type=Path, help="write result.json and README.md here")
    a = ap.parse_args()
    concs = [int(x) for x in a.concurrency.split(",")]
    sock = bind("127.0.0.1", 0)
    port = sock.getsockname()[1]
    import uvicorn

    load_before = os.getloadavg()[0]  # other processes on the machine: the numbers mean little when this exceeds the cores
    t0 = time.perf_counter()
    engine = open_engine(ServeConfig(path=a.dir, device=a.device, gpu_memory=a.gpu_memory, max_batch=max(concs), max_queue=0,
                                      max_context=a.max_context))
    load_s = time.perf_counter() - t0
    server = uvicorn.Server(uvicorn.Config(create_app(engine), log_level="warning"))
    th = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    th.start()
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while not server.started:
            if time.monotonic() > deadline:
                raise SystemExit("bench_serve: the server did not start")
            time.sleep(0.05)
        chat = bool(getattr(engine.tokenizer, "chat_template", None))  # synthetic benchmark models have none
        one_request(url, engine.model_id, PROMPTS[0], 4, chat)  # warm-up: kernels, allocator
        rounds = []
        for c in concs:
            r = round_at(url, engine.model_id, c, a.requests, a.max_tokens, chat)
            print(f"concurrency {c:3d}: {r['tokens_per_s']:.2f} tokens/s, mean batch {r['mean_decode_batch']:.2f}, "
                  f"latency {r['latency_s']['mean']:.2f} s, TTFT {r['ttft_s']['mean']:.2f} s", flush=True)
            rounds.append(r)
    finally:
        server.should_exit = True
        th.join(30)
        close_engine(engine)
        sock.close()
    res = {"command": " ".join(sys.argv), "shards": a.dir, "machine": machine(), "load_s": load_s,
           "load_average_1m_before_after": [load_before, os.getloadavg()[0]],
           "max_tokens": a.max_tokens, "requests_per_client": a.requests, "rounds": rounds}
    print(table(res))
    if a.out:
        a.out.mkdir(parents=True, exist_ok=True)
        (a.out / "result.json").write_text(json.dumps(res, indent=1) + "\n")
        (a.out / "README.md").write_text(
            f"# `qstream serve` on {res['machine'].get('gpu', 'this CPU')}\n\nCommand: `{res['command']}`\n\nMachine: {res['machine']}\n\n"
            f"Each client sends {a.requests} streamed greedy {'chat' if chat else 'completion'} requests of {a.max_tokens} tokens (8 prompts in turn); "
            "aggregate tokens/s is all completion tokens over the wall time of the round; TTFT is time to the first "
            "text chunk. `--max-batch` equals the largest concurrency. 1-minute load average before/after: "
            f"{res['load_average_1m_before_after']} on {os.cpu_count()} cores.\n\n" + table(res) + "\n")
        print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
