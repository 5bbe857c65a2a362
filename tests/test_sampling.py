"""Sampling: top-k/top-p/min-p filtering properties, greedy rows, per-row seeds, speculative acceptance."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from nanoseek.infer.sampling import SamplingParams, filter_logits, sample, speculative_accept


@settings(max_examples=50, deadline=None)
@given(st.lists(st.floats(-5, 5), min_size=2, max_size=30), st.floats(0.05, 1.0), st.integers(0, 10),
       st.floats(0.0, 0.5))
def test_filter_properties(vals, top_p, top_k, min_p):
    x = torch.tensor([vals])
    kept = torch.isfinite(filter_logits(x, torch.tensor([top_k]), torch.tensor([top_p]), torch.tensor([min_p])))[0]
    probs = x.softmax(-1)[0]
    assert kept[x[0].argmax()]  # the most likely token always survives
    if top_k:
        assert kept.sum() <= top_k
    assert (probs[kept] >= min_p * probs.max() - 1e-6).all()
    kp = probs[kept].sort(descending=True).values
    assert kp[:-1].sum() < top_p + 1e-5  # nucleus: without its least likely token the kept set holds < top_p
    if (~kept).any():  # nothing dropped is more likely than what is kept
        assert probs[~kept].max() <= probs[kept].min() + 1e-6


def test_greedy_rows_and_top_k_one():
    torch.manual_seed(0)
    logits = torch.randn(4, 50)
    t = torch.tensor([0.0, 1.0, 0.7, 0.0])
    out = sample(logits, t, torch.tensor([0, 1, 1, 0]), torch.ones(4), torch.zeros(4), torch.rand(4))
    assert out.tolist() == logits.argmax(-1).tolist()  # temperature 0 and top-k 1 are both greedy
    # any_greedy=False (the caller knows no row is greedy) leaves sampled rows exactly as they were
    t, u = torch.tensor([1.0, 0.5, 0.7, 2.0]), torch.rand(4)
    args = (logits, t, torch.zeros(4, dtype=torch.long), torch.ones(4), torch.zeros(4), u)
    assert sample(*args, any_greedy=False).tolist() == sample(*args).tolist()


def test_inverse_cdf_sampling_matches_the_distribution():
    N, V = 20_000, 5
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0, -30.0]).expand(N, V)
    ones, zeros = torch.ones(N), torch.zeros(N)
    tok = sample(logits, ones, zeros.long(), ones, zeros, torch.rand(N, generator=torch.Generator().manual_seed(0)),
                 filtered=False)
    freq = torch.bincount(tok, minlength=V).float() / N
    assert (freq - logits[0].softmax(-1)).abs().max() < 0.01
    # top-p 0.8 keeps exactly the smallest prefix holding >= 0.8 of the mass; u near 1 stays in range
    tok = sample(logits[:3], ones[:3], zeros[:3].long(), torch.full((3,), 0.8), zeros[:3], torch.tensor([0.0, 0.5, 0.9999999]))
    assert set(tok.tolist()) <= {0, 1} and tok[0] == 0


def test_speculative_accept_preserves_the_target_distribution():
    g = torch.Generator().manual_seed(0)
    N, V = 40_000, 6
    p = torch.tensor([0.5, 0.2, 0.1, 0.1, 0.05, 0.05]).expand(N, V)
    q = torch.tensor([0.05, 0.05, 0.1, 0.2, 0.3, 0.3]).expand(N, V)  # a poor draft
    draft = torch.multinomial(q, 1, generator=g)[:, 0]
    acc, tok = speculative_accept(p, q, draft, torch.rand(N, generator=g))
    freq = torch.bincount(tok, minlength=V).float() / N
    assert (freq - p[0]).abs().max() < 0.01
    assert abs(acc.float().mean().item() - (torch.minimum(p[0], q[0])).sum().item()) < 0.01  # E[accept] = sum min(p, q)


def test_params_validation():
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0)
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=-1)
    assert SamplingParams(stop="x").stop == ["x"]
