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
    gens = [torch.Generator().manual_seed(i) for i in range(4)]
    t = torch.tensor([0.0, 1.0, 0.7, 0.0])
    out = sample(logits, t, torch.tensor([0, 1, 1, 0]), torch.ones(4), torch.zeros(4), gens)
    assert out.tolist() == logits.argmax(-1).tolist()  # temperature 0 and top-k 1 are both greedy


def test_per_row_seed_is_independent_of_the_batch():
    torch.manual_seed(0)
    logits = torch.randn(3, 50)
    ones, zeros = torch.ones(3), torch.zeros(3)
    a = [sample(logits[1:2], ones[:1], zeros[:1].long(), ones[:1], zeros[:1], [torch.Generator().manual_seed(5)])
         for _ in range(2)]
    b = sample(logits, ones, zeros.long(), ones, zeros,
               [torch.Generator().manual_seed(9), torch.Generator().manual_seed(5), None])
    assert a[0].item() == a[1].item() == b[1].item()


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
