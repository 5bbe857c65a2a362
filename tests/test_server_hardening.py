"""`nanoseek serve` against hostile and careless clients, on the tiny programmed model of test_server.py.

Strict input (no coercion, valid Unicode only, every range), limits checked before any engine work (the
engine's submitted-request counter does not move), auth on every route but /health and the web chat,
disconnects that free their slot, a full queue that answers 429 with Retry-After, an engine thread that
dies loudly (503, /health fails), and an access log without prompts, completions or keys.
No test times anything: a StepGate holds the engine wherever "not done yet" matters.
"""
import json
import logging
import os
import socket
import subprocess
import sys
import threading
import tracemalloc

import httpx
import pytest

from test_server import KEY, OK, StepGate, idle, wait_until

from nanoseek.infer.http_gate import WEB_CSP
from nanoseek.infer.server import BackgroundServer, Options

AUTH = {"Authorization": f"Bearer {KEY}"}
LONG = {"max_tokens": 200, "ignore_eos": True, "temperature": 0}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from test_server import build_model_dir
    return build_model_dir(tmp_path_factory.mktemp("hardened"))


def options(model_dir, **kw) -> Options:
    base = dict(model=model_dir, served_model_name="served", api_key=KEY, max_batch=8, max_queue=8, max_len=256,
                max_body_bytes=64 << 10, max_header_bytes=8 << 10, request_timeout=60, shutdown_timeout=5,
                prefix_cache_mb=1)
    return Options(**{**base, **kw})


@pytest.fixture(scope="module")
def server(model_dir):
    with BackgroundServer(options(model_dir)) as s:
        yield s


def submitted(server) -> int:
    return server.service.loop.stats["requests"]


CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"
PROMPT = {"model": "served", "prompt": "hi", "max_tokens": 4}


def msg(**kw):
    return {**OK, "messages": [{"role": "user", "content": "hi", **kw}]}


# (path, raw JSON body or dict, status, the param the error names). Raw strings carry what json.dumps
# would not write: lone surrogates, NaN.
BAD_INPUTS = [
    (CHAT, {**OK, "max_tokens": "4"}, 400, "max_tokens"),
    (CHAT, {**OK, "max_tokens": 4.0}, 400, "max_tokens"),
    (CHAT, {**OK, "temperature": "0.5"}, 400, "temperature"),
    (CHAT, {**OK, "top_p": "1"}, 400, "top_p"),
    (CHAT, {**OK, "n": "2"}, 400, "n"),
    (CHAT, {**OK, "n": True}, 400, "n"),
    (CHAT, {**OK, "seed": "7"}, 400, "seed"),
    (CHAT, {**OK, "top_k": "3"}, 400, "top_k"),
    (CHAT, {**OK, "stream": "true"}, 400, "stream"),
    (CHAT, {**OK, "stream": 1}, 400, "stream"),
    (CHAT, {**OK, "logprobs": 1}, 400, "logprobs"),
    (CHAT, {**OK, "top_logprobs": "2", "logprobs": True}, 400, "top_logprobs"),
    (CHAT, {**OK, "stream_options": {"include_usage": "yes"}}, 400, "stream_options.include_usage"),
    (CHAT, {**OK, "model": 5}, 400, "model"),
    (CHAT, json.dumps(OK).replace('"max_tokens": 4', '"temperature": NaN'), 400, "temperature"),
    (CHAT, json.dumps(OK).replace('"max_tokens": 4', '"temperature": Infinity'), 400, "temperature"),
    (CHAT, json.dumps(OK).replace('"hi"', '"hi \\ud800"'), 400, "messages.0.content"),
    (CHAT, json.dumps(OK).replace('"hi"', '"\\udfff"'), 400, "messages.0.content"),
    (CHAT, json.dumps(OK).replace('"hi"', '"a\\u0000b"'), 400, "messages.0.content"),
    (CHAT, json.dumps(msg(name="x")).replace('"x"', '"\\ud83d"'), 400, "messages.0.name"),
    (CHAT, json.dumps({**OK, "stop": ["x"]}).replace('"x"', '"\\ud800"'), 400, "stop"),
    (CHAT, b'{"model": "served", "messages": [{"role": "user", "content": "\xff\xfe"}]}', 400, None),
    (CHAT, {**OK, "messages": [{"role": "function", "content": "hi"}]}, 400, "messages.0.role"),
    (CHAT, {**OK, "messages": [{"role": "function", "content": "hi"}]}, 400, "messages.0.role"),
    (CHAT, msg(content=[{"type": "image_url", "image_url": {"url": "http://x/y.png"}}]), 400, "messages.0.content"),
    (CHAT, msg(content=[{"type": "input_audio", "input_audio": {}}]), 400, "messages.0.content"),
    (CHAT, msg(content=[{"type": "text"}]), 400, "messages.0.content"),
    (CHAT, msg(content=[{"type": "text", "text": 5}]), 400, "messages.0.content"),
    (CHAT, {**OK, "messages": ["hi"]}, 400, "messages.0"),
    (CHAT, {**OK, "n": 10**9}, 400, "n"),
    (CHAT, {**OK, "n": 9}, 400, "n"),  # within the API's 16, past this server's max_batch
    (CHAT, {**OK, "max_tokens": 10**9}, 400, "max_tokens"),
    (CHAT, {**OK, "logprobs": True, "top_logprobs": 21}, 400, "top_logprobs"),
    (CHAT, {**OK, "top_p": 1.5}, 400, "top_p"),
    (CHAT, {**OK, "min_p": -1}, 400, "min_p"),
    (CHAT, {**OK, "repetition_penalty": 0}, 400, "repetition_penalty"),
    (CHAT, {**OK, "messages": [{"role": "user", "content": "hi " * 300}]}, 400, "messages"),
    (CHAT, "", 400, None),
    (CHAT, "null", 400, None),
    (COMPLETIONS, {**PROMPT, "max_tokens": "4"}, 400, "max_tokens"),
    (COMPLETIONS, {**PROMPT, "logprobs": "2"}, 400, "logprobs"),
    (COMPLETIONS, {**PROMPT, "logprobs": 6}, 400, "logprobs"),
    (COMPLETIONS, {**PROMPT, "echo": "yes"}, 400, "echo"),
    (COMPLETIONS, {**PROMPT, "prompt": [1.5, 2]}, 400, "prompt"),
    (COMPLETIONS, {**PROMPT, "prompt": ["a", 1]}, 400, "prompt"),
    (COMPLETIONS, json.dumps(PROMPT).replace('"hi"', '"\\ud800"'), 400, "prompt"),
    (COMPLETIONS, {**PROMPT, "prompt": ["a"] * 20}, 400, "n"),  # 20 sequences: more than the server holds
    (COMPLETIONS, {**PROMPT, "prompt": [-1]}, 400, "prompt"),
    (COMPLETIONS, {**PROMPT, "n": 10**9}, 400, "n"),
]


def post(server, path, body, key=KEY, headers=()):
    content = body if isinstance(body, (str, bytes)) else json.dumps(body)
    auth = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(server.url + path, content=content, timeout=60,
                      headers={"Content-Type": "application/json", **auth, **dict(headers)})


@pytest.mark.parametrize("path,body,status,param", BAD_INPUTS, ids=[f"{i}-{p.split('/')[-1]}"
                                                                     for i, (p, *_rest) in enumerate(BAD_INPUTS)])
def test_bad_input_is_a_4xx_naming_the_field_before_any_engine_work(server, path, body, status, param):
    before = submitted(server)
    r = post(server, path, body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"] and "\n" not in err["message"]
    if param:
        assert err["param"] == param, err
    assert submitted(server) == before  # rejected before the engine saw it


@pytest.mark.parametrize("i", [i for i, (_, body, _s, _p) in enumerate(BAD_INPUTS) if isinstance(body, dict)])
def test_every_4xx_comes_before_the_first_streamed_byte(server, i):
    path, body, status, _ = BAD_INPUTS[i]
    r = post(server, path, {**body, "stream": True} if "stream" not in body else body)
    assert r.status_code == status and r.headers["content-type"] == "application/json", r.text


def test_valid_unicode_passes(server):
    paired = json.dumps({**OK, "max_tokens": 2}).replace('"hi"', '"caf\\u00e9 \\ud83d\\ude00 \\u4e2d"')
    assert post(server, CHAT, paired).status_code == 200


def test_body_and_header_limits(server):
    before = submitted(server)
    big = {**OK, "messages": [{"role": "user", "content": "x" * (70 << 10)}]}
    r = post(server, CHAT, big)
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"

    def chunks():  # no Content-Length: the limit counts what arrives
        for _ in range(80):
            yield b"x" * 1024
    r = httpx.post(server.url + CHAT, content=chunks(), headers=AUTH, timeout=30)
    assert r.status_code == 413
    r = httpx.get(server.url + "/health", headers={"X-Filler": "y" * (9 << 10)})
    assert r.status_code == 431 and r.json()["error"]["code"] == "headers_too_large"
    r = post(server, CHAT, {**OK, "stream": True}, headers={"X-Filler": "y" * (9 << 10)})
    assert r.status_code == 431 and r.headers["content-type"] == "application/json"
    assert submitted(server) == before


def status_of(server, raw_path: str, headers: str = "") -> int:
    """GET a path exactly as written (httpx would normalise //, %2F and ..)."""
    port = int(server.url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(f"GET {raw_path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n{headers}\r\n".encode())
        reply = b""
        while chunk := s.recv(65536):
            reply += chunk
    return int(reply.split(b" ", 2)[1])


@pytest.mark.parametrize("path", ["/v1/models", "//v1/models", "/V1/models", "/%2Fv1/models", "/v1//models",
                                  "/v1/models/served", "/web/../v1/models", "/web/..%2Fv1/models", "/openapi.json",
                                  "/docs", "/v1/nowhere", "/health/", "/anything"])
def test_key_required_on_every_route_and_spelling(server, path):
    assert status_of(server, path) == 401
    assert status_of(server, path, "Authorization: Bearer sk-wrong\r\n") == 401
    assert status_of(server, path, f"Authorization: Bearer {KEY}\r\n") != 401


@pytest.mark.parametrize("path", ["/health", "/", "/web/app.js", "/web/style.css"])
def test_health_and_web_chat_need_no_key(server, path):
    assert status_of(server, path) == 200


def test_no_cors_grant_and_strict_csp(server):
    origin = {"Origin": "https://evil.example"}
    for r in (httpx.get(server.url + "/v1/models", headers={**AUTH, **origin}),
              httpx.options(server.url + CHAT, headers={**origin, "Access-Control-Request-Method": "POST"}),
              httpx.get(server.url + "/health", headers=origin)):
        assert not any(h.startswith("access-control-") for h in r.headers), dict(r.headers)
    for path in ("/", "/web/app.js"):
        csp = httpx.get(server.url + path).headers["content-security-policy"]
        assert csp == WEB_CSP and "default-src 'none'" in csp and "unsafe" not in csp


def test_refuses_a_network_host_without_a_key(model_dir):
    """Exit 2 with one line, before loading anything or binding; with a key it would serve."""
    env = {k: v for k, v in os.environ.items() if k != "NANOSEEK_API_KEY"}
    r = subprocess.run([sys.executable, "-c", "import sys; from nanoseek.cli import main; sys.exit(main())",
                        "serve", model_dir, "--host", "0.0.0.0", "--port", "9"], env=env, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 2, r.stdout + r.stderr
    lines = (r.stdout + r.stderr).strip().splitlines()
    assert len(lines) == 1 and "without an API key" in lines[0] and "--api-key" in lines[0]


def test_access_log_has_metadata_but_no_text_nor_key(server, caplog):
    caplog.set_level(logging.DEBUG)
    secret = "my secret zebra 4711"
    r = post(server, CHAT, {**OK, "messages": [{"role": "user", "content": secret}], "max_tokens": 60})
    answer = r.json()["choices"][0]["message"]
    assert r.status_code == 200 and answer["content"]
    post(server, CHAT, OK, key="sk-wrong-4711")
    lines = [rec.getMessage() for rec in caplog.records]
    text = "\n".join(lines)
    assert any(line.startswith("POST /v1/chat/completions 200 in=") and "ms" in line for line in lines), text
    assert any(line.startswith("POST /v1/chat/completions 401 in=") for line in lines), text
    for private in (secret, answer["content"], answer["reasoning_content"], KEY, "sk-wrong-4711"):
        assert private not in text


def test_log_content_logs_the_text(model_dir, caplog):
    caplog.set_level(logging.INFO, logger="nanoseek.server")
    with BackgroundServer(options(model_dir, log_content=True, api_key=None)) as s:
        secret = "my secret zebra 4711"
        r = post(s, CHAT, {**OK, "messages": [{"role": "user", "content": secret}], "max_tokens": 60}, key=None)
    text = "\n".join(rec.getMessage() for rec in caplog.records)
    assert secret in text and r.json()["choices"][0]["message"]["content"][:10] in text


def test_disconnect_cycles_free_slot_and_memory(server, monkeypatch):
    """100 clients (streaming and not) leave while their request is in the engine: each is aborted, its
    sequence and cache row freed at the engine's next step, and memory returns to the baseline."""
    loop, engine = server.service.loop, server.service.loop.engine
    aborted, real_abort = [], loop.abort

    def abort(h):
        real_abort(h)
        aborted.append(h)
    monkeypatch.setattr(loop, "abort", abort)
    port = int(server.url.rsplit(":", 1)[1])
    finished = []  # (finish_reason, tokens) of each: the handles themselves would hold memory

    def cycle(gate, stream: bool):
        body = json.dumps({**OK, **LONG, "stream": stream}).encode()
        gate.allow(1)  # the prefill, then the engine waits with the request running
        steps = gate.steps
        s = socket.create_connection(("127.0.0.1", port), timeout=30)
        s.sendall(f"POST {CHAT} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\nContent-Type: application/json"
                  f"\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
        wait_until(lambda: gate.steps == steps + 1 and len(engine.active) == 1, what="the request to run")
        s.close()
        wait_until(lambda: aborted, what="the server to see the client leave")
        gate.allow(1)  # the step that drops it
        wait_until(lambda: idle(loop), what="the slot to free")
        out = aborted.pop().req.outputs[0]
        finished.append((out.finish_reason, len(out.token_ids)))

    with StepGate(loop) as gate:
        for i in range(10):  # warm-up: first-use caches (asyncio, h11, torch) are not a leak
            cycle(gate, stream=bool(i % 2))
        tracemalloc.start()
        before = tracemalloc.get_traced_memory()[0]
        for i in range(100):
            cycle(gate, stream=bool(i % 2))
        after = tracemalloc.get_traced_memory()[0]
        tracemalloc.stop()
    assert len(finished) == 110 and all(reason == "abort" for reason, _ in finished)
    assert all(tokens <= 2 for _, tokens in finished)  # dropped, not decoded to its 200
    assert not (loop.handles or engine.requests or engine.active or engine.waiting)  # every slot is free
    assert after - before < 512 << 10, f"python heap grew {after - before} bytes over 100 cycles"


def test_twice_capacity_gives_429_with_retry_after_and_no_5xx(model_dir):
    """Capacity 4 (2 decoding + 2 queued) and 8 clients at once, the engine held: 4 are taken, 4 get 429
    with Retry-After at once, /health answers meanwhile; released, the 4 finish. No 5xx."""
    with BackgroundServer(options(model_dir, max_batch=2, max_queue=2, api_key=None)) as s:
        loop, statuses = s.service.loop, []
        with StepGate(loop) as gate:
            def client(i):
                body = {**OK, "max_tokens": 8, "stream": bool(i % 2)}
                r = httpx.post(s.url + CHAT, json=body, timeout=60)
                statuses.append((r.status_code, r.headers.get("retry-after")))
            threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
            for t in threads:
                t.start()
            wait_until(lambda: len(loop.handles) == 4 and len(statuses) == 4, what="4 taken and 4 refused")
            assert sorted(statuses) == [(429, "1")] * 4
            assert httpx.get(s.url + "/health", timeout=30).json()["waiting"] == 4
            gate.open()
            for t in threads:
                t.join(timeout=60)
        assert sorted(c for c, _ in statuses) == [200] * 4 + [429] * 4


class EngineCrash(BaseException):
    """Not an Exception: what a step failure cannot be caught as (the loop survives those)."""


def test_engine_thread_death_fails_fast(model_dir):
    with BackgroundServer(options(model_dir, api_key=None, request_timeout=600)) as s:
        loop, results = s.service.loop, []
        with StepGate(loop) as gate:
            threads = [threading.Thread(target=lambda st=st: results.append(
                httpx.post(s.url + CHAT, json={**OK, **LONG, "stream": st}, timeout=120))) for st in (False, True)]
            for t in threads:
                t.start()
            wait_until(lambda: len(loop.handles) == 2, what="two waiting requests")

            def crash():
                raise EngineCrash("injected")
            loop.engine.step = crash  # the step held in the gate runs; the engine thread's next one is this
            gate.allow(1)
            for t in threads:
                t.join(timeout=60)
        assert loop.dead and isinstance(loop.died, EngineCrash)
        by_kind = {r.headers["content-type"].split(";")[0]: r for r in results}
        assert by_kind["application/json"].status_code == 503  # long before its 600 s timeout
        assert "engine stopped" in by_kind["text/event-stream"].text  # the stream had started: in-band
        h = httpx.get(s.url + "/health", timeout=30)
        assert h.status_code == 503 and h.json()["status"] == "engine_dead"
        r = httpx.post(s.url + CHAT, json=OK, timeout=30)
        assert r.status_code == 503 and r.json()["error"]["code"] == "engine_dead"
