"""Calculator tool-use conversations for the cold start, so the model the speedrun trains really calls a tool.

The web chat (nanoseek/infer/web/app.js) offers one tool, `calculator`, whose arguments are an arithmetic
expression; CALCULATOR is the very same schema, so the model learns the tools header the chat sends. A record
is a question that is tedious in the head (a product or a sum of multi-digit numbers), the assistant's short
reasoning and its call, the tool's result, and the final answer:

    {"tools": [CALCULATOR], "messages": [user, assistant with tool_calls, tool, assistant]}

The expression is built from the numbers drawn and its value computed here, never by evaluating a string.
Records are kept short: the tools header alone is ~170 tokens of the speedrun's tiny vocabulary, and the whole
conversation must fit an SFT row of 256 tokens. SFT trains both assistant turns (the call and the answer) and
neither the header nor the tool's output (Tokenizer.encode_chat).
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass

from nanoseek.data.chat import ChatTemplateError
from nanoseek.data.tool_calls import ToolCall, format_calls
from nanoseek.errors import UsageError

CALCULATOR = {"type": "function", "function": {
    "name": "calculator", "description": "Evaluate an arithmetic expression",
    "parameters": {"type": "object", "properties": {"expression": {"type": "string"}}, "required": ["expression"]}}}

_ASK = ("What is {}?", "Compute {}.", "How much is {}?", "Calculate {}.")


@dataclass
class Problem:
    expression: str  # as the calculator gets it, e.g. "4821 * 37"
    value: int       # its true value


def _problem(rng: random.Random) -> Problem:
    """A product of a 3-4 digit and a 2-3 digit number, or a sum of three 4-5 digit numbers."""
    if rng.random() < 0.5:
        a, b = rng.randint(100, 9999), rng.randint(11, 999)
        return Problem(f"{a} * {b}", a * b)
    xs = [rng.randint(1000, 99999) for _ in range(3)]
    return Problem(" + ".join(map(str, xs)), sum(xs))


def tool_use_record(problem: Problem, question: str) -> dict:
    """One conversation: the question, the call (reasoning says why), the result, the answer."""
    call = {"id": "call_0", "type": "function", "function": {
        "name": "calculator", "arguments": json.dumps({"expression": problem.expression})}}
    return {"tools": [CALCULATOR], "messages": [
        {"role": "user", "content": question},
        {"role": "assistant", "reasoning_content": "use the calculator", "content": "", "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_0", "content": str(problem.value)},
        {"role": "assistant", "reasoning_content": f"it says {problem.value}", "content": str(problem.value)},
    ]}


def tool_use_problems(n: int, seed: int = 0) -> list[tuple[Problem, str]]:
    """n (problem, question) pairs; same seed, same pairs."""
    rng = random.Random(f"tool-use/{seed}")
    return [(p, rng.choice(_ASK).format(p.expression)) for p in (_problem(rng) for _ in range(n))]


def tool_use_dataset(n: int, seed: int = 0) -> list[dict]:
    """n calculator conversations for SFT."""
    return [tool_use_record(p, q) for p, q in tool_use_problems(n, seed)]


def renders_tool_calls(tok) -> bool:
    """Does tok's chat template write a tool-use conversation the way the server reads it back (DeepSeek-V3's
    call markers, the tool's result, the tools header)? A foreign template may refuse the `tool` role, or drop
    or reformat the calls; training on such renderings would not teach a call the server can parse."""
    record = tool_use_dataset(1)[0]
    call = record["messages"][1]["tool_calls"][0]["function"]
    try:
        text = tok.apply_chat_template(record["messages"], tools=record["tools"])
    except ChatTemplateError:
        return False
    return (format_calls([ToolCall(call["name"], call["arguments"])]) in text
            and record["messages"][2]["content"] in text and CALCULATOR["function"]["description"] in text)


def tool_use_count(tok, n_examples: int, share: float) -> int:
    """How many of n_examples cold-start records are calculator conversations: share of them, or 0 (with one
    line saying why) when the model's chat template cannot render tool calls."""
    if not 0 <= share <= 1:
        raise UsageError(f"sft --tool-share must be between 0 and 1, got {share}")
    n = round(n_examples * share)
    if n and tok.chat_template is not None and not renders_tool_calls(tok):  # none at all: encoding says so
        print("sft: the model's chat template cannot render calculator tool calls: no tool-use conversations")
        return 0
    return n


def mix_in(items: list, extra: list, seed: int = 0) -> list:
    """items and extra shuffled together (so the extra ones spread over the packed rows); items unchanged when
    there is no extra."""
    if not extra:
        return items
    out = items + extra
    random.Random(f"tool-use-mix/{seed}").shuffle(out)
    return out
