"""Per-request controls of `nanoseek serve`, through the official openai client against a real server:
thinking on / off and its budget, reasoning_content sent back, response_format (json_object, json_schema),
and the prefix cache's usage fields. The tiny model is test_server's programmed one (REASONING</think>ANSWER).
"""
import json

import httpx
import jsonschema
import openai
import pytest

from nanoseek.infer.server import BackgroundServer, Options
from test_server import ANSWER, KEY, REASONING, build_model_dir

SCHEMA = {"type": "object", "additionalProperties": False, "required": ["answer", "sure", "unit"],
          "properties": {"answer": {"type": "integer", "minimum": 0, "maximum": 99}, "sure": {"type": "boolean"},
                         "unit": {"enum": ["km", "mile"]}}}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    opts = Options(model=build_model_dir(tmp_path_factory.mktemp("controls")), served_model_name="served",
                   api_key=KEY, max_batch=4, max_queue=4, max_len=256, request_timeout=60, shutdown_timeout=5,
                   prefix_block=4)
    with BackgroundServer(opts) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)


def ask(client, messages=None, **kw):
    kw = {"temperature": 0, "max_tokens": 60, **kw}
    messages = messages or [{"role": "user", "content": "hi"}]
    return client.chat.completions.create(model="served", messages=messages, **kw)


def close_ids(server) -> list[int]:
    return server.service.tok.encode("\n</think>\n\n")


def test_thinking_on_by_default_and_off_per_request(server, client):
    on = ask(client)
    assert on.choices[0].message.reasoning_content == REASONING and on.choices[0].message.content == ANSWER
    for off in (ask(client, extra_body={"thinking": {"type": "disabled"}}),
                ask(client, extra_body={"chat_template_kwargs": {"enable_thinking": False}}),
                ask(client, reasoning_effort="none")):
        assert not off.choices[0].message.model_extra.get("reasoning_content")
        assert off.usage.completion_tokens_details.reasoning_tokens == 0
        assert off.usage.prompt_tokens == on.usage.prompt_tokens + len(close_ids(server))  # the block closed empty


def test_thinking_budget_ends_the_reasoning(server, client):
    full = ask(client)
    cut = ask(client, extra_body={"thinking": {"type": "enabled", "budget_tokens": 3}})
    reasoning = cut.choices[0].message.reasoning_content
    assert reasoning and REASONING.startswith(reasoning) and len(reasoning) < len(REASONING)
    end = close_ids(server).index(server.service.tok.think_end_id) + 1
    assert cut.usage.completion_tokens_details.reasoning_tokens == 3 + end  # 3 thought, then the forced close
    assert full.usage.completion_tokens_details.reasoning_tokens > 3 + end


def test_reasoning_content_sent_back_is_accepted_and_dropped(client):
    history = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": ANSWER},
               {"role": "user", "content": "hi"}]
    plain = ask(client, history)
    history[1]["reasoning_content"] = "an old chain of thought that must not reach the prompt " * 4
    sent_back = ask(client, history)
    assert sent_back.usage.prompt_tokens == plain.usage.prompt_tokens
    assert sent_back.choices[0].message.content == plain.choices[0].message.content


def test_json_schema_answer_parses_and_validates_reasoning_stays_free(client):
    for extra in ({}, {"thinking": {"type": "disabled"}}):
        r = ask(client, max_tokens=120, extra_body=extra,
                response_format={"type": "json_schema", "json_schema": {"name": "reply", "schema": SCHEMA,
                                                                        "strict": True}})
        msg = r.choices[0].message
        assert r.choices[0].finish_reason == "stop"
        jsonschema.validate(json.loads(msg.content), SCHEMA)
        if not extra:
            assert msg.reasoning_content == REASONING  # the model's own reasoning, unconstrained


def test_json_object_streams_json(client):
    stream = ask(client, max_tokens=40, seed=3, temperature=1.0, stream=True, response_format={"type": "json_object"},
                 extra_body={"thinking": {"type": "disabled"}})
    text, finish = "", None
    for chunk in stream:
        for c in chunk.choices:
            text += c.delta.content or ""
            finish = c.finish_reason or finish
    assert text.startswith("{")
    if finish == "stop":  # a value can outgrow 40 tokens; a finished one is an object
        assert isinstance(json.loads(text), dict)


def test_prefix_cache_usage_fields(client):
    system = {"role": "system", "content": "hello there, what is two plus two? say hi " * 3}
    first = ask(client, [system, {"role": "user", "content": "hi"}])
    again = ask(client, [system, {"role": "user", "content": "say hi"}])
    u = again.usage
    assert first.choices[0].message.content == ANSWER
    hit = u.model_extra["prompt_cache_hit_tokens"]
    assert hit >= len(system["content"]) // 8 and hit + u.model_extra["prompt_cache_miss_tokens"] == u.prompt_tokens
    assert u.prompt_tokens_details.cached_tokens == hit


@pytest.mark.parametrize("body, param", [
    ({"thinking": {"type": "maybe"}}, "thinking.type"),
    ({"thinking": {"type": "enabled", "budget_tokens": 0}}, "thinking.budget_tokens"),
    ({"reasoning_effort": "extreme"}, "reasoning_effort"),
    ({"chat_template_kwargs": {"enable_thinking": "no"}}, "chat_template_kwargs.enable_thinking"),
    ({"chat_template_kwargs": {"messages": []}}, "chat_template_kwargs"),
    ({"response_format": {"type": "xml"}}, "response_format.type"),
    ({"response_format": {"type": "json_schema"}}, "response_format"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nope"}}}},
     "response_format"),
])
def test_bad_controls_are_a_400_naming_the_field(server, body, param):
    r = httpx.post(server.url + "/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"}, timeout=30,
                   json={"model": "served", "messages": [{"role": "user", "content": "hi"}], **body})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param
