"""GRPO's policy objectives (GRPO, GSPO, CISPO) as properties, and the off-policy corrections
(truncated importance sampling, DeepSeek-V3.2's sequence masking, the kept sampling mask) by hand."""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from nanoseek.config import get_preset
from nanoseek.model.transformer import Transformer
from nanoseek.train.grpo_loss import (OBJECTIVES, grpo_loss, normalizer, offpolicy_sequence_mask, policy_logprobs,
                                      tis_weights)

EPS_LOW, EPS_HIGH = 0.2, 0.28


def batch(seed: int, rows: int, cols: int, spread: float = 0.0):
    """Random log-probs (with grad), old log-probs `spread` away, advantages and a mask with >= 1 token per row."""
    g = torch.Generator().manual_seed(seed)
    old = -5 * torch.rand(rows, cols, generator=g)
    logp = (old + spread * torch.randn(rows, cols, generator=g)).requires_grad_()
    adv = torch.randn(rows, generator=g)
    mask = (torch.rand(rows, cols, generator=g) > 0.3).float()
    mask[:, 0] = 1.0
    return logp, old, adv, mask


def grad_of(objective, logp, old, adv, mask, norm, **kw):
    loss, stats = grpo_loss(logp, old, adv, mask, norm, objective=objective, eps_low=EPS_LOW, eps_high=EPS_HIGH, **kw)
    (g,) = torch.autograd.grad(loss, logp)
    return loss, g, stats


# ------------------------------------------------------------------------------ ratio = 1: the plain policy gradient

@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), rows=st.integers(1, 6), cols=st.integers(1, 9),
       objective=st.sampled_from(OBJECTIVES), agg=st.sampled_from(["token", "sequence", "dr_grpo"]))
def test_on_policy_every_objective_is_the_plain_policy_gradient(seed, rows, cols, objective, agg):
    """old = current: every ratio is 1, nothing clips, and each objective's gradient is REINFORCE's
    -A * mask / norm. (GSPO's s_i = exp(mean_t log r_t) puts 1/|o_i| on each token, and its value counts
    on each of the |o_i| tokens: the same per-token gradient under any aggregation.)"""
    logp, _, adv, mask = batch(seed, rows, cols)
    norm = normalizer(mask, agg, cols)
    _, g, stats = grad_of(objective, logp, logp.detach(), adv, mask, norm)
    expected = -adv.unsqueeze(-1) * mask / (norm.unsqueeze(-1) if norm.dim() == 1 else norm)
    torch.testing.assert_close(g, expected, rtol=1e-5, atol=1e-8)
    assert stats["clipped"] == 0


# ------------------------------------------------------------------------------ GSPO

@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), rows=st.integers(1, 5), cols=st.integers(1, 8))
def test_gspo_ratio_is_the_geometric_mean_of_token_ratios(seed, rows, cols):
    """Its loss under A = -1, no clip reached (eps huge): each row's s_i = (prod_t r_t)^(1/|o_i|)."""
    logp, old, _, mask = batch(seed, rows, cols, spread=0.3)
    adv = -torch.ones(rows)
    norm = normalizer(mask, "sequence", cols)
    loss, _ = grpo_loss(logp, old, adv, mask, norm, objective="gspo", eps_low=1e9, eps_high=1e9)
    ratios = torch.exp(logp.detach() - old)
    geo = torch.stack([ratios[i][mask[i].bool()].prod() ** (1 / mask[i].sum()) for i in range(rows)])
    assert loss.item() == pytest.approx(geo.mean().item(), rel=1e-5)  # -(s * -1) averaged over sequences


@pytest.mark.parametrize("s,adv,clipped", [(1.5, 1.0, True), (1.5, -1.0, False), (0.5, -1.0, True), (0.5, 1.0, False),
                                           (1.1, 1.0, False)])
def test_gspo_clip_regions(s, adv, clipped):
    """A sequence ratio s outside [1 - eps_low, 1 + eps_high] on the side the advantage pushes passes no
    gradient to any of its tokens; inside, or on the other side, the gradient is s * A / |o| per token."""
    old = torch.zeros(1, 4)
    logp = torch.full((1, 4), math.log(s)).requires_grad_()   # every token ratio s: the geometric mean is s
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    norm = normalizer(mask, "sequence", 4)
    loss, g, stats = grad_of("gspo", logp, old, torch.tensor([adv]), mask, norm)
    if clipped:
        assert g.abs().max() == 0 and stats["clipped"] == 3
        bound = 1 + EPS_HIGH if s > 1 else 1 - EPS_LOW
        assert loss.item() == pytest.approx(-bound * adv)
    else:
        torch.testing.assert_close(g, torch.tensor([[-s * adv / 3] * 3 + [0.0]]))
        assert stats["clipped"] == 0


# ------------------------------------------------------------------------------ CISPO

@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), rows=st.integers(1, 6), cols=st.integers(1, 9))
def test_cispo_weights_are_clipped_and_stop_gradient(seed, rows, cols):
    """d loss / d logp_t = -clip(r_t, 1 - eps_low, 1 + eps_high) A mask / norm on every token: the weight
    is clipped but carries no gradient itself, and no token (clipped or not) loses its gradient."""
    logp, old, adv, mask = batch(seed, rows, cols, spread=0.5)
    norm = normalizer(mask, "token", cols)
    _, g, stats = grad_of("cispo", logp, old, adv, mask, norm)
    r = torch.exp(logp.detach() - old)
    w = r.clamp(1 - EPS_LOW, 1 + EPS_HIGH)
    torch.testing.assert_close(g, -w * adv.unsqueeze(-1) * mask / norm, rtol=1e-5, atol=1e-8)
    outside = ((r < 1 - EPS_LOW) | (r > 1 + EPS_HIGH)).float() * mask
    assert stats["clipped"].item() == outside.sum().item()
    assert (g[mask.bool() & (adv.unsqueeze(-1) != 0).expand_as(mask)] != 0).all()


# ------------------------------------------------------------------------------ GRPO's token clip, as a property

@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), rows=st.integers(1, 6), cols=st.integers(1, 9))
def test_grpo_clip_regions(seed, rows, cols):
    """A token with r > 1 + eps_high and A > 0, or r < 1 - eps_low and A < 0, has zero gradient; every
    other token gets -r A / norm (the unclipped surrogate's)."""
    logp, old, adv, mask = batch(seed, rows, cols, spread=0.5)
    norm = normalizer(mask, "token", cols)
    _, g, stats = grad_of("grpo", logp, old, adv, mask, norm)
    r, a = torch.exp(logp.detach() - old), adv.unsqueeze(-1).expand_as(mask)
    clipped = ((r > 1 + EPS_HIGH) & (a > 0)) | ((r < 1 - EPS_LOW) & (a < 0))
    torch.testing.assert_close(g, torch.where(clipped, 0.0, -r * a) * mask / norm, rtol=1e-5, atol=1e-8)
    assert stats["clipped"].item() == (clipped.float() * mask).sum().item()


# ------------------------------------------------------------------------------ off-policy corrections by hand

def test_tis_weights_by_hand():
    old = torch.log(torch.tensor([[0.5, 0.2, 0.9]]))
    engine = torch.log(torch.tensor([[0.25, 0.4, 0.1]]))
    w = tis_weights(old, engine, cap=2.0)
    assert w.tolist()[0] == pytest.approx([2.0, 0.5, 2.0])  # 0.5/0.25 = 2, 0.2/0.4 = 0.5, 0.9/0.1 = 9 -> cap 2
    # in the loss, on policy (ratio 1): the gradient is the plain one scaled by w
    logp = old.clone().requires_grad_()
    mask, adv = torch.ones(1, 3), torch.tensor([1.0])
    loss, _ = grpo_loss(logp, old, adv, mask, normalizer(mask, "token", 3), token_weights=w)
    loss.backward()
    assert logp.grad.tolist()[0] == pytest.approx([-2.0 / 3, -0.5 / 3, -2.0 / 3])
    assert loss.item() == pytest.approx(-(2.0 + 0.5 + 2.0) / 3)


def test_offpolicy_sequence_mask_by_hand():
    # per-token log(pi_engine / pi): row 0 mean (0.3 + 0.1) / 2 = 0.2, row 1 mean 0.05 (its 3rd token is padding),
    # row 2 mean 0.2 again but a positive advantage
    logp = torch.zeros(3, 3)
    engine = torch.tensor([[0.3, 0.1, 9.0], [0.05, 0.05, 9.0], [0.3, 0.1, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0], [1.0, 1.0, 0.0]])
    adv = torch.tensor([-1.0, -1.0, 1.0])
    assert offpolicy_sequence_mask(logp, engine, adv, mask, delta=0.1).tolist() == [0.0, 1.0, 1.0]
    assert offpolicy_sequence_mask(logp, engine, adv, mask, delta=0.25).tolist() == [1.0, 1.0, 1.0]
    # a masked sequence contributes nothing, but the normalizer still counts its tokens (V3.2's 1/|o_i|, 1/G)
    m = offpolicy_sequence_mask(logp, engine, adv, mask, delta=0.1).unsqueeze(-1).expand_as(mask)
    loss, _ = grpo_loss(logp, logp, adv, mask, normalizer(mask, "token", 3), token_weights=m)
    assert loss.item() == pytest.approx(-(0 + -2 + 2) / 6)


# ------------------------------------------------------------------------------ the kept sampling mask

def test_truncated_logprobs_by_hand():
    """top-k 3 at T = 0.8: log-probs of softmax over the 3 largest logits / T (the sampled token always kept);
    no truncation gives exactly the model's own chunked-head log-probs, entropy and MTP CE."""
    torch.manual_seed(0)
    model = Transformer(get_preset("tiny").replace(hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
                                                   num_hidden_layers=2, vocab_size=50)).train()
    ids = torch.randint(0, 50, (2, 7))
    mask = torch.ones(2, 6)
    mask[1, 4:] = 0
    T = 0.8
    logp, ent, mtp = policy_logprobs(model, ids, mask, T, mtp_weight=0.1, entropy=True, sampling_mask=(3, 1.0))
    with torch.no_grad():
        x = model(ids[:, :-1]) / T
    top = x.topk(3, -1).indices
    for b in range(2):
        for t in range(6):
            keep = set(top[b, t].tolist()) | {ids[b, t + 1].item()}
            z = x[b, t, sorted(keep)].logsumexp(-1)
            want = (x[b, t, ids[b, t + 1]] - z).item() * mask[b, t].item()
            assert logp[b, t].item() == pytest.approx(want, abs=1e-5)
    full = policy_logprobs(model, ids, mask, T, mtp_weight=0.1, entropy=True)
    plain = policy_logprobs(model, ids, mask, T, mtp_weight=0.1, entropy=True, sampling_mask=(0, 1.0))
    for a, b in zip(full, plain):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert (ent <= full[1] + 1e-5).all() and mtp is not None
    logp.sum().backward()  # differentiable through the truncation
