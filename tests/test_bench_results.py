"""benchmarks' JSON: a run of some suites refreshes their rows and keeps the other suites' rows of the last run."""
import json

from benchmarks.common import Row, write_json


def test_a_partial_run_replaces_its_suites_rows_and_keeps_the_rest(tmp_path):
    path = tmp_path / "results.json"
    write_json([Row("train step", 1.0, 1.0, "tokens/s", 1.0, suite="train_step"),
                Row("GRPO step", 2.0, 4.0, "s/step", 2.0, suite="grpo_step"),
                Row("GRPO step, compiled", 2.0, 4.0, "s/step", 2.0, suite="grpo_step")], path)
    write_json([Row("GRPO step", 3.0, 6.0, "s/step", 2.0, suite="grpo_step")], path, {"grpo_step"})
    rows = json.loads(path.read_text())
    assert [(r["work"], r["ours"]) for r in rows] == [("train step", 1.0), ("GRPO step", 3.0)]


def test_rows_of_an_older_file_without_suites_are_replaced_by_name(tmp_path):
    path = tmp_path / "results.json"
    path.write_text(json.dumps([{"work": "GRPO step", "ours": 1, "reference": 1, "unit": "s", "ratio": 1, "note": ""},
                                {"work": "train step", "ours": 1, "reference": 1, "unit": "s", "ratio": 1, "note": ""}]))
    write_json([Row("GRPO step", 5.0, 5.0, "s", 1.0, suite="grpo_step")], path, {"grpo_step"})
    assert [(r["work"], r["ours"]) for r in json.loads(path.read_text())] == [("train step", 1), ("GRPO step", 5.0)]


def test_a_full_run_writes_only_its_rows(tmp_path):
    path = tmp_path / "results.json"
    path.write_text(json.dumps([{"work": "old", "ours": 1, "reference": 1, "unit": "s", "ratio": 1, "note": ""}]))
    write_json([Row("new", 1.0, 1.0, "s", 1.0, suite="x")], path)
    assert [r["work"] for r in json.loads(path.read_text())] == ["new"]
