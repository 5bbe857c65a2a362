"""Calculator tool-use conversations for the cold start: the chat's schema, calls the server's parser reads back,
true results, SFT trains the call and the answer only, the share, and foreign templates skipped."""
import json
import re
from pathlib import Path

import pytest
from hypothesis import given, settings, strategies as st

from nanoseek.data.chat import EOS, parse_completion, render_chat
from nanoseek.data.tool_calls import ToolCall, format_calls, parse_tool_calls
from nanoseek.data.tool_use import (CALCULATOR, mix_in, renders_tool_calls, tool_use_count, tool_use_dataset,
                                    tool_use_problems)
from nanoseek.errors import UsageError
from nanoseek.tokenizer import Tokenizer, train_tokenizer

APP_JS = Path(__file__).parents[1] / "nanoseek" / "infer" / "web" / "app.js"
TEXTS = ["What is 4821 * 37? use the calculator, it says 178377",
         "Compute 12345 + 67890 + 11111. <think>\nit says 91346\n</think>\n\n91346"] * 40


@pytest.fixture(scope="module")
def tok(tmp_path_factory) -> Tokenizer:
    return train_tokenizer(TEXTS, vocab_size=400, out_dir=tmp_path_factory.mktemp("tok"))


def true_value(expression: str) -> int:
    """The value of "a * b" or "a + b + c", read independently of the generator."""
    if " * " in expression:
        a, b = expression.split(" * ")
        return int(a) * int(b)
    return sum(int(x) for x in expression.split(" + "))


def test_schema_is_the_web_chats():
    literal = re.search(r"const CALCULATOR = (\{.*?\}) \};", APP_JS.read_text(), re.S).group(1) + " }"
    as_json = re.sub(r"(\w+):", r'"\1":', literal)
    assert json.loads(as_json) == CALCULATOR


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10 ** 6), n=st.integers(1, 8))
def test_records_render_and_the_call_parses_back(seed, n):
    for record, (problem, question) in zip(tool_use_dataset(n, seed), tool_use_problems(n, seed)):
        user, call_turn, tool, answer = record["messages"]
        assert record["tools"] == [CALCULATOR] and user == {"role": "user", "content": question}
        assert problem.expression in question and problem.value == true_value(problem.expression)
        prompt = render_chat([user], True, tools=record["tools"])
        completion = render_chat([user, call_turn], tools=record["tools"])[len(prompt):]
        parsed = parse_completion(completion)
        content, calls = parse_tool_calls(parsed.answer)
        assert parsed.well_formed and content == "" and len(calls) == 1 and calls[0].name == "calculator"
        arguments = json.loads(calls[0].arguments)
        assert arguments == {"expression": problem.expression} and isinstance(arguments["expression"], str)
        assert set(arguments) == set(CALCULATOR["function"]["parameters"]["required"])
        assert tool["content"] == str(true_value(arguments["expression"]))
        assert answer["content"] == tool["content"]


def test_sft_trains_the_call_and_the_answer_not_the_header_nor_the_tool_output(tok):
    record = tool_use_dataset(1, seed=3)[0]
    user, call_turn, tool, answer = record["messages"]
    ids, mask = tok.encode_chat(record["messages"], record["tools"])
    assert tok.decode(ids) == tok.apply_chat_template(record["messages"], tools=record["tools"])
    call = call_turn["tool_calls"][0]["function"]
    trained = tok.decode([i for i, m in zip(ids, mask) if m])
    assert trained == ("use the calculator\n</think>\n\n" + format_calls([ToolCall(call["name"], call["arguments"])])
                       + EOS + f"it says {tool['content']}\n</think>\n\n{answer['content']}" + EOS)
    untrained = tok.decode([i for i, m in zip(ids, mask) if not m])
    assert "## Tools" in untrained and CALCULATOR["function"]["description"] in untrained
    assert f"<｜tool▁output▁begin｜>{tool['content']}<｜tool▁output▁end｜>" in untrained
    prompt = tok.apply_chat_template([user], add_generation_prompt=True, tools=record["tools"])
    assert ids[:mask.index(1)] == tok.encode(prompt)  # the first prompt is tokenized as at generation time


def test_the_share_gives_the_count(tok, capsys):
    assert renders_tool_calls(tok)
    assert [tool_use_count(tok, 4000, s) for s in (0.05, 0.0, 1.0)] == [200, 0, 4000]
    assert capsys.readouterr().out == ""
    with pytest.raises(UsageError, match="between 0 and 1"):
        tool_use_count(tok, 4000, 1.5)


def test_mix_in_spreads_the_extra_and_keeps_everything():
    items, extra = list(range(100)), ["t"] * 5
    mixed = mix_in(items, extra, seed=1)
    assert sorted(map(str, mixed)) == sorted(map(str, items + extra)) and mixed[-5:] != extra
    assert mix_in(items, [], seed=1) is items


@pytest.mark.parametrize("template", [
    # refuses the tool role
    "{% for m in messages %}{% if m['role'] == 'tool' %}{{ raise_exception('no tools') }}{% endif %}"
    "{{ m['content'] }}{% endfor %}",
    # renders only the text: the calls vanish
    "{% for m in messages %}{{ m['role'] + ': ' + (m['content'] or '') + '\n' }}{% endfor %}",
])
def test_a_template_without_tool_calls_is_skipped_with_one_line(tok, capsys, template):
    foreign = Tokenizer(tok.tk, chat_template=template, special_tokens=tok.special_tokens)
    assert not renders_tool_calls(foreign)
    assert tool_use_count(foreign, 4000, 0.05) == 0
    assert capsys.readouterr().out.strip().splitlines() == [
        "sft: the model's chat template cannot render calculator tool calls: no tool-use conversations"]
