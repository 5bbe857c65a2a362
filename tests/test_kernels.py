"""Every fast path of nanoseek.kernels against the reference module of nanoseek.model it replaces:
outputs and gradients, over drawn shapes (no token for some experts, one token, many)."""
import contextlib
import copy
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from nanoseek.config import DenseConfig, ModelConfig
from nanoseek.kernels import speedup, transposed_weights
from nanoseek.kernels.decode_weights import DecodeLinear, DecodeMLA, cache_transposed
from nanoseek.kernels.expert_ffn import FastMLP
from nanoseek.kernels.experts import FastExperts, grouped_mm_runs
from nanoseek.model.dense import DenseTransformer
from nanoseek.model.mla import MLA
from nanoseek.model.moe import MLP, Experts
from nanoseek.model.transformer import Transformer

SMALL = dict(vocab_size=97, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
             num_attention_heads=4, q_lora_rank=32, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8,
             v_head_dim=8, n_routed_experts=8, n_group=4, topk_group=2, num_experts_per_tok=2,
             first_k_dense_replace=1, max_position_embeddings=64, num_nextn_predict_layers=1)
DENSE = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2)


def _experts_pair(g: torch.Generator, n_experts: int, dtype=torch.float64) -> tuple[Experts, FastExperts]:
    ref = Experts(n_experts, 16, 12).to(dtype)
    for p in ref.parameters():
        p.data = torch.randn(p.shape, generator=g, dtype=dtype) * 0.3
    fast = copy.deepcopy(ref)
    fast.__class__ = FastExperts
    return ref, fast


def _routing(g: torch.Generator, n: int, k: int, n_experts: int, dtype=torch.float64):
    x = torch.randn(n, 16, generator=g, dtype=dtype, requires_grad=True)
    idx = torch.stack([torch.randperm(n_experts, generator=g)[:k] for _ in range(n)]) if n else torch.zeros(0, k, dtype=torch.long)
    return x, idx, torch.rand(n, k, generator=g, dtype=dtype, requires_grad=True)


def _assert_same_grads(out_a, out_b, inputs_a, inputs_b, g, tol):
    w = torch.randn(out_a.shape, generator=g, dtype=out_a.dtype)
    got = torch.autograd.grad((out_a * w).sum(), inputs_a)
    want = torch.autograd.grad((out_b * w).sum(), inputs_b)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)


# n up to 150 with k = 4 crosses every size threshold: all-experts decode, padded blocks, per-expert GEMMs
@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 10_000), n=st.integers(0, 150), k=st.integers(1, 4), n_experts=st.sampled_from([4, 8]),
       mode=st.sampled_from(["train", "no_grad", "engine"]))
def test_fast_experts_match_the_reference_loop(seed, n, k, n_experts, mode):
    """FastExperts (hand-written backward for training; padded blocks or per-expert GEMMs without
    grad; all experts from the engine's side-by-side copies) equals the reference `Experts`."""
    g = torch.Generator().manual_seed(seed)
    ref, fast = _experts_pair(g, n_experts)
    x, idx, weights = _routing(g, n, k, n_experts)
    want, want_counts = ref(x, idx, weights)
    if mode == "train":
        got, counts = fast(x, idx, weights)
    else:
        cache_transposed(fast)
        with torch.no_grad(), transposed_weights() if mode == "engine" else contextlib.nullcontext():
            got, counts = fast(x, idx, weights)
    torch.testing.assert_close(got, want.detach(), rtol=1e-10, atol=1e-10)
    assert counts.tolist() == want_counts.tolist()
    if mode == "train" and n:
        _assert_same_grads(got, want, [x, weights, *fast.parameters()], [x, weights, *ref.parameters()], g, 1e-10)


@pytest.mark.skipif(not grouped_mm_runs(torch.device("cpu"), torch.float32, 16, 12), reason="no torch._grouped_mm here")
@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 10_000), n=st.integers(1, 40), k=st.integers(1, 4))
def test_grouped_gemm_experts_match_the_reference_loop(seed, n, k):
    """The grouped-GEMM path (taken on CUDA) run here on CPU: outputs and gradients."""
    g = torch.Generator().manual_seed(seed)
    ref, fast = _experts_pair(g, 8, torch.float32)
    x, idx, weights = _routing(g, n, k, 8, torch.float32)
    want, _ = ref(x, idx, weights)
    order = idx.reshape(-1).argsort(stable=True)
    src = order // k
    counts = torch.bincount(idx.reshape(-1), minlength=8)
    ys = fast._grouped_ffn(x.index_select(0, src), counts)
    got = torch.zeros_like(x).index_add_(0, src, ys * weights.reshape(-1)[order].unsqueeze(-1))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    _assert_same_grads(got, want, [x, weights, *fast.parameters()], [x, weights, *ref.parameters()], g, 1e-4)


def test_grouped_gemm_that_cannot_run_says_so_once():
    with pytest.warns(UserWarning, match="one GEMM per expert"):
        assert not grouped_mm_runs(torch.device("cpu"), torch.bool, 16, 12)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not grouped_mm_runs(torch.device("cpu"), torch.bool, 16, 12)  # answered, not retried


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), rows=st.integers(1, 24), dim=st.integers(1, 20), hidden=st.integers(1, 20),
       grad=st.booleans())
def test_fast_mlp_matches_the_reference_mlp(seed, rows, dim, hidden, grad):
    g = torch.Generator().manual_seed(seed)
    ref = MLP(dim, hidden).double()
    for p in ref.parameters():
        p.data = torch.randn(p.shape, generator=g, dtype=torch.float64)
    fast = copy.deepcopy(ref)
    fast.__class__ = FastMLP
    x = torch.randn(2, rows, dim, generator=g, dtype=torch.float64, requires_grad=True)
    with contextlib.nullcontext() if grad else torch.no_grad():
        got, want = fast(x), ref(x)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    if grad:
        _assert_same_grads(got, want, [x, *fast.parameters()], [x, *ref.parameters()], g, 1e-10)


@pytest.mark.parametrize("kind", ["moe", "dense"])
def test_trained_model_with_kernels_matches_the_reference_model(kind):
    """speedup(for_="train") changes nothing a training step sees: loss terms and every gradient."""
    torch.manual_seed(0)
    ref = (Transformer(ModelConfig(**SMALL)) if kind == "moe" else DenseTransformer(DenseConfig(**DENSE))).double()
    fast = copy.deepcopy(ref)
    speedup(fast, for_="train")
    assert any(isinstance(m, FastMLP) for m in fast.modules())
    ids = torch.randint(0, 97, (3, 12))
    a, b = fast.loss(ids[:, :-1], ids[:, 1:]), ref.loss(ids[:, :-1], ids[:, 1:])
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-10, atol=1e-10)
    a["loss"].backward()
    b["loss"].backward()
    for (name, p), q in zip(fast.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-9, atol=1e-12, msg=name)


def test_decode_copies_are_used_only_in_the_engine_scope():
    """The engine's [in, out] weight copies give the same logits inside its scope and are ignored
    everywhere else, so no forward outside the engine can see a stale copy."""
    m = Transformer(ModelConfig(**SMALL))
    ids = torch.randint(0, 97, (3, 7))
    with torch.no_grad():
        plain = m(ids)
        speedup(m, for_="decode")
        assert isinstance(m.lm_head, DecodeLinear) and isinstance(m.layers[0].self_attn, DecodeMLA)
        with transposed_weights():
            assert torch.allclose(m(ids, absorb=True), plain, atol=1e-5)
            m.lm_head.__dict__["_engine_copies"][0][0].zero_()  # proves the copy is what runs here
            assert m(ids).abs().max() == 0
        assert torch.allclose(m(ids), plain, atol=1e-6)         # outside the scope: the live weights
        m.lm_head.weight.mul_(2)                                # a visible in-place change: copy ignored
        with transposed_weights():
            assert torch.allclose(m(ids), 2 * plain, atol=1e-5)


def test_no_kernels_flag_keeps_the_reference_modules(monkeypatch):
    monkeypatch.setenv("NANOSEEK_KERNELS", "0")
    m = Transformer(ModelConfig(**SMALL))
    assert speedup(m, for_="decode")()
    assert {type(x) for x in m.modules()} == {type(x) for x in Transformer(ModelConfig(**SMALL)).modules()}
    assert not any(isinstance(x, (FastExperts, FastMLP, DecodeLinear, DecodeMLA)) for x in m.modules())
    assert any(type(x) is MLA for x in m.modules())


def test_speedup_names_a_bad_purpose():
    with pytest.raises(ValueError, match="for_"):
        speedup(Transformer(ModelConfig(**SMALL)), for_="serve")
