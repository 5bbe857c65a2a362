// nanoseek web chat: streams /v1/chat/completions (SSE) and shows the reasoning in a collapsible block.
// Model output is never inserted as HTML: it is escaped first, then a tiny markdown subset adds fixed tags.
// With the calculator tool on, the model may call it: the page shows each call, computes it (a small
// arithmetic parser, never eval) and sends the result back, for a few rounds per question.
"use strict";
const $ = (id) => document.getElementById(id);
const chat = { messages: [], model: null, maxLen: Infinity, controller: null };
const MAX_TOOL_ROUNDS = 3;  // calls answered per question before the page stops asking
const CALCULATOR = { type: "function", function: { name: "calculator", description: "Evaluate an arithmetic expression",
  parameters: { type: "object", properties: { expression: { type: "string" } }, required: ["expression"] } } };

for (const id of ["temperature", "max-tokens", "api-key"]) {  // settings survive a reload
  const saved = localStorage.getItem("nanoseek." + id);
  if (saved !== null) $(id).value = saved;
  $(id).addEventListener("change", () => localStorage.setItem("nanoseek." + id, $(id).value));
}
$("tools").checked = localStorage.getItem("nanoseek.tools") === "on";
$("tools").addEventListener("change", () => localStorage.setItem("nanoseek.tools", $("tools").checked ? "on" : "off"));

function calculate(expression) {  // + - * / ^, parentheses, unary minus; a string result or an error message
  const tokens = expression.match(/\d+(?:\.\d+)?|[-+*/^()]|\S/g) || [];
  let i = 0;
  const peek = () => tokens[i], next = () => tokens[i++];
  const atom = () => {
    const t = next();
    if (t === "(") { const v = sum(); if (next() !== ")") throw new Error("missing )"); return v; }
    if (t !== undefined && /^\d/.test(t)) return Number(t);
    throw new Error("unexpected " + (t ?? "end"));
  };
  const power = () => { const b = atom(); return peek() === "^" ? (next(), b ** unary()) : b; };
  const unary = () => (peek() === "-" ? (next(), -unary()) : power());  // -2^2 is -(2^2)
  const product = () => {
    let v = unary();
    while (peek() === "*" || peek() === "/") v = next() === "*" ? v * unary() : v / unary();
    return v;
  };
  const sum = () => {
    let v = product();
    while (peek() === "+" || peek() === "-") v = next() === "+" ? v + product() : v - product();
    return v;
  };
  try {
    const v = sum();
    if (i < tokens.length) throw new Error("unexpected " + tokens[i]);
    return String(v);
  } catch (e) { return "error: " + e.message; }
}

function runTool(call) {
  if (call.function.name !== "calculator") return "error: no tool named " + call.function.name;
  try { return calculate(String(JSON.parse(call.function.arguments).expression ?? "")); }
  catch { return "error: the arguments are not JSON"; }
}

function headers() {
  const h = { "Content-Type": "application/json" };
  if ($("api-key").value) h.Authorization = "Bearer " + $("api-key").value;
  return h;
}

function escapeHtml(s) {
  return s.replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" }[c]));
}

function inline(s) {  // s is raw text; code spans are cut out first so their content stays literal
  return s.split(/(`[^`\n]+`)/).map((part, i) => {
    if (i % 2) return "<code>" + escapeHtml(part.slice(1, -1)) + "</code>";
    return escapeHtml(part)
      .replace(/\*\*([^*\n]+)\*\*/g, "<strong>$1</strong>")
      .replace(/(^|[\s(])\*([^*\s][^*\n]*)\*/g, "$1<em>$2</em>");
  }).join("");
}

function blocks(text) {  // headings, bullet / numbered lists, paragraphs
  let html = "", list = null;
  const close = () => { if (list) { html += `</${list}>`; list = null; } };
  for (const para of text.split(/\n{2,}/)) {
    const lines = para.split("\n").filter((l) => l.trim());
    let plain = [];
    const flush = () => { if (plain.length) { close(); html += "<p>" + plain.map(inline).join("<br>") + "</p>"; plain = []; } };
    for (const line of lines) {
      const h = line.match(/^(#{1,6})\s+(.*)/), ul = line.match(/^\s*[-*]\s+(.*)/), ol = line.match(/^\s*\d+[.)]\s+(.*)/);
      if (h) { flush(); close(); const n = h[1].length; html += `<h${n}>${inline(h[2])}</h${n}>`; }
      else if (ul || ol) {
        flush();
        const kind = ul ? "ul" : "ol";
        if (list !== kind) { close(); html += `<${kind}>`; list = kind; }
        html += "<li>" + inline((ul || ol)[1]) + "</li>";
      } else plain.push(line);
    }
    flush();
    close();
  }
  return html;
}

function renderMarkdown(src) {  // ``` fences split the text; odd parts are code
  return src.split("```").map((part, i) => {
    if (i % 2 === 0) return blocks(part);
    const nl = part.indexOf("\n");
    const code = nl >= 0 && /^[\w+#.-]*$/.test(part.slice(0, nl)) ? part.slice(nl + 1) : part;
    return "<pre><code>" + escapeHtml(code.replace(/\n$/, "")) + "</code></pre>";
  }).join("");
}

function addMessage(role, text) {
  const div = document.createElement("div");
  div.className = "msg " + role;
  if (role === "user") div.textContent = text;
  $("log").appendChild(div);
  div.scrollIntoView({ block: "end" });
  return div;
}

function assistantView() {
  const div = addMessage("assistant");
  div.innerHTML = '<details class="thinking" open hidden><summary>Thinking…</summary><div class="reasoning"></div></details>' +
    '<div class="content"></div><div class="meta"><button type="button" class="copy">Copy</button><span class="stats"></span></div>';
  const view = { div, thinking: div.querySelector(".thinking"), reasoning: div.querySelector(".reasoning"),
    content: div.querySelector(".content"), stats: div.querySelector(".stats"), reasoningText: "", text: "",
    calls: [], callViews: [] };
  div.querySelector(".copy").addEventListener("click", async (e) => {
    try { await navigator.clipboard.writeText(view.text); e.target.textContent = "Copied"; }
    catch { e.target.textContent = "Copy failed"; }
    setTimeout(() => { e.target.textContent = "Copy"; }, 1200);
  });
  return view;
}

async function* sseEvents(response) {  // yields the parsed JSON of each `data:` line
  const reader = response.body.getReader(), decoder = new TextDecoder();
  let buf = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buf += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buf.indexOf("\n\n")) >= 0) {
      const event = buf.slice(0, cut);
      buf = buf.slice(cut + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data: ")) continue;
        if (line === "data: [DONE]") return;
        yield JSON.parse(line.slice(6));
      }
    }
  }
}

function setBusy(busy) {
  $("send").hidden = busy;
  $("stop").hidden = !busy;
}

function showCall(view, delta) {  // a streamed tool-call delta: the first names the call, the rest add arguments
  if (delta.id) {
    view.calls[delta.index] = { id: delta.id, type: "function", function: { name: delta.function.name, arguments: "" } };
    const box = document.createElement("div");
    box.className = "tool-call";
    box.innerHTML = '<span class="call"></span><div class="result"></div>';
    view.content.before(box);
    view.callViews[delta.index] = box;
  }
  const call = view.calls[delta.index];
  call.function.arguments += delta.function?.arguments || "";
  view.callViews[delta.index].querySelector(".call").textContent = `${call.function.name}(${call.function.arguments})`;
}

async function reply(view, started) {  // one streamed answer into `view`; its finish reason
  let usage = null, firstAnswer = null, finish = null;
  const body = { model: chat.model, messages: chat.messages, stream: true, stream_options: { include_usage: true },
    temperature: Number($("temperature").value),
    max_tokens: Math.min(Number($("max-tokens").value), chat.maxLen - 1) };  // the server clamps to the room left
  if ($("tools").checked) body.tools = [CALCULATOR];
  const r = await fetch("/v1/chat/completions", { method: "POST", headers: headers(), body: JSON.stringify(body),
    signal: chat.controller.signal });
  if (!r.ok) throw new Error((await r.json().catch(() => ({}))).error?.message || r.statusText);
  for await (const ev of sseEvents(r)) {
    if (ev.error) throw new Error(ev.error.message);
    if (ev.usage) usage = ev.usage;
    const choice = ev.choices?.[0], delta = choice?.delta || {};
    finish = choice?.finish_reason || finish;
    if (delta.reasoning_content) {
      view.thinking.hidden = false;
      view.reasoningText += delta.reasoning_content;
      view.reasoning.textContent = view.reasoningText;  // plain text: never parsed as HTML
    }
    if (delta.content) {
      if (firstAnswer === null) firstAnswer = performance.now();
      view.text += delta.content;
      view.content.innerHTML = renderMarkdown(view.text);  // escaped by renderMarkdown
    }
    for (const d of delta.tool_calls || []) {
      if (firstAnswer === null) firstAnswer = performance.now();
      showCall(view, d);
    }
    view.div.scrollIntoView({ block: "end" });
  }
  const secs = ((firstAnswer || performance.now()) - started) / 1000;
  view.thinking.querySelector("summary").textContent = `Thought for ${secs.toFixed(1)} s`;
  if (view.text || view.calls.length) view.thinking.open = false;
  if (usage) {
    const rate = usage.completion_tokens / ((performance.now() - started) / 1000);
    view.stats.textContent = `${usage.completion_tokens} tokens (${usage.completion_tokens_details?.reasoning_tokens ?? 0} ` +
      `thinking) · ${rate.toFixed(0)} tok/s · cache hit ${usage.prompt_cache_hit_tokens ?? 0}/${usage.prompt_tokens}`;
  }
  return finish;
}

async function send(text) {
  chat.messages.push({ role: "user", content: text });
  addMessage("user", text);
  chat.controller = new AbortController();
  setBusy(true);
  try {
    for (let round = 0; ; round++) {
      const view = assistantView();
      let finish;
      try { finish = await reply(view, performance.now()); }
      catch (e) {
        if (e.name !== "AbortError") { view.div.classList.add("error"); view.content.textContent = "Error: " + e.message; }
        else view.stats.textContent = "stopped";
        chat.messages.push({ role: "assistant", content: view.text });
        return;
      }
      if (finish !== "tool_calls" || !view.calls.length) {
        chat.messages.push({ role: "assistant", content: view.text });  // earlier reasoning is not sent back, as in R1
        return;
      }
      // within a tool-calling turn the reasoning goes back with the calls (the server's rule, as DeepSeek's API)
      chat.messages.push({ role: "assistant", content: view.text || null, reasoning_content: view.reasoningText,
        tool_calls: view.calls });
      view.calls.forEach((call, k) => {
        const result = runTool(call);
        view.callViews[k].querySelector(".result").textContent = "→ " + result;
        chat.messages.push({ role: "tool", tool_call_id: call.id, content: result });
      });
      if (round + 1 >= MAX_TOOL_ROUNDS) {
        const note = document.createElement("div");
        note.className = "tool-note";
        note.textContent = `stopped after ${MAX_TOOL_ROUNDS} rounds of tool calls`;
        view.div.appendChild(note);
        return;
      }
    }
  } finally {
    setBusy(false);
    chat.controller = null;
  }
}

$("composer").addEventListener("submit", (e) => {
  e.preventDefault();
  const text = $("input").value.trim();
  if (!text || chat.controller || !chat.model) return;
  $("input").value = "";
  send(text);
});
$("input").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); $("composer").requestSubmit(); }
});
$("stop").addEventListener("click", () => chat.controller?.abort());
$("clear").addEventListener("click", () => { chat.controller?.abort(); chat.messages = []; $("log").textContent = ""; });

async function connect() {
  try {
    const r = await fetch("/v1/models", { headers: headers() });
    const data = await r.json();
    if (!r.ok) throw new Error(data.error?.message || r.statusText);
    chat.model = data.data[0].id;
    chat.maxLen = data.data[0].max_model_len || Infinity;
    $("model").textContent = `${chat.model} · context ${data.data[0].max_model_len ?? "?"}`;
  } catch (e) {
    $("model").textContent = "not connected: " + e.message + " (set the API key in Settings)";
    setTimeout(connect, 3000);
  }
}
$("api-key").addEventListener("change", connect);
connect();
