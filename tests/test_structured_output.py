"""Structured output in the engine: for random JSON schemas, sampled answers always parse and validate;
the grammar constrains only the answer after the reasoning; thinking budgets close the block."""
import functools
import json

import jsonschema
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nanoseek.config import get_preset
from nanoseek.infer.api_schema import ResponseFormat
from nanoseek.infer.engine import Engine
from nanoseek.infer.guide import OutputGuide
from nanoseek.infer.sampling import SamplingParams
from nanoseek.infer.structured_output import JSONGrammars
from nanoseek.model.transformer import Transformer
from nanoseek.tokenizer import train_tokenizer


@pytest.fixture(scope="module")
def setup():
    tok = train_tokenizer(['{"name": "ab", "n": [1, 2], "ok": true, "x": null}'] * 20 + ["hello there"] * 5,
                          vocab_size=400)
    cfg = get_preset("tiny").replace(vocab_size=tok.vocab_size + 3, hidden_size=64, intermediate_size=128,
                                     moe_intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     q_lora_rank=32, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8,
                                     v_head_dim=8, n_routed_experts=4, n_group=2, topk_group=1, num_experts_per_tok=2,
                                     max_position_embeddings=512, eos_token_id=tok.eos_id)
    torch.manual_seed(0)
    model = Transformer(cfg).eval()
    eng = Engine(model, tok, max_batch=4, max_len=512)
    return tok, eng, JSONGrammars(tok, cfg.vocab_size, eng.stop_ids)


def guided(setup, schema: dict | None, thinking: bool = False, budget: int | None = None):
    tok, eng, grammars = setup
    fmt = ResponseFormat.model_validate({"type": "json_schema", "json_schema": {"name": "t", "schema": schema}}
                                        if schema is not None else {"type": "json_object"})
    answer = functools.partial(grammars.matcher, grammars.grammar(fmt))
    return functools.partial(OutputGuide, eng.model.config.vocab_size, eng.stop_ids, tok, thinking, budget, answer)


NAMES = st.text("abcdxyz", min_size=1, max_size=4)
LEAVES = st.one_of(
    st.just({"type": "boolean"}), st.just({"type": "null"}),
    st.integers(-50, 50).map(lambda lo: {"type": "integer", "minimum": lo, "maximum": lo + 200}),
    st.integers(0, 6).map(lambda n: {"type": "string", "maxLength": n}),
    st.lists(st.text("abz", min_size=1, max_size=3), min_size=1, max_size=3, unique=True).map(lambda v: {"enum": v}),
)


def _object(children):
    return st.dictionaries(NAMES, children, min_size=1, max_size=3).map(
        lambda props: {"type": "object", "properties": props, "required": sorted(props), "additionalProperties": False})


SCHEMAS = st.recursive(LEAVES, lambda children: st.one_of(
    _object(children), st.builds(lambda item, n: {"type": "array", "items": item, "maxItems": n}, children,
                                 st.integers(0, 2))), max_leaves=6)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(SCHEMAS, st.integers(0, 2**30))
def test_answers_to_random_schemas_parse_and_validate(setup, schema, seed):
    tok, eng, _ = setup
    sp = SamplingParams(temperature=1.0, max_tokens=400, seed=seed, n=2, guide=guided(setup, schema))
    for out in eng.generate([tok.encode("hello there")], sp)[0].outputs:
        assert out.finish_reason == "stop", out.text
        jsonschema.validate(json.loads(out.text), schema)


def test_the_grammar_waits_for_the_end_of_the_reasoning(setup):
    """A thinking budget of 4: four free tokens, the forced close, then JSON."""
    tok, eng, _ = setup
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
              "additionalProperties": False}
    sp = SamplingParams(temperature=1.0, max_tokens=100, seed=1, guide=guided(setup, schema, thinking=True, budget=4))
    out = eng.generate([tok.encode("hello there")], sp)[0].outputs[0]
    close = tok.encode("\n</think>\n\n")
    assert out.token_ids[4:4 + len(close)] == close
    assert json.loads(tok.decode(out.token_ids[4 + len(close):-1])) in ({"ok": True}, {"ok": False})


def test_speculative_engines_refuse_guided_requests(setup):
    tok, eng, _ = setup
    spec = Engine(eng.model, tok, max_batch=2, max_len=64, speculative=True)
    if spec.speculative:
        with pytest.raises(ValueError, match="guided"):
            spec.add_request([1, 2], SamplingParams(guide=guided(setup, None)))
