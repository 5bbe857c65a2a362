"""MTP speculation samples what the main model samples: the marginals of the 2nd and 3rd tokens (the
verified one and the bonus one after an accepted draft), at T = 0.6 with top-p, against the exact
distributions computed from full forwards of the main model; greedy rows in a mixed batch stay exact, and so do
greedy rows with a repetition penalty."""
import pytest
import torch

from nanoseek.infer.engine import Engine
from nanoseek.infer.sampling import SamplingParams, filter_logits
from nanoseek.model.transformer import Transformer
from test_engine import MOE, naive_greedy

V, T, TOP_P = 12, 0.6, 0.9


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = Transformer(MOE.replace(vocab_size=V, eos_token_id=V - 1)).eval()
    with torch.no_grad():
        m.lm_head.weight.mul_(4)  # peaked but not one-hot, so drafts are often rejected
    return m


def _dist(m, ids: list[int]) -> torch.Tensor:
    """The sampling distribution after ids: softmax of the top-p-filtered logits / T."""
    with torch.no_grad():
        x = m(torch.tensor([ids]))[0, -1:].float() / T
    return filter_logits(x, torch.zeros(1, dtype=torch.long), torch.tensor([TOP_P]), torch.zeros(1)).softmax(-1)[0]


def _exact_marginals(m, prompt: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """P(t2) and P(t3) by summing over every path (V + V^2 forwards of a tiny model)."""
    p1, p2, p3 = _dist(m, prompt), torch.zeros(V), torch.zeros(V)
    for a in range(V):
        if p1[a] == 0:
            continue
        pa = _dist(m, prompt + [a])
        p2 += p1[a] * pa
        for b in range(V):
            if pa[b] > 0:
                p3 += p1[a] * pa[b] * _dist(m, prompt + [a, b])
    return p2, p3


def test_sampling_follows_the_main_models_distribution(model):
    prompt, n = [1, 2], 1000
    eng = Engine(model, max_batch=n, max_len=8, speculative=True)
    sp = SamplingParams(temperature=T, top_p=TOP_P, n=n, seed=3, max_tokens=3, ignore_eos=True)
    outs = eng.generate([prompt], sp)[0].outputs
    p2, p3 = _exact_marginals(model, prompt)
    for k, exact in ((1, p2), (2, p3)):
        hist = torch.bincount(torch.tensor([o.token_ids[k] for o in outs]), minlength=V).float() / n
        assert 0.5 * (hist - exact).abs().sum().item() < 0.1, f"token {k + 1}"
    # the drafts are far from the target (accepting them all would fail the check above)
    assert 0.1 < eng.acceptance_rate < 0.9


def test_greedy_rows_stay_exact_beside_sampled_rows(model):
    prompts = [[1, 2, 3], [4, 5], [6], [7, 8, 9, 10]]
    sps = [SamplingParams(temperature=0 if i % 2 == 0 else 0.8, top_k=5, seed=i, max_tokens=6, ignore_eos=True)
           for i in range(len(prompts))]
    outs = Engine(model, max_batch=4, max_len=32, speculative=True).generate(prompts, sps)
    for i in (0, 2):
        assert outs[i].outputs[0].token_ids == naive_greedy(model, prompts[i], 6)


def test_repetition_penalty_applies_to_draft_and_target(model):
    # plain decoding samples from the penalized logits, so verification must compare against those too
    prompts = [[1, 2, 3], [4, 5], [6, 6, 6]]
    sp = SamplingParams(temperature=0, repetition_penalty=1.5, max_tokens=10, ignore_eos=True)
    plain = Engine(model, max_batch=3, max_len=32).generate(prompts, sp)
    spec = Engine(model, max_batch=3, max_len=32, speculative=True).generate(prompts, sp)
    assert [o.outputs[0].token_ids for o in spec] == [o.outputs[0].token_ids for o in plain]
