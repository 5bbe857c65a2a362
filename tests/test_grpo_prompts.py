"""GRPO's --task-weighting learnable: the split of a step's prompts over the tasks, its moving average of
informative groups, and its exact resume; in a real GRPO run, the task whose groups teach gets the prompts."""
from types import SimpleNamespace

import pytest
import torch
from hypothesis import given, settings, strategies as st

from nanoseek.config import get_preset
from nanoseek.data.task_registry import Sample
from nanoseek.model.transformer import Transformer
from nanoseek.speedrun.run import Options as SpeedrunOptions, speedrun
from nanoseek.train.grpo import GRPO, Options, grpo
from nanoseek.train.grpo_prompts import TaskWeights

TASKS = ["add", "compare", "max", "sub"]


def _pools(sizes):
    return {t: [Sample(t, f"{t} question {i}", str(i)) for i in range(k)] for t, k in zip(TASKS, sizes)}


@settings(max_examples=200, deadline=None)
@given(signal=st.lists(st.floats(0, 1), min_size=4, max_size=4), n=st.integers(0, 64),
       sizes=st.lists(st.integers(1, 20), min_size=4, max_size=4))
def test_counts_and_draws_follow_the_shares(signal, n, sizes):
    w = TaskWeights(TASKS)
    w.load_state_dict(dict(zip(TASKS, signal)))
    shares = w.shares()
    assert abs(sum(shares.values()) - 1) < 1e-9
    assert min(shares.values()) >= w.floor / (1 + len(TASKS) * w.floor) - 1e-12  # no task starves
    counts = w.counts(n)
    assert sum(counts.values()) == n
    assert all(abs(counts[t] - shares[t] * n) < 1 for t in TASKS)  # largest remainder: within one of exact
    drawn = w.draw(_pools(sizes), n, "key")
    assert [s.task for s in drawn].count("add") == counts["add"] and len(drawn) == n
    assert drawn == w.draw(_pools(sizes), n, "key")  # a pure function of the key and the state
    for t, k in zip(TASKS, sizes):  # no repeats inside a step unless the pool is smaller than its count
        mine = [s.prompt for s in drawn if s.task == t]
        assert len(set(mine)) == min(len(mine), k)


def test_update_moves_the_prompts_to_the_task_that_teaches():
    w = TaskWeights(["add", "compare"])
    assert w.counts(16) == {"add": 8, "compare": 8}  # the first step spreads evenly
    for _ in range(10):
        w.update(["add"] * 4 + ["compare"] * 4, [True, True, True, False] + [False] * 4)
    assert abs(w.signal["add"] - (0.8 ** 10 + 0.75 * (1 - 0.8 ** 10))) < 1e-12
    assert abs(w.signal["compare"] - 0.8 ** 10) < 1e-12
    counts = w.counts(16)
    assert counts["add"] >= 13 and counts["compare"] >= 1  # the floor keeps a solved task in view
    w.update(["add"] * 2, [False, False])  # a task not drawn keeps its average
    assert abs(w.signal["compare"] - 0.8 ** 10) < 1e-12


def test_state_round_trips_and_ignores_unknown_tasks():
    w = TaskWeights(["add", "sub"])
    w.update(["add", "sub"], [True, False])
    v = TaskWeights(["add", "sub"])
    v.load_state_dict({**w.state_dict(), "gone": 0.3})
    assert v.signal == w.signal and v.counts(7) == w.counts(7)


# ------------------------------------------------------------------------------ inside a GRPO run

class DigitTok:
    """10 digit tokens (2..11), pad 0, eos 1, bos 12: enough for a task without a real tokenizer."""
    pad_id, eos_id, bos_id, vocab_size, stop_ids = 0, 1, 12, 16, [1]

    def encode(self, text):
        return [12] + [2 + int(c) for c in text if c.isdigit()][:4]

    def decode_completion(self, ids):
        return "".join(str(i - 2) for i in ids if 2 <= i <= 11)


class DigitGRPO(GRPO):
    """The questions' digits as the prompt (no chat template: the digit vocabulary has none)."""

    def encode_prompt(self, sample):
        return self.tok.encode(sample.prompt)


def _varied_on_add(samples, texts, n_tokens):
    """add's groups always differ (reward = the completion's first digit is even), compare's never."""
    out = []
    for i, (s, t) in enumerate(zip(samples, texts)):
        ok = float(i % 2 == 0) if s.task == "add" else 1.0
        out.append(SimpleNamespace(total=ok, accuracy=ok, format=1.0, language=1.0, length=0.0))
    return out


def _run(**kw):
    torch.manual_seed(0)
    model = Transformer(get_preset("tiny").replace(
        hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, vocab_size=16, bos_token_id=12, eos_token_id=1))
    o = Options(**{**dict(tasks=["add", "compare"], steps=6, prompts_per_step=8, group_size=4, max_new_tokens=2,
                          n_prompts=50, task_weighting="learnable", filter_zero_var=True), **kw})
    return DigitGRPO(model, DigitTok(), o, reward_fn=_varied_on_add)


def test_grpo_run_draws_more_of_the_task_that_teaches_and_resumes_its_draws():
    run = _run()
    rows = [run.step(s) for s in range(6)]
    shares = [r["task_share/add"] for r in rows]
    assert shares[0] == rows[0]["task_share/compare"] == 0.5  # the first step spreads evenly
    assert all(a < b for a, b in zip(shares, shares[1:])) and shares[-1] > 0.7, shares
    assert rows[-1]["task_share/compare"] > 0.05  # the floor
    drawn = [s.task for s in run.prompts_at(6)]
    assert drawn.count("add") > drawn.count("compare") >= 1
    # a resumed run loads the averages from the checkpoint's extra state and draws the same prompts
    resumed = _run()
    assert [s.prompt for s in resumed.prompts_at(6)] != [s.prompt for s in run.prompts_at(6)]
    resumed.load_extra_state(run.extra_state())
    assert [s.prompt for s in resumed.prompts_at(6)] == [s.prompt for s in run.prompts_at(6)]
    assert _run(task_weighting="even").extra_state() == {"skipped": 0}


def test_an_unknown_weighting_fails_before_any_run_folder(tmp_path):
    with pytest.raises(SystemExit, match="--grpo-task-weighting must be one of even, learnable, got 'uniform'"):
        speedrun(SpeedrunOptions(out=str(tmp_path / "run"), grpo_task_weighting="uniform"))
    with pytest.raises(SystemExit, match="--task-weighting must be one of even, learnable, got 'uniform'"):
        grpo(Options(model=str(tmp_path / "m"), out=str(tmp_path / "grpo"), task_weighting="uniform"))
    assert not any(tmp_path.iterdir())
