"""Data sources: every --tasks entry (task, gym:ANY, data file) becomes samples with a checker; clear errors."""
import csv
import json

import pytest
from hypothesis import given, settings, strategies as st

from nanoseek.cli import main
from nanoseek.data.sources import (ANSWER_FIELDS, PROMPT_FIELDS, choose_check, eval_samples, heldout_samples,
                                   load_chat, reference_answer, resolve, resolve_all, row_sample, train_samples,
                                   with_split)
from nanoseek.data.task_registry import Sample, split_of
from nanoseek.data.tasks import get_task, mix
from nanoseek.data.verify import check_answer, last_boxed
from nanoseek.errors import UsageError

ROWS = [{"question": "Tom has 3 bags of 4 apples. How many apples?", "answer": "3 bags of 4 is 12.\n#### 12"},
        {"question": "What is 1/2 + 1/4?", "answer": "Add: $\\boxed{\\frac{3}{4}}$"},
        {"question": "Capital of France?", "answer": "Paris"},
        {"question": "Population, rounded?", "answer": "1,250"},
        {"question": "Simplify 2x + 3x.", "answer": "5x"}]


def write(path, rows=ROWS):
    """rows as a data file of path's type (the datasets library, pyarrow, json, csv), returns path."""
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif path.suffix == ".json":
        path.write_text(json.dumps(rows))
    elif path.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq
        pq.write_table(pa.Table.from_pylist(rows), path)
    elif path.suffix == ".csv":
        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    else:  # a datasets save_to_disk folder
        import datasets
        datasets.Dataset.from_list(rows).save_to_disk(str(path))
    return path


# ------------------------------------------------------------------------------ reference answers

def test_gsm8k_and_boxed_references():
    assert reference_answer("She sells 16 - 3 - 4 = <<16-3-4=9>>9 eggs.\n#### 18") == (
        "18", "She sells 16 - 3 - 4 = <<16-3-4=9>>9 eggs.")
    assert reference_answer("so #### 1,000") == ("1000", "so")
    assert reference_answer("Thus $\\boxed{\\frac{1}{2}}$.")[0] == "\\frac{1}{2}"
    assert reference_answer("\\boxed{1} then \\boxed{x^{2}}")[0] == "x^{2}"   # the last box
    assert reference_answer("  42 ") == ("42", "")
    assert reference_answer("\\boxed{") == ("\\boxed{", "")                 # unclosed: kept as is
    assert last_boxed("\\fbox{ {a}{b} }") == " {a}{b} "


latex = st.recursive(st.sampled_from(["1", "x", "\\pi", "2", "+", "-", "^"]),
                     lambda inner: st.one_of(st.tuples(inner, inner).map("".join),
                                             inner.map(lambda t: "{" + t + "}"),
                                             st.tuples(inner, inner).map(lambda p: f"\\frac{{{p[0]}}}{{{p[1]}}}")),
                     max_leaves=8)
prose = st.text(st.characters(blacklist_characters="#{}\\", blacklist_categories=("Cs",)), max_size=60)


@settings(max_examples=200, deadline=None)
@given(rationale=prose, n=st.integers(-10 ** 9, 10 ** 9))
def test_gsm8k_reference_property(rationale, n):
    ref, why = reference_answer(f"{rationale}\n#### {n}")
    assert ref == str(n) and why == rationale.strip()
    assert choose_check(ref) == "int"


@settings(max_examples=200, deadline=None)
@given(before=prose, content=latex, after=prose)
def test_boxed_reference_property(before, content, after):
    ref, why = reference_answer(f"{before} \\boxed{{{content}}} {after}")
    assert ref == content.strip() and why
    assert last_boxed(f"\\boxed{{{content}}}") == content


def test_checker_choice():
    assert [choose_check(a) for a in ["12", "-7", "+3", "007"]] == ["int"] * 4
    assert [choose_check(a) for a in ["0.5", "1/2", "\\frac{1}{2}", "$x$", "2x + 1", "(1, 2)", "3\\sqrt{2}",
                                      "1e-3", "50%", "x^2 - 1"]] == ["math"] * 10
    assert [choose_check(a) for a in ["Paris", "yes", "A", "3 apples", "mother-in-law", "x"]] == ["string"] * 6


@given(st.integers())
def test_integers_are_int_checked(n):
    assert choose_check(str(n)) == "int"


@given(st.from_regex(r"[A-Za-z]{4,12}( [A-Za-z]{2,12}){0,3}", fullmatch=True))
def test_words_are_string_checked(words):
    assert choose_check(words) == "string"


# ------------------------------------------------------------------------------ fields

@settings(max_examples=60, deadline=None)
@given(p=st.sampled_from(PROMPT_FIELDS), a=st.sampled_from(ANSWER_FIELDS), other=st.sampled_from(["id", "meta", "x"]),
       prompt=st.text(min_size=1, max_size=30).filter(str.strip), n=st.integers(0, 999))
def test_field_detection_property(p, a, other, prompt, n):
    record = {other: "noise", p: prompt, a: str(n)}
    s = row_sample(record, 0, "t", "f.jsonl", list(record))
    assert (s.prompt, s.answer, s.meta["check"]) == (prompt.strip(), str(n), "int")


def test_field_priority_and_flags(tmp_path):
    # answer beats solution (MATH-500 has both); explicit and dotted fields; a chat prompt is its last user turn
    s = row_sample({"problem": "p", "solution": "long \\boxed{2}", "answer": "2"}, 0, "t", "f", [])
    assert s.answer == "2" and "rationale" not in s.meta
    rows = [{"q": "2+2?", "reward_model": {"ground_truth": "4"}, "answer": "ignored"},
            {"q": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "3+3?"}],
             "reward_model": {"ground_truth": "6"}, "answer": "x"}]
    src = resolve(str(write(tmp_path / "verl.jsonl", rows)), "q", "reward_model.ground_truth")
    assert [(r.prompt, r.answer) for r in src.rows] == [("2+2?", "4"), ("3+3?", "6")]


@pytest.mark.parametrize("name", ["d.jsonl", "d.json", "d.parquet", "d.csv", "d_dir"])
def test_each_format_round_trips(tmp_path, name):
    path = write(tmp_path / name)
    src = resolve(str(path))
    assert src.kind == "file" and src.name == path.stem
    assert [r.prompt for r in src.rows] == [r["question"] for r in ROWS]
    assert [r.answer for r in src.rows] == ["12", "\\frac{3}{4}", "Paris", "1250", "5x"]
    assert [r.meta["check"] for r in src.rows] == ["int", "math", "string", "int", "math"]
    assert all(r.task == path.stem for r in src.rows)
    assert src.rows[0].meta["rationale"] == "3 bags of 4 is 12."


def test_datasetdict_folder_and_csv_keeps_text(tmp_path):
    import datasets
    d = datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS[:3]),
                              "test": datasets.Dataset.from_list(ROWS[3:])})
    d.save_to_disk(str(tmp_path / "dd"))
    assert len(resolve(str(tmp_path / "dd")).rows) == 3                  # its train split
    assert [r.answer for r in resolve(f"{tmp_path / 'dd'}@test").rows] == ["1250", "5x"]  # a named split
    write(tmp_path / "c.csv", [{"prompt": "pad?", "answer": "007"}, {"prompt": "half?", "answer": "0.50"}])
    assert [r.answer for r in resolve(str(tmp_path / "c.csv")).rows] == ["007", "0.50"]


def test_mixed_type_answer_column_stays_exact(tmp_path):
    # ints in some rows, text in others: datasets stores the column as JSON; "0.3" must not become 0.30000000000000004
    rows = [{"prompt": "a", "answer": 24}, {"prompt": "b", "answer": "0.3"}, {"prompt": "c", "answer": "007"},
            {"prompt": "d", "answer": "1.50"}, {"prompt": "e", "answer": "Paris"}, {"prompt": "f", "answer": 0.1}]
    src = resolve(str(write(tmp_path / "mixed.jsonl", rows)))
    assert [r.answer for r in src.rows] == ["24", "0.3", "007", "1.50", "Paris", "0.1"]
    assert [r.meta["check"] for r in src.rows] == ["int", "math", "int", "math", "string", "math"]


def test_checker_per_sample_and_check_column(tmp_path):
    rows = [{"prompt": "a", "answer": "x^2+1", "check": "string"}, {"prompt": "b", "answer": "12", "check": None},
            {"prompt": "c", "answer": "1/2", "check": "auto"}]
    src = resolve(str(write(tmp_path / "c.jsonl", rows)))
    assert [r.meta["check"] for r in src.rows] == ["string", "int", "math"]
    assert check_answer(src.rows[0], "x^2 + 1").correct is False      # string: exact text
    assert check_answer(src.rows[1], "The answer is 12.").correct
    assert check_answer(src.rows[2], "0.5").correct
    with pytest.raises(UsageError, match="not one of int, math"):
        resolve(str(write(tmp_path / "bad.jsonl", [{"prompt": "a", "answer": "1", "check": "regex"}])))


def test_file_rows_grade_their_references(tmp_path):
    src = resolve(str(write(tmp_path / "g.jsonl")))
    for s in src.rows:
        assert check_answer(s, s.answer).correct, s
        s2 = Sample.from_dict(json.loads(json.dumps(s.to_dict())))  # graded from its JSON alone
        assert check_answer(s2, s.answer).correct
    assert check_answer(src.rows[1], "0.75").correct and not check_answer(src.rows[1], "0.7").correct
    assert check_answer(src.rows[2], "paris").correct and not check_answer(src.rows[2], "Lyon").correct


# ------------------------------------------------------------------------------ splits and pools

def test_pools_eval_and_splits(tmp_path):
    rows = [{"prompt": f"What is {i} + {i}?", "answer": str(2 * i)} for i in range(300)]
    path = str(write(tmp_path / "sums.jsonl", rows))
    # without files the training pool is exactly tasks.mix (GRPO runs resume bit-exactly)
    assert train_samples(resolve_all(["add", "sort"]), 40, 2, 5) == mix(["add", "sort"], 40, "train", 2, 5)
    pool = train_samples(resolve_all(["add", path]), 40, 1, 0)
    assert len(pool) == 40 + 300 and {s.task for s in pool} == {"add", "sums"}
    ev = eval_samples(resolve_all(["add", path]), 7, 1, 0)
    assert [s.prompt for s in ev if s.task == "sums"] == [r["prompt"] for r in rows[:7]]  # the first n rows
    train, test = resolve(f"{path}@train").rows, resolve(f"{path}@test").rows
    assert test and not {s.prompt for s in train} & {s.prompt for s in test}
    assert all(split_of(s.prompt) == "test" for s in test) and len(train) + len(test) < 300  # validation apart
    assert with_split(["add", "gym:gcd", path, f"{path}@test"], "train") == ["add", "gym:gcd", f"{path}@train",
                                                                                f"{path}@test"]
    held = heldout_samples(resolve_all(["add", f"{path}@train"]), 10, 1, 0)
    assert {s.task for s in held} == {"add", "sums"} and all(split_of(s.prompt) == "test" for s in held)
    assert heldout_samples(resolve_all([path]), 10) == []      # a whole file has no held-out part


def test_same_stem_twice_keeps_both_names(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    one, two = str(write(tmp_path / "a" / "my.jsonl")), str(write(tmp_path / "b" / "my.jsonl"))
    assert [s.name for s in resolve_all([one, two])] == ["my", two]


def test_load_chat_for_sft(tmp_path):
    rows = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello",
                                                              "reasoning_content": "greet back"}]},
            {"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]}]
    for path in (write(tmp_path / "chat.jsonl", rows), write(tmp_path / "chat.parquet", rows)):
        assert load_chat(path) == [{"messages": rows[0]["messages"]}, {"messages": rows[1]["messages"]}]
    qa = load_chat(write(tmp_path / "gsm.jsonl", ROWS[:1]))
    assert qa == [{"messages": [{"role": "user", "content": ROWS[0]["question"]},
                                {"role": "assistant", "content": "12", "reasoning_content": "3 bags of 4 is 12."}]}]


# ------------------------------------------------------------------------------ reasoning-gym

NEW_GYM = ["count_bits", "family_relationships", "number_sorting"]  # outside gym.LEVELS: default configs


@pytest.mark.parametrize("name", NEW_GYM)
def test_any_gym_dataset_graded_by_its_own_scorer(name):
    pytest.importorskip("reasoning_gym")
    from nanoseek.data.gym import LEVELS
    assert name not in LEVELS
    src = resolve(f"gym:{name}")
    assert src.kind == "gym" and src.name == f"gym:{name}"
    train = get_task(f"gym:{name}").generate(60, "train", seed=0)
    test = eval_samples([src], 15, 1, 0)  # eval draws the test split
    assert len(test) == 15 and not {s.prompt for s in train} & {s.prompt for s in test}
    for s in test[:5]:
        assert s.meta["check"] == "gym" and s.answer
        s = Sample.from_dict(json.loads(json.dumps(s.to_dict())))  # graded from its JSON alone
        assert check_answer(s, s.answer).correct
        assert not check_answer(s, "definitely not " + s.answer + " 17").correct


def test_unknown_gym_dataset_suggests_close_names():
    pytest.importorskip("reasoning_gym")
    with pytest.raises(UsageError, match="did you mean gym:count_bits"):
        resolve("gym:count_bit")
    with pytest.raises(UsageError, match="did you mean gym:gsm_symbolic"):
        resolve("gsm_symbolic")  # the prefix forgotten


# ------------------------------------------------------------------------------ errors through the CLI

def _bad_files(tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "broken.jsonl").write_text('{"prompt": "a", "answer": "1"}\n{"prompt": "b", answer: 2}\n')
    (tmp_path / "notes.txt").write_text("hello")
    write(tmp_path / "cols.jsonl", [{"text": "a", "label": "1"}])
    write(tmp_path / "noanswer.jsonl", [{"prompt": "a", "answer": "1"}, {"prompt": "b"}])
    return {
        "nope": "unknown task 'nope'",
        "ad": "did you mean add?",
        "gym:no_such_gym": "unknown reasoning-gym dataset",
        str(tmp_path / "missing.jsonl"): "does not exist",
        str(tmp_path / "notes.txt"): "unsupported file type '.txt'",
        str(tmp_path / "empty.jsonl"): "is empty",
        str(tmp_path / "broken.jsonl"): "broken.jsonl:2: not valid JSON",
        str(tmp_path / "cols.jsonl"): "has no prompt field (looked for prompt, question, problem, input); its "
                                      "columns: text, label; name the prompt column with --prompt-field",
        str(tmp_path / "noanswer.jsonl"): "row 2 has no answer field",
    }


@pytest.mark.parametrize("command", ["eval", "grpo", "rejection-sample"])
def test_task_errors_are_one_line_before_anything_is_made(tmp_path, capsys, command):
    pytest.importorskip("reasoning_gym")
    model = str(tmp_path / "no-model")  # never reached: the tasks fail first
    for spec, expected in _bad_files(tmp_path).items():
        out = tmp_path / "run"
        argv = [command, model, "--tasks", spec] + ([] if command == "eval" else ["--out", str(out)])
        assert main(argv) == 2, spec
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith(f"nanoseek {command}: error: ") and expected in err, err
        assert not out.exists()


def test_field_flag_errors_and_model_errors(tmp_path, capsys):
    data = str(write(tmp_path / "d.jsonl"))
    assert main(["eval", str(tmp_path / "m"), "--tasks", data, "--answer-field", "label"]) == 2
    err = capsys.readouterr().err
    assert "has no column 'label' (given by --answer-field); its columns: question, answer" in err
    assert err.count("\n") == 1
    # good tasks: then the model's own error, as one line too
    assert main(["eval", str(tmp_path / "m"), "--tasks", f"add,{data}"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no-model" not in err and str(tmp_path / "m") in err
    assert main(["sft", str(tmp_path / "m"), "--data", str(tmp_path / "gone.jsonl"), "--out", str(tmp_path / "r")]) == 2
    assert "gone.jsonl does not exist" in capsys.readouterr().err and not (tmp_path / "r").exists()
    assert main(["sft", str(tmp_path / "m"), "--tasks", "gym:gcd", "--out", str(tmp_path / "r")]) == 2
    assert "no worked solutions for gym:gcd" in capsys.readouterr().err
    assert main(["speedrun", "--tasks", "add,nope", "--out", str(tmp_path / "sr")]) == 2
    assert "unknown task 'nope'" in capsys.readouterr().err and not (tmp_path / "sr").exists()


# ------------------------------------------------------------------------------ eval and the data command

def test_eval_scores_a_jsonl_file_with_its_checkers(tmp_path):
    from nanoseek.data.chat import EOS
    from nanoseek.eval import Completion, evaluate, to_markdown
    path = str(write(tmp_path / "my.jsonl"))
    right = {"Tom": "12", "What is 1/2": "0.75", "Capital": "paris", "Population": "1,250", "Simplify": "5x"}

    def generate(prompts, n, temperature, top_p, max_tokens, seed):  # the model stands aside: data + scoring
        out = []
        for p in prompts:
            answer = next((v for k, v in right.items() if k in p), "?")
            answer = "Lyon" if "Capital" in p and n == 1 else answer  # greedy gets France wrong
            out.append([Completion(f"thinking\n</think>\n\n{answer}{EOS}", 5) for _ in range(n)])
        return out

    r = evaluate(tasks=[path, "add"], n=10, k=2, generate=generate)
    mine = r["tasks"]["my"]
    assert mine["n"] == 5 and mine["pass@1"] == 1.0 and mine["greedy"] == pytest.approx(0.8)
    assert mine["checker"] == "int+math+string" and r["tasks"]["add"]["checker"] == "int"
    assert r["overall"]["checker"] == "int+math+string"
    md = to_markdown(r)
    assert "| checker |" in md and "| my | 5 | 100.0 | 80.0 |" in md and md.count("int+math+string") == 2


def test_data_command_on_files_and_new_gym(tmp_path, capsys):
    pytest.importorskip("reasoning_gym")
    from nanoseek.data.cli import Options, run
    path = str(write(tmp_path / "my.jsonl"))
    rows = run(Options(task=[path, "gym:count_bits"], n=4, out=str(tmp_path / "s.jsonl")))
    assert len(rows) == 5 + 4
    out = capsys.readouterr().out
    assert "[my] 5 rows of" in out and "checkers: int 2, math 2, string 1" in out
    assert "[gym:count_bits]" in out and "checkers: gym 4" in out and "0 reference(s) failed" in out
    run(Options(list=True))
    out = capsys.readouterr().out
    assert "gym:count_bits" not in out and "count_bits" in out and "add" in out
