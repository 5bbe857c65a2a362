"""`nanoseek serve MODEL_DIR`: an OpenAI-compatible API and a web chat (at /) over the batching engine.

Endpoints: GET /v1/models, POST /v1/chat/completions, POST /v1/completions (JSON or SSE stream),
GET /health, GET / (web chat), GET /openapi.json and /docs. Reasoning models answer as DeepSeek's API
does: the chain of thought in `reasoning_content`, the answer in `content`, and `usage` counts
reasoning tokens and prompt-cache hits (KV really reused: nanoseek/infer/prefix_cache.py). Per request,
thinking on / off and its budget (thinking.py), a JSON answer (structured_output.py, guide.py) and tool calls
(tools.py).
With --api-key (or env NANOSEEK_API_KEY) every route but /health and the web chat's files wants
`Authorization: Bearer KEY`; without a key the server binds loopback only.
Bad input is a 4xx with OpenAI's error JSON, never a 500, and every limit (n, max_tokens, top_logprobs,
capacity; the prompt's length right after tokenizing) is checked before the engine sees the request.
The engine runs in one background thread for all requests (nanoseek/infer/engine_loop.py); headers, auth,
body size and the access log are nanoseek/infer/http_gate.py's.
"""
from __future__ import annotations

import asyncio
import contextlib
import functools
import ipaddress
import itertools
import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import torch
import uvicorn
from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from nanoseek.data.chat import THINK_END, THINK_START, ChatTemplateError, describe_template, opens_think
from nanoseek.errors import UsageError
from nanoseek.infer.api_schema import APIError, ChatRequest, CompletionRequest, error_body
from nanoseek.infer.engine import Engine
from nanoseek.infer.engine_loop import EngineLoop, Handle, follow
from nanoseek.infer.guide import OutputGuide
from nanoseek.infer.http_gate import Gate
from nanoseek.infer.sampling import SamplingParams
from nanoseek.infer.structured_output import JSONGrammars
from nanoseek.infer.thinking import Thinking, reasoning_and_answer, render_prompt, splitter, thinking_of
from nanoseek.infer.tools import ToolUse, call_grammar, tool_stream, tool_use_of, with_tool_calls
from nanoseek.hf.load import from_pretrained
from nanoseek.tokenizer import load_tokenizer

WEB = Path(__file__).parent / "web"
POSITIONAL = (("model", "model directory (HF layout, with the tokenizer)"),)


@dataclass
class Options:
    model: str = field(default="", metadata={"help": "model directory"})
    host: str = field(default="127.0.0.1", metadata={"help": "interface to bind (0.0.0.0 exposes it to the network)"})
    port: int = field(default=8000, metadata={"help": "TCP port"})
    api_key: str | None = field(default=None, metadata={"help": "require 'Authorization: Bearer KEY' on every route "
                                                                 "but /health and the web chat (default: env "
                                                                 "NANOSEEK_API_KEY, else no auth: loopback only)"})
    served_model_name: str | None = field(default=None, metadata={"help": "model id in the API (default: dir name)"})
    max_batch: int = field(default=16, metadata={"help": "max sequences decoding at once (engine cache rows)"})
    max_queue: int = field(default=64, metadata={"help": "max sequences waiting for a slot; more get 429"})
    max_len: int = field(default=0, metadata={"help": "context length, prompt + completion (0: the model's, <= 4096)"})
    request_timeout: float = field(default=600.0, metadata={"help": "seconds before a request is aborted (408)"})
    max_body_bytes: int = field(default=4 << 20, metadata={"help": "largest request body accepted (413 past it)"})
    max_header_bytes: int = field(default=16 << 10, metadata={"help": "largest total of request headers (431 past it)"})
    log_content: bool = field(default=False, metadata={"help": "also log request and response bodies (prompts and "
                                                               "completions); by default only metadata is logged"})
    prefix_cache_mb: float = field(default=256.0, metadata={"help": "memory for KV reused across requests that share "
                                                                     "a prompt prefix (0: no prefix cache)"})
    prefix_block: int = field(default=16, metadata={"help": "tokens per prefix-cache block"})
    shutdown_timeout: float = field(default=30.0, metadata={"help": "seconds in-flight requests get on shutdown"})
    device: str = field(default="auto", metadata={"help": "cpu, cuda or auto"})
    speculative: bool = field(default=False, metadata={"help": "MTP self-speculative decoding (models with MTP): the "
                                                                "same outputs, up to 2 tokens per forward; turns the "
                                                                "prefix cache off and refuses guided requests"})


# pydantic names the branch of a union it tried in an error's location ("str", "list[TextPart]",
# "function-after[...]"); the client's field path is the rest
_UNION_BRANCHES = {"str", "int", "float", "bool", "list", "dict"}


def _param_name(loc) -> str | None:
    names = [str(x) for x in loc
             if isinstance(x, int) or (x != "body" and x.isidentifier() and x not in _UNION_BRANCHES)]
    return ".".join(names) or None


def api_key_of(opts: Options) -> str | None:
    return opts.api_key or os.environ.get("NANOSEEK_API_KEY") or None


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve to any interface
        return False


def _uvicorn_limits(opts: Options) -> dict:
    """Headers past max_header_bytes get the Gate's 431; h11's own cap (far above it, a bound on what one
    connection may buffer) only stops the absurd, with uvicorn's 400."""
    return {"h11_max_incomplete_event_size": max(64 << 10, 4 * opts.max_header_bytes), "access_log": False,
            "timeout_graceful_shutdown": opts.shutdown_timeout}


def _sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


class Service:
    """Model, tokenizer, engine loop and options behind one app; builds OpenAI response pieces."""

    def __init__(self, opts: Options, model=None, tokenizer=None):
        device = opts.device if opts.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
        self.model = model if model is not None else from_pretrained(opts.model).to(device)
        self.tok = tokenizer if tokenizer is not None else load_tokenizer(opts.model)
        self.opts = opts
        self.name = opts.served_model_name or Path(opts.model.rstrip("/")).name or "nanoseek"
        self.max_len = opts.max_len or min(self.model.config.max_position_embeddings, 4096)
        self.api_key = api_key_of(opts)
        engine = Engine(self.model, self.tok, max_batch=opts.max_batch, max_len=self.max_len,
                        prefix_cache_bytes=int(opts.prefix_cache_mb * 2**20), prefix_block=opts.prefix_block,
                        speculative=opts.speculative)
        if opts.speculative and not engine.speculative:
            raise UsageError("--speculative needs a model with an MTP module (num_nextn_predict_layers >= 1)")
        self.loop = EngineLoop(engine, opts.max_queue)
        self.grammars = JSONGrammars(self.tok, self.model.config.vocab_size, engine.stop_ids)
        self.created = int(time.time())

    def check(self, req, max_tokens: int | None, sequences: int) -> None:
        """The limits that need no tokenizing, checked before any: model, n, max_tokens, capacity."""
        if req.model != self.name:
            raise APIError(404, f"the model '{req.model}' does not exist; this server serves '{self.name}'",
                           param="model", code="model_not_found")
        if req.n > self.opts.max_batch:
            raise APIError(400, f"n={req.n} exceeds the server's max_batch={self.opts.max_batch}", param="n")
        if max_tokens is not None and max_tokens >= self.max_len:  # could never fit; smaller ones are clamped
            raise APIError(400, f"max_tokens={max_tokens} exceeds the context length of {self.max_len} tokens",
                           param="max_tokens", code="context_length_exceeded")
        if sequences > self.opts.max_batch + self.opts.max_queue:
            raise APIError(400, f"{sequences} sequences (prompts x n) exceed what this server holds at once "
                           f"({self.opts.max_batch + self.opts.max_queue})", param="n")
        self.loop.check_room(sequences)  # 429 before tokenizing; submit() checks again

    def params(self, req, n_prompt: int, max_tokens: int | None, top_logprobs: int) -> SamplingParams:
        """The engine's sampling parameters, after check(): the prompt's length is the one limit left."""
        if n_prompt >= self.max_len:
            raise APIError(400, f"this model's maximum context length is {self.max_len} tokens; the prompt has "
                           f"{n_prompt}", param="messages", code="context_length_exceeded")
        room = self.max_len - n_prompt
        # a vanishing temperature overflows logits / t: it means greedy; any int is a seed (torch wants < 2**63)
        temperature = req.temperature if req.temperature >= 1e-4 else 0.0
        seed = None if req.seed is None else req.seed % 2**62
        return SamplingParams(temperature=temperature, top_p=req.top_p, top_k=req.top_k, min_p=req.min_p,
                              repetition_penalty=req.repetition_penalty, max_tokens=min(max_tokens or room, room),
                              stop=list(req.stop or []), seed=seed, top_logprobs=top_logprobs, n=req.n,
                              ignore_eos=req.ignore_eos)

    def guide(self, opened: bool, budget: int | None, response_format, tools: ToolUse):
        """The factory of each sequence's OutputGuide, or None when the request constrains nothing."""
        grammar = (self.grammars.lark_grammar(call_grammar(tools, self.tok), "tool_choice", "tool_choice")
                   if tools.forced else self.grammars.grammar(response_format))
        if grammar is None and (budget is None or not opened):
            return None
        answer = None if grammar is None else functools.partial(self.grammars.matcher, grammar)
        V, stops = self.model.config.vocab_size, self.loop.engine.stop_ids
        return functools.partial(OutputGuide, V, stops, self.tok, opened, budget if opened else None, answer)

    def reasoning_tokens(self, ids: list[int], text: str, opened: bool) -> int:
        """The tokens up to and including the one that completes `</think>`; all of them when the block never
        closed, none when the model did not think. `</think>` may be one token or several."""
        end = self.tok.think_end_id
        if end is not None and end in ids:
            return ids.index(end) + 1
        if THINK_END not in text:
            return len(ids) if opened or text.lstrip().startswith(THINK_START) else 0
        lo, hi = 1, len(ids)  # the shortest prefix whose text holds </think>
        while lo < hi:
            mid = (lo + hi) // 2
            lo, hi = (lo, mid) if THINK_END in self.tok.decode(ids[:mid]) else (mid + 1, hi)
        return lo

    def usage(self, handles: list[Handle], outputs: list, opened: bool, thought: bool = True) -> dict:
        """opened: the prompts ended inside an opened think block; thought: thinking was on."""
        prompt, hit = sum(len(h.prompt) for h in handles), sum(h.req.cached_tokens for h in handles)
        completion = sum(len(o.token_ids) for o in outputs)
        reasoning = sum(self.reasoning_tokens(o.token_ids, o.text, opened) for o in outputs) if thought else 0
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
                "prompt_cache_hit_tokens": hit, "prompt_cache_miss_tokens": prompt - hit,
                "prompt_tokens_details": {"cached_tokens": hit},
                "completion_tokens_details": {"reasoning_tokens": reasoning}}

    def chat_logprobs(self, ids: list[int], lps: list[float], tops: list[dict]) -> dict:
        def entry(t, lp):
            s = self.tok.decode([t])
            return {"token": s, "logprob": lp, "bytes": list(s.encode())}
        tops = list(tops) + [{}] * (len(ids) - len(tops))
        return {"content": [{**entry(t, lp), "top_logprobs": [entry(k, v) for k, v in top.items()]}
                            for t, lp, top in zip(ids, lps, tops)]}

    def legacy_logprobs(self, ids: list[int], lps: list[float], tops: list[dict], offset: int) -> dict:
        toks = [self.tok.decode([t]) for t in ids]
        offsets = list(itertools.accumulate([len(t) for t in toks], initial=offset))[:-1]
        return {"tokens": toks, "token_logprobs": lps, "text_offset": offsets,
                "top_logprobs": [{self.tok.decode([k]): v for k, v in d.items()} for d in tops] or None}


def create_app(opts: Options, model=None, tokenizer=None) -> FastAPI:
    svc = Service(opts, model, tokenizer)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        svc.loop.start()
        yield
        svc.loop.stop()  # uvicorn has already given in-flight requests `shutdown_timeout` to finish

    app = FastAPI(title="nanoseek", summary="OpenAI-compatible API of a nanoseek model", lifespan=lifespan)
    app.state.service = svc
    app.add_middleware(Gate, max_body=opts.max_body_bytes, max_headers=opts.max_header_bytes, api_key=svc.api_key,
                       log_content=opts.log_content)

    @app.exception_handler(APIError)
    async def _api_error(request, e: APIError):
        return JSONResponse(e.body(), e.status, headers=e.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, e: RequestValidationError):  # OpenAI's 400 shape, not FastAPI's 422
        err = e.errors()[0]
        if err.get("type") == "json_invalid":
            return JSONResponse(error_body(f"the body is not valid JSON: {err.get('ctx', {}).get('error', '')}",
                                           code="invalid_json"), 400)
        param = _param_name(err.get("loc", ()))
        return JSONResponse(error_body(f"{param or 'body'}: {err.get('msg', 'invalid value')}", param=param,
                                       code="invalid_value"), 400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request, e: StarletteHTTPException):
        return JSONResponse(error_body(str(e.detail), code=f"http_{e.status_code}"), e.status_code)

    @app.exception_handler(Exception)
    async def _crash(request, e: Exception):
        return JSONResponse(error_body(f"internal error: {type(e).__name__}", "server_error"), 500)

    def events(h: Handle, request: Request):
        return follow(h, svc.loop, request.receive, opts.request_timeout)

    async def collect(h: Handle, request: Request) -> list:
        async for kind, payload in events(h, request):
            if kind == "done":
                return payload.outputs
        raise APIError(400, "the client disconnected", code="client_disconnected")  # nobody reads this

    def sse(gen) -> StreamingResponse:
        async def body():
            try:
                async for part in gen:
                    yield part
            except APIError as e:  # headers are sent: mid-stream errors (timeout, shutdown) go in-band
                yield _sse(e.body())
            finally:
                await gen.aclose()  # a client that left cancels us here: abort its request now
            yield "data: [DONE]\n\n"
        return StreamingResponse(body(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    v1 = APIRouter(prefix="/v1")

    @v1.get("/models")
    async def models():
        return {"object": "list", "data": [await model_info(svc.name)]}

    @v1.get("/models/{model_id:path}")
    async def model_info(model_id: str):
        if model_id != svc.name:
            raise APIError(404, f"the model '{model_id}' does not exist", param="model", code="model_not_found")
        return {"id": svc.name, "object": "model", "created": svc.created, "owned_by": "nanoseek",
                "max_model_len": svc.max_len}

    @v1.post("/chat/completions")
    async def chat(req: ChatRequest, request: Request):
        if req.top_logprobs and not req.logprobs:
            raise APIError(400, "top_logprobs needs logprobs=true", param="top_logprobs")
        svc.check(req, req.max_completion_tokens or req.max_tokens, req.n)
        thinking, tools = thinking_of(req), tool_use_of(req, svc.grammars)
        try:
            prompt = render_prompt(svc.tok, req, thinking, tools.offered)
        except ChatTemplateError as e:  # the model's template refused the conversation (e.g. a role it lacks)
            raise APIError(400, str(e), param="messages", code="invalid_messages") from e
        opened, ids = opens_think(prompt), svc.tok.encode(prompt)
        params = svc.params(req, len(ids), req.max_completion_tokens or req.max_tokens, req.top_logprobs or 0)
        params.guide = svc.guide(opened, thinking.budget, req.response_format, tools)
        h = svc.loop.submit(ids, params)
        meta = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": svc.name,
                "system_fingerprint": None}
        if req.stream:
            return sse(stream_chat(h, req, meta, request, opened, thinking, tools))
        choices, outputs = [], await collect(h, request)
        for o in outputs:
            reasoning, answer = reasoning_and_answer(o.text, thinking, opened)
            message, finish = {"role": "assistant", "content": answer, "reasoning_content": reasoning}, o.finish_reason
            if tools.parse:
                message, finish = with_tool_calls(message, finish)
            choices.append({"index": o.index, "finish_reason": finish, "message": message,
                            "logprobs": svc.chat_logprobs(o.token_ids, o.logprobs, o.top_logprobs)
                            if req.logprobs else None})
        return {**meta, "object": "chat.completion", "choices": choices,
                "usage": svc.usage([h], outputs, opened, thinking.enabled)}

    async def stream_chat(h: Handle, req: ChatRequest, meta: dict, request: Request, opened: bool,
                          thinking: Thinking, tools: ToolUse):
        split = [splitter(thinking, opened) for _ in range(req.n)]
        calls = [tool_stream(tools) for _ in range(req.n)]
        unsent = [[] for _ in range(req.n)]  # token events not yet covered by a chunk's logprobs
        sent = [0] * req.n

        def chunk(i, delta, finish=None, logprobs=None):
            return _sse({**meta, "object": "chat.completion.chunk",
                         "choices": [{"index": i, "delta": delta, "logprobs": logprobs, "finish_reason": finish}]})
        for i in range(req.n):
            yield chunk(i, {"role": "assistant", "content": ""})
        async for kind, payload in events(h, request):
            if kind == "done":
                if req.stream_options and req.stream_options.include_usage:
                    yield _sse({**meta, "object": "chat.completion.chunk", "choices": [],
                                "usage": svc.usage([h], payload.outputs, opened, thinking.enabled)})
                return
            for ev in payload:
                i = ev.index
                if ev.token_id >= 0:
                    unsent[i].append(ev)
                reasoning, answer = split[i].feed(ev.text, final=ev.finished)
                content, tool_calls = calls[i].feed(answer, final=ev.finished)
                delta = {k: v for k, v in (("reasoning_content", reasoning), ("content", content),
                                           ("tool_calls", tool_calls)) if v}
                if delta:
                    lp = None
                    if req.logprobs:
                        toks = unsent[i]
                        lp = svc.chat_logprobs([e.token_id for e in toks], [e.logprob for e in toks],
                                               h.req.outputs[i].top_logprobs[sent[i]:sent[i] + len(toks)])
                        sent[i] += len(toks)
                    unsent[i] = []
                    yield chunk(i, delta, logprobs=lp)
                if ev.finished:
                    yield chunk(i, {}, finish=calls[i].finish_reason(ev.finish_reason))

    @v1.post("/completions")
    async def completions(req: CompletionRequest, request: Request):
        p = req.prompt
        prompts = [p] if isinstance(p, str) or (p and isinstance(p[0], int)) else list(p)
        if not prompts or any(len(x) == 0 for x in prompts):
            raise APIError(400, "prompt must not be empty", param="prompt")
        if req.stream and len(prompts) > 1:
            raise APIError(400, "streaming takes a single prompt", param="prompt")
        svc.check(req, req.max_tokens, len(prompts) * req.n)
        ids = [svc.tok.encode(x) if isinstance(x, str) else list(x) for x in prompts]
        V = svc.model.config.vocab_size
        if any(not 0 <= t < V for x in ids for t in x):
            raise APIError(400, f"prompt token ids must be in [0, {V})", param="prompt")
        params = [svc.params(req, len(x), req.max_tokens or 16, req.logprobs or 0) for x in ids]
        handles = []
        try:
            for x, sp in zip(ids, params):
                handles.append(svc.loop.submit(x, sp))
        except APIError:
            for h in handles:
                svc.loop.abort(h)
            raise
        meta = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": svc.name}
        texts = [x if isinstance(x, str) else svc.tok.decode(x) for x in prompts]
        echo = texts if req.echo else [""] * len(ids)
        opened = all(map(opens_think, texts))  # for the usage's reasoning tokens
        if req.stream:
            return sse(stream_completion(handles[0], req, meta, request, echo[0], opened))
        results = await asyncio.gather(*(collect(h, request) for h in handles))
        choices = [{"index": i * req.n + o.index, "text": echo[i] + o.text, "finish_reason": o.finish_reason,
                    "logprobs": svc.legacy_logprobs(o.token_ids, o.logprobs, o.top_logprobs, len(echo[i]))
                    if req.logprobs is not None else None}
                   for i, outs in enumerate(results) for o in outs]
        return {**meta, "choices": choices, "usage": svc.usage(handles, [o for r in results for o in r], opened)}

    async def stream_completion(h: Handle, req: CompletionRequest, meta: dict, request: Request, echo: str,
                                opened: bool):
        def chunk(i, text, finish=None, logprobs=None):
            return _sse({**meta, "choices": [{"index": i, "text": text, "logprobs": logprobs,
                                              "finish_reason": finish}]})
        for i in range(req.n if echo else 0):
            yield chunk(i, echo)
        async for kind, payload in events(h, request):
            if kind == "done":
                if req.stream_options and req.stream_options.include_usage:
                    yield _sse({**meta, "choices": [], "usage": svc.usage([h], payload.outputs, opened)})
                return
            for ev in payload:
                if ev.text or ev.finished:
                    lp = (svc.legacy_logprobs([ev.token_id], [ev.logprob], [], 0)
                          if req.logprobs is not None and ev.token_id >= 0 else None)
                    yield chunk(ev.index, ev.text, ev.finish_reason if ev.finished else None, lp)

    app.include_router(v1)

    @app.get("/health")
    async def health():
        if svc.loop.dead:  # a load balancer must see this server as down
            return JSONResponse({"status": "engine_dead", "model": svc.name, **svc.loop.load()}, 503)
        return {"status": "closing" if svc.loop.closing else "ok", "model": svc.name, **svc.loop.load()}

    @app.get("/metrics", include_in_schema=False)
    async def metrics():  # Prometheus' text format: load, tokens/s, MTP acceptance
        return PlainTextResponse(svc.loop.metrics(), media_type="text/plain; version=0.0.4")

    @app.get("/", include_in_schema=False)
    async def index():
        return FileResponse(WEB / "index.html")

    app.mount("/web", StaticFiles(directory=WEB), name="web")
    return app


class BackgroundServer:
    """The server in a thread on a free 127.0.0.1 port: `with BackgroundServer(opts) as s: s.url`.
    For tests, benchmarks and notebooks; `nanoseek serve` runs uvicorn in the foreground instead."""

    def __init__(self, opts: Options, model=None, tokenizer=None):
        self.app = create_app(opts, model, tokenizer)
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(self.app, log_level="warning", **_uvicorn_limits(opts)))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    @property
    def service(self) -> Service:
        return self.app.state.service

    def __enter__(self) -> "BackgroundServer":
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=(self.server.config.timeout_graceful_shutdown or 30) + 15)
        self.sock.close()


def run(opts: Options) -> None:
    if not _is_loopback(opts.host) and not api_key_of(opts):
        raise UsageError(f"refusing to serve on {opts.host!r} without an API key: anyone who can reach it could use "
                         "it; pass --api-key KEY (or set NANOSEEK_API_KEY), or bind --host 127.0.0.1")
    if not opts.model or not Path(opts.model).is_dir():
        raise SystemExit(f"error: give a model directory: nanoseek serve MODEL_DIR (got {opts.model!r})")
    handler = logging.StreamHandler()  # the access log: metadata only, unless --log-content
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s: %(message)s"))
    logging.getLogger("nanoseek.server").addHandler(handler)
    logging.getLogger("nanoseek.server").setLevel(logging.INFO)
    app = create_app(opts)
    svc = app.state.service
    print(f"nanoseek: serving '{svc.name}' (context {svc.max_len}, batch {opts.max_batch}"
          + (", MTP speculation" if opts.speculative else "") + ") on "
          f"http://{opts.host}:{opts.port}   web chat: /   API: /v1   docs: /docs"
          + ("   (API key required)" if svc.api_key else ""), flush=True)
    if svc.tok.chat_template is not None:
        print(f"nanoseek: chat completions use {describe_template(svc.tok)}", flush=True)
    else:
        print("nanoseek: this model has no chat template: /v1/chat/completions answers 400, /v1/completions works",
              flush=True)
    uvicorn.run(app, host=opts.host, port=opts.port, log_level="info", **_uvicorn_limits(opts))
