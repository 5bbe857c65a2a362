"""The CI variant of the main job: every stage runs end to end and leaves finite metrics and every artifact."""
import json
import math
from pathlib import Path

import pytest

from nanoseek.speedrun import EVALUATED, Options, speedrun


@pytest.mark.slow
@pytest.mark.auto_dtype
def test_quick_speedrun_end_to_end(tmp_path):
    out = tmp_path / "run"
    report = speedrun(Options(out=str(out), quick=True))
    assert report.exists()
    md = report.read_text()
    assert "| stage | pass@1 %" in md
    for name in ("accuracy", "loss", "reward", "expert_load"):
        assert (out / "plots" / f"{name}.png").stat().st_size > 1000
    for _, stage, _ in EVALUATED:
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
    assert (out / "rejection" / "rejection.jsonl").exists()
    # rerunning resumes: every stage is skipped, nothing retrains
    before = (out / "pretrain" / "stage.json").read_text()
    speedrun(Options(out=str(out), quick=True))
    assert (out / "pretrain" / "stage.json").read_text() == before


def test_report_checks_weigh_the_change_against_question_noise():
    from nanoseek.speedrun_report import _checks, paired_two_se
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
