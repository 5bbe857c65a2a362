"""What every HTTP request of `nanoseek serve` passes first, before routing or JSON parsing.

In order: the header-size limit (431), the API key (401), the body-size limit (413). Then, on the way
out: security headers (a strict Content-Security-Policy on the web chat) and one access-log line of
metadata: method, path, status, bytes in and out, latency. Prompt and completion text reach the log
only when the operator asks for it (--log-content); headers (the API key among them) never do.
"""
from __future__ import annotations

import hmac
import logging
import time

from fastapi.responses import JSONResponse

from nanoseek.infer.api_schema import error_body

log = logging.getLogger("nanoseek.server")

# The web chat's scripts, styles and API calls come from this server only; model output is never markup
# (app.js escapes it), and this policy is the second line: no inline script, no remote image or link target.
WEB_CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
           "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
CONTENT_LOG_LIMIT = 64 << 10  # characters of each body that --log-content keeps


def is_public(path: str) -> bool:
    """The routes that need no API key: /health and the web chat's page and static files. Everything else,
    whatever its spelling (//v1, /V1, /%2Fv1: uvicorn decodes %2F), is behind the key, so no variant of a
    /v1 path can slip past the check on its way to a route."""
    if path in ("/", "/health"):
        return True
    return path.startswith("/web/") and ".." not in path.split("/") and "//" not in path


def _response(status: int, message: str, code: str):
    return JSONResponse(error_body(message, code=code), status)


class Gate:
    """ASGI middleware run before any parsing. The body (at most `max_body` bytes) is buffered, then
    replayed to the app; after it, the app's `receive` is the connection's own (it reports a disconnect)."""

    def __init__(self, app, max_body: int, max_headers: int, api_key: str | None, log_content: bool = False):
        self.app, self.max_body, self.max_headers, self.key = app, max_body, max_headers, api_key
        self.log_content = log_content

    def refusal(self, scope, headers: dict):
        """The 431/401 a request gets before its body is read, or None."""
        size = sum(len(k) + len(v) for k, v in scope["headers"])
        if size > self.max_headers:
            return _response(431, f"request headers exceed {self.max_headers} bytes", "headers_too_large")
        if self.key and not is_public(scope["path"]):
            auth = headers.get(b"authorization", b"")
            sent = auth[7:].strip() if auth[:7].lower() == b"bearer " else b""
            if not hmac.compare_digest(sent, self.key.encode()):  # constant time: the key is not guessable by timing
                return _response(401, "invalid or missing API key: send the header 'Authorization: Bearer KEY'",
                                 "invalid_api_key")
        return None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started, path = time.perf_counter(), scope["path"]
        out = {"status": 0, "bytes": 0, "body": []}

        async def send_logged(msg):
            if msg["type"] == "http.response.start":
                out["status"] = msg["status"]
                extra = [(b"x-content-type-options", b"nosniff"), (b"referrer-policy", b"no-referrer")]
                if path == "/" or path.startswith("/web/"):
                    extra.append((b"content-security-policy", WEB_CSP.encode()))
                msg = {**msg, "headers": list(msg.get("headers", [])) + extra}
            elif msg["type"] == "http.response.body":
                out["bytes"] += len(msg.get("body", b""))
                if self.log_content:
                    out["body"].append(msg.get("body", b""))
            await send(msg)

        body = b""
        try:
            headers = dict(scope["headers"])
            refusal = self.refusal(scope, headers)
            if refusal is None:
                body, refusal = await self._read_body(headers, scope["method"], receive)
            if refusal is not None:
                return await refusal(scope, receive, send_logged)
            if body is None:  # the client left while sending
                return
            replayed = False

            async def replay():  # the buffered body once, then the real channel (it reports disconnects)
                nonlocal replayed
                if not replayed:
                    replayed = True
                    return {"type": "http.request", "body": body, "more_body": False}
                return await receive()
            await self.app(scope, replay, send_logged)
        finally:
            ms = (time.perf_counter() - started) * 1e3
            log.info("%s %s %s in=%dB out=%dB %.1fms", scope["method"], path, out["status"] or "-", len(body or b""),
                     out["bytes"], ms)
            if self.log_content:
                for name, raw in (("request", body or b""), ("response", b"".join(out["body"]))):
                    log.info("%s %s %s body: %s", scope["method"], path, name,
                             raw.decode("utf-8", "replace")[:CONTENT_LOG_LIMIT])

    async def _read_body(self, headers: dict, method: str, receive):
        """(body, None), (None, None) when the client left, or (partial body, 413 response)."""
        declared = headers.get(b"content-length", b"")
        too_big = declared.isdigit() and int(declared) > self.max_body
        chunks, size, more = [], 0, not too_big and method in ("POST", "PUT", "PATCH")
        while more:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                return None, None
            chunks.append(msg.get("body", b""))
            size += len(chunks[-1])
            too_big, more = size > self.max_body, msg.get("more_body", False) and size <= self.max_body
        body = b"".join(chunks)
        if too_big:
            return body, _response(413, f"request body exceeds {self.max_body} bytes", "request_too_large")
        return body, None
