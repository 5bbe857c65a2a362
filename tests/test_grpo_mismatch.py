"""GRPO's rollout/trainer mismatch metrics, its off-policy options and DAPO's dynamic sampling, end to end
on a tiny random MoE: ~0 mismatch for an fp32 engine and trainer, > 0 under a bf16 engine or a truncated
sampler (until the sampling mask is kept), and refills that are bounded and a pure function of (seed, step)."""
import math

import pytest
import torch

from nanoseek.config import get_preset
from nanoseek.data.corpus import default_corpus
from nanoseek.model.transformer import Transformer
from nanoseek.tokenizer import train_tokenizer
from nanoseek.train.grpo import GRPO, Options

BASE = dict(steps=2, prompts_per_step=4, group_size=4, max_new_tokens=12, temperature=1.5, mode="r1",
            language_weight=1.0, lr=1e-3, seed=0)


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(default_corpus(300, seed=1), 1024)


def tiny_moe(tok):
    torch.manual_seed(0)
    cfg = get_preset("tiny").replace(hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=3,
                                     vocab_size=tok.vocab_size, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id,
                                     pad_token_id=tok.pad_id)
    return Transformer(cfg).train()


def run_steps(tok, steps: int = 1, **kw) -> list[dict]:
    run = GRPO(tiny_moe(tok), tok, Options(**{**BASE, **kw}))
    return [run.step(s) for s in range(steps)]


def test_mismatch_is_zero_for_fp32_and_not_under_a_bf16_engine(tok):
    (fp32,) = run_steps(tok, log_router_flips=True)
    (bf16,) = run_steps(tok, log_router_flips=True, rollout_dtype="bf16")
    layers = [k for k in fp32 if k.startswith("router_flip_rate/")]
    assert len(layers) == 2  # the tiny preset's first layer is dense
    assert fp32["mismatch_kl"] < 1e-9 and fp32["mismatch_max_dlogp"] < 1e-4
    assert fp32["router_flip_rate"] == fp32["router_flip_tokens"] == 0
    assert bf16["mismatch_kl"] > 1e-8 and bf16["mismatch_max_dlogp"] > 1e-3
    assert 0 <= bf16["router_flip_rate"] <= bf16["router_flip_tokens"] <= 1
    assert bf16["router_flip_rate"] == pytest.approx(sum(bf16[k] for k in layers) / len(layers))


def test_a_truncated_sampler_is_a_mismatch_until_the_sampling_mask_is_kept(tok):
    (plain,) = run_steps(tok, top_k=8)
    (kept,) = run_steps(tok, top_k=8, keep_sampling_mask=True)
    assert plain["mismatch_kl"] > 0.01   # the engine sampled from the top 8, the trainer scores all tokens
    assert kept["mismatch_kl"] < 1e-9 and kept["mismatch_max_dlogp"] < 1e-4


def test_off_policy_options_run_and_corrections_near_one_change_nothing(tok):
    plain = run_steps(tok, 2)
    corrected = run_steps(tok, 2, tis_cap=2.0, mask_offpolicy=0.5)  # fp32: weights ~1, nothing masked
    for a, b in zip(plain, corrected):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5) and b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)
    for loss in ("gspo", "cispo"):
        rows = run_steps(tok, 2, loss=loss, mu=2, rollout_dtype="bf16", tis_cap=2.0)
        assert all(math.isfinite(r["loss"]) and r["skipped"] == 0 for r in rows)


def test_dynamic_sampling_refills_boundedly_and_deterministically(tok):
    kw = dict(dynamic_sampling=2, prompts_per_step=2, seed=3)
    a, b = run_steps(tok, 3, **kw), run_steps(tok, 3, **kw)
    drop = ("time", "per_s")
    assert [{k: v for k, v in r.items() if not any(d in k for d in drop)} for r in a] == \
           [{k: v for k, v in r.items() if not any(d in k for d in drop)} for r in b]
    assert any(r["dynamic_rounds"] > 0 for r in a), "the test needs a refill"
    for r in a:
        assert r["dynamic_rounds"] <= 2 and r["dynamic_extra_rollouts"] == 4 * 2 * r["dynamic_rounds"]
        assert r["trained_seqs"] <= 4 * 2
        if r["dynamic_rounds"] < 2:  # stopped early: the batch is full of informative groups
            assert r["trained_seqs"] == 4 * 2
