"""Prefix cache: KV reused across requests gives the same greedy tokens as recomputing; the radix tree's
matching, per-token heads, byte cap and leaf-first LRU eviction; property test against a plain model of it."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from nanoseek.infer.engine import Engine
from nanoseek.infer.prefix_cache import PrefixCache
from nanoseek.infer.sampling import SamplingParams
from nanoseek.model.cache import KVCache
from nanoseek.model.dense import DenseTransformer
from nanoseek.model.transformer import Transformer
from test_engine import DENSE, MOE

SYSTEM = [7, 3, 9, 12, 40, 41, 42, 43, 44, 45, 46, 47, 50, 51, 52, 53, 54, 55, 60, 61, 62]  # 21 shared tokens


@pytest.fixture(scope="module", params=["moe", "dense"])
def model(request):
    torch.manual_seed(0)
    return (Transformer(MOE) if request.param == "moe" else DenseTransformer(DENSE)).eval()


def greedy(tokens: int, **kw) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True, **kw)


def test_greedy_output_is_identical_with_the_cache_on_and_off(model):
    """Shared system prompt, a second turn that extends a first turn's prompt + answer, the same prompt again,
    n > 1 groups and prompts admitted together: every token equals the cache-off engine's."""
    plain = Engine(model, max_batch=4, max_len=96)
    cached = Engine(model, max_batch=4, max_len=96, prefix_cache_bytes=1 << 20, prefix_block=4)
    first = [SYSTEM + [1, 2, 3], SYSTEM + [5, 6], [9, 9, 9, 9, 9, 9]]
    ref1, got1 = plain.generate(first, greedy(10)), cached.generate(first, greedy(10))
    assert [o.outputs[0].token_ids for o in got1] == [o.outputs[0].token_ids for o in ref1]
    turn2 = SYSTEM + [1, 2, 3] + got1[0].outputs[0].token_ids + [70, 71]
    second = [turn2, SYSTEM + [8], SYSTEM + [1, 2, 3], [9, 9, 9, 9, 9, 9, 4]]
    params = [greedy(12), greedy(12, n=2), greedy(12), greedy(12)]
    ref2, got2 = plain.generate(second, params), cached.generate(second, params)
    for r, g in zip(ref2, got2):
        assert [o.token_ids for o in g.outputs] == [o.token_ids for o in r.outputs]
    hits = [g.cached_tokens for g in got2]
    # turn 2 reuses turn 1's prompt and all but the last generated token (that one was never written)
    assert hits[0] == len(SYSTEM) + 3 + 10 - 1
    assert hits[1] == len(SYSTEM) and hits[2] == len(SYSTEM) + 2 and hits[3] == 6
    assert all(r.cached_tokens == 0 for r in ref2)


def test_batch_generation_has_no_prefix_cache(model):
    """Rollouts and evaluation build engines without one: behaviour and speed as before."""
    eng = Engine(model, max_batch=2, max_len=64)
    assert eng.prefix_cache is None
    assert eng.generate([SYSTEM, SYSTEM], greedy(3))[1].cached_tokens == 0


def test_speculative_engine_ignores_the_prefix_cache():
    torch.manual_seed(0)
    model = Transformer(MOE).eval()
    eng = Engine(model, max_batch=2, max_len=64, speculative=True, prefix_cache_bytes=1 << 20, prefix_block=4)
    plain = Engine(model, max_batch=2, max_len=64)
    for _ in range(2):
        out = eng.generate([SYSTEM], greedy(6))[0]
        assert out.cached_tokens == 0
        assert out.outputs[0].token_ids == plain.generate([SYSTEM], greedy(6))[0].outputs[0].token_ids


def _cache(rows: int = 1, length: int = 64) -> KVCache:
    c = KVCache(2, rows, length, ((3,),))
    for layer in c.layers:  # position p of row r holds the value 1000 r + p
        layer[0].copy_(torch.arange(rows).view(-1, 1, 1) * 1000 + torch.arange(length).view(1, -1, 1).float())
    return c


def test_match_uses_the_head_of_a_block_and_copies_values():
    pc = PrefixCache(1 << 20, block_size=4)
    src = _cache()
    pc.store([1, 2, 3, 4, 5, 6, 7], src, 0)              # blocks [1 2 3 4] [5 6 7]
    assert len(pc) == 2
    path = pc.match([1, 2, 3, 4, 5, 9, 9, 9], limit=7)
    dst = KVCache(2, 2, 64, ((3,),))
    assert pc.load(path, dst, 1) == 5
    assert torch.equal(dst.layers[1][0][1, :5, 0], torch.arange(5.0))
    assert pc.load(pc.match([2, 2], limit=1), dst, 0) == 0
    pc.store([1, 2, 3, 4, 5, 6, 7, 8, 10], src, 0)      # [5 6 7 8] extends the short [5 6 7]: that one goes
    assert len(pc) == 3 and sum(k for _, k in pc.match([1, 2, 3, 4, 5, 6, 7, 8, 10], 9)) == 9


def test_lru_evicts_leaves_first_under_the_byte_cap():
    block_bytes = 2 * 4 * 3 * 4  # 2 layers x 4 tokens x 3 values x fp32
    pc = PrefixCache(3 * block_bytes, block_size=4)
    src = _cache()
    pc.store([1, 2, 3, 4, 5, 6, 7, 8], src, 0)          # root block A, child B
    pc.store([9, 9, 9, 9], src, 0)                      # C
    pc.match([9, 9, 9, 9, 0], limit=4)                  # C is now the most recent
    pc.store([1, 2, 3, 4, 6, 6, 6, 6], src, 0)          # D under A: over the cap, the oldest leaf (B) goes
    assert pc.used <= pc.capacity and len(pc) == 3 and pc.stats["evicted_blocks"] == 1
    assert sum(k for _, k in pc.match([1, 2, 3, 4, 5, 6, 7, 8], 8)) == 4
    assert sum(k for _, k in pc.match([1, 2, 3, 4, 6, 6, 6, 6], 8)) == 8


@settings(max_examples=60, deadline=None)
@given(st.lists(st.lists(st.integers(0, 3), min_size=1, max_size=14), min_size=1, max_size=8),
       st.lists(st.integers(0, 3), min_size=1, max_size=14), st.integers(1, 5), st.integers(1, 6))
def test_match_is_the_longest_stored_prefix(stored, query, block, cap_blocks):
    """Against the plain definition: with room for everything, the match is the longest common prefix with any
    stored sequence; under any cap it is a prefix of one, and what it loads are that sequence's values."""
    big = PrefixCache(1 << 20, block_size=block)
    small = PrefixCache(cap_blocks * 2 * block * 3 * 4, block_size=block)
    caches = [_cache(length=16) for _ in stored]
    for i, seq in enumerate(stored):
        caches[i].layers[0][0].add_(i * 100)  # distinct values per stored sequence, equal per position otherwise
        big.store(seq, caches[i], 0)
        small.store(seq, caches[i], 0)
    limit = len(query)

    def lcp(a, b):
        return next((k for k in range(min(len(a), len(b))) if a[k] != b[k]), min(len(a), len(b)))
    assert sum(k for _, k in big.match(query, limit)) == max(lcp(s, query) for s in stored)
    dst = KVCache(2, 1, 16, ((3,),))
    n = small.load(small.match(query, limit), dst, 0)
    assert small.used <= small.capacity
    assert any(lcp(s, query) >= n for s in stored)
    assert torch.equal(dst.layers[1][0][0, :n, 0], torch.arange(float(n)))
