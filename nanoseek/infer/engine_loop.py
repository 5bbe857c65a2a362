"""The engine behind a server: one thread steps it for every request; each request reads its own queue.

Requests from many clients therefore decode together in one batch (continuous batching), and the
asyncio event loop never waits on the model. If that thread dies, every waiting request and every new
one gets a 503 at once and /health fails, rather than requests hanging until their timeout.
"""
from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import threading
import time
from dataclasses import dataclass

from nanoseek.infer.api_schema import APIError
from nanoseek.infer.engine import Engine
from nanoseek.infer.sampling import SamplingParams

log = logging.getLogger("nanoseek.server")
RETRY_AFTER_S = 1  # what a 429 tells the client to wait: a slot frees as soon as any sequence ends


@dataclass
class Handle:
    rid: int
    prompt: list[int]
    params: SamplingParams
    queue: asyncio.Queue
    loop: asyncio.AbstractEventLoop
    req: object = None  # the engine's RequestOutput (read-only here: top logprobs while streaming)


class EngineLoop:
    """Owns the engine; its thread steps it and routes each token event to its request's queue.

    Capacity: `max_batch` sequences decode, `max_queue` more wait; past that, submit() raises 429."""

    def __init__(self, engine: Engine, max_queue: int):
        self.engine, self.max_queue = engine, max_queue
        self.handles: dict[int, Handle] = {}
        self.stats = {"steps": 0, "peak_running": 0, "requests": 0, "rejected": 0, "tokens": 0, "busy_s": 0.0}
        self.closing = False
        self.died: BaseException | None = None  # what killed the engine thread, if anything did
        self._ids = itertools.count()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._thread = threading.Thread(target=self._run, name="nanoseek-engine", daemon=True)

    def start(self) -> None:
        self._thread.start()

    @property
    def dead(self) -> bool:
        return self.died is not None

    def check_room(self, n: int) -> None:
        """Raise the 503 / 429 that a request of n sequences would get now (call with the lock held, or
        unlocked as a cheap early check: submit() checks again)."""
        if self.dead:
            raise APIError(503, "the engine stopped; the server must be restarted", "server_error",
                           code="engine_dead")
        if self.closing:
            raise APIError(503, "the server is shutting down", "server_error", code="shutting_down")
        seqs = sum(h.params.n for h in list(self.handles.values()))
        if seqs + n > self.engine.max_batch + self.max_queue:
            self.stats["rejected"] += 1
            raise APIError(429, f"too many requests: {seqs} sequences running or queued; retry later",
                           "rate_limit_error", code="rate_limit_exceeded", headers={"Retry-After": str(RETRY_AFTER_S)})

    def submit(self, prompt: list[int], params: SamplingParams) -> Handle:
        with self._lock:
            self.check_room(params.n)
            h = Handle(next(self._ids), prompt, params, asyncio.Queue(), asyncio.get_running_loop())
            self.handles[h.rid] = h  # registered before the engine can emit anything for it
            self.stats["requests"] += 1
            try:
                self.engine.add_request(prompt, params, request_id=h.rid)
            except ValueError as e:  # the server checks first; this is the engine's own guard
                del self.handles[h.rid]
                raise APIError(400, str(e)) from e
            h.req = self.engine.requests[h.rid]
        self._wake.set()
        return h

    def abort(self, h: Handle) -> None:
        if h.rid in self.handles:
            self.engine.abort(h.rid)
            self._wake.set()

    def load(self) -> dict:
        eng, pc = self.engine, self.engine.prefix_cache
        cache = {} if pc is None else {"prefix_cache": {**pc.stats, "blocks": len(pc), "bytes": pc.used,
                                                        "capacity_bytes": pc.capacity}}
        spec = {"speculative": {**eng.spec_stats, "acceptance_rate": eng.acceptance_rate}} if eng.speculative else {}
        return {"running": len(eng.active), "waiting": len(eng.waiting), **self.stats,
                "tokens_per_s": self.stats["tokens"] / max(self.stats["busy_s"], 1e-9), **cache, **spec}

    def metrics(self) -> str:
        """load() in Prometheus' text format. tokens/s: generated tokens per second the engine was stepping
        (prefills included), so idle time does not dilute it."""
        ld, lines = self.load(), []

        def put(name: str, kind: str, value, doc: str) -> None:
            name = f"nanoseek_{name}"
            lines.extend([f"# HELP {name} {doc}", f"# TYPE {name} {kind}", f"{name} {value:g}"])
        put("requests_running", "gauge", ld["running"], "sequences decoding")
        put("requests_waiting", "gauge", ld["waiting"], "sequences waiting for a slot")
        put("requests_total", "counter", ld["requests"], "requests accepted")
        put("requests_rejected_total", "counter", ld["rejected"], "requests refused with 429")
        put("generation_tokens_total", "counter", ld["tokens"], "tokens generated")
        put("engine_busy_seconds_total", "counter", ld["busy_s"], "seconds the engine spent stepping")
        put("generation_tokens_per_second", "gauge", ld["tokens_per_s"], "tokens generated per busy second")
        if "speculative" in ld:
            sp = ld["speculative"]
            put("spec_draft_tokens_total", "counter", sp["drafted"], "MTP draft tokens verified")
            put("spec_accepted_tokens_total", "counter", sp["accepted"], "MTP draft tokens accepted")
            put("spec_acceptance_rate", "gauge", sp["acceptance_rate"], "share of MTP drafts accepted")
        return "\n".join(lines) + "\n"

    def stop(self) -> None:
        """Called after the HTTP server let in-flight requests finish: whatever is left gets a clean error."""
        self.closing = True
        self._wake.set()
        self._thread.join(timeout=10)
        with self._lock:
            for h in self.handles.values():
                self._put(h, ("error", APIError(503, "the server shut down before the request finished",
                                                "server_error", code="shutting_down")))
            self.handles.clear()

    def _put(self, h: Handle, item) -> None:
        with contextlib.suppress(RuntimeError):  # the client's event loop is gone: nobody is listening
            h.loop.call_soon_threadsafe(h.queue.put_nowait, item)

    def _run(self) -> None:
        try:
            self._steps()
        except BaseException as e:  # noqa: BLE001 - whatever ended the thread: fail fast, never hang
            self.died = e
            log.error("the engine thread died: %r", e)
            self._fail_all(APIError(503, "the engine stopped; the server must be restarted", "server_error",
                                    code="engine_dead"))

    def _steps(self) -> None:
        eng = self.engine
        while not self.closing:
            if not eng.has_work():
                self._wake.wait(0.05)
                self._wake.clear()
                continue
            t0 = time.perf_counter()
            try:
                events = eng.step()
            except Exception as e:  # noqa: BLE001 - a broken step fails its requests, not the server
                self._fail_all(APIError(500, f"generation failed: {e}", "server_error"))
                continue
            self.stats["busy_s"] += time.perf_counter() - t0
            self.stats["tokens"] += sum(ev.token_id >= 0 for ev in events)
            self.stats["steps"] += 1
            self.stats["peak_running"] = max(self.stats["peak_running"], len(eng.active))
            by_rid: dict[int, list] = {}
            for ev in events:
                by_rid.setdefault(ev.request_id, []).append(ev)
            with self._lock:
                for rid, h in list(self.handles.items()):  # all: one aborted while waiting has no event
                    if rid in by_rid:
                        self._put(h, ("events", by_rid[rid]))
                    req = eng.requests.get(rid)
                    if req is not None and req.finished:
                        eng.requests.pop(rid)
                        del self.handles[rid]
                        self._put(h, ("done", req))

    def _fail_all(self, error: APIError) -> None:
        with self._lock, self.engine._lock:  # start clean: the cache rows of a failed step are not trustworthy
            self.engine.active.clear(), self.engine.waiting.clear(), self.engine.requests.clear()
            for h in self.handles.values():
                self._put(h, ("error", error))
            self.handles.clear()


async def _report_disconnect(receive, queue: asyncio.Queue) -> None:
    """Wait on the connection (its body is already read, so the next message is the disconnect) and tell
    the request's reader. Non-streaming handlers are not cancelled when their client leaves; this is how
    they learn it at once, without polling."""
    while (await receive())["type"] != "http.disconnect":
        pass
    queue.put_nowait(("gone", None))


async def follow(h: Handle, loop: EngineLoop, receive, timeout: float):
    """Yield ("events", [Event]) items, then ("done", RequestOutput). Aborts the request in the engine
    when the consumer leaves early (client gone, timeout, stream closed), so its slot frees at once.
    receive: the request's ASGI receive channel, watched for the client's disconnect."""
    deadline = time.monotonic() + timeout
    done = False
    watcher = asyncio.ensure_future(_report_disconnect(receive, h.queue))
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise APIError(408, f"request timed out after {timeout:g} s", "timeout_error", code="timeout")
            try:
                kind, payload = await asyncio.wait_for(h.queue.get(), timeout=left)
            except asyncio.TimeoutError:
                continue
            if kind == "gone":
                return
            if kind == "error":
                raise payload
            done = kind == "done"
            yield kind, payload
            if done:
                return
    finally:
        watcher.cancel()
        if not done:
            loop.abort(h)
