"""Tool calls through the official openai client against a real server: tools and tool_choice (auto, none,
required, named), tool_calls in responses and streamed deltas, tool results sent back, the reasoning_content
rule of a tool-calling turn, and 400s naming the field.

The tiny model is test_server's programmed one, whose greedy answer here is REASONING</think> followed by a
call of the calculator in DeepSeek-V3's format. Forced calls (required, named) come from the grammar, so a
random model's arguments validate against the tool's schema whatever it samples.
"""
import json

import httpx
import jsonschema
import openai
import pytest

from nanoseek.data.tool_calls import ToolCall, format_calls
from nanoseek.infer.server import BackgroundServer, Options
from test_server import KEY, REASONING, build_model_dir

ARGS = '{"expression": "1+2"}'
TOOL_ANSWER = format_calls([ToolCall("calculator", ARGS)])
CALCULATOR = {"type": "object", "additionalProperties": False, "required": ["expression"],
              "properties": {"expression": {"type": "string", "maxLength": 12}}}
WEATHER = {"type": "object", "additionalProperties": False, "required": ["city", "days"],
           "properties": {"city": {"enum": ["Seoul", "Busan"]},
                          "days": {"type": "integer", "minimum": 1, "maximum": 7}}}
SCHEMAS = {"calculator": CALCULATOR, "weather": WEATHER}
TOOLS = [{"type": "function", "function": {"name": name, "description": f"the {name}", "parameters": schema}}
         for name, schema in SCHEMAS.items()]
NO_THINKING = {"thinking": {"type": "disabled"}}


def tool_model_dir(path) -> str:
    """The programmed model, answering with a calculator call (its pieces single tokens: a chain never repeats)."""
    return build_model_dir(path, answer=TOOL_ANSWER, pieces=("function", "calculator\n```json\n", ARGS, "\n```"),
                           context=1024)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    opts = Options(model=tool_model_dir(tmp_path_factory.mktemp("tools")), served_model_name="served", api_key=KEY,
                   max_batch=4, max_queue=4, max_len=1024, request_timeout=60, shutdown_timeout=5)
    with BackgroundServer(opts) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)


def ask(client, messages=None, **kw):
    kw = {"temperature": 0, "max_tokens": 80, "tools": TOOLS, **kw}
    return client.chat.completions.create(model="served", messages=messages or [{"role": "user", "content": "hi"}],
                                          **kw)


def test_auto_returns_the_models_call(client):
    r = ask(client)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    assert choice.message.reasoning_content == REASONING
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_")
    assert (call.function.name, call.function.arguments) == ("calculator", ARGS)


def test_streamed_tool_call_deltas_add_up_to_the_call(client):
    calls, reasoning, content, finish, ids = {}, "", "", None, []
    for chunk in ask(client, stream=True):
        for c in chunk.choices:
            reasoning += c.delta.model_extra.get("reasoning_content") or ""
            content += c.delta.content or ""
            finish = c.finish_reason or finish
            for d in c.delta.tool_calls or []:
                if d.id:
                    ids.append(d.id)
                    calls[d.index] = {"name": d.function.name, "arguments": ""}
                calls[d.index]["arguments"] += d.function.arguments or ""
    assert reasoning == REASONING and content == "" and finish == "tool_calls"
    assert calls == {0: {"name": "calculator", "arguments": ARGS}} and len(ids) == 1


def test_tool_choice_none_offers_no_tools_and_parses_nothing(client):
    auto, none = ask(client), ask(client, tool_choice="none")
    assert none.choices[0].message.tool_calls is None and none.choices[0].finish_reason == "stop"
    assert none.usage.prompt_tokens < auto.usage.prompt_tokens  # the tools are not in the prompt
    assert none.choices[0].message.content == TOOL_ANSWER  # the model's text, as it wrote it


def test_named_choice_forces_that_tool_after_free_reasoning(client):
    r = ask(client, tool_choice={"type": "function", "function": {"name": "weather"}})
    msg = r.choices[0].message
    assert msg.reasoning_content == REASONING and r.choices[0].finish_reason == "tool_calls"
    (call,) = msg.tool_calls
    assert call.function.name == "weather"
    jsonschema.validate(json.loads(call.function.arguments), WEATHER)


@pytest.mark.parametrize("seed", range(4))
def test_forced_calls_of_a_sampling_model_always_validate(client, seed):
    for choice, parallel in (("required", False), ("required", True),
                             ({"type": "function", "function": {"name": "calculator"}}, True)):
        r = ask(client, tool_choice=choice, parallel_tool_calls=parallel, temperature=1.0, seed=seed, max_tokens=160,
                extra_body=NO_THINKING)
        calls = r.choices[0].message.tool_calls
        assert calls and (parallel or len(calls) == 1), r
        complete = calls if r.choices[0].finish_reason == "tool_calls" else calls[:-1]  # a cut-off call is partial
        for call in complete:
            assert isinstance(choice, str) or call.function.name == "calculator"
            jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])


def test_tool_results_go_back_and_the_turns_reasoning_with_them(server, client):
    """The call as returned, sent back with its reasoning, renders exactly as the model wrote it (the tool turn
    stays a prefix of itself); reasoning within the turn reaches the prompt, reasoning of an earlier turn not."""
    first = ask(client)
    msg = first.choices[0].message
    call = msg.tool_calls[0]
    assistant = {"role": "assistant", "content": msg.content, "reasoning_content": msg.reasoning_content,
                 "tool_calls": [call.model_dump()]}
    result = {"role": "tool", "tool_call_id": call.id, "content": "3"}
    turn = [{"role": "user", "content": "hi"}, assistant, result]
    with_reasoning = ask(client, turn)
    assert with_reasoning.choices[0].finish_reason in ("tool_calls", "stop", "length")
    without = ask(client, [turn[0], {k: v for k, v in assistant.items() if k != "reasoning_content"}, result])
    tok = server.service.tok
    assert with_reasoning.usage.prompt_tokens == without.usage.prompt_tokens + len(tok.encode(REASONING))
    earlier = ask(client, turn + [{"role": "assistant", "content": "3"}, {"role": "user", "content": "hi"}])
    earlier_plain = ask(client, [turn[0], {k: v for k, v in assistant.items() if k != "reasoning_content"}, result,
                                 {"role": "assistant", "content": "3"}, {"role": "user", "content": "hi"}])
    assert earlier.usage.prompt_tokens == earlier_plain.usage.prompt_tokens

    prompt = tok.apply_chat_template([turn[0]], add_generation_prompt=True, tools=TOOLS)
    history = tok.apply_chat_template(turn[:2], tools=TOOLS)
    assert history == prompt + REASONING + "\n</think>\n\n" + TOOL_ANSWER + tok.eos_token  # R1's completion format


@pytest.mark.parametrize("body, param", [
    ({"tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tools": None, "tool_choice": "required"}, "tool_choice"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "nope"}}}]},
     "tools.0.function.parameters"),
    ({"tools": [{"type": "function", "function": {"name": "a b"}}]}, "tools.0.function.name"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}] * 2}, "tools"),
    ({"tools": [{"type": "retrieval"}]}, "tools.0.type"),
    ({"tool_choice": "sometimes"}, "tool_choice"),
    ({"tool_choice": "required", "response_format": {"type": "json_object"}}, "response_format"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "tool", "content": "3"}]}, "messages.1.tool_call_id"),
    ({"messages": [{"role": "user", "content": "hi", "tool_calls": []}]}, "messages.0.tool_calls"),
    ({"messages": [{"role": "assistant", "tool_calls": [{"id": "c", "type": "function",
                                                         "function": {"name": "f", "arguments": {}}}]}]},
     "messages.0.tool_calls.0.function.arguments"),
])
def test_bad_tool_input_is_a_400_naming_the_field(server, body, param):
    body = {"model": "served", "messages": [{"role": "user", "content": "hi"}], "tools": TOOLS, **body}
    r = httpx.post(server.url + "/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"}, timeout=30,
                   json={k: v for k, v in body.items() if v is not None})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param, r.text
