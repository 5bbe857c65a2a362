"""The web chat at /: headless Chromium sends a message, sees the streamed answer and the thinking block,
and the model's `<img onerror>` / `<script>` text renders as text (no markup injection). Saves the
screenshot (docs/web-chat.png when NANOSEEK_UPDATE_SCREENSHOT=1). Needs Debian's Chromium (`apt-get install chromium`); skipped without it."""
import http.server
import json
import os
import threading
from pathlib import Path

import pytest

from test_server import ANSWER, REASONING, build_model_dir

from nanoseek.infer.server import BackgroundServer, Options

CHROMIUM = "/usr/bin/chromium"
# The docs screenshot is refreshed only on request, so a test run leaves the checkout clean.
DOCS_SHOT = Path(__file__).resolve().parents[1] / "docs" / "web-chat.png"
pytestmark = [pytest.mark.browser, pytest.mark.skipif(not os.path.exists(CHROMIUM),
                                                     reason=f"no browser at {CHROMIUM}: apt-get install chromium")]


def wait_for_model_name(page, name):
    """Wait until the page has read /v1/models. A locator wait, not `wait_for_function`: Playwright polls a
    string predicate with eval inside the page, which the page's strict CSP (no 'unsafe-eval') refuses."""
    page.locator("#model", has_text=name).wait_for(timeout=20_000)


def test_web_chat_streams_thinking_and_escapes_html(tmp_path):
    playwright = pytest.importorskip("playwright.sync_api")
    model = build_model_dir(tmp_path / "model")
    opts = Options(model=model, served_model_name="nanoseek-tiny", max_len=256, shutdown_timeout=2)
    with BackgroundServer(opts) as server, playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--disable-sync"])
        try:
            page = browser.new_page(viewport={"width": 900, "height": 640})
            errors = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.on("dialog", lambda d: (errors.append("dialog: " + d.message), d.dismiss()))
            page.goto(server.url + "/")
            wait_for_model_name(page, "nanoseek-tiny")
            page.click("#settings summary")
            page.fill("#temperature", "0")
            page.click("#settings summary")
            page.fill("#input", "What is 1 + 2? Show **work**.")
            page.press("#input", "Enter")
            answer = page.locator(".msg.assistant .content")
            answer.get_by_text("or<script>boom()").wait_for(timeout=20_000)  # the streamed answer, as text
            page.wait_for_selector("#send:not([hidden])")  # the stream ended

            assert page.locator(".msg.user").inner_text() == "What is 1 + 2? Show **work**."
            thinking = page.locator(".msg.assistant .thinking")
            assert thinking.is_visible() and thinking.locator(".reasoning").text_content() == REASONING
            assert "Thought for" in thinking.locator("summary").inner_text()
            # markdown renders, the injection does not: no <img>/<script> element, the text is shown verbatim
            assert answer.locator("strong").inner_text() == "world" and answer.locator("code").inner_text() == "x"
            assert answer.locator("img, script").count() == 0
            assert answer.inner_text().strip() == ANSWER.replace("**", "").replace("`", "")
            assert page.evaluate("typeof window.boom") == "undefined" and not errors
            assert "tokens" in page.locator(".msg.assistant .stats").inner_text()
            assert page.locator("#stop").is_hidden() and page.locator(".msg.assistant .copy").is_visible()

            page.fill("#input", "And 2 + 2?")  # a second turn: the shared history is a prompt-cache hit
            page.press("#input", "Enter")
            page.locator(".msg.assistant").nth(1).locator(".stats").get_by_text("tokens").wait_for(timeout=20_000)
            hit = page.locator(".msg.assistant .stats").nth(1).inner_text().split("cache hit ")[1].split("/")[0]
            assert int(hit) > 10
            page.locator(".msg.assistant .thinking summary").first.click()  # show the reasoning in the screenshot
            shot = DOCS_SHOT if os.environ.get("NANOSEEK_UPDATE_SCREENSHOT") else tmp_path / "web-chat.png"
            page.screenshot(path=str(shot))
        finally:
            browser.close()


def test_web_chat_shows_tool_calls_and_sends_the_results_back(tmp_path):
    """With the calculator tool on, a model that calls it: the page shows the call as it streams, computes it
    and sends the result back with the turn's reasoning, and stops after its limit of rounds (this model calls
    again every time). The call's text is shown as text."""
    playwright = pytest.importorskip("playwright.sync_api")
    from test_server_tools import ARGS, tool_model_dir
    opts = Options(model=tool_model_dir(tmp_path / "model"), served_model_name="tools", max_len=1024,
                   shutdown_timeout=2)
    with BackgroundServer(opts) as server, playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--headless", "--no-sandbox", "--disable-gpu"])
        try:
            page = browser.new_page()
            errors, bodies = [], []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.on("request", lambda r: r.method == "POST" and bodies.append(json.loads(r.post_data)))
            page.goto(server.url + "/")
            wait_for_model_name(page, "tools")
            page.click("#settings summary")
            page.fill("#temperature", "0")
            page.check("#tools")
            page.click("#settings summary")
            page.fill("#input", "What is 1 + 2?")
            page.press("#input", "Enter")
            page.locator(".tool-note").wait_for(timeout=30_000)
            page.wait_for_selector("#send:not([hidden])")
            calls = page.locator(".msg.assistant .tool-call")
            assert calls.count() == 3 and not errors
            assert calls.first.locator(".call").inner_text() == f"calculator({ARGS})"
            assert calls.first.locator(".result").inner_text() == "→ 3"
            assert page.locator(".msg.assistant .reasoning").first.text_content() == REASONING
            assert all(b["tools"][0]["function"]["name"] == "calculator" for b in bodies) and len(bodies) == 3
            assistant, result = bodies[1]["messages"][1:]
            assert assistant["tool_calls"][0]["function"] == {"name": "calculator", "arguments": ARGS}
            assert assistant["reasoning_content"] == REASONING  # within the tool turn it goes back
            assert result == {"role": "tool", "tool_call_id": assistant["tool_calls"][0]["id"], "content": "3"}
        finally:
            browser.close()


def test_web_chat_on_a_model_transformers_made(tmp_path):
    """A Qwen2 checkpoint with a ChatML tokenizer (no think block): the reply streams in as content, no thinking
    block shows, and a second turn renders through the model's own template."""
    playwright = pytest.importorskip("playwright.sync_api")
    from test_foreign_model import save_model
    model = save_model(tmp_path / "qwen", "qwen25_chatml", "qwen2")
    opts = Options(model=str(model), served_model_name="my-qwen", max_len=256, shutdown_timeout=2)
    with BackgroundServer(opts) as server, playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--headless", "--no-sandbox", "--disable-gpu"])
        try:
            page = browser.new_page()
            errors = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(server.url + "/")
            wait_for_model_name(page, "my-qwen")
            page.click("#settings summary")
            page.fill("#max-tokens", "24")  # two turns of a random model's text fit the 256-token context
            page.click("#settings summary")
            for turn, text in enumerate(["What is 1 + 2?", "And 2 + 2?"]):
                page.fill("#input", text)
                page.press("#input", "Enter")
                page.locator(".msg.assistant").nth(turn).locator(".stats").get_by_text("tokens").wait_for(timeout=30_000)
                reply = page.locator(".msg.assistant").nth(turn)
                assert reply.locator(".content").inner_text().strip()  # the random model's text, all of it answer
                assert reply.locator(".thinking").is_hidden()
            assert page.locator(".msg.user").nth(1).inner_text() == "And 2 + 2?" and not errors
        finally:
            browser.close()


class _Recorder(http.server.BaseHTTPRequestHandler):
    """A second origin on loopback: any request the page makes to it is a fetch the page must not make."""
    hits: list = []

    def do_GET(self):
        self.hits.append(self.path)
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args):  # quiet
        pass


def hostile_pieces(port: int) -> tuple[str, ...]:
    return ("<script>boom()</script>", f" <img src=http://127.0.0.1:{port}/a.png onerror=alert(1)>",
            " [tap](javascript:steal())", f" ![pic](//127.0.0.1:{port}/b.gif)", ' <a href="javascript:void(0)">go</a>',
            f' <svg onload=alert(2)><image href="http://127.0.0.1:{port}/c.svg"/></svg>')


def test_web_chat_runs_and_fetches_nothing_a_model_writes(tmp_path):
    """A model whose answer is script tags, onerror/onload handlers, javascript: links and remote images: the
    page shows it as text; nothing runs (no dialog, no page error, no global it defines), and no request
    leaves for the other origin the answer points at. The server sends a strict CSP header."""
    playwright = pytest.importorskip("playwright.sync_api")
    recorder = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Recorder)
    threading.Thread(target=recorder.serve_forever, daemon=True).start()
    pieces = hostile_pieces(recorder.server_address[1])
    model = build_model_dir(tmp_path / "model", answer="".join(pieces), pieces=pieces)
    opts = Options(model=model, served_model_name="stub", max_len=256, shutdown_timeout=2)
    try:
        with BackgroundServer(opts) as server, playwright.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=["--headless", "--no-sandbox", "--disable-gpu"])
            try:
                page = browser.new_page()
                errors, requests = [], []
                page.on("pageerror", lambda e: errors.append(str(e)))
                page.on("dialog", lambda d: (errors.append("dialog: " + d.message), d.dismiss()))
                page.on("request", lambda r: requests.append(r.url))
                response = page.goto(server.url + "/")
                assert "default-src 'none'" in response.headers["content-security-policy"]
                wait_for_model_name(page, "stub")
                page.click("#settings summary")
                page.fill("#temperature", "0")
                page.click("#settings summary")
                page.fill("#input", "hi")
                page.press("#input", "Enter")
                answer = page.locator(".msg.assistant .content")
                answer.get_by_text("javascript:void(0)", exact=False).wait_for(timeout=20_000)
                page.wait_for_selector("#send:not([hidden])")  # the stream ended
                shown = answer.inner_text()
                assert all(piece.strip() in shown for piece in pieces)  # the model's text, verbatim
                assert answer.locator("script, img, a, svg, image, iframe").count() == 0
                assert page.evaluate("typeof window.boom + typeof window.steal") == "undefinedundefined"
                assert not errors and not _Recorder.hits
                assert all(u.startswith(server.url) for u in requests), requests
            finally:
                browser.close()
    finally:
        recorder.shutdown()
        recorder.server_close()
