"""The CI variant of the main job: every stage runs end to end and leaves finite metrics and every artifact."""
import json
import math
from pathlib import Path

import pytest
import torch

from nanoseek.options import read_config_file
from nanoseek.speedrun.report import mismatch_lines
from nanoseek.speedrun.run import Options, evaluated, speedrun, stage_names
from nanoseek.train.mismatch import LogprobMismatch, router_flips


@pytest.mark.slow
@pytest.mark.auto_dtype
def test_quick_speedrun_end_to_end(tmp_path):
    out = tmp_path / "run"
    opts = Options(out=str(out), quick=True, seeds=2)
    report = speedrun(opts)
    assert report.exists()
    md = report.read_text()
    assert "| stage | k | pass@1 %" in md
    assert "**GRPO (R1) over cold-start SFT**, 2 seeds" in md and "**R1-Zero over the base**, 2 seeds" in md
    assert "pass@1 % per task at difficulty 1:" in md and "One level above the trained range (difficulty 2" in md
    assert (out / "eval" / "grpo-difficulty2.json").exists()
    for name in ("accuracy", "loss", "reward", "expert_load"):
        assert (out / "plots" / f"{name}.png").stat().st_size > 1000
    stages = [stage for _, stage, _ in evaluated(opts)]
    assert {"grpo-seed1", "r1-zero-seed1"} <= set(stages)
    assert all(line in md for line in mismatch_lines(out, stages))  # the RL stages' mismatch (those that trained)
    for stage in stages:
        marker = json.loads((out / stage / "stage.json").read_text())
        assert (Path(marker["model"]) / "config.json").exists() and (Path(marker["model"]) / "tokenizer.json").exists()
        ev = json.loads((out / "eval" / f"{stage}.json").read_text())["overall"]
        for k in ("pass@1", "cons@k", "format_error", "mean_len"):
            assert ev[k] is not None and math.isfinite(ev[k]), (stage, k)
    for stage in ("pretrain", "sft", "sft2", "grpo"):
        rows = [json.loads(x) for x in (out / stage / "metrics.jsonl").read_text().splitlines() if x.strip()]
        assert rows, stage
        key = "reward" if stage == "grpo" else "loss"
        assert all(math.isfinite(r[key]) for r in rows if key in r), stage
    # GRPO on the SFT model pays the KL penalty to its cold-start model: the reference is loaded and moves the loss
    grpo_rows = [json.loads(x) for x in (out / "grpo" / "metrics.jsonl").read_text().splitlines() if '"kl"' in x]
    assert opts.grpo_beta > 0 and f"beta: {opts.grpo_beta}" in (out / "grpo" / "config.yaml").read_text()
    assert max(r["kl"] for r in grpo_rows) > 0
    # R1-Zero runs the same GRPO from the base: only the model, the prompt mode, the steps and the folder differ
    cfg = {stage: read_config_file(out / stage / "config.yaml") for stage in ("grpo", "r1-zero")}
    assert {k for k in cfg["grpo"] if cfg["grpo"][k] != cfg["r1-zero"][k]} <= {"model", "mode", "steps", "out"}
    assert cfg["r1-zero"]["mode"] == "r1-zero" and cfg["r1-zero"]["lr"] == opts.grpo_lr
    assert (out / "rejection" / "rejection.jsonl").exists()
    # rerunning resumes: every stage is skipped, nothing retrains
    before = (out / "pretrain" / "stage.json").read_text()
    speedrun(Options(out=str(out), quick=True, seeds=2))
    assert (out / "pretrain" / "stage.json").read_text() == before


def test_r1_zero_branches_off_the_base_first_and_grpo_seeds_precede_the_student_baseline():
    names = stage_names(Options(seeds=3))
    assert names[:5] == ["pretrain", "r1-zero", "r1-zero-seed1", "r1-zero-seed2", "sft"]
    assert names[names.index("distill-logits") + 1:names.index("student-grpo")] == ["grpo-seed1", "grpo-seed2"]
    assert names[-2:] == ["eval", "report"] and len(names) == len(set(names)) == 15
    assert "r1-zero" not in stage_names(Options(seeds=3, r1_zero=False))


def test_report_checks_weigh_the_change_against_question_noise():
    from nanoseek.speedrun.report import _checks, paired_two_se
    same = [0.0, 1.0] * 50
    assert paired_two_se(same, same) == (100, 0.0)
    n, two_se = paired_two_se([0.0] * 100, [1.0] * 10 + [0.0] * 90)   # 10 of 100 questions flip to right
    assert n == 100 and 0.05 < two_se < 0.07
    res = lambda xs: {"pass@1": sum(xs) / len(xs), "per_question": xs}  # noqa: E731
    base, sft = [0.0] * 100, [1.0] * 30 + [0.0] * 70
    wobble = [1.0] * 29 + [0.0] * 70 + [1.0]                           # a 1-question difference
    lines = _checks({"pretrain": res(base), "sft": res(sft), "grpo": res(wobble)})
    assert lines[0].startswith("- cold-start SFT raises held-out accuracy over the base: yes")
    assert "GRPO raises held-out accuracy over cold-start SFT: **within noise**" in lines[1]
    lines = _checks({"sft": res(sft), "grpo": res([0.0] * 100)})
    assert "**no**" in lines[0]


def test_seed_table_gives_each_seed_its_verdict_and_the_gap_it_closed():
    from nanoseek.speedrun.report import seed_table
    res = lambda label, xs, **kw: {"label": label, "pass@1": sum(xs) / len(xs), "per_question": xs, **kw}  # noqa: E731
    sft = res("cold-start SFT", [1.0] * 20 + [0.0] * 80, **{"pass@16": 0.6})
    results = {"sft": sft, "grpo": res("GRPO (R1), seed 0", [1.0] * 40 + [0.0] * 60),
               "grpo-seed1": res("GRPO (R1), seed 1", [1.0] * 21 + [0.0] * 79)}
    lines = seed_table(results, 16)
    rows = [x for x in lines if x.startswith("| 0 ") or x.startswith("| 1 ")]
    assert rows[0].split("|")[3].strip() == "+20.0" and "yes" in rows[0] and rows[0].rstrip(" |").endswith("50 %")
    assert "within noise" in rows[1]
    assert any("Mean gain +10.5" in x and "1 of 2 seeds" in x for x in lines)
    assert seed_table({"sft": sft, "grpo": results["grpo"]}, 16) == []  # one seed: the main table says it all


def test_r1_zero_length_line_reads_the_metrics(tmp_path):
    from nanoseek.speedrun.report import r1_zero_length
    assert r1_zero_length(tmp_path) is None
    (tmp_path / "r1-zero").mkdir()
    rows = [{"step": i + 1, "reward": 0.1, "accuracy": i / 40, "reward_format": min(1.0, i / 20),
             "response_len": 20 + i} for i in range(40)]
    (tmp_path / "r1-zero" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    line = r1_zero_length(tmp_path)
    # first tenth: steps 1-4 (lengths 20-23, mean 21.5), last tenth: steps 37-40 (56-59, mean 57.5)
    assert "grows: 22 → 58 tokens (2.67×)" in line and "of its 40 steps" in line and "format rate 8 → 100 %" in line


def test_mismatch_lines_give_each_rl_stage_its_logged_mismatch(tmp_path):
    def row(step, dlogp, flipped, replayed):  # a GRPO row as mismatch.py logs it: 4 tokens, 2 MoE layers
        lp = LogprobMismatch(torch.device("cpu"))
        lp.add(torch.tensor([[dlogp, 0.0, 0.0, 0.0]]), torch.zeros(1, 4), torch.ones(1, 4))
        engine = [torch.zeros(2, 4, 1, dtype=torch.long)]
        trainer = torch.zeros(2, 1, 4, 1, dtype=torch.long)
        trainer[0, 0, :flipped] = 1  # layer 0 sends the first `flipped` tokens elsewhere
        out = {"step": step, "reward": 0.5, **lp.row()}
        if replayed:
            return {**out, **router_flips(engine, torch.zeros_like(trainer), torch.ones(1, 4)),
                    **router_flips(engine, trainer, torch.ones(1, 4), "_unreplayed")}
        return {**out, **router_flips(engine, trainer, torch.ones(1, 4))}

    for stage, rows in (("grpo", [row(1, 0.5, 1, False), row(2, 0.1, 3, False)]),
                        ("grpo-seed1", [row(1, 0.5, 2, True)]), ("r1-zero", [{"step": 1, "reward": 0.1}])):
        (tmp_path / stage).mkdir()
        (tmp_path / stage / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    lines = mismatch_lines(tmp_path, ["pretrain", "grpo", "grpo-seed1", "r1-zero"])
    assert len(lines) == 2  # r1-zero logged no mismatch, pretrain has no metrics here
    kl = lambda d: (math.exp(d) - 1 - d) / 4  # noqa: E731  (k3 per token over the 4 tokens)
    assert lines[0] == (f"- grpo: mismatch_kl {(kl(0.5) + kl(0.1)) / 2:.2g} per token (worst step {kl(0.5):.2g}), "
                        "max |Δ log p| 0.5 over 2 steps; router flips 25.00 % of routing decisions (50.00 % of tokens)")
    assert lines[1].endswith("router flips 0.00 % of routing decisions (0.00 % of tokens); without replay 25.00 % of "
                             "routing decisions (50.00 % of tokens)")


def test_task_table_lists_each_stage_per_task_and_the_level_above():
    from nanoseek.speedrun.report import task_table
    results = {"sft": {"label": "cold-start SFT", "pass@1": 0.5, "tasks": {"add": 0.25, "sub": 0.75}},
               "grpo": {"label": "GRPO (R1)", "pass@1": 0.625, "tasks": {"add": 0.5, "sub": 0.75}}}
    above = {"grpo": {"label": "GRPO (R1)", "pass@1": 0.1, "tasks": {"add": 0.0, "sub": 0.2}}}
    lines = task_table(results, above, 2)
    assert lines[0] == "| stage | add | sub | all |" and lines[2] == "| cold-start SFT | 25.0 | 75.0 | 50.0 |"
    assert "difficulty 3" in lines[5] and lines[-1] == "| GRPO (R1) | 0.0 | 20.0 | 10.0 |"
    assert task_table({"x": {"label": "x", "pass@1": 0.1}}, {}, 1) == []


def test_full_k_only_where_the_report_needs_pass_at_k():
    from nanoseek.speedrun.run import eval_k
    o = Options()
    stages = ("sft", "grpo", "grpo-seed1", "pretrain", "r1-zero", "r1-zero-seed1", "sft2", "distill-sft",
              "student-grpo")
    assert [eval_k(o, s, o.difficulty) for s in stages] == [16, 16, 16, 4, 4, 4, 4, 4, 4]
    assert eval_k(o, "grpo", o.difficulty + 1) == 4  # one level above: pass@1 only
    assert eval_k(Options(eval_k=2), "pretrain", 2) == 2  # never more samples than --eval-k
