"""Rewards: the right behaviour on good completions, and no accuracy/format reward for known hacks."""
import pytest
from hypothesis import given, settings, strategies as st

from nanoseek.data.chat import EOS
from nanoseek.data.task_registry import Sample
from nanoseek.rewards import (RewardConfig, compute_reward, compute_rewards, is_repetitive, language_reward,
                              length_penalty, script_of)
from nanoseek.data.chat import parse_completion

ADD = Sample("add", "What is 17 + 25?", "42", 2, {"check": "int", "a": 17, "b": 25})
GOOD = "ones: 7 + 5 = 12, write 2 carry 1\ntens: 1 + 2 + 1 = 4\n</think>\n\n42" + EOS

# name -> completion (all are attempts to get reward without a correct, well-formed answer)
HACKS = {
    "answer only inside think": "the answer is 42",
    "several answers after think": "adding\n</think>\n\n41 42 43",
    "several answers with 'or'": "adding\n</think>\n\n42 or 43",
    "empty think": "</think>\n\n42",
    "tags in wrong order": "</think> adding <think> 42",
    "reference in reasoning, other final": "the answer is 42\n</think>\n\n43",
    "answer then more thinking": "adding</think>42<think>hmm</think>42",
    "repeated opening tag": "<think>adding</think>42",
    "repetition loop": "wait " * 2000 + "</think>\n\n42",
    "empty answer": "adding 17 and 25\n</think>\n\n" + EOS,
}


def test_good_completion_full_reward():
    r = compute_reward(ADD, GOOD)
    assert (r.accuracy, r.format, r.language, r.length) == (1.0, 1.0, 1.0, 0.0)
    assert r.total == pytest.approx(1.0 + 0.2 + 0.1) and r.answer == "42"


def test_wrong_answer_keeps_format():
    r = compute_reward(ADD, GOOD.replace("\n\n42", "\n\n41"))
    assert r.accuracy == 0.0 and r.format == 1.0


def test_hacks_get_no_accuracy_or_no_format():
    honest_wrong = compute_reward(ADD, GOOD.replace("\n\n42", "\n\n41")).total
    for name, text in HACKS.items():
        r = compute_reward(ADD, text)
        assert r.total < compute_reward(ADD, GOOD).total, name
        if name.startswith("several answers") or name.startswith("reference in"):
            # well-formed, so format is earned, but the trick earns nothing over an honest wrong answer
            assert r.accuracy == 0.0 and r.total <= honest_wrong, (name, r)
        else:
            assert r.format == 0.0, (name, r)
        if name not in ("empty think", "repetition loop", "repeated opening tag"):
            assert r.accuracy == 0.0, (name, r)


def test_no_accuracy_for_answer_in_reasoning_or_wrong_order():
    for name in ["answer only inside think", "several answers after think", "tags in wrong order",
                 "reference in reasoning, other final", "answer then more thinking"]:
        assert compute_reward(ADD, HACKS[name]).accuracy == 0.0, name


def test_length_penalty_dapo():
    assert length_penalty(100, 512, 128) == 0.0
    assert length_penalty(384, 512, 128) == 0.0
    assert length_penalty(448, 512, 128) == pytest.approx(-0.5)
    assert length_penalty(600, 512, 128) == -1.0
    cfg = RewardConfig(length=1.0)
    long = compute_reward(ADD, HACKS["repetition loop"], cfg)
    assert long.length == -1.0 and long.total < compute_reward(ADD, GOOD, cfg).total
    assert compute_reward(ADD, GOOD, cfg, n_tokens=600).length == -1.0
    assert compute_reward(ADD, HACKS["repetition loop"]).length == 0.0  # off by default


def test_r1_zero_mode():
    assert compute_reward(ADD, "<think>add</think> <answer>42</answer>", prompt_opened_think=False).accuracy == 1.0
    r = compute_reward(ADD, "add</think> <answer>42</answer>", prompt_opened_think=False)
    assert r.format == 0.0 and "no opening" in r.reasons["format"]
    assert compute_reward(ADD, "<think>add 42", prompt_opened_think=False).accuracy == 0.0


def test_language_consistency():
    ko = Sample("word", "사과가 3개 있고 2개를 더 사면 몇 개입니까?", "5", 1, {"check": "int"})
    assert compute_reward(ko, "3 더하기 2는 5 입니다\n</think>\n5").language == 1.0
    mixed = compute_reward(ko, "3 더하기 2 is five\n</think>\n5").language
    assert 0.2 < mixed < 0.8
    assert compute_reward(ko, "three plus two\n</think>\n5").language == 0.0
    # no letters in the prompt: one consistent script is asked for
    bare = Sample("add", "17 + 25 = ?", "42", 1, {"check": "int"})
    assert language_reward(bare.prompt, parse_completion("seven plus five</think>42"))[0] == 1.0
    assert language_reward(bare.prompt, parse_completion("seven 더하기 five</think>42"))[0] < 1.0
    assert script_of("한") == "hangul" and script_of("中") == "han" and script_of("a") == "latin" and script_of("1") is None


def test_repetition_detector():
    assert is_repetitive("wait " * 200)
    assert not is_repetitive(GOOD * 3)
    assert not is_repetitive("short")


def test_batch_helper():
    out = compute_rewards([ADD, ADD], [GOOD, HACKS["empty think"]])
    assert [r.accuracy for r in out] == [1.0, 1.0] and [r.format for r in out] == [1.0, 0.0]


@settings(max_examples=150, deadline=None)
@given(st.text(max_size=300))
def test_rewards_bounded_on_garbage(text):
    r = compute_reward(ADD, text, RewardConfig(length=1.0))
    assert 0 <= r.accuracy <= 1 and r.format in (0.0, 1.0) and 0 <= r.language <= 1 and -1 <= r.length <= 0
    if r.accuracy:  # an accuracy reward needs 42 as the only number after a closing tag
        assert "</think>" in text and "42" in text.split("</think>", 1)[1]


def test_print_hack_table():
    rows = [("good", GOOD)] + list(HACKS.items())
    cfg = RewardConfig(length=1.0, max_len=512, cache_len=128)
    print(f"\n{'case':40s} {'acc':>4s} {'fmt':>4s} {'lang':>5s} {'len':>5s} {'total':>6s}  reasons")
    for name, text in rows:
        r = compute_reward(ADD, text, cfg)
        print(f"{name:40s} {r.accuracy:4.1f} {r.format:4.1f} {r.language:5.2f} {r.length:5.2f} {r.total:6.2f}  "
              f"{r.reasons['accuracy']}; {r.reasons['format']}")
