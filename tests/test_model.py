"""Model internals: config checks, sizes, MLA paths, cache decoding, routing, MTP, packing."""
import contextlib
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from nanoseek.config import DenseConfig, ModelConfig, get_preset
from nanoseek.model.dense import DenseTransformer
from nanoseek.model.moe import Gate
from nanoseek.model.transformer import Transformer

SMALL = dict(vocab_size=97, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
             num_attention_heads=4, q_lora_rank=32, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8,
             v_head_dim=8, n_routed_experts=8, n_group=4, topk_group=2, num_experts_per_tok=2,
             first_k_dense_replace=1, max_position_embeddings=64)


@pytest.mark.parametrize("bad,field", [
    (dict(topk_group=5), "topk_group"),
    (dict(n_routed_experts=10), "n_group"),
    (dict(num_experts_per_tok=9), "num_experts_per_tok"),
    (dict(qk_rope_head_dim=7), "qk_rope_head_dim"),
    (dict(first_k_dense_replace=4), "first_k_dense_replace"),
    (dict(hidden_size=0), "hidden_size"),
])
def test_invalid_config_names_the_field(bad, field):
    with pytest.raises(ValueError, match=field):
        ModelConfig(**{**SMALL, **bad})


def test_invalid_dense_config():
    with pytest.raises(ValueError, match="num_key_value_heads"):
        DenseConfig(num_attention_heads=8, num_key_value_heads=3)


def test_deepseek_v3_parameter_counts_on_meta():
    with torch.device("meta"):
        m = Transformer(get_preset("deepseek-v3"))
    total, active = m.num_parameters(), m.num_parameters(active=True)
    print(f"deepseek-v3: total {total / 1e9:.1f}B, active {active / 1e9:.1f}B")
    assert abs(total / 671e9 - 1) < 0.01
    assert abs(active / 37e9 - 1) < 0.03
    cfg = m.config
    assert cfg.cache_values_per_token() == 576 and cfg.naive_cache_values_per_token() == 40960


def test_absorbed_equals_expanded():
    m = Transformer(ModelConfig(**SMALL)).eval()
    x = torch.randint(0, 97, (2, 20))
    with torch.no_grad():
        a, b = m(x, absorb=False), m(x, absorb=True)
    assert (a - b).abs().max().item() < 1e-4


@pytest.mark.parametrize("engine_scope", [False, True])
@pytest.mark.parametrize("kind", ["moe", "dense"])
def test_cached_decoding_matches_full_forward(kind, engine_scope):
    """Prefill ragged prompts, then decode token by token through the cache (absorbed MLA path);
    engine_scope: with the engine's decode kernels and weight copies (per-head bmm absorption)."""
    from nanoseek.kernels import speedup, transposed_weights
    m = (Transformer(ModelConfig(**SMALL)) if kind == "moe" else
         DenseTransformer(DenseConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2))).eval()
    seq = torch.randint(0, 97, (2, 24))
    lens = [9, 14]  # prompt lengths per row
    cache = m.make_cache(batch=2, max_len=32)
    if engine_scope:
        speedup(m, for_="decode")
    with torch.no_grad(), transposed_weights() if engine_scope else contextlib.nullcontext():
        full = m(seq)
        for b, L in enumerate(lens):  # prefill each row separately into its slot
            pos = torch.arange(L).unsqueeze(0)
            row_cache_logits = m(seq[b:b + 1, :L], positions=pos, cache=_RowView(cache, b))
            assert (row_cache_logits[0] - full[b, :L]).abs().max() < 1e-4
        for step in range(24 - max(lens)):  # decode both rows together, at different positions
            pos = torch.tensor([[lens[0] + step], [lens[1] + step]])
            ids = seq.gather(1, pos)
            out = m(ids, positions=pos, cache=cache)
            ref = full.gather(1, pos.unsqueeze(-1).expand(-1, -1, full.shape[-1]))
            assert (out - ref).abs().max() < 1e-4


class _RowView:
    """A one-row window onto a batched cache (to prefill slot b alone)."""

    def __init__(self, cache, row):
        self.cache, self.row, self.max_len = cache, row, cache.max_len

    @property
    def limit(self):
        return self.cache.limit

    @limit.setter
    def limit(self, v):
        self.cache.limit = v

    def update(self, layer, positions, *values):
        pos = positions.expand(self.cache.batch, -1)
        vals = [v.expand(self.cache.batch, *v.shape[1:]) for v in values]
        sel = torch.zeros(self.cache.batch, dtype=torch.bool)
        sel[self.row] = True
        saved = [buf[~sel].clone() for buf in self.cache.layers[layer]]
        out = self.cache.update(layer, pos, *vals)
        for buf, s in zip(self.cache.layers[layer], saved):
            buf[~sel] = s
        return tuple(o[self.row:self.row + 1] for o in out)


def test_cache_bytes_per_token():
    cfg = ModelConfig(**SMALL)
    m = Transformer(cfg)
    assert m.make_cache(1, 8).bytes_per_token() == (16 + 8) * 3 * 4
    assert m.make_cache(1, 8, dtype=torch.bfloat16).bytes_per_token() == (16 + 8) * 3 * 2


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 10_000), n_group=st.sampled_from([1, 2, 4]), k=st.integers(1, 4),
       bias_scale=st.sampled_from([0.0, 0.1, 10.0]))
def test_routing_properties(seed, n_group, k, bias_scale):
    topk_group = max(1, n_group // 2)
    if topk_group * (8 // n_group) < k:
        return
    cfg = ModelConfig(**{**SMALL, "n_group": n_group, "topk_group": topk_group, "num_experts_per_tok": k})
    g = Gate(cfg)
    torch.manual_seed(seed)
    torch.nn.init.normal_(g.weight)
    g.e_score_correction_bias.normal_(0, 1).mul_(bias_scale)
    x = torch.randn(16, 64)
    w, idx, scores = g(x)
    assert idx.shape == (16, k) and len({tuple(sorted(r)) for r in idx.tolist()}) >= 1
    assert all(len(set(r)) == k for r in idx.tolist())  # distinct experts
    # weights use the unbiased scores, normalized over the chosen k, times the routed scaling
    assert torch.allclose(w.sum(-1), torch.full((16,), cfg.routed_scaling_factor), atol=1e-4)
    assert torch.allclose(w, scores.gather(1, idx) / scores.gather(1, idx).sum(-1, keepdim=True) * 2.5, atol=1e-5)
    # chosen experts lie in at most topk_group groups
    groups = idx // (8 // n_group)
    assert all(len(set(r)) <= topk_group for r in groups.tolist())
    # within the allowed groups, the chosen experts are the top-k by biased score
    biased = scores + g.e_score_correction_bias
    for r in range(16):
        allowed = [e for e in range(8) if e // (8 // n_group) in set(groups[r].tolist())]
        best = sorted(allowed, key=lambda e: -biased[r, e].item())[:k]
        assert set(best) == set(idx[r].tolist()) or math.isclose(
            biased[r, best[-1]].item(), min(biased[r, e].item() for e in idx[r].tolist()), rel_tol=1e-6)


def test_bias_steers_selection_not_weights():
    cfg = ModelConfig(**{**SMALL, "n_group": 1, "topk_group": 1, "num_experts_per_tok": 1})
    g = Gate(cfg)
    torch.nn.init.normal_(g.weight, std=0.02)
    x = torch.randn(32, 64)
    g.e_score_correction_bias.zero_()
    g.e_score_correction_bias[3] = 100.0  # forces expert 3
    w, idx, scores = g(x)
    assert (idx == 3).all()
    assert torch.allclose(w[:, 0], torch.full((32,), 2.5))  # normalized over k=1, independent of the bias


def test_packed_documents_do_not_attend_across():
    m = Transformer(ModelConfig(**SMALL)).eval()
    a, b = torch.randint(0, 97, (1, 10)), torch.randint(0, 97, (1, 7))
    packed = torch.cat([a, b], 1)
    doc = torch.tensor([[0] * 10 + [1] * 7])
    pos = torch.cat([torch.arange(10), torch.arange(7)]).unsqueeze(0)
    with torch.no_grad():
        out = m(packed, positions=pos, doc_ids=doc)
        assert (out[:, :10] - m(a)).abs().max() < 1e-4
        assert (out[:, 10:] - m(b)).abs().max() < 1e-4


def test_mtp_loss_targets_second_next_token():
    """MTP depth 1 at position i sees t_{i+1} and must predict t_{i+2}: learnable on a fixed sequence."""
    cfg = ModelConfig(**SMALL)
    m = Transformer(cfg)
    seq = torch.randint(0, 97, (4, 17))
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    first = None
    for _ in range(60):
        out = m.loss(seq[:, :-1], seq[:, 1:], mtp_weight=1.0)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        first = first or out["mtp_loss"].item()
    assert out["mtp_loss"].item() < 0.3 * first
    # and the trained MTP head predicts t_{i+2} from (h_i, t_{i+1}) on the training data
    with torch.no_grad():
        h, kw = m.hidden_states(seq[:, :-1])
        T = h.shape[1]
        h1 = m.mtp_hidden(1, h[:, :T - 1], seq[:, 1:T], rotary=kw["rotary"], cos=kw["cos"][:, :T - 1],
                          sin=kw["sin"][:, :T - 1], positions=kw["positions"][:, :T - 1], mask=None, absorb=None)
        acc = (m.mtp_logits(1, h1).argmax(-1) == seq[:, 2:T + 1]).float().mean().item()
    assert acc > 0.8


def test_tiny_preset_trains():
    cfg = get_preset("tiny").replace(vocab_size=128, num_hidden_layers=2)
    m = Transformer(cfg)
    data = torch.randint(0, 128, (8, 33))
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    losses = []
    for _ in range(25):
        loss = m.loss(data[:, :-1], data[:, 1:])["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.6 * losses[0]


def _per_expert_reference(x, idx, weights, ex):
    """Plain autograd, one token at a time: sum_k w_k * FFN_{idx_k}(x)."""
    rows = []
    for t in range(x.shape[0]):
        y = 0
        for e, w in zip(idx[t].tolist(), weights[t]):
            h = x[t] @ ex.gate_proj[e].t()
            y = y + w * ((F.silu(h) * (x[t] @ ex.up_proj[e].t())) @ ex.down_proj[e].t())
        rows.append(y)
    return torch.stack(rows)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000), n=st.integers(0, 40), k=st.integers(1, 4))
def test_routed_experts_match_a_per_token_reference(seed, n, k):
    """The reference experts loop equals plain per-token autograd: outputs, and the gradients of
    the input, the routing weights and every expert's weights (experts that get no token included)."""
    from nanoseek.model.moe import Experts
    g = torch.Generator().manual_seed(seed)
    ex = Experts(8, 16, 12).double()
    for p in ex.parameters():
        p.data = torch.randn(p.shape, generator=g, dtype=torch.float64) * 0.3
    x = torch.randn(n, 16, generator=g, dtype=torch.float64, requires_grad=True)
    idx = torch.stack([torch.randperm(8, generator=g)[:k] for _ in range(n)]) if n else torch.zeros(0, k, dtype=torch.long)
    weights = torch.rand(n, k, generator=g, dtype=torch.float64, requires_grad=True)
    ref = _per_expert_reference(x, idx, weights, ex) if n else torch.zeros(0, 16, dtype=torch.float64)
    out, counts = ex(x, idx, weights)
    torch.testing.assert_close(out, ref.detach(), rtol=1e-10, atol=1e-10)
    assert counts.tolist() == torch.bincount(idx.flatten(), minlength=8).tolist()
    if n:
        w = torch.randn(out.shape, generator=g, dtype=torch.float64)
        got = torch.autograd.grad((out * w).sum(), [x, weights, *ex.parameters()], allow_unused=True)
        want = torch.autograd.grad((ref * w).sum(), [x, weights, *ex.parameters()], allow_unused=True)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b if b is not None else torch.zeros_like(a), rtol=1e-10, atol=1e-10)


def test_engine_after_a_fused_adamw_step_generates_from_the_new_weights():
    """Fused AdamW updates weights without bumping their version: a new engine must still copy them."""
    from nanoseek.infer.engine import Engine
    from nanoseek.infer.sampling import SamplingParams
    m = Transformer(ModelConfig(**SMALL))
    prompt = [[5, 17, 3]]
    greedy = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    Engine(m, max_batch=1, max_len=16).generate(prompt, greedy)
    opt = torch.optim.AdamW(m.parameters(), lr=0.05, fused=True)
    for _ in range(3):
        m.loss(torch.tensor([[5, 17, 3, 9]]), torch.tensor([[60, 60, 60, 60]]))["loss"].backward()
        opt.step()
        opt.zero_grad()
    got = Engine(m, max_batch=1, max_len=16).generate(prompt, greedy)[0].outputs[0].token_ids
    fresh = Transformer(ModelConfig(**SMALL))
    fresh.load_state_dict(m.state_dict())
    want = Engine(fresh, max_batch=1, max_len=16).generate(prompt, greedy)[0].outputs[0].token_ids
    assert list(got) == list(want) and 60 in got


def _fp64_model(model_cls: str, seed: int):
    """A tiny MoE (with MTP) or dense student in float64, for exact comparisons with plain autograd."""
    torch.manual_seed(seed)
    return (Transformer(ModelConfig(**SMALL, aux_loss_alpha=0.0)) if model_cls == "moe" else
            DenseTransformer(DenseConfig(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2))).double()


@pytest.mark.parametrize("model_cls", ["moe", "dense"])
@pytest.mark.parametrize("masked", [True, False])
def test_loss_is_the_masked_cross_entropy_with_mtp(model_cls, masked):
    """The training loss is the masked next-token CE plus 0.3 x the depth-1 MTP CE (position i sees
    token i+1, predicts target i+1), written out here from the logits (float64)."""
    model = _fp64_model(model_cls, seed=0)
    ids, tgt = torch.randint(0, 97, (2, 10)), torch.randint(0, 97, (2, 10))
    mask = (torch.rand(2, 10) > 0.3).float() if masked else torch.ones(2, 10)

    def ce(logits, t, m):
        per = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), t.reshape(-1), reduction="none")
        return (per * m.reshape(-1)).sum() / m.sum()

    want = ce(model(ids), tgt, mask)
    if model_cls == "moe":
        h, kw = model.hidden_states(ids)
        h1 = model.mtp_hidden(1, h[:, :-1], ids[:, 1:], rotary=model.rotary, cos=kw["cos"][:, :-1],
                              sin=kw["sin"][:, :-1], positions=kw["positions"][:, :-1], mask=None, absorb=None)
        want = want + 0.3 * ce(model.mtp_logits(1, h1), tgt[:, 1:], mask[:, 1:])
    torch.testing.assert_close(model.loss(ids, tgt, mask if masked else None)["loss"], want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("model_cls", ["moe", "dense"])
@pytest.mark.parametrize("temperature,masked", [(1.0, False), (0.7, True)])
def test_token_logprobs_are_the_log_softmax_at_the_targets(model_cls, temperature, masked):
    """GRPO's log-probs and entropy come from log_softmax(logits / temperature), 0 where the mask is
    not set; the MTP CE is taken on a detached trunk (no gradient reaches the trunk through it)."""
    model = _fp64_model(model_cls, seed=1)
    ids, tgt = torch.randint(0, 97, (2, 10)), torch.randint(0, 97, (2, 10))
    mtp_mask = (torch.rand(2, 9) > 0.3).double()
    keep = torch.rand(2, 10) > 0.4 if masked else torch.ones(2, 10, dtype=torch.bool)
    logp, ent, mtp = model.token_logprobs(ids, tgt, temperature=temperature, entropy=True, mtp_mask=mtp_mask,
                                          mask=keep.double() if masked else None)
    logp_all = F.log_softmax(model(ids) / temperature, -1)
    torch.testing.assert_close(logp, logp_all.gather(-1, tgt.unsqueeze(-1)).squeeze(-1) * keep, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ent, -(logp_all.exp() * logp_all).sum(-1) * keep, rtol=1e-10, atol=1e-10)
    assert not ent.requires_grad
    if model_cls == "dense":
        assert mtp is None
        return
    trunk = [p for n, p in model.named_parameters() if n.startswith("layers.")]
    assert all(g is None for g in torch.autograd.grad(mtp, trunk, allow_unused=True))


@pytest.mark.parametrize("kernels", [False, True])
def test_training_loss_under_bf16_autocast_follows_fp32(kernels):
    """The model, and with `kernels` its hand-written training paths (routed and dense SwiGLU, head CE,
    norms), take autocast's dtype. Dense model: loss and gradients within bf16 error of fp32. MoE model
    (bf16 can flip a router's choice, so no tolerance holds in general): finite fp32 gradients for every
    parameter."""
    from nanoseek.kernels import speedup
    torch.manual_seed(0)
    ids, tgt = torch.randint(0, 97, (2, 12)), torch.randint(0, 97, (2, 12))
    dense = DenseTransformer(DenseConfig(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2))
    for model in (dense, Transformer(ModelConfig(**SMALL))):
        if kernels:
            speedup(model, for_="train")
        ref = model.loss(ids, tgt)["loss"]
        g_ref = torch.autograd.grad(ref, list(model.parameters()))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model.loss(ids, tgt)["loss"]
        g_low = torch.autograd.grad(low, list(model.parameters()))
        assert low.dtype == torch.float32 and abs(low.item() - ref.item()) < 1e-2 * ref.item()
        for (name, p), a, b in zip(model.named_parameters(), g_low, g_ref):
            assert a.dtype == p.dtype and torch.isfinite(a).all(), name
            if model is dense:
                assert (a - b).norm() <= 0.03 * b.norm() + 1e-6, name
