"""Evaluation harness: metric math, the scoring path with a perfect stub, and a tiny random model end to end."""
import itertools
import json

import pytest
import torch
from hypothesis import given, settings, strategies as st

from nanoseek.data.chat import EOS
from nanoseek.data.task_registry import Sample
from nanoseek.eval import (METRICS, Completion, Options, build_prompt, cons_at_k, evaluate, pass_at_k, run,
                           score_question, to_markdown)

TASKS = ["add", "sort", "countdown", "compare"]


def comp(answer: str) -> Completion:
    return Completion(f"I add the numbers.\n</think>\n\n{answer}{EOS}", 7)


def test_pass_and_cons_math():
    s = Sample("add", "What is 1 + 2?", "3", 1, {"check": "int"})
    q = score_question(s, [comp("3"), comp("3"), comp("4")])
    assert q["pass@1"] == pytest.approx(2 / 3) and q["cons@k"] == 1.0 and q["format_error"] == 0
    q = score_question(s, [comp("4"), comp("3"), comp("4")])
    assert q["pass@1"] == pytest.approx(1 / 3) and q["cons@k"] == 0.0
    # a format error does not vote; ties go to the first answer seen
    bad = Completion("no think block closed", 4)
    q = score_question(s, [bad, bad, comp("3")])
    assert q["cons@k"] == 1.0 and q["format_error"] == pytest.approx(2 / 3) and q["mean_len"] == pytest.approx(5)
    assert cons_at_k(["5", "3", "3 ", "5."], [False, True, True, False]) == 0.0
    assert cons_at_k(["", ""], [False, False]) == 0.0


@settings(max_examples=200, deadline=None)
@given(st.lists(st.booleans(), min_size=1, max_size=9), st.integers(1, 9))
def test_pass_at_k_is_the_chance_that_k_of_the_samples_hold_a_correct_one(correct, k):
    """Unbiased pass@k equals the brute-force share of k-subsets of the samples with a correct one in them."""
    n, c = len(correct), sum(correct)
    if k > n:
        with pytest.raises(ValueError):
            pass_at_k(n, c, k)
        return
    subsets = list(itertools.combinations(correct, k))
    assert pass_at_k(n, c, k) == pytest.approx(sum(map(any, subsets)) / len(subsets))
    assert pass_at_k(n, c, 1) == pytest.approx(c / n) and pass_at_k(n, c, k) >= pass_at_k(n, c, 1) - 1e-12


def test_pass_at_k_in_the_report():
    s = Sample("add", "What is 1 + 2?", "3", 1, {"check": "int"})

    def one_in_four(prompts, n, temperature, top_p, max_tokens, seed):  # 1 correct of every 4 samples
        return [[comp("3" if i % 4 == 0 else "4") for i in range(n)] for _ in prompts]
    r = evaluate(generate=one_in_four, samples=[s], k=16, greedy=False)
    o = r["overall"]
    assert o["pass@1"] == pytest.approx(0.25) and o["pass@4"] == pytest.approx(1 - 495 / 1820)  # 1 - C(12, 4) / C(16, 4)
    assert o["pass@16"] == 1.0 and o["pass@64"] is None  # only k up to the samples drawn
    assert "| **overall** | 1 | 25.0 | – | 0.0 | 100.0 |" in to_markdown(r) and "pass@k column: pass@16, the unbiased chance" in to_markdown(r)


def perfect(samples):
    """A stub generator that answers every question with its reference, in the R1 format."""
    ref = {build_prompt(s, "r1"): s.answer for s in samples}

    def generate(prompts, n, temperature, top_p, max_tokens, seed):
        return [[comp(ref[p]) for _ in range(n)] for p in prompts]
    return generate


def test_perfect_model_scores_one():
    from nanoseek.data.tasks import get_task
    samples = [s for t in TASKS for s in get_task(t).generate(5, "test", 1, seed=3)]
    r = evaluate(generate=perfect(samples), samples=samples, k=3)
    for row in [*r["tasks"].values(), r["overall"]]:
        assert row["pass@1"] == row["greedy"] == row["cons@k"] == 1.0
        assert row["format_error"] == 0.0
    assert set(r["tasks"]) == set(TASKS) and r["overall"]["n"] == 20
    assert "| **overall** | 20 | 100.0 |" in to_markdown(r)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A random tiny MoE model + tokenizer saved in HF layout."""
    from nanoseek.config import get_preset
    from nanoseek.data.corpus import default_corpus
    from nanoseek.model.transformer import Transformer
    from nanoseek.tokenizer import train_tokenizer
    d = tmp_path_factory.mktemp("tiny")
    tok = train_tokenizer(default_corpus(300, seed=1), 1024)
    torch.manual_seed(0)
    cfg = get_preset("tiny").replace(hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
                                     num_hidden_layers=2, vocab_size=tok.vocab_size)
    Transformer(cfg).save_pretrained(d, tokenizer=tok)
    return d


def test_tiny_model_end_to_end_and_deterministic(tiny, tmp_path):
    kw = dict(tasks=["add", "sort"], n=3, k=2, max_tokens=6, seed=1)
    r1 = evaluate(str(tiny), **kw)
    for row in [*r1["tasks"].values(), r1["overall"]]:
        for m in ("pass@1", "greedy", "cons@k", "format_error"):
            assert 0.0 <= row[m] <= 1.0
        assert 0 < row["mean_len"] <= 6
    r2 = evaluate(str(tiny), **kw)
    assert [e["completion"] for e in r1["examples"]] == [e["completion"] for e in r2["examples"]]
    assert r1["overall"] == r2["overall"]
    # the CLI path writes JSON + markdown; r1-zero prompts work too
    run(Options(model=str(tiny), tasks=["max"], n=2, k=2, max_tokens=4, template="r1-zero", out=str(tmp_path)))
    report = json.loads((tmp_path / "eval.json").read_text())
    assert report["template"] == "r1-zero" and set(METRICS) <= set(report["overall"])
    assert "| max | 2 |" in (tmp_path / "eval.md").read_text()


def test_greedy_on_the_engine_matches_full_recomputation(tiny):
    from nanoseek.eval import model_generator
    from nanoseek.hf.load import from_pretrained
    from nanoseek.tokenizer import load_tokenizer
    model, tok = from_pretrained(tiny), load_tokenizer(tiny)
    prompt = build_prompt(Sample("add", "What is 2 + 2?", "4"), "r1", tok)
    (out,), = model_generator(model, tok)([prompt], 1, 0.0, 1.0, 5, 0)
    seq = tok.encode(prompt)
    for _ in range(5):
        seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
        if seq[-1] == tok.eos_id:
            break
    assert out.n_tokens == len(seq) - len(tok.encode(prompt))
    assert tok.decode(seq[len(tok.encode(prompt)):]).replace(EOS, "") == out.text


def test_speculative_eval_gives_the_same_greedy_results_and_reports_acceptance(tiny):
    kw = dict(tasks=["add", "compare"], n=3, k=1, temperature=0.0, max_tokens=8, seed=2, greedy=False)
    plain = evaluate(str(tiny), **kw)
    spec = evaluate(str(tiny), speculative=True, **kw)
    assert "mtp_acceptance" not in plain and 0.0 <= spec["mtp_acceptance"] <= 1.0
    assert [e["completion"] for e in spec["examples"]] == [e["completion"] for e in plain["examples"]]
    assert spec["overall"] == plain["overall"]


def test_sound_counts_right_answers_whose_every_step_holds():
    s = Sample("add", "What is 47 + 38?", "85", 2, {"check": "int", "a": 47, "b": 38})
    good = "ones: 7 + 8 = 15, write 5 carry 1\ntens: 4 + 3 + 1 = 8\n</think>\n85"
    slip = "ones: 7 + 8 = 14, write 4 carry 1\ntens: 4 + 3 + 1 = 8\n</think>\n85"  # right answer, wrong step
    wrong = "ones: 7 + 8 = 15, write 5 carry 1\ntens: 4 + 3 = 7\n</think>\n75"
    hidden = "</think>\n85"  # right, but no reasoning shown

    def four(prompts, n, temperature, top_p, max_tokens, seed):
        return [[Completion(t, 20) for t in (good, slip, wrong, hidden)][:n] for _ in prompts]
    o = evaluate(generate=four, samples=[s], k=4, greedy=False)["overall"]
    assert o["pass@1"] == 0.75 and o["sound"] == 0.25
    assert "sound reasoning: samples that are right" in to_markdown(evaluate(generate=four, samples=[s], k=4))
