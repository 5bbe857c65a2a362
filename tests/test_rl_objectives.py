"""The speedrun's optional RL-objective stages (speedrun/rl_objectives.py): each arm's options train a real GRPO step
on a tiny MoE with a bf16 engine, the stages sit before the evaluation seed by seed, and the report's table reads
the arms' metrics (held-out accuracy before/after, mismatch, flips, collapse) as they were logged."""
import json

import pytest

from nanoseek.speedrun import rl_objectives
from nanoseek.speedrun.run import Options, stage_names

from test_grpo_mismatch import run_steps, tok  # noqa: F401  (tok: a fixture)


@pytest.mark.parametrize("arm", list(rl_objectives.ARMS))
def test_each_arm_trains_a_step_on_a_bf16_engine(tok, arm):
    kw = rl_objectives.arm_options(arm, {"lr": 1e-3}, steps=1, seed=0, heldout=0)
    assert kw["rollout_dtype"] == "bf16" and kw["mu"] == 2 and kw["lr"] == 1e-3
    kw = {k: v for k, v in kw.items() if k not in ("steps", "eval_n")}
    (row,) = run_steps(tok, **kw)
    assert row["mismatch_kl"] > 0  # the bf16 engine is not the fp32 trainer
    assert "router_flip_rate" in row
    if arm == "grpo-r3":
        assert row["router_flip_rate"] == 0 and "router_flip_rate_unreplayed" in row
    else:
        assert "router_flip_rate_unreplayed" not in row


def test_an_unknown_arm_is_a_clear_error():
    with pytest.raises(SystemExit, match="unknown --rl-objectives arm 'ppo'.*grpo, grpo-r3, gspo, cispo"):
        rl_objectives.arm_options("ppo", {}, 1, 0, 0)


def test_the_arms_run_seed_by_seed_before_the_evaluation():
    names = stage_names(Options(seeds=2, rl_objectives=["grpo", "cispo"], r1_zero=False))
    arms = names[names.index("student-grpo") + 1:names.index("eval")]
    assert arms == ["rl-grpo", "rl-cispo", "rl-grpo-seed1", "rl-cispo-seed1"]
    assert "rl-grpo" not in stage_names(Options(seeds=2))


def _write_run(d, start, end, kl, flips, unreplayed=None, skipped=0):
    rows = [{"step": 0, "eval_accuracy": start}]
    for s in range(1, 11):
        r = {"step": s, "reward": 0.1 * s, "mismatch_kl": kl, "clip_frac": 0.01, "router_flip_rate": flips,
             "skipped": skipped}
        if unreplayed is not None:
            r["router_flip_rate_unreplayed"] = unreplayed
        rows.append(r)
    rows.append({"step": 10, "eval_accuracy": end})
    d.mkdir(parents=True)
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_the_report_section_pools_the_seeds_of_each_arm(tmp_path):
    _write_run(tmp_path / "rl-grpo", 0.50, 0.60, 1e-3, 0.02)
    _write_run(tmp_path / "rl-grpo-seed1", 0.50, 0.70, 3e-3, 0.04)
    _write_run(tmp_path / "rl-grpo-r3", 0.50, 0.30, 1e-3, 0.0, unreplayed=0.03)  # lost 20 points: a collapse
    _write_run(tmp_path / "rl-grpo-r3-seed1", 0.50, 0.55, 1e-3, 0.0, unreplayed=0.05, skipped=0)
    stages = {s: {"wall_s": 100.0} for s in ("rl-grpo", "rl-grpo-seed1", "rl-grpo-r3", "rl-grpo-r3-seed1")}
    lines, plots = rl_objectives.section(tmp_path, ["grpo", "grpo-r3", "gspo"], [0, 1], stages)
    grpo = next(x for x in lines if x.startswith("| grpo |"))
    r3 = next(x for x in lines if x.startswith("| grpo-r3 |"))
    assert not any(x.startswith("| gspo |") for x in lines)  # an arm that did not run has no row
    cells = [c.strip() for c in grpo.strip("|").split("|")]
    assert cells[1:6] == ["2", "50.0 ± 0.0", "65.0 ± 7.1", "+10.0 / +20.0", "+15.0"]
    assert cells[6] == "0.100 → 1.000" and cells[7] == "0.002" and cells[8] == "3.00" and cells[9] == "–"
    assert cells[11:] == ["100 s", "0 of 2"]
    cells = [c.strip() for c in r3.strip("|").split("|")]
    assert cells[4:6] == ["-20.0 / +5.0", "-7.5"]
    assert cells[8] == "0.00" and cells[9] == "4.00" and cells[-1] == "1 of 2"
    assert len(plots) == 1 and plots[0].stat().st_size > 1000


def test_the_reward_curve_is_a_trailing_moving_average():
    assert rl_objectives._moving_average([1.0, 3.0, 5.0, 7.0], 2) == [1.0, 2.0, 4.0, 6.0]
    assert rl_objectives._moving_average([], 3) == []


def test_no_arm_no_section(tmp_path):
    assert rl_objectives.section(tmp_path, [], [0], {}) == ([], [])
    assert rl_objectives.section(tmp_path, ["grpo"], [0], {}) == ([], [])
