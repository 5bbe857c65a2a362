"""Thinking control per chat request: on / off, and a budget of reasoning tokens.

On / off comes from DeepSeek's `thinking: {"type": "enabled" | "disabled"}`, from `chat_template_kwargs`
(`thinking` as DeepSeek-V3.1's template reads it, `enable_thinking` as Qwen3's does) or from
`reasoning_effort: "none"`. The model's template decides how: it is rendered with both switches set, and a
template that ignores them (R1's, nanoseek's own) but still opens `<think>` in its generation prompt gets
the block closed empty right there (`<think>\\n\\n</think>\\n\\n`, what R1 renders for no reasoning).

The budget is `thinking.budget_tokens`, or `reasoning_effort` minimal / low / medium (high: none); when the
reasoning reaches it, the engine writes `</think>` and the model goes on with its answer (guide.py).

Earlier turns' `reasoning_content` is accepted and dropped: it never reaches the template, as DeepSeek's API
documents (it ignores the field in the input), so a client that sends its history back unchanged pays no
prompt tokens for old reasoning. Within the tool-calling turn in progress it is kept (nanoseek/infer/tools.py).
"""
from __future__ import annotations

from dataclasses import dataclass

from nanoseek.data.chat import THINK_END, ThinkSplitter, opens_think, parse_completion
from nanoseek.infer.api_schema import APIError
from nanoseek.infer.tools import history

EFFORT_BUDGET = {"minimal": 64, "low": 256, "medium": 1024, "high": None}
# variables the server itself hands the template: chat_template_kwargs may not replace them
_RESERVED = {"messages", "add_generation_prompt", "tools", "documents"}


@dataclass
class Thinking:
    enabled: bool
    budget: int | None  # reasoning tokens before the engine closes the block (None: no limit)


def thinking_of(req) -> Thinking:
    kwargs = req.chat_template_kwargs or {}
    enabled = True
    for key in ("thinking", "enable_thinking"):
        if key in kwargs:
            if not isinstance(kwargs[key], bool):
                raise APIError(400, f"chat_template_kwargs.{key} must be a boolean",
                               param=f"chat_template_kwargs.{key}")
            enabled = kwargs[key]
    if req.reasoning_effort == "none":
        enabled = False
    if req.thinking is not None:
        enabled = req.thinking.type == "enabled"
    budget = EFFORT_BUDGET.get(req.reasoning_effort) if req.reasoning_effort else None
    if req.thinking is not None and req.thinking.budget_tokens is not None:
        budget = req.thinking.budget_tokens
    return Thinking(enabled, budget if enabled else None)


def render_prompt(tok, req, thinking: Thinking, tools: list[dict] | None = None) -> str:
    """The generation prompt of a chat request: its history (tools.history), the tools offered, the client's
    template switches, and thinking on / off as the template understands it."""
    extra = dict(req.chat_template_kwargs or {})
    bad = sorted(k for k in extra if k in _RESERVED or k.endswith("_token") or not k.isidentifier())
    if bad:
        raise APIError(400, f"chat_template_kwargs may not set {', '.join(bad)}", param="chat_template_kwargs")
    extra.update(thinking=thinking.enabled, enable_thinking=thinking.enabled)
    if tools is not None:
        extra["tools"] = tools
    prompt = tok.apply_chat_template(history(req.messages), add_generation_prompt=True, **extra)
    if not thinking.enabled and opens_think(prompt):
        prompt = prompt + "\n" + THINK_END + "\n\n"
    return prompt


class _AllAnswer:
    """The stream splitter when thinking is off: whatever the model writes is the answer."""

    def feed(self, text: str, final: bool = False) -> tuple[str, str]:
        return "", text


def splitter(thinking: Thinking, opened: bool):
    return ThinkSplitter(opened) if thinking.enabled else _AllAnswer()


def reasoning_and_answer(text: str, thinking: Thinking, opened: bool) -> tuple[str | None, str]:
    """(reasoning_content, content) of a finished completion; with thinking off there is no reasoning, even
    where the model writes a `</think>` of its own."""
    if not thinking.enabled:
        return None, text.strip()
    parsed = parse_completion(text, opened_think=opened)
    return parsed.reasoning, parsed.answer
