"""Cold-start worked solutions and the pretraining corpus."""
import json
import re

import pytest

from nanoseek.data.chat import BOS, EOS, question_prompt, render_chat
from nanoseek.data.coldstart import SOLVERS, coldstart_dataset, coldstart_record, worked_solution
from nanoseek.data.corpus import default_corpus, iter_documents, iter_text_file, render_document
from nanoseek.data.tasks import get_task, list_tasks
from nanoseek.rewards import compute_reward


def test_every_own_task_has_a_solver():
    assert set(SOLVERS) == set(list_tasks(own_only=True))


@pytest.mark.parametrize("name", sorted(SOLVERS))
def test_solutions_are_correct_and_short(name):
    task = get_task(name)
    for d in range(task.min_difficulty, task.max_difficulty + 1):
        for seed in range(3):
            for s in task.generate(15, "train", d, seed):
                rec = coldstart_record(s)
                user, asst = rec["messages"]
                assert user == {"role": "user", "content": s.prompt}
                reasoning = asst["reasoning_content"]
                assert reasoning and "think>" not in reasoning and len(reasoning) < 700
                # the chat rendering's completion gets full accuracy + format reward
                prompt = render_chat([user], add_generation_prompt=True)
                completion = render_chat(rec["messages"])[len(prompt):]
                r = compute_reward(s, completion)
                assert (r.accuracy, r.format) == (1.0, 1.0), (s, completion, r)


def test_arithmetic_steps_are_true():
    """Every 'a op b [op c] = z' chain in the solutions is arithmetically right."""
    chain = re.compile(r"((?:-?\d+ [+\-*/] )+-?\d+) = (-?\d+)")
    n_checked = 0
    for name in ["add", "sub", "mul", "lineq", "word", "countdown"]:
        for s in get_task(name).generate(60, seed=5):
            for lhs, z in chain.findall(worked_solution(s)):
                assert eval(lhs) == int(z), (name, s.prompt, worked_solution(s))  # digits and + - * / only
                n_checked += 1
    assert n_checked > 500


def test_carry_lines_for_addition():
    s = next(x for x in get_task("add").generate(50, difficulty=3) if x.meta["a"] % 10 + x.meta["b"] % 10 >= 10)
    assert "carry 1" in worked_solution(s).splitlines()[0]


def test_coldstart_dataset():
    data = coldstart_dataset(20, ["add", "sort"], difficulty=2, seed=1)
    assert len(data) == 20 and data == coldstart_dataset(20, ["add", "sort"], difficulty=2, seed=1)
    json.dumps(data)


def test_corpus_documents(tmp_path):
    docs = list(iter_documents(60, seed=0))
    assert len(docs) == 60 and docs == list(iter_documents(60, seed=0))
    styles = {"chat": sum(EOS in d for d in docs), "zero": sum("<answer>" in d for d in docs),
              "plain": sum(d.startswith("Question:") for d in docs)}
    assert all(v > 5 for v in styles.values()), styles
    assert len(default_corpus(10, seed=1)) == 10
    (tmp_path / "a.txt").write_text("first doc\n\nsecond doc\n")
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "third"}) + "\n" + json.dumps({"other": 1}) + "\n")
    extra = list(iter_documents(2, files=[str(tmp_path / "a.txt"), str(tmp_path / "b.jsonl")]))
    assert extra[2:] == ["first doc", "second doc", "third"]
    assert list(iter_text_file(tmp_path / "a.txt")) == ["first doc", "second doc"]


@pytest.mark.parametrize("name", sorted(SOLVERS))
def test_r1_zero_prompt_opens_the_base_models_documents(name):
    """R1-Zero asks the base with its instruction preamble: the base must have read documents that open with that
    very prompt, the worked solution and the tagged answer following it, as its rewards parse them."""
    s = get_task(name).generate(1, "train", 1)[0]
    prompt = question_prompt(None, s.prompt, "r1-zero").removeprefix(BOS)
    doc = render_document(s, "zero")
    assert doc.startswith(prompt)
    r = compute_reward(s, doc[len(prompt):], prompt_opened_think=True)
    assert r.accuracy == 1.0 and r.format == 1.0, (doc, r)


def test_corpus_never_holds_test_problems():
    docs = "\n".join(iter_documents(300, seed=0, tasks=["add"], difficulty=1))
    for s in get_task("add").generate(10, "test", 1):
        assert s.prompt not in docs
