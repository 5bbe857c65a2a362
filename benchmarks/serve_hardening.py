"""Hardening figures of `nanoseek serve` (issue: strict input, limits, disconnects, load), as JSON.

Phases (all by default, or --only some):
  limits       time to reject n=10**9 (and that the engine saw nothing)
  disconnects  100 connect-and-drop cycles (streaming and not) without pacing: time from the client's close
               to the freed slot, and process memory (RSS, python heap) before and after
  soak         2x the configured concurrency for --duration seconds: status counts, 5xx count, 429 rate,
               /health latency (polled throughout)
  fuzz         schemathesis on /openapi.json with --fuzz-examples per route (runs tests/test_server_fuzz.py)

The tests assert the behaviour with a paced engine; this script measures the timings on this machine.
Run from the repository root: python -m benchmarks.serve_hardening --json serve_hardening.json
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import tracemalloc
from collections import Counter
from pathlib import Path

import httpx
import torch

PHASES = ["limits", "disconnects", "soak", "fuzz"]
CHAT = "/v1/chat/completions"


def _server(max_batch: int, max_queue: int):
    from nanoseek.config import get_preset
    from nanoseek.infer.server import BackgroundServer, Options
    from nanoseek.model.transformer import Transformer
    from nanoseek.tokenizer import train_tokenizer

    tok = train_tokenizer(["the quick brown fox jumps over the lazy dog, 0123456789."] * 50, vocab_size=600)
    torch.manual_seed(0)
    model = Transformer(get_preset("tiny").replace(vocab_size=tok.vocab_size, bos_token_id=tok.bos_id,
                                                   eos_token_id=tok.eos_id)).eval()
    opts = Options(served_model_name="tiny", max_batch=max_batch, max_queue=max_queue, max_len=512, shutdown_timeout=5,
                   prefix_cache_mb=8)
    return BackgroundServer(opts, model=model, tokenizer=tok)


def _body(**kw) -> dict:
    return {"model": "tiny", "messages": [{"role": "user", "content": "tell me about the fox"}], **kw}


def _ms(xs: list[float]) -> dict:
    xs = sorted(xs)
    return {"n": len(xs), "p50_ms": round(statistics.median(xs) * 1e3, 2),
            "p99_ms": round(xs[min(len(xs) - 1, int(0.99 * len(xs)))] * 1e3, 2), "max_ms": round(xs[-1] * 1e3, 2)}


def _post_raw(port: int, path: str, body: bytes) -> bytes:
    """One request in one write on a fresh TCP_NODELAY connection: httpx writes headers and body apart,
    and Nagle's algorithm with the peer's delayed ACK then adds ~40 ms that are not the server's."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: "
                  f"{len(body)}\r\nConnection: close\r\n\r\n".encode() + body)
        reply = b""
        while chunk := s.recv(65536):
            reply += chunk
    return reply


def limits(server, reps: int = 50) -> dict:
    loop, port = server.service.loop, int(server.url.rsplit(":", 1)[1])
    before, times, statuses = loop.stats["requests"], [], Counter()
    body = json.dumps(_body(n=10**9)).encode()
    for _ in range(reps):
        t = time.perf_counter()
        reply = _post_raw(port, CHAT, body)
        times.append(time.perf_counter() - t)
        statuses[int(reply.split(b" ", 2)[1])] += 1
    return {"reject_n_1e9": _ms(times), "statuses": dict(statuses),
            "engine_requests_submitted": loop.stats["requests"] - before, "engine_waiting": len(loop.engine.waiting)}


def _rss_bytes() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def disconnects(server, cycles: int = 100) -> dict:
    loop, engine = server.service.loop, server.service.loop.engine
    port = int(server.url.rsplit(":", 1)[1])

    def cycle(stream: bool) -> float:
        body = json.dumps(_body(max_tokens=400, ignore_eos=True, stream=stream)).encode()
        s = socket.create_connection(("127.0.0.1", port), timeout=30)
        s.sendall(f"POST {CHAT} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {len(body)}"
                  f"\r\n\r\n".encode() + body)
        while not engine.active:
            time.sleep(0.001)
        s.close()
        t = time.perf_counter()
        while loop.handles or engine.active or engine.waiting:
            time.sleep(0.001)
        return time.perf_counter() - t

    for i in range(10):  # warm-up: first-use caches are not a leak
        cycle(bool(i % 2))
    tracemalloc.start()
    gc.collect()  # garbage not yet collected is not held memory
    rss0, heap0 = _rss_bytes(), tracemalloc.get_traced_memory()[0]
    freed = [cycle(bool(i % 2)) for i in range(cycles)]
    gc.collect()
    rss1, heap1 = _rss_bytes(), tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    return {"cycles": cycles, "close_to_slot_freed": _ms(freed), "rss_mib_before": round(rss0 / 2**20, 1),
            "rss_mib_after": round(rss1 / 2**20, 1), "python_heap_growth_kib": round((heap1 - heap0) / 1024, 1),
            "free_slots_after": engine.max_batch - len(engine.active), "max_batch": engine.max_batch,
            "requests_left": len(engine.requests) + len(loop.handles)}


def soak(server, duration: float, clients: int) -> dict:
    statuses, health, health_bad, stop = Counter(), [], Counter(), threading.Event()

    def client(i: int):
        rng = random.Random(i)
        with httpx.Client(base_url=server.url, timeout=120) as c:
            while not stop.is_set():
                body = _body(max_tokens=rng.randint(8, 48), ignore_eos=True, stream=rng.random() < 0.5)
                try:
                    if body["stream"]:
                        with c.stream("POST", CHAT, json=body) as r:
                            for k, _ in enumerate(r.iter_lines()):
                                if k == 3 and rng.random() < 0.1:  # some clients leave mid-stream
                                    break
                    else:
                        r = c.post(CHAT, json=body)
                    statuses[r.status_code] += 1
                    if r.status_code == 429:
                        statuses["429_with_retry_after"] += "retry-after" in r.headers
                        stop.wait(rng.uniform(0.05, 0.25))  # a fraction of Retry-After: keep the pressure on
                except httpx.HTTPError as e:
                    statuses[f"client_error:{type(e).__name__}"] += 1

    def poll_health():
        with httpx.Client(base_url=server.url, timeout=30) as c:
            while not stop.is_set():
                t = time.perf_counter()
                r = c.get("/health")
                health.append(time.perf_counter() - t)
                if r.status_code != 200:
                    health_bad[r.status_code] += 1
                stop.wait(0.2)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    threads.append(threading.Thread(target=poll_health))
    for t in threads:
        t.start()
    time.sleep(duration)
    stop.set()
    for t in threads:
        t.join(timeout=180)
    answered = sum(v for k, v in statuses.items() if isinstance(k, int))
    return {"duration_s": duration, "clients": clients, "statuses": {str(k): v for k, v in statuses.items()},
            "answered": answered, "5xx": sum(v for k, v in statuses.items() if isinstance(k, int) and k >= 500),
            "429_rate": round(statuses[429] / max(1, answered), 3), "health": _ms(health),
            "health_not_200": dict(health_bad), "peak_running": server.service.loop.stats["peak_running"]}


def fuzz(examples: int) -> dict:
    with tempfile.TemporaryDirectory() as d:
        report = Path(d) / "fuzz.json"
        env = {**os.environ, "NANOSEEK_FUZZ_EXAMPLES": str(examples), "NANOSEEK_FUZZ_REPORT": str(report)}
        t = time.perf_counter()
        rc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                             "tests/test_server_fuzz.py"], env=env).returncode
        out = json.loads(report.read_text()) if report.exists() else {}
    return {"pytest_rc": rc, "seconds": round(time.perf_counter() - t, 1), **out}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.serve_hardening", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", nargs="*", choices=PHASES, help="run only these phases")
    p.add_argument("--json", default="serve_hardening.json", help="where to write the results")
    p.add_argument("--duration", type=float, default=180.0, help="soak seconds")
    p.add_argument("--max-batch", type=int, default=4, help="server's max_batch in the soak")
    p.add_argument("--max-queue", type=int, default=4, help="server's max_queue; the soak runs 2 x (batch + queue) "
                                                            "clients")
    p.add_argument("--fuzz-examples", type=int, default=200, help="schemathesis examples per route")
    args = p.parse_args(argv)
    phases = args.only or PHASES
    out = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}"}
    if {"limits", "disconnects", "soak"} & set(phases):
        with _server(args.max_batch, args.max_queue) as server:
            for name in ("limits", "disconnects"):
                if name in phases:
                    print(f"running {name} ...", flush=True)
                    out[name] = globals()[name](server)
            if "soak" in phases:
                print(f"running soak for {args.duration:g} s ...", flush=True)
                out["soak"] = soak(server, args.duration, 2 * (args.max_batch + args.max_queue))
    if "fuzz" in phases:
        print(f"running fuzz with {args.fuzz_examples} examples per route ...", flush=True)
        out["fuzz"] = fuzz(args.fuzz_examples)
    Path(args.json).write_text(json.dumps(out, indent=1))
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
