"""Task registry: determinism, split disjointness, difficulty, mixing, user data."""
import json

import pytest

from nanoseek.data.sources import load_records
from nanoseek.data.task_registry import SPLITS, Sample, split_of
from nanoseek.data.tasks import get_task, list_tasks, mix
from nanoseek.data.verify import check_answer

OWN = ["add", "sub", "mul", "sort", "max", "compare", "countdown", "lineq", "word"]


def test_registry_lists_own_and_gym_tasks():
    names = list_tasks()
    assert set(OWN) <= set(names)
    assert any(n.startswith("gym:") for n in names)
    assert set(list_tasks(own_only=True)) == set(OWN)
    with pytest.raises(KeyError):
        get_task("nope")


@pytest.mark.parametrize("name", OWN)
def test_generate_deterministic_and_checked(name):
    task = get_task(name)
    for d in range(task.min_difficulty, task.max_difficulty + 1):
        a = task.generate(20, "train", d, seed=1)
        assert a == task.generate(20, "train", d, seed=1)
        assert a != task.generate(20, "train", d, seed=2)
        for s in a:
            assert s.task == name and s.difficulty == d and isinstance(s.answer, str)
            assert split_of(s.prompt) == "train"
            assert check_answer(s, s.answer).correct, s


@pytest.mark.parametrize("name", OWN)
def test_test_prompts_never_in_train(name):
    task = get_task(name)
    for d in (task.min_difficulty, task.max_difficulty):
        train = {s.prompt for s in task.generate(300, "train", d, seed=0)}
        test = {s.prompt for s in task.generate(30, "test", d, seed=0)}
        val = {s.prompt for s in task.generate(30, "validation", d, seed=0)}
        assert not train & test and not train & val and not test & val


def test_split_fractions_roughly_80_10_10():
    counts = {s: 0 for s in SPLITS}
    for i in range(5000):
        counts[split_of(f"What is {i} + {i * 7 % 13}?")] += 1
    assert 350 < counts["test"] < 650 and 350 < counts["validation"] < 650


def test_difficulty_controls_size():
    add = get_task("add")
    assert all(len(s.meta["a"].__str__()) <= 2 for s in add.generate(20, difficulty=2))
    assert all(len(str(s.meta["a"])) == 6 for s in add.generate(20, difficulty=6))
    assert all(len(s.meta["numbers"]) == 3 for s in get_task("sort").generate(10, difficulty=2))
    assert all(len(s.meta["numbers"]) == 5 for s in get_task("countdown").generate(10, difficulty=4))
    assert add.clip(99) == 6 and add.clip(-3) == 1
    levels = {s.difficulty for s in add.generate(60)}  # None: mixture over the range
    assert len(levels) >= 4
    with pytest.raises(ValueError):
        add.generate(1, split="dev")


def test_small_problem_space_still_fills_request():
    # 1-digit addition has ~10 test problems; asking for more repeats rather than hanging
    s = get_task("add").generate(40, "test", 1)
    assert len(s) == 40 and len({x.prompt for x in s}) < 40


def test_low_difficulty_prompts_are_short():
    for name in OWN:
        for s in get_task(name).generate(10, difficulty=1):
            assert len(s.prompt) < 100, s.prompt


def test_mix():
    m = mix(["add", "sort", "word"], 31, "validation", 2, seed=3)
    assert len(m) == 31 and {s.task for s in m} == {"add", "sort", "word"}
    assert m == mix(["add", "sort", "word"], 31, "validation", 2, seed=3)
    assert all(split_of(s.prompt) == "validation" for s in m)
    assert {s.task for s in mix(None, 18)} == set(OWN)


def test_sample_json_round_trip():
    s = get_task("countdown").generate(1)[0]
    s2 = Sample.from_dict(json.loads(json.dumps(s.to_dict())))
    assert s2 == s and check_answer(s2, s.answer).correct


def test_gym_tasks():
    pytest.importorskip("reasoning_gym")
    for name in ["gym:chain_sum", "gym:leg_counting", "gym:spell_backward"]:
        task = get_task(name)
        train = task.generate(20, "train", task.min_difficulty, seed=0)
        test = task.generate(10, "test", task.min_difficulty, seed=0)
        assert not {s.prompt for s in train} & {s.prompt for s in test}
        for s in train[:5]:
            assert "<answer>" not in s.answer
            s = Sample.from_dict(json.loads(json.dumps(s.to_dict())))  # graded from its JSON alone
            assert check_answer(s, s.answer).correct
            assert not check_answer(s, s.answer + "x").correct


def test_load_user_data(tmp_path):
    p = tmp_path / "d.jsonl"
    rows = [{"prompt": "What is 1/2 + 1/4?", "answer": "\\frac{3}{4}"}, {"question": "2+2?", "ground_truth": 4},
            {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}]
    p.write_text("\n".join(json.dumps(r) for r in rows))
    data = load_records(p)
    assert isinstance(data[0], Sample) and data[1].answer == "4" and data[2]["messages"][1]["content"] == "hello"
    assert check_answer(data[1], "4").correct and not check_answer(data[1], "5").correct
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa
    uniform = [{"prompt": s.prompt, "answer": s.answer} for s in data[:2]]
    pq.write_table(pa.Table.from_pylist(uniform), tmp_path / "d.parquet")
    assert [s.prompt for s in load_records(tmp_path / "d.parquet")] == [data[0].prompt, data[1].prompt]
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_list(uniform).save_to_disk(str(tmp_path / "ds"))
    assert [s.answer for s in load_records(tmp_path / "ds")] == ["\\frac{3}{4}", "4"]
    (tmp_path / "bad.jsonl").write_text(json.dumps({"foo": 1}))
    with pytest.raises(ValueError):
        load_records(tmp_path / "bad.jsonl")


def test_core_does_not_import_optional_libraries():
    import subprocess
    import sys
    code = ("import sys, nanoseek.data.tasks, nanoseek.data.verify, nanoseek.rewards, nanoseek.data.coldstart;"
            "from nanoseek.data.tasks import get_task; from nanoseek.rewards import compute_reward;"
            "s = get_task('add').generate(1)[0]; assert compute_reward(s, 'r</think>' + s.answer).accuracy == 1;"
            "print(sorted(m for m in ('reasoning_gym', 'math_verify', 'datasets', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_data_cli_writes_jsonl(tmp_path, capsys):
    from nanoseek.data.cli import Options, run
    rows = run(Options(task=["add", "countdown"], n=4, split="validation", difficulty=2, out=str(tmp_path / "s.jsonl")))
    lines = [json.loads(x) for x in (tmp_path / "s.jsonl").read_text().splitlines()]
    assert len(lines) == len(rows) == 8 and {r["task"] for r in lines} == {"add", "countdown"}
    out = capsys.readouterr().out
    assert "check(reference): True" in out and "answers/s" in out and "wrote 8 samples" in out
    run(Options(task=["sort"], n=3, chat=True, out=str(tmp_path / "c.jsonl")))
    recs = [json.loads(x) for x in (tmp_path / "c.jsonl").read_text().splitlines()]
    assert len(recs) == 3 and recs[0]["messages"][1]["reasoning_content"]


def test_max_difficulty_caps_the_mixed_levels():
    levels = {s.difficulty for s in get_task("add").generate(200, "train", None, seed=1, max_difficulty=2)}
    assert levels == {1, 2}
    assert {s.difficulty for s in get_task("add").generate(300, "train", None, seed=1)} == set(range(1, 7))
    assert {s.difficulty for s in mix(["add", "compare"], 100, max_difficulty=1)} == {1}
    assert get_task("add").generate(5, "train", 3, seed=1, max_difficulty=2) == get_task("add").generate(5, "train", 3, seed=1)
