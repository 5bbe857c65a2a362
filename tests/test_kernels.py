"""Every fast path of nanoseek.kernels against the reference module of nanoseek.model it replaces:
outputs and gradients, over drawn shapes (no token for some experts, one token, many)."""
import contextlib
import copy
import math
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from nanoseek.config import DenseConfig, ModelConfig
from nanoseek.kernels import chunked_head, known_logprob_gradient, speedup, transposed_weights
from nanoseek.kernels.chunked_head import ChunkedLMHead
from nanoseek.kernels.decode_weights import DecodeLinear, DecodeLMHead, DecodeMLA, cache_transposed
from nanoseek.kernels.expert_ffn import FastMLP
from nanoseek.kernels.experts import FastExperts, grouped_mm_runs
from nanoseek.kernels.mla import FastMLA
from nanoseek.kernels.rms_norm import FastRMSNorm
from nanoseek.model.dense import DenseTransformer
from nanoseek.model.head import LMHead
from nanoseek.model.mla import MLA
from nanoseek.model.moe import MLP, Experts
from nanoseek.model.norm import RMSNorm
from nanoseek.model.rope import RotaryEmbedding
from nanoseek.model.transformer import Transformer
from nanoseek.train.grpo_loss import OBJECTIVES, gradient_at_ratio_one, grpo_loss, normalizer

SMALL = dict(vocab_size=97, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
             num_attention_heads=4, q_lora_rank=32, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8,
             v_head_dim=8, n_routed_experts=8, n_group=4, topk_group=2, num_experts_per_tok=2,
             first_k_dense_replace=1, max_position_embeddings=64, num_nextn_predict_layers=1)
DENSE = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2)


def _fast_copy(ref: torch.nn.Module, fast_cls: type) -> torch.nn.Module:
    fast = copy.deepcopy(ref)
    fast.__class__ = fast_cls
    return fast


def _experts_pair(g: torch.Generator, n_experts: int, dtype=torch.float64) -> tuple[Experts, FastExperts]:
    ref = Experts(n_experts, 16, 12).to(dtype)
    for p in ref.parameters():
        p.data = torch.randn(p.shape, generator=g, dtype=dtype) * 0.3
    return ref, _fast_copy(ref, FastExperts)


def _routing(g: torch.Generator, n: int, k: int, n_experts: int, dtype=torch.float64):
    x = torch.randn(n, 16, generator=g, dtype=dtype, requires_grad=True)
    idx = torch.stack([torch.randperm(n_experts, generator=g)[:k] for _ in range(n)]) if n else torch.zeros(0, k, dtype=torch.long)
    return x, idx, torch.rand(n, k, generator=g, dtype=dtype, requires_grad=True)


@contextlib.contextmanager
def _chunk_rows(n: int):
    """The chunked head with chunks of n rows (hypothesis runs many examples per test: no monkeypatch)."""
    before, chunked_head.CHUNK_ROWS = chunked_head.CHUNK_ROWS, n
    try:
        yield
    finally:
        chunked_head.CHUNK_ROWS = before


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
    fast = _fast_copy(ref, FastMLP)
    x = torch.randn(2, rows, dim, generator=g, dtype=torch.float64, requires_grad=True)
    with contextlib.nullcontext() if grad else torch.no_grad():
        got, want = fast(x), ref(x)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    if grad:
        _assert_same_grads(got, want, [x, *fast.parameters()], [x, *ref.parameters()], g, 1e-10)


def _head_pair(g: torch.Generator, dim: int, vocab: int) -> tuple[LMHead, ChunkedLMHead]:
    ref = LMHead(dim, vocab).double()
    ref.weight.data = torch.randn(vocab, dim, generator=g, dtype=torch.float64) * 0.5
    return ref, _fast_copy(ref, ChunkedLMHead)


def _rows_mask(g: torch.Generator, shape, kind: str) -> torch.Tensor | None:
    if kind == "none":
        return None
    return (torch.rand(shape, generator=g) > (0.4 if kind == "holes" else 2.0)).double()  # "empty": no row set


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), B=st.integers(1, 3), T=st.integers(1, 9), dim=st.integers(1, 12),
       vocab=st.integers(2, 40), chunk=st.integers(1, 8), mask_kind=st.sampled_from(["none", "holes", "empty"]))
def test_chunked_head_cross_entropy_matches_the_reference(seed, B, T, dim, vocab, chunk, mask_kind):
    """ChunkedLMHead's CE (gradients formed in the forward, rows chunked and selected by the mask)
    equals LMHead's plain log_softmax CE: value and the gradients of h and the weight (float64)."""
    g = torch.Generator().manual_seed(seed)
    ref, fast = _head_pair(g, dim, vocab)
    h = torch.randn(B, T, dim, generator=g, dtype=torch.float64, requires_grad=True)
    targets, mask = torch.randint(0, vocab, (B, T), generator=g), _rows_mask(g, (B, T), mask_kind)
    with _chunk_rows(chunk):
        got = fast.cross_entropy(h, targets, mask)
        with torch.no_grad():  # evaluation: no gradients formed, the same value
            torch.testing.assert_close(fast.cross_entropy(h, targets, mask), got.detach(), rtol=1e-12, atol=1e-12)
    want = ref.cross_entropy(h, targets, mask)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    for a, b in zip(torch.autograd.grad(3 * got, [h, fast.weight]), torch.autograd.grad(3 * want, [h, ref.weight])):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), B=st.integers(1, 3), T=st.integers(1, 9), dim=st.integers(1, 12),
       vocab=st.integers(2, 40), chunk=st.integers(1, 8), temperature=st.sampled_from([1.0, 0.7]),
       mask_kind=st.sampled_from(["none", "holes"]), known=st.booleans())
def test_chunked_head_log_probs_match_the_reference(seed, B, T, dim, vocab, chunk, temperature, mask_kind, known):
    """ChunkedLMHead's log-probs and entropy equal LMHead's, and so do the gradients: of a loss that
    mixes them non-linearly (as GRPO's ratio does), recomputed in backward, or, with `known`, of a
    linear one whose gradient known_logprob_gradient promised, formed in the forward (float64)."""
    g = torch.Generator().manual_seed(seed)
    ref, fast = _head_pair(g, dim, vocab)
    h = torch.randn(B, T, dim, generator=g, dtype=torch.float64, requires_grad=True)
    targets, mask = torch.randint(0, vocab, (B, T), generator=g), _rows_mask(g, (B, T), mask_kind)
    w = torch.randn(B, T, generator=g, dtype=torch.float64)
    loss = (lambda lp: (w * lp).sum()) if known else (lambda lp: (w * lp.exp()).sum())  # noqa: E731
    want, want_ent = ref.log_probs(h, targets, temperature, entropy=True, mask=mask)
    d_want = torch.autograd.grad(loss(want), [h, ref.weight])
    with _chunk_rows(chunk), known_logprob_gradient(w if known else None):
        got, ent = fast.log_probs(h, targets, temperature, entropy=True, mask=mask)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ent, want_ent, rtol=1e-10, atol=1e-10)
    assert not ent.requires_grad
    for a, b in zip(torch.autograd.grad(loss(got), [h, fast.weight]), d_want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("masked", [False, True])
def test_known_logprob_gradient_saves_the_backward_head_matmul(masked, monkeypatch):
    """With the gradient known before the forward, the head runs one matmul per chunk instead of
    two; a different gradient arriving falls back to the recompute, with the right result."""
    from types import SimpleNamespace

    import torch.nn.functional as F
    calls = []
    monkeypatch.setattr(chunked_head, "CHUNK_ROWS", 7)
    monkeypatch.setattr(chunked_head, "F", SimpleNamespace(linear=lambda *a: calls.append(1) or F.linear(*a)))
    g = torch.Generator().manual_seed(0)
    ref, fast = _head_pair(g, 16, 97)
    h = torch.randn(2, 10, 16, generator=g, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 97, (2, 10), generator=g)
    keep = torch.rand(2, 10, generator=g) > 0.4 if masked else torch.ones(2, 10, dtype=torch.bool)
    w = torch.randn(2, 10, generator=g, dtype=torch.float64) * keep
    chunks = math.ceil(int(keep.sum()) / 7)

    def grads(hint, scale):
        calls.clear()
        with known_logprob_gradient(hint):
            logp = fast.log_probs(h, targets, 0.7, entropy=True, mask=keep.double() if masked else None)[0]
        return torch.autograd.grad((logp * w * scale).sum(), [h, fast.weight]), len(calls)

    want, n = grads(None, 1.0)
    assert n == 2 * chunks
    got, n = grads(w, 1.0)
    assert n == chunks
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    got, n = grads(w, 2.0)  # not the gradient promised: recomputed
    assert n == 2 * chunks
    for a, b in zip(got, want):
        torch.testing.assert_close(a, 2 * b, rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="known_logprob_gradient"), known_logprob_gradient(w[:, :3]):
        fast.log_probs(h, targets)


@pytest.mark.parametrize("objective", OBJECTIVES)
@pytest.mark.parametrize("agg", ["token", "sequence"])
def test_grpo_on_policy_gradient_is_bitwise_what_backward_brings(objective, agg):
    """GRPO promises the head the gradient of its own loss at ratio 1 (`gradient_at_ratio_one`):
    it must be bit for bit what backward brings to the log-probs, or the head silently recomputes."""
    g = torch.Generator().manual_seed(1)
    mask = (torch.rand(4, 9, generator=g) > 0.3).float()
    adv, norm = torch.randn(4, generator=g), normalizer(mask, agg, 9)
    logp = (torch.randn(4, 9, generator=g) - 3).requires_grad_()

    def loss_of(lp):
        return grpo_loss(lp, lp.detach(), adv, mask, norm, None, 0.0, 0.2, 0.28, objective)[0] * 2

    hint = gradient_at_ratio_one(loss_of, mask)
    (loss_of(logp) + 0.5).backward()
    assert torch.equal(logp.grad, hint)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000), rows=st.integers(1, 12), dim=st.integers(1, 24), grad=st.booleans(),
       dtype=st.sampled_from([torch.float64, torch.float32]))
def test_fast_rmsnorm_matches_the_reference(seed, rows, dim, grad, dtype):
    """FastRMSNorm (hand-written backward keeping x and 1/rms; F.rms_norm without grad in fp32) equals
    RMSNorm: output, input and weight gradients."""
    g = torch.Generator().manual_seed(seed)
    ref = RMSNorm(dim).to(dtype)
    ref.weight.data = torch.randn(dim, generator=g, dtype=dtype)
    fast = _fast_copy(ref, FastRMSNorm)
    x = torch.randn(2, rows, dim, generator=g, dtype=dtype, requires_grad=True)
    tol = 1e-10 if dtype == torch.float64 else 1e-5
    with contextlib.nullcontext() if grad else torch.no_grad():
        got, want = fast(x), ref(x)
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)
    if grad:
        _assert_same_grads(got, want, [x, fast.weight], [x, ref.weight], g, tol)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000), B=st.integers(1, 2), T=st.integers(1, 12), past=st.integers(0, 6),
       v_dim=st.sampled_from([8, 12]), masked=st.booleans())
def test_fast_mla_matches_the_reference(seed, B, T, past, v_dim, masked):
    """FastMLA equals MLA in both forms: expanded (training, v padded for flash SDPA; outputs and
    gradients) and absorbed on a latent of `past` + T keys (heads as query rows; two bmm up to
    SMALL_T query positions, SDPA above), causal or with a per-row position mask."""
    torch.manual_seed(seed)
    cfg = ModelConfig(**{**SMALL, "v_head_dim": v_dim})
    ref = MLA(cfg, 0).double()
    fast = _fast_copy(ref, FastMLA)
    rotary = RotaryEmbedding(cfg.qk_rope_head_dim, cfg.rope_theta, None, 64, cfg.rope_interleave)
    x = torch.randn(B, T, cfg.hidden_size, dtype=torch.float64, requires_grad=True)
    positions = torch.arange(past, past + T).expand(B, T)
    cos, sin = rotary(positions, x.dtype)
    keys = torch.arange(past + T)
    mask = (keys.view(1, 1, -1) <= positions.unsqueeze(-1)).unsqueeze(1) if masked else None
    kw = dict(rotary=rotary, cos=cos, sin=sin, positions=positions, mask=mask)
    if not past:
        got, want = fast(x, absorb=False, **kw), ref(x, absorb=False, **kw)
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
        _assert_same_grads(got, want, [x, *fast.parameters()], [x, *ref.parameters()], torch.Generator(), 1e-9)
    q_nope, q_pe = ref._queries(x.detach())
    q_pe = rotary.rotate(q_pe, cos, sin)
    kv = torch.randn(B, past + T, cfg.kv_lora_rank + cfg.qk_rope_head_dim, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(fast._attend_latent(q_nope, q_pe, kv, mask), ref._attend_latent(q_nope, q_pe, kv, mask),
                                   rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("kind", ["moe", "dense"])
def test_trained_model_with_kernels_matches_the_reference_model(kind):
    """speedup(for_="train") changes nothing a training step sees: loss terms and every gradient."""
    torch.manual_seed(0)
    ref = (Transformer(ModelConfig(**SMALL)) if kind == "moe" else DenseTransformer(DenseConfig(**DENSE))).double()
    fast = copy.deepcopy(ref)
    speedup(fast, for_="train")
    assert {FastMLP, FastRMSNorm, ChunkedLMHead} <= {type(m) for m in fast.modules()}
    ids = torch.randint(0, 97, (3, 12))
    a, b = fast.loss(ids[:, :-1], ids[:, 1:]), ref.loss(ids[:, :-1], ids[:, 1:])
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-10, atol=1e-10)
    a["loss"].backward()
    b["loss"].backward()
    for (name, p), q in zip(fast.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-9, atol=1e-12, msg=name)
    mask, mtp_mask = (torch.rand(3, 11) > 0.3).double(), (torch.rand(3, 10) > 0.3).double()
    kw = dict(temperature=0.7, entropy=True, mask=mask, mtp_mask=mtp_mask)
    a, b = fast.token_logprobs(ids[:, :-1], ids[:, 1:], **kw), ref.token_logprobs(ids[:, :-1], ids[:, 1:], **kw)
    for x, y in zip(a, b):
        assert (x is None) == (y is None)
        if x is not None:
            torch.testing.assert_close(x, y, rtol=1e-10, atol=1e-10)
    w = torch.randn(3, 11, dtype=torch.float64)
    ga = torch.autograd.grad((w * a[0].exp()).sum() + (a[2] if a[2] is not None else 0), list(fast.parameters()),
                             allow_unused=True)
    gb = torch.autograd.grad((w * b[0].exp()).sum() + (b[2] if b[2] is not None else 0), list(ref.parameters()),
                             allow_unused=True)
    for (name, _), x, y in zip(fast.named_parameters(), ga, gb):
        assert (x is None) == (y is None), name
        if x is not None:
            torch.testing.assert_close(x, y, rtol=1e-9, atol=1e-12, msg=name)


def test_decode_copies_are_used_only_in_the_engine_scope():
    """The engine's [in, out] weight copies give the same logits inside its scope and are ignored
    everywhere else, so no forward outside the engine can see a stale copy."""
    m = Transformer(ModelConfig(**SMALL))
    ids = torch.randint(0, 97, (3, 7))
    with torch.no_grad():
        plain = m(ids)
        speedup(m, for_="decode")
        assert isinstance(m.lm_head, DecodeLMHead) and isinstance(m.layers[0].self_attn, DecodeMLA)
        with transposed_weights():
            assert torch.allclose(m(ids, absorb=True), plain, atol=1e-5)
            m.lm_head.__dict__["_engine_copies"][0][0].zero_()  # proves the copy is what runs here
            assert m(ids).abs().max() == 0
        assert torch.allclose(m(ids), plain, atol=1e-6)         # outside the scope: the live weights
        m.lm_head.weight.mul_(2)                                # a visible in-place change: copy ignored
        with transposed_weights():
            assert torch.allclose(m(ids), 2 * plain, atol=1e-5)


def test_a_model_swapped_for_training_keeps_its_training_kernels_for_decoding():
    """GRPO's policy is its own rollout model: the engine's decode swap must extend, not undo, the
    training kernels (the chunked head, FastMLA)."""
    m = Transformer(ModelConfig(**SMALL))
    speedup(m, for_="train")
    speedup(m, for_="decode")
    assert type(m.lm_head) is DecodeLMHead and isinstance(m.lm_head, ChunkedLMHead)
    assert all(type(b.self_attn) is DecodeMLA for b in m.layers) and isinstance(m.layers[0].self_attn, FastMLA)
    assert type(m.norm) is FastRMSNorm


def test_no_kernels_flag_keeps_the_reference_modules(monkeypatch):
    monkeypatch.setenv("NANOSEEK_KERNELS", "0")
    m = Transformer(ModelConfig(**SMALL))
    assert speedup(m, for_="decode")()
    assert {type(x) for x in m.modules()} == {type(x) for x in Transformer(ModelConfig(**SMALL)).modules()}
    assert not any(isinstance(x, (FastExperts, FastMLP, FastRMSNorm, ChunkedLMHead, FastMLA, DecodeLinear))
                   for x in m.modules())
    assert any(type(x) is MLA for x in m.modules()) and type(m.lm_head) is LMHead


def test_speedup_names_a_bad_purpose():
    with pytest.raises(ValueError, match="for_"):
        speedup(Transformer(ModelConfig(**SMALL)), for_="serve")
