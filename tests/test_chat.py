"""R1 chat template and completion parser."""
from hypothesis import given, settings, strategies as st

from nanoseek.data.chat import (BOS, EOS, THINK_END, THINK_START, format_r1_zero_prompt, parse_completion,
                                render_chat)

CONV = [
    {"role": "user", "content": "q1"},
    {"role": "assistant", "reasoning_content": "old thinking", "content": "a1"},
    {"role": "user", "content": "q2"},
    {"role": "assistant", "reasoning_content": "new thinking", "content": "a2"},
]


def test_render_exact():
    assert render_chat(CONV) == (
        f"{BOS}<｜User｜>q1<｜Assistant｜>a1{EOS}<｜User｜>q2<｜Assistant｜><think>\nnew thinking\n</think>\n\na2{EOS}")


def test_old_reasoning_dropped_and_generation_prompt_opens_think():
    text = render_chat(CONV[:3], add_generation_prompt=True)
    assert "old thinking" not in text
    assert text.endswith("<｜User｜>q2<｜Assistant｜><think>\n")


def test_prompt_is_prefix_of_full_rendering():
    prompt = render_chat(CONV[:3], add_generation_prompt=True)
    full = render_chat(CONV)
    assert full.startswith(prompt)
    assert full[len(prompt):] == f"new thinking\n</think>\n\na2{EOS}"


def test_system_and_content_with_think_in_history():
    msgs = [{"role": "system", "content": "SYS"}, {"role": "user", "content": "q"},
            {"role": "assistant", "content": "<think>junk</think>\n\nans"}, {"role": "user", "content": "q3"}]
    text = render_chat(msgs, add_generation_prompt=True)
    assert text.startswith(BOS + "SYS<｜User｜>q")
    assert "junk" not in text and "<｜Assistant｜>ans" + EOS in text


def test_final_turn_without_reasoning_still_has_think_block():
    text = render_chat([{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}])
    assert text.endswith("<｜Assistant｜><think>\n\n</think>\n\na" + EOS)


def test_parse_typical_completion():
    p = parse_completion("step 1\nstep 2\n</think>\n\n42" + EOS)
    assert (p.reasoning, p.answer, p.well_formed) == ("step 1\nstep 2", "42", True)


def test_parse_missing_close():
    p = parse_completion("thinking forever and 42")
    assert p.answer == "" and not p.well_formed and p.reasoning == "thinking forever and 42"


def test_parse_repeated_open_tag_tolerated_but_flagged():
    p = parse_completion("<think>\nr\n</think>\n42")
    assert p.reasoning == "r" and p.answer == "42" and not p.well_formed
    p2 = parse_completion("<think>\nr\n</think>\n42", opened_think=False)
    assert p2.well_formed and p2.answer == "42"


def test_parse_not_opened_requires_open_tag():
    p = parse_completion("r</think>42", opened_think=False)
    assert not p.well_formed and "no opening" in p.reason


def test_parse_extra_tags_flagged():
    assert not parse_completion("r</think>41</think>42").well_formed
    assert not parse_completion("r<think>x</think>42").well_formed
    assert not parse_completion("</think>42").well_formed  # empty reasoning


def test_parse_trailing_after_eos_ignored_and_answer_tags():
    p = parse_completion("r</think><answer> 7 </answer>" + EOS + "garbage </think> 8")
    assert p.answer == "7" and p.well_formed


def test_r1_zero_prompt():
    p = format_r1_zero_prompt("  What is 2+2? ")
    assert "What is 2+2?" in p and p.endswith("<think>") and "<answer>" in p
    assert parse_completion(" 2 plus 2 </think> <answer>4</answer>").answer == "4"


_text = st.text(alphabet=st.characters(blacklist_characters="<>"), max_size=60)


@settings(max_examples=200, deadline=None)
@given(_text.filter(lambda s: s.strip()), _text.filter(lambda s: s.strip()), st.sampled_from(["", " ", "\n", "\n\n", " \n "]),
       st.sampled_from(["", EOS, EOS + "junk"]))
def test_parse_recovers_parts_property(reasoning, answer, ws, tail):
    text = ws + reasoning + ws + THINK_END + ws + answer + ws + tail
    p = parse_completion(text)
    assert p.reasoning == reasoning.strip() and p.answer == answer.strip() and p.well_formed
    p0 = parse_completion(THINK_START + text, opened_think=False)
    assert (p0.reasoning, p0.answer, p0.well_formed) == (p.reasoning, p.answer, True)


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=200))
def test_parse_never_raises(text):
    p = parse_completion(text)
    assert isinstance(p.answer, str)
    if p.well_formed:
        assert p.answer and p.reasoning and THINK_END not in p.answer


@settings(max_examples=50, deadline=None)
@given(st.lists(st.tuples(_text, _text, _text), min_size=1, max_size=3))
def test_render_prefix_property(turns):
    msgs = []
    for q, r, a in turns:
        msgs += [{"role": "user", "content": q}, {"role": "assistant", "reasoning_content": r, "content": a}]
    full = render_chat(msgs)
    assert full.startswith(render_chat(msgs[:-1], add_generation_prompt=True))
    assert full.count(THINK_START) == 1 and full.count(EOS) == len(turns)
