"""`nanoseek serve`: the real server and engine on a tiny model, driven through the official openai client.

The tiny model is random except that its output is programmed as a bigram chain (the blocks' output
projections are damped and the LM head maps each token of one fixed completion to the next), so a
reasoning completion with `</think>` and HTML-injection text comes out deterministically, without
training. Long generations use `ignore_eos` on otherwise random logits.

No test here depends on how fast the CPU decodes: where a test needs the engine to be "not done yet",
a StepGate holds the engine's steps until the test lets them go.
"""
import json
import threading
import time

import httpx
import openai
import pytest
import torch

from nanoseek.config import get_preset
from nanoseek.data.chat import ThinkSplitter
from nanoseek.infer.server import BackgroundServer, Options
from nanoseek.model.transformer import Transformer
from nanoseek.tokenizer import train_tokenizer

REASONING, ANSWER = "Hmm, one plus two.", 'Hello **world**! Try `x` <img src=q onerror="alert(1)"> or<script>boom()'
KEY = "sk-test"
LONG = {"ignore_eos": True}  # vLLM's extra: keep sampling past eos


def build_model_dir(path, answer: str = ANSWER, pieces: tuple[str, ...] = (), context: int = 256) -> str:
    """Save a tiny MoE + tokenizer whose greedy (and low-temperature) chat answer is REASONING</think>answer.
    pieces: substrings of the answer made single tokens, so an answer whose characters repeat (digits and
    punctuation are tokens of their own) is still a chain without a repeated token. context: the model's
    max_position_embeddings."""
    completion = REASONING + "</think>" + answer
    tok = train_tokenizer([completion] * 20 + ["hello there, what is two plus two? say hi"] * 5, vocab_size=600)
    tok.tk.add_tokens(list(pieces))
    cfg = get_preset("tiny").replace(
        vocab_size=tok.vocab_size, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
        num_hidden_layers=2, num_attention_heads=4, q_lora_rank=32, kv_lora_rank=16, qk_nope_head_dim=8,
        qk_rope_head_dim=8, v_head_dim=8, n_routed_experts=4, n_group=2, topk_group=1, num_experts_per_tok=2,
        max_position_embeddings=context, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id)
    torch.manual_seed(0)
    model = Transformer(cfg).eval()
    prompt = tok.encode(tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True))
    chain = [prompt[-1]] + tok.encode(completion) + [tok.eos_id]
    nxt = dict(zip(chain, chain[1:]))
    assert len(nxt) == len(chain) - 1, "the programmed completion must not repeat a token"
    with torch.no_grad():
        for name, p in model.named_parameters():  # damp the blocks so the residual stays near the embedding
            if name.startswith("layers.") and ("o_proj" in name or "down_proj" in name):
                p.mul_(0.05)
        emb = model.embed_tokens.weight
        unit = emb / emb.norm(dim=-1, keepdim=True)
        model.lm_head.weight.mul_(0.1)
        for a, b in nxt.items():
            model.lm_head.weight[b] += 3.0 * unit[a]
    model.save_pretrained(path, tokenizer=tok)
    return str(path)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_model_dir(tmp_path_factory.mktemp("served"))


@pytest.fixture(scope="module")
def server(model_dir):
    opts = Options(model=model_dir, served_model_name="served", api_key=KEY, max_batch=8, max_queue=8, max_len=256,
                   max_body_bytes=64 << 10, request_timeout=30, shutdown_timeout=5)
    with BackgroundServer(opts) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=30)


def wait_until(cond, timeout=10.0, what="the condition"):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out after {timeout} s waiting for {what}"
        time.sleep(0.01)


def idle(loop) -> bool:
    return not (loop.handles or loop.engine.active or loop.engine.waiting)


class StepGate:
    """Paces a running server's engine: each engine step first waits for a permit from the test.

    The engine thread calls `loop.engine.step()` (EngineLoop._run); this wraps that method on the engine
    instance, so the real step still runs and only *when* is up to the test. "The request cannot have
    finished yet" is then a state the test sets, not a race a fast CPU wins. The gate starts closed and
    starts from an idle engine, so `steps` and `batch_sizes` are this test's. Leaving the `with` block
    opens it and restores the engine; it also fails open after HOLD_LIMIT_S, so no test can hang on it.
    """

    HOLD_LIMIT_S = 60.0

    def __init__(self, loop):
        self.loop, self.engine = loop, loop.engine
        self.steps = 0         # real steps taken through the gate
        self.batch_sizes = []  # sequences decoding after each of them
        self._permits, self._open = 0, False
        self._cond = threading.Condition()

    def __enter__(self) -> "StepGate":
        wait_until(lambda: idle(self.loop), what="the engine to be idle")
        real = self.engine.step

        def step():
            with self._cond:
                self._cond.wait_for(lambda: self._open or self._permits > 0, timeout=self.HOLD_LIMIT_S)
                self._permits = max(0, self._permits - 1)
            events = real()
            with self._cond:
                self.steps += 1
                self.batch_sizes.append(len(self.engine.active))
            return events

        self.engine.step = step
        return self

    def __exit__(self, exc_type, *exc) -> None:
        self.open()
        del self.engine.step  # the class's method again
        if exc_type is None:  # whatever the test left in flight drains once the engine may step
            wait_until(lambda: idle(self.loop), what="the engine to drain")

    def allow(self, k: int) -> None:
        with self._cond:
            self._permits += k
            self._cond.notify_all()

    def open(self) -> None:
        with self._cond:
            self._open = True
            self._cond.notify_all()


def chat(client, content="hi", **kw):
    return client.chat.completions.create(model="served", messages=[{"role": "user", "content": content}], **kw)


def test_models_health_and_openapi(server, client):
    assert [m.id for m in client.models.list().data] == ["served"]
    assert httpx.get(server.url + "/health").json()["status"] == "ok"
    spec = httpx.get(server.url + "/openapi.json", headers={"Authorization": f"Bearer {KEY}"}).json()
    assert "/v1/chat/completions" in spec["paths"] and "/v1/completions" in spec["paths"]


def test_chat_reasoning_content_and_usage(client):
    r = chat(client, temperature=0, max_tokens=60)
    msg = r.choices[0].message
    assert msg.reasoning_content == REASONING and msg.content == ANSWER
    assert r.choices[0].finish_reason == "stop"
    u = r.usage
    assert u.total_tokens == u.prompt_tokens + u.completion_tokens
    assert 0 < u.completion_tokens_details.reasoning_tokens < u.completion_tokens
    again = chat(client, temperature=0, max_tokens=60).usage.model_extra  # same prompt: its prefix is cached
    assert again["prompt_cache_hit_tokens"] == u.prompt_tokens - 1
    assert again["prompt_cache_hit_tokens"] + again["prompt_cache_miss_tokens"] == u.prompt_tokens


def test_chat_n_choices(client):
    r = chat(client, temperature=0.8, max_tokens=60, n=2, seed=1)
    assert [c.index for c in r.choices] == [0, 1]
    assert all(c.message.content == ANSWER for c in r.choices)  # the programmed answer, sampled twice


def test_request_timeout_is_a_clean_error(server, client):
    """With the engine held, no token can come: a short timeout gives 408 (in-band when streaming), and the
    timed-out requests are aborted, so the engine drains once it may step again."""
    opts = server.service.opts
    old, opts.request_timeout = opts.request_timeout, 0.3
    try:
        with StepGate(server.service.loop):
            with pytest.raises(openai.APIStatusError) as e:
                chat(client, max_tokens=200, extra_body=LONG)
            assert e.value.status_code == 408 and e.value.body["code"] == "timeout"
            with pytest.raises(openai.APIError, match="timed out"):
                list(chat(client, max_tokens=200, stream=True, extra_body=LONG))
    finally:
        opts.request_timeout = old


def test_chat_stream_reasoning_before_content(client):
    stream = chat(client, "say hi", temperature=0.5, max_tokens=60, stream=True,
                  stream_options={"include_usage": True}, logprobs=True, top_logprobs=2)
    kinds, reasoning, content, usage, finish = [], "", "", None, None
    for c in stream:
        if c.usage:
            usage = c.usage
        for ch in c.choices:
            d = ch.delta.model_extra.get("reasoning_content")
            if d:
                kinds.append("r")
                reasoning += d
            if ch.delta.content:
                kinds.append("c")
                content += ch.delta.content
                assert ch.logprobs.content and len(ch.logprobs.content[0].top_logprobs) == 2
            finish = ch.finish_reason or finish
    assert reasoning == REASONING and content == ANSWER and finish == "stop"
    assert kinds.index("c") > kinds.index("r") and "r" not in kinds[kinds.index("c"):]
    assert usage.completion_tokens_details.reasoning_tokens > 0


def test_completions_n_seed_and_logprobs(client):
    kw = dict(model="served", prompt="hello there", max_tokens=12, temperature=1.0, extra_body=LONG)
    a = client.completions.create(n=2, seed=7, logprobs=2, **kw)
    assert len(a.choices) == 2 and all(c.finish_reason == "length" for c in a.choices)
    assert a.usage.completion_tokens == 24 and len(a.choices[0].logprobs.tokens) == 12
    b = client.completions.create(n=2, seed=7, logprobs=2, **kw)
    assert [c.text for c in a.choices] == [c.text for c in b.choices]
    c = client.completions.create(n=1, seed=8, **kw)
    assert c.choices[0].text not in [x.text for x in a.choices]
    streamed = "".join(ch.choices[0].text for ch in client.completions.create(n=1, seed=8, stream=True, **kw))
    assert streamed == c.choices[0].text


def raw(server, body, key=KEY, path="/v1/chat/completions", **kw):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    if isinstance(body, (dict, list)):
        body = json.dumps(body)
    return httpx.post(server.url + path, content=body, headers={"Content-Type": "application/json", **headers},
                      timeout=30, **kw)


OK = {"model": "served", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
BAD = [  # (body, status, param it should name or None)
    ("{not json", 400, None),
    ([1, 2], 400, None),
    ({**OK, "model": "gpt-9"}, 404, "model"),
    ({**OK, "messages": []}, 400, "messages"),
    ({**OK, "messages": "hi"}, 400, "messages"),
    ({**OK, "messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages.0.role"),
    ({**OK, "messages": [{"role": "user", "content": 5}]}, 400, None),
    ({**OK, "messages": [{"role": "user", "content": "hi " * 400}]}, 400, "messages"),
    ({**OK, "max_tokens": 0}, 400, "max_tokens"),
    ({**OK, "max_tokens": -3}, 400, "max_tokens"),
    ({**OK, "max_tokens": 10**9}, 400, "max_tokens"),
    ({**OK, "temperature": -0.1}, 400, "temperature"),
    ({**OK, "temperature": 2.5}, 400, "temperature"),
    ({**OK, "temperature": "hot"}, 400, "temperature"),
    ({**OK, "top_p": 0}, 400, "top_p"),
    ({**OK, "top_k": 10**30}, 400, "top_k"),
    ({**OK, "n": 0}, 400, "n"),
    ({**OK, "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    ({**OK, "top_logprobs": 3}, 400, "top_logprobs"),
    ({"model": "served"}, 400, "messages"),
]


@pytest.mark.parametrize("body,status,param", BAD, ids=[f"{i}-{s}" for i, (_, s, _) in enumerate(BAD)])
def test_bad_chat_input_is_a_4xx_with_openai_error(server, body, status, param):
    r = raw(server, body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if param:
        assert err["param"] == param


def test_bad_completion_input_auth_and_size(server, client):
    for body in ({"model": "served", "prompt": ""}, {"model": "served", "prompt": [10**6]},
                 {"model": "served", "prompt": "x", "logprobs": 9}, {"model": "served", "prompt": 3}):
        r = raw(server, body, path="/v1/completions")
        assert r.status_code == 400 and "error" in r.json(), r.text
    for key in (None, "wrong"):
        r = raw(server, OK, key=key)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url + "/v1", api_key="nope", max_retries=0).models.list()
    r = raw(server, {**OK, "messages": [{"role": "user", "content": "x" * (70 << 10)}]})
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    assert httpx.get(server.url + "/v1/nowhere", headers={"Authorization": f"Bearer {KEY}"}).status_code == 404
    for odd in ({"temperature": 1e-40}, {"seed": -(10**30)}, {"top_p": 1e-30, "temperature": 2}):  # valid, extreme
        assert raw(server, {**OK, **odd}).status_code == 200
    assert httpx.get(server.url + "/health").json()["status"] == "ok"  # nothing above broke the engine


def test_concurrent_requests_are_batched(server, client):
    """Six requests sent together decode as one batch of six, in about the engine steps one request takes
    (one after the other they would take six times as many)."""
    loop = server.service.loop
    kw = dict(model="served", prompt="say hi", max_tokens=20, temperature=1.0, extra_body=LONG)
    with StepGate(loop) as gate:
        gate.open()  # not pacing here, only counting
        client.completions.create(**kw)
    one = gate.steps
    results = []
    threads = [threading.Thread(target=lambda: results.append(client.completions.create(**kw))) for _ in range(6)]
    with StepGate(loop) as gate:  # held until all six are queued, so none can start early
        for th in threads:
            th.start()
        wait_until(lambda: len(loop.engine.waiting) == 6, what="six queued requests")
        gate.open()
        for th in threads:
            th.join(timeout=30)
    assert len(results) == 6 and all(r.usage.completion_tokens == 20 for r in results)
    assert max(gate.batch_sizes) == 6 and loop.stats["peak_running"] >= 6
    assert gate.steps <= one + 2, (gate.steps, one)  # one after the other: 6 * one


def test_disconnect_frees_the_slot(server, monkeypatch):
    """A streaming client that leaves after a few of its 200 tokens: the server aborts the request and the
    engine drops it at its next step instead of decoding it to the end."""
    loop = server.service.loop
    aborted, real_abort = [], loop.abort

    def abort(h):
        real_abort(h)
        aborted.append(h)
    monkeypatch.setattr(loop, "abort", abort)
    body = {**OK, "max_tokens": 200, "stream": True, "ignore_eos": True, "temperature": 0}
    with StepGate(loop) as gate:
        gate.allow(3)  # 4 tokens of the programmed reasoning, then the engine waits
        with httpx.stream("POST", server.url + "/v1/chat/completions", json=body,
                          headers={"Authorization": f"Bearer {KEY}"}, timeout=30) as r:
            lines = r.iter_lines()
            for _ in range(6):  # the role chunk, then two reasoning deltas
                next(lines)
            assert loop.load()["running"] == 1
        wait_until(lambda: aborted, what="the server to abort the request of the client that left")
        gate.open()
        wait_until(lambda: idle(loop), what="the slot to free")
    out = aborted[0].req.outputs[0]
    assert out.finish_reason == "abort" and len(out.token_ids) <= 4, (out.finish_reason, len(out.token_ids))


def test_queue_full_gives_429(model_dir):
    opts = Options(model=model_dir, served_model_name="served", max_batch=1, max_queue=1, max_len=256,
                   shutdown_timeout=2)
    with BackgroundServer(opts) as s, StepGate(s.service.loop) as gate:
        engine = s.service.loop.engine
        c = openai.OpenAI(base_url=s.url + "/v1", api_key="none", max_retries=0, timeout=30)
        long = dict(model="served", prompt="hi", max_tokens=120, extra_body=LONG)
        gate.allow(1)  # the first request is admitted, then held far from its 120 tokens
        first = c.completions.create(stream=True, **long)
        wait_until(lambda: gate.steps == 1 and len(engine.active) == 1, what="the first request to run")
        queued = threading.Thread(target=lambda: c.completions.create(**{**long, "max_tokens": 2}))
        queued.start()
        wait_until(lambda: engine.waiting, what="the second request to queue")
        with pytest.raises(openai.RateLimitError) as e:
            c.completions.create(**long)
        assert e.value.status_code == 429 and e.value.body["code"] == "rate_limit_exceeded"
        first.close()
        gate.open()
        queued.join(timeout=20)
        assert not queued.is_alive()


def test_think_splitter_holds_back_a_partial_tag():
    sp = ThinkSplitter()
    parts = [sp.feed(x) for x in ["abc</th", "ink>\n\nans", "wer"]]
    assert parts == [("abc", ""), ("", "ans"), ("", "wer")]


# `nanoseek serve` as the console script runs it (nanoseek.cli:main), except that engine steps after the
# first {free} wait while the file {hold} exists (for at most a minute): the test, not the CPU, decides
# how far generation has got when the shutdown starts.
PACED_SERVE = """
import os, sys, time
from nanoseek.cli import main
from nanoseek.infer.engine import Engine

real_step, taken = Engine.step, []

def paced_step(self):
    deadline = time.monotonic() + 60
    while len(taken) >= {free} and os.path.exists({hold!r}) and time.monotonic() < deadline:
        time.sleep(0.01)
    taken.append(1)
    return real_step(self)

Engine.step = paced_step
sys.exit(main())
"""


def test_cli_env_key_and_graceful_shutdown(model_dir, tmp_path):
    """`nanoseek serve DIR` in a subprocess: NANOSEEK_API_KEY guards /v1; on SIGTERM the in-flight stream
    still runs to its end before the process exits."""
    import os
    import signal
    import socket
    import subprocess
    import sys
    from pathlib import Path

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    hold, free = tmp_path / "hold", 20
    hold.touch()
    proc = subprocess.Popen([sys.executable, "-c", PACED_SERVE.format(free=free, hold=str(hold)), "serve", model_dir,
                             "--port", str(port), "--max-len", "256"],
                            env={**os.environ, "NANOSEEK_API_KEY": "k1"}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    url, lines = f"http://127.0.0.1:{port}", []

    def refused() -> bool:
        try:
            httpx.get(url + "/health", timeout=5)
            return False
        except httpx.TransportError:
            return True

    try:
        wait_until(lambda: proc.poll() is not None or not refused(), timeout=60, what="the server to start")
        assert proc.poll() is None, "server did not start"
        assert httpx.get(url + "/v1/models").status_code == 401
        body = {"model": Path(model_dir).name, "prompt": "hi", "max_tokens": 100, "ignore_eos": True, "stream": True,
                "seed": 0}
        with httpx.stream("POST", url + "/v1/completions", json=body, headers={"Authorization": "Bearer k1"},
                          timeout=60) as r:
            for line in filter(None, r.iter_lines()):
                lines.append(line)
                if len(lines) == 3:  # mid-stream: at most `free` steps (free + 1 of 100 tokens) have run
                    proc.send_signal(signal.SIGTERM)
                    wait_until(refused, timeout=30, what="the server to stop accepting connections")
                    hold.unlink()  # shutting down: the rest of the tokens are generated from here on
        assert lines[-1] == "data: [DONE]"  # finished, not cut:
        assert json.loads(lines[-2][6:])["choices"][0]["finish_reason"] == "length"
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert "Application shutdown complete" in proc.stdout.read()
