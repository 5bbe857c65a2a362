"""`nanoseek serve --speculative`: MTP speculation behind the OpenAI API gives what the plain server gives.

Two servers on the same tiny programmed model (test_server.build_model_dir), one plain and one
speculative, driven through the official openai client: greedy answers, streamed text, n > 1,
stop strings and log-probs must match token for token; the prefix cache stays off under speculation
(usage says so); /metrics reports the acceptance rate and tokens/s.
"""
import httpx
import openai
import pytest

from nanoseek.errors import UsageError
from nanoseek.infer.server import BackgroundServer, Options
from nanoseek.hf.load import from_pretrained
from nanoseek.tokenizer import load_tokenizer
from test_server import ANSWER, KEY, REASONING, build_model_dir

HI = [{"role": "user", "content": "hi"}]
LONG = {"ignore_eos": True}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_model_dir(tmp_path_factory.mktemp("served_spec"))


def _serve(model_dir, speculative: bool):
    return BackgroundServer(Options(model=model_dir, served_model_name="served", api_key=KEY, max_batch=8,
                                    max_len=256, request_timeout=30, shutdown_timeout=5, speculative=speculative))


@pytest.fixture(scope="module")
def servers(model_dir):
    with _serve(model_dir, False) as plain, _serve(model_dir, True) as spec:
        assert spec.service.loop.engine.speculative and not plain.service.loop.engine.speculative
        yield plain, spec


@pytest.fixture(scope="module")
def clients(servers):
    return [openai.OpenAI(base_url=s.url + "/v1", api_key=KEY, max_retries=0, timeout=30) for s in servers]


def both(clients, fn):
    """fn(client) on the plain and on the speculative server."""
    return [fn(c) for c in clients]


def test_greedy_chat_and_logprobs_match_the_plain_server(clients):
    kw = dict(model="served", messages=HI, temperature=0, max_tokens=40, logprobs=True, top_logprobs=2)
    plain, spec = both(clients, lambda c: c.chat.completions.create(**kw))
    p, s = plain.choices[0], spec.choices[0]
    assert s.message.content == p.message.content == ANSWER
    assert s.message.model_extra["reasoning_content"] == REASONING
    assert s.finish_reason == p.finish_reason == "stop"
    assert [t.token for t in s.logprobs.content] == [t.token for t in p.logprobs.content]
    for a, b in zip(s.logprobs.content, p.logprobs.content):
        assert a.logprob == pytest.approx(b.logprob, abs=1e-4)
        assert [t.token for t in a.top_logprobs] == [t.token for t in b.top_logprobs]
    assert spec.usage.completion_tokens == plain.usage.completion_tokens


def test_streaming_gives_the_same_text_and_logprobs(clients):
    def stream(c):
        text, lps, finish = "", [], None
        for ch in c.chat.completions.create(model="served", messages=HI, temperature=0, max_tokens=40, stream=True,
                                            logprobs=True):
            for x in ch.choices:
                text += (x.delta.model_extra or {}).get("reasoning_content") or ""
                text += x.delta.content or ""
                lps += [t.logprob for t in (x.logprobs.content if x.logprobs else [])]
                finish = x.finish_reason or finish
        return text, lps, finish
    (pt, plp, pf), (st, slp, sf) = both(clients, stream)
    assert st == pt == REASONING + ANSWER and sf == pf == "stop"
    assert slp == pytest.approx(plp, abs=1e-4)


def test_n_samples_greedy_and_seeded(clients):
    greedy = both(clients, lambda c: c.completions.create(model="served", prompt="hello there", n=3, temperature=0,
                                                          max_tokens=12, extra_body=LONG))
    texts = [[ch.text for ch in r.choices] for r in greedy]
    assert texts[1] == texts[0] and len(set(texts[1])) == 1 and len(texts[1]) == 3
    # sampled: speculation draws differently from the plain server, but a seed still fixes every sample
    kw = dict(model="served", prompt="hello there", n=3, temperature=0.8, max_tokens=12, seed=5, extra_body=LONG)
    a, b = (clients[1].completions.create(**kw) for _ in range(2))
    assert [c.text for c in a.choices] == [c.text for c in b.choices]
    assert all(c.finish_reason == "length" for c in a.choices) and a.usage.completion_tokens == 36


@pytest.mark.parametrize("stop", [ANSWER[8:13], ANSWER[10:16]])  # at a token's start; inside one
def test_stop_strings_cut_the_same_place(clients, stop):
    cut = ANSWER[:ANSWER.index(stop)]
    plain, spec = both(clients, lambda c: c.chat.completions.create(model="served", messages=HI, temperature=0,
                                                                    max_tokens=40, stop=[stop]))
    assert spec.choices[0].message.content == plain.choices[0].message.content == cut
    assert spec.choices[0].finish_reason == plain.choices[0].finish_reason == "stop"
    streamed = both(clients, lambda c: "".join(ch.choices[0].delta.content or "" for ch in c.chat.completions.create(
        model="served", messages=HI, temperature=0, max_tokens=40, stop=[stop], stream=True) if ch.choices))
    assert streamed[1] == streamed[0] == cut  # a stream holds back what may start a stop string


def test_prefix_cache_stays_off_and_answers_stay_exact(clients, servers):
    first, again = (clients[1].chat.completions.create(model="served", messages=HI, temperature=0, max_tokens=40)
                    for _ in range(2))
    assert first.choices[0].message.content == again.choices[0].message.content == ANSWER
    assert again.usage.prompt_tokens_details.cached_tokens == 0  # the MTP layer's entries need the next token
    assert servers[1].service.loop.engine.prefix_cache is not None  # configured, but not used


def test_metrics_report_acceptance_and_throughput(clients, servers):
    clients[1].completions.create(model="served", prompt="hello there", temperature=0, max_tokens=16, extra_body=LONG)
    spec = httpx.get(servers[1].url + "/metrics", headers={"Authorization": f"Bearer {KEY}"}).text
    values = {line.split()[0]: float(line.split()[1]) for line in spec.splitlines() if not line.startswith("#")}
    assert values["nanoseek_spec_draft_tokens_total"] > 0
    assert 0 <= values["nanoseek_spec_acceptance_rate"] <= 1
    assert values["nanoseek_spec_acceptance_rate"] == pytest.approx(
        values["nanoseek_spec_accepted_tokens_total"] / values["nanoseek_spec_draft_tokens_total"])
    assert values["nanoseek_generation_tokens_total"] >= 16 and values["nanoseek_generation_tokens_per_second"] > 0
    plain = httpx.get(servers[0].url + "/metrics", headers={"Authorization": f"Bearer {KEY}"}).text
    assert "nanoseek_generation_tokens_per_second" in plain and "spec_" not in plain
    assert httpx.get(servers[1].url + "/metrics").status_code == 401  # behind the API key like /v1
    health = httpx.get(servers[1].url + "/health").json()
    assert health["speculative"]["drafted"] == values["nanoseek_spec_draft_tokens_total"]


def test_speculative_needs_an_mtp_module(model_dir):
    d = model_dir
    model = from_pretrained(d)
    model.mtp = type(model.mtp)()  # no MTP module
    with pytest.raises(UsageError, match="MTP"):
        BackgroundServer(Options(model=d, served_model_name="served", speculative=True), model, load_tokenizer(d))
