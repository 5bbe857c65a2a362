"""DeepSeek-V3's tool-call format and its streaming parser: for random completions (well-formed calls, content
around them, malformed blocks, stray marker pieces, fences inside arguments) and every way of cutting them
into deltas, the streamed content and calls are those of the whole string; well-formed calls come back as
written; cuts at the real tokenizer's tokens (markers one token each) grouped 1..N per delta do too."""
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nanoseek.data.tool_calls import (CALL_BEGIN, CALL_END, CALLS_BEGIN, CALLS_END, SEP, TOOL_MARKERS,
                                      ToolCall, ToolCallParser, format_call, format_calls, parse_tool_calls)
from nanoseek.tokenizer import train_tokenizer


def streamed(pieces: list[str]) -> tuple[str, list[ToolCall]]:
    """Feed the pieces one by one, then the end; assemble calls as an OpenAI client does from deltas."""
    parser, content, calls = ToolCallParser(), "", []
    for k, piece in enumerate(pieces + [""]):
        text, deltas = parser.feed(piece, final=k == len(pieces))
        content += text
        for d in deltas:
            if d.name is not None:
                assert d.index == len(calls), "a call's first delta names it, in order"
                calls.append(ToolCall(d.name, ""))
            else:
                assert d.index == len(calls) - 1, "argument deltas continue the latest call"
            calls[d.index].arguments += d.arguments
    return content, calls


def cut(text: str, points: list[int]) -> list[str]:
    bounds = [0] + sorted(set(p for p in points if 0 < p < len(text))) + [len(text)]
    return [text[a:b] for a, b in zip(bounds, bounds[1:])]


ARG_VALUES = st.recursive(
    st.one_of(st.integers(-999, 999), st.booleans(), st.none(),
              st.lists(st.sampled_from(list("ab <>`\n\"\\｜▁") + ["```", "<｜tool", "\n```"]), max_size=8).map("".join)),
    lambda kids: st.dictionaries(st.text("xyz_", min_size=1, max_size=3), kids, max_size=3), max_leaves=5)
ARGUMENTS = st.builds(json.dumps, st.dictionaries(st.text("abc", min_size=1, max_size=3), ARG_VALUES, max_size=3),
                      indent=st.sampled_from([None, 2]))
NAMES = st.text("abcdef_0123-", min_size=1, max_size=12)
CALLS = st.lists(st.builds(ToolCall, NAMES, ARGUMENTS), min_size=1, max_size=3)
CONTENT = st.lists(st.sampled_from(list("ab \n`<>｜▁") + ["```", "<｜tool▁calls", "<｜tool"]), max_size=12).map("".join)
# pieces a model might write where it should not: fragments and whole markers out of place
JUNK = st.one_of(st.sampled_from(TOOL_MARKERS + ["\n", "```json\n", "\n```", "function", SEP + "f\n"]),
                 st.builds(lambda m, k: m[:k], st.sampled_from(TOOL_MARKERS), st.integers(1, 8)), CONTENT)


@st.composite
def completions(draw):
    """(text, content, calls) for a well-formed completion, or (text, None, None) for a messy one."""
    content, calls = draw(CONTENT), draw(CALLS)
    if draw(st.booleans()):
        return content + format_calls(calls), content, calls
    parts = [content, format_calls(calls)] + draw(st.lists(st.one_of(JUNK, CALLS.map(format_calls),
                                                                      st.builds(format_call, NAMES, ARGUMENTS)),
                                                            max_size=6))
    order = draw(st.permutations(range(len(parts))))
    return "".join(parts[i] for i in order), None, None


@settings(max_examples=600, deadline=None)
@given(completions(), st.lists(st.integers(0, 400), max_size=40))
def test_any_cut_into_deltas_parses_as_the_whole_string(completion, points):
    text, content, calls = completion
    whole = parse_tool_calls(text)
    assert streamed(cut(text, points)) == whole
    if calls is not None:  # well formed: exactly what was written
        assert whole == (content, calls)


@settings(max_examples=150, deadline=None)
@given(completions())
def test_one_character_at_a_time_and_every_single_cut(completion):
    text = completion[0]
    whole = parse_tool_calls(text)
    assert streamed(list(text)) == whole
    for p in range(1, len(text), max(1, len(text) // 60)):
        assert streamed([text[:p], text[p:]]) == whole


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(["hello there, what is two plus two?"] * 5, vocab_size=300)


def test_cuts_at_tokens_grouped_1_to_n_per_delta(tok):
    """What a server streams: text per token (markers are single tokens here), k tokens per delta, and the
    begin and end markers of a whole block in one delta (the bug peers' parsers had)."""
    calls = [ToolCall("calc", '{"expression": "1 + 2"}'), ToolCall("weather", '{"city": "Seoul", "n": [1, 2]}')]
    text = "Let me check." + format_calls(calls)
    ids = tok.encode(text)
    assert all(len(tok.encode(m)) == 1 for m in TOOL_MARKERS)
    pieces = [tok.decode([i]) for i in ids]
    assert "".join(pieces) == text
    for k in range(1, len(pieces) + 1):
        for offset in range(min(k, 4)):  # groups starting at different tokens
            groups = [pieces[:offset]] + [pieces[j:j + k] for j in range(offset, len(pieces), k)]
            assert streamed(["".join(g) for g in groups]) == ("Let me check.", calls), (k, offset)


def test_malformed_blocks_are_dropped_alike():
    cases = {
        CALLS_BEGIN + CALL_BEGIN + "function" + SEP + "\n```json\n{}\n```" + CALL_END + CALLS_END: ("", []),
        "a" + CALLS_BEGIN + "junk" + CALLS_END + "b": ("ab", []),
        "a" + CALLS_BEGIN + CALL_BEGIN + "function" + SEP + "f" + CALL_END + CALLS_END: ("a", []),
        CALLS_BEGIN + CALL_BEGIN + "function" + SEP + "f\n```json\n{\"x\": 1": ("", [ToolCall("f", '{"x": 1')]),
        CALL_BEGIN + "function" + SEP + "f\n": (CALL_BEGIN + "function" + SEP + "f\n", []),  # no block: text
    }
    for text, expected in cases.items():
        assert parse_tool_calls(text) == expected
        assert streamed(list(text)) == expected
