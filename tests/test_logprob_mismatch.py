"""benchmarks/logprob_mismatch.py: engine vs trainer log-probs on the same tokens, on a random tiny model."""
import math

import pytest
import torch

from benchmarks.logprob_mismatch import (ENGINE_BF16, ENGINE_FP32, TRAINER_FP32, TRAINER_FP32_EVAL, measure,
                                         mismatch_stats, random_model, routing_stats)
from nanoseek.data.sources import resolve_all, train_samples

KEYS = {"engine", "trainer", "sequences", "tokens", "mean_dlogp", "mean_abs_dlogp", "p50_abs_dlogp", "p99_abs_dlogp",
        "max_abs_dlogp", "share_abs_dlogp_over_0.1", "share_ratio_outside_clip", "mean_abs_seq_sum_dlogp",
        "mismatch_kl", "entropy", "router_flip_rate", "router_flip_rate_per_layer", "tokens_with_any_flip",
        "router_flip_rate_prompt"}


@pytest.fixture(scope="module")
def rows():
    model, tok = random_model("tiny")
    questions = [s.prompt for s in train_samples(resolve_all(["add"]), 3, 1, 0)]
    pairs = [(ENGINE_FP32, TRAINER_FP32), (ENGINE_FP32, TRAINER_FP32_EVAL), (ENGINE_BF16, TRAINER_FP32)]
    return measure(model, tok, questions, group=2, max_new_tokens=12, pairs=pairs)


def test_fp32_engine_and_fp32_trainer_agree(rows):
    """Same precision on both sides: only kernel and batching differences remain (measured ~3e-7)."""
    for r in rows[:2]:
        assert r["mean_abs_dlogp"] < 1e-3 and r["max_abs_dlogp"] < 1e-2
        assert r["share_ratio_outside_clip"] == 0.0
        assert r["router_flip_rate"] < 0.01


def test_bf16_engine_shows_a_mismatch(rows):
    """Autocast really reaches the engine's forwards: bf16 rounding is far above the fp32 floor."""
    assert rows[2]["mean_abs_dlogp"] > 10 * rows[0]["mean_abs_dlogp"]


def test_rows_are_consistent(rows):
    assert [(r["engine"], r["trainer"]) for r in rows] == [("fp32", "fp32 train"), ("fp32", "fp32 eval"),
                                                          ("bf16 autocast", "fp32 train")]
    for r in rows:
        assert KEYS <= r.keys()
        assert r["sequences"] == 3 * 2 and 0 < r["tokens"] <= 3 * 2 * 12
        assert r["p50_abs_dlogp"] <= r["p99_abs_dlogp"] <= r["max_abs_dlogp"]
        assert r["mismatch_kl"] >= 0 and r["mean_abs_dlogp"] >= abs(r["mean_dlogp"])
        shares = ("share_abs_dlogp_over_0.1", "share_ratio_outside_clip", "router_flip_rate", "tokens_with_any_flip",
                  "router_flip_rate_prompt", *r["router_flip_rate_per_layer"])
        assert all(0 <= (r[s] if isinstance(s, str) else s) <= 1 for s in shares)
        assert r["router_flip_rate"] <= r["tokens_with_any_flip"]
    assert rows[0]["tokens"] == rows[1]["tokens"]  # one engine run, scored by two trainer setups


def test_mismatch_stats_by_hand():
    engine = torch.zeros(2, 3)
    trainer = torch.tensor([[0.5, -0.3, 5.0], [0.05, 5.0, 5.0]])  # the 5.0s sit outside the mask
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    s = mismatch_stats(engine, trainer, mask, eps_low=0.2, eps_high=0.28)
    assert s["tokens"] == 3 and s["sequences"] == 2
    assert s["mean_abs_dlogp"] == pytest.approx(0.85 / 3) and s["max_abs_dlogp"] == pytest.approx(0.5)
    assert s["share_ratio_outside_clip"] == pytest.approx(2 / 3)  # exp(0.5) > 1.28, exp(-0.3) < 0.8
    assert s["share_abs_dlogp_over_0.1"] == pytest.approx(2 / 3)
    assert s["mean_abs_seq_sum_dlogp"] == pytest.approx((0.2 + 0.05) / 2)
    k3 = sum(math.exp(d) - 1 - d for d in (0.5, -0.3, 0.05)) / 3
    assert s["mismatch_kl"] == pytest.approx(k3)


def test_routing_compares_expert_sets_not_their_order():
    trainer = torch.tensor([[[[0, 1], [2, 3], [4, 5]]]])            # [layers 1, B 1, T 3, k 2]
    engine = torch.tensor([[[[1, 0], [2, 5], [4, 5], [-1, -1]]]])   # position 0 reordered, 1 flipped, 3 never run
    mask = torch.tensor([[0.0, 1.0, 1.0]])                           # positions 1, 2 scored; 0 is a prompt token
    s = routing_stats(engine, trainer, mask, prompt_lens=torch.tensor([2]))
    assert s["router_flip_rate"] == 0.5 and s["tokens_with_any_flip"] == 0.5 and s["router_flip_rate_prompt"] == 0.0
