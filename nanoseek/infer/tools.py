"""Tool calls in chat requests: the tools the template offers, the grammar that forces a call, the history as
the template sees it, and `tool_calls` in responses and streamed deltas (DeepSeek-V3's format, parsed by
nanoseek/data/tool_calls.py).

tool_choice (the default is auto when there are tools):
  auto      the template offers the tools and the model may call them; its calls are parsed out of the answer.
            Nothing is forced, so a model that writes a malformed call gets it dropped (as the parser says).
  none      the tools are not offered and nothing is parsed: the answer is all content.
  required  the answer, after the reasoning (which stays the model's own), is a block of calls, enforced by an
            llguidance grammar in which each call's arguments follow its tool's JSON schema, so they always
            parse and validate; one call, or one or more when parallel_tool_calls is true.
  named     {"type": "function", "function": {"name": N}}: the same, one call to N.

reasoning_content in the history: the assistant messages after the last user message (the tool-calling turn
in progress: calls, their results, the answer) are rendered with the reasoning_content the client sends back,
so the model goes on with the chain of thought that chose the call (what DeepSeek's API requires within a
tool-calling turn; Qwen3's and DeepSeek-V3.1's templates render it the same way). A client that leaves it out
is not refused: the turn renders with an empty think block. Reasoning of earlier turns is dropped, as before.
"""
from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field

from nanoseek.data.tool_calls import (ARGS_CLOSE, ARGS_OPEN, CALL_BEGIN, CALL_END, CALLS_BEGIN, CALLS_END, SEP,
                                      ToolCallParser, parse_tool_calls)
from nanoseek.infer.api_schema import APIError, FunctionSpec, NamedToolChoice
from nanoseek.infer.structured_output import COMPACT


@dataclass
class ToolUse:
    """What a chat request does with tools."""
    offered: list[dict] | None = None      # the tools the template gets, in OpenAI's shape (None: no tools)
    parse: bool = False                    # read tool calls out of the answer
    forced: list[FunctionSpec] = field(default_factory=list)  # required / named: a call must be to one of these
    parallel: bool = True                  # a forced answer may hold several calls


def tool_use_of(req, grammars) -> ToolUse:
    """The request's tools and tool_choice, their schemas checked (400 naming the tool's parameters)."""
    tools = req.tools or []
    for i, tool in enumerate(tools):
        where = f"tools.{i}.function.parameters"
        grammars.schema_grammar(tool.function.parameters, where, where)
    choice = req.tool_choice or "auto"
    if not tools or choice == "none":
        return ToolUse()
    offered = [t.model_dump(exclude_none=True) for t in tools]
    if choice == "auto":
        return ToolUse(offered, parse=True)
    if req.response_format is not None and req.response_format.type != "text":
        raise APIError(400, "response_format cannot constrain an answer that tool_choice makes a tool call",
                       param="response_format")
    named = choice.function.name if isinstance(choice, NamedToolChoice) else None
    forced = [t.function for t in tools if named in (None, t.function.name)]
    return ToolUse(offered, parse=True, forced=forced, parallel=req.parallel_tool_calls and named is None)


def call_grammar(use: ToolUse, tok) -> str:
    """llguidance Lark for a forced answer: up to two newlines (R1 writes them after `</think>`), then the block
    of calls. A marker that is one token of the vocabulary is that token; otherwise it is text."""
    def marker(m: str) -> str:
        i = tok.token_to_id(m)
        return f"<[{i}]>" if i is not None else json.dumps(m)
    more_calls = '("\\n" call)* ' if use.parallel else ""
    choices = " | ".join(f"f{i}" for i in range(len(use.forced)))
    rules = [f"start: LEAD {marker(CALLS_BEGIN)} call {more_calls}{marker(CALLS_END)}",
             "LEAD: /\\n{0,2}/",
             f'call: {marker(CALL_BEGIN)} "function" {marker(SEP)} ({choices}) {marker(CALL_END)}']
    for i, fn in enumerate(use.forced):
        opening, schema = json.dumps(fn.name + "\n" + ARGS_OPEN), {**fn.parameters, "x-guidance": COMPACT}
        rules += [f"f{i}: {opening} a{i} {json.dumps(ARGS_CLOSE)}", f"a{i}: %json {json.dumps(schema)}"]
    return "\n".join(rules)


def history(messages) -> list[dict]:
    """The conversation as the chat template gets it: roles, text, tool calls and results, and reasoning only
    within the tool-calling turn in progress (the module's docstring has the rule)."""
    last_user = max((i for i, m in enumerate(messages) if m.role == "user"), default=-1)
    out = []
    for i, m in enumerate(messages):
        entry = {"role": "system" if m.role == "developer" else m.role, "content": m.text()}
        if m.tool_calls:
            entry["tool_calls"] = [c.model_dump() for c in m.tool_calls]
        if m.tool_call_id is not None:
            entry["tool_call_id"] = m.tool_call_id
        if m.role == "assistant" and i > last_user and m.reasoning_content:
            entry["reasoning_content"] = m.reasoning_content
        out.append(entry)
    return out


def _call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def with_tool_calls(message: dict, finish_reason: str) -> tuple[dict, str]:
    """A finished answer's message with its calls as `tool_calls` (content: the text around them, None when
    there is none); finish_reason "tool_calls" when it called and stopped by itself."""
    content, calls = parse_tool_calls(message["content"])
    if not calls:
        return message, finish_reason
    tool_calls = [{"id": _call_id(), "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
                  for c in calls]
    return ({**message, "content": content.strip() or None, "tool_calls": tool_calls},
            "tool_calls" if finish_reason == "stop" else finish_reason)


class ToolStream:
    """One streamed choice's answer deltas → (content, OpenAI tool_call deltas). A call's first delta carries
    its id, type and name; the next ones carry pieces of its arguments."""

    def __init__(self):
        self.parser, self.ids = ToolCallParser(), []

    def feed(self, text: str, final: bool = False) -> tuple[str, list[dict]]:
        content, deltas = self.parser.feed(text, final)
        out = []
        for d in deltas:
            if d.name is not None:
                self.ids.append(_call_id())
                out.append({"index": d.index, "id": self.ids[d.index], "type": "function",
                            "function": {"name": d.name, "arguments": d.arguments}})
            else:
                out.append({"index": d.index, "function": {"arguments": d.arguments}})
        return content, out

    def finish_reason(self, reason: str) -> str:
        return "tool_calls" if self.ids and reason == "stop" else reason


class _NoTools:
    """The stream when nothing is parsed: all of the answer is content."""

    def feed(self, text: str, final: bool = False) -> tuple[str, list[dict]]:
        return text, []

    def finish_reason(self, reason: str) -> str:
        return reason


def tool_stream(use: ToolUse):
    return ToolStream() if use.parse else _NoTools()
