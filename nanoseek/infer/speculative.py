"""MTP self-speculative decoding (DeepSeek-V3 §2.2 / §5.4.3), batched over the engine's active sequences.

Every sequence carries a draft distribution q for the token after its last one, made by the MTP
module. One step verifies all drafts in a single [B, 2] forward of the main model on (last, draft):
a draft is kept with probability min(1, p/q) (greedy: iff it is the argmax), else the token is drawn
from norm(max(0, p - q)); a kept draft also yields the main model's next token for free. Output
follows the main model's distribution exactly (greedy: the same tokens as plain decoding), at up to
2 tokens per main-model forward. Rows advance by 1 or 2 positions: the cache is per-row positional
and masks keys past each query, so a rejected draft's cache entry is simply overwritten later.
"""
from __future__ import annotations

import torch

from nanoseek.infer.sampling import filter_logits, speculative_accept
from nanoseek.model.transformer import attention_mask


def mtp_forward(engine, h: torch.Tensor, next_ids: torch.Tensor, pos: torch.Tensor, rows: slice) -> torch.Tensor | None:
    """Depth-1 MTP over pairs (h_i [B, T, D], t_{i+1} [B, T]) at positions pos [B, T], writing the MTP
    block's cache rows; returns its logits [B, T, V] (the draft for t_{i+2}), None when T == 0."""
    if h.shape[1] == 0:
        return None
    model, cache = engine.model, engine.cache
    kv_len = int(pos.max()) + 1
    cache.limit, cache.rows = kv_len, rows
    cos, sin = model.rotary(pos, h.dtype)
    h1 = model.mtp_hidden(1, h, next_ids, rotary=model.rotary, cos=cos, sin=sin, positions=pos,
                          mask=attention_mask(pos, kv_len, None), cache=cache, absorb=True)
    return model.mtp_logits(1, h1).float()


def _probs(logits: torch.Tensor, seqs) -> torch.Tensor:
    """The sampling distribution of each row (temperature, top-k/p, min-p): [B, V] -> [B, V]."""
    f = lambda name, dt: torch.tensor([getattr(s.params, name) for s in seqs], dtype=dt, device=logits.device)  # noqa: E731
    t = f("temperature", torch.float32).clamp_min(1e-5).unsqueeze(-1)
    return filter_logits(logits / t, f("top_k", torch.long), f("top_p", torch.float32), f("min_p", torch.float32)).softmax(-1)


def speculative_step(engine, events: list) -> None:
    seqs = list(engine.active)
    B, dev = len(seqs), engine.device
    q = torch.stack([s.q for s in seqs])                                           # [B, V] draft logits
    draft = engine._choose(q, seqs)                                                # d ~ q (argmax when greedy)
    ids = torch.tensor([[s.last] for s in seqs], device=dev)
    p0 = torch.tensor([[s.pos] for s in seqs], device=dev)
    ids, pos = torch.cat([ids, draft[:, None]], 1), torch.cat([p0, p0 + 1], 1)     # [B, 2]: (last, draft)
    engine.cache.rows = slice(0, B)
    h, _ = engine.model.hidden_states(ids, pos, engine.cache)                      # [B, 2, D]
    lg = engine.model.lm_head(h).float()                                           # [B, 2, V]
    tok = lg[:, 0].argmax(-1)
    accepted = tok == draft
    if not all(s.params.temperature == 0 for s in seqs):
        greedy = torch.tensor([s.params.temperature == 0 for s in seqs], device=dev)
        u = torch.tensor([s.uniform() for s in seqs], device=dev)
        acc_s, tok_s = speculative_accept(_probs(lg[:, 0], seqs), _probs(q, seqs), draft, u, [s.gen for s in seqs])
        accepted, tok = torch.where(greedy, accepted, acc_s), torch.where(greedy, tok, tok_s)
    # 1st token of every row: the draft if accepted, else the correction; its log-prob is under p (lg[:, 0])
    for s in seqs:
        s.pos += 1
    finished = engine._record(lg[:, 0], tok, seqs, events)
    acc = accepted.tolist()
    engine.spec_stats["drafted"] += B
    engine.spec_stats["accepted"] += sum(acc)
    done = {id(s) for s, _ in finished}
    # 2nd token of the accepted rows: the main model's prediction after the draft, already computed
    second = [i for i in range(B) if acc[i] and id(seqs[i]) not in done]
    tok2 = tok.clone()
    if second:
        idx = torch.tensor(second, device=dev)
        sub = [seqs[i] for i in second]
        t2 = engine._choose(lg[idx, 1], sub)
        for s in sub:
            s.pos += 1
        finished += engine._record(lg[idx, 1], t2, sub, events)
        tok2[idx] = t2
    # next drafts: MTP at (h_p, t_{p+1}) and (h_{p+1}, t_{p+2}); an accepted row drafts from the 2nd pair
    d = mtp_forward(engine, h, torch.stack([tok, tok2], 1), pos, slice(0, B))     # [B, 2, V]
    col = torch.tensor(acc, device=dev).long()
    q_next = d[torch.arange(B, device=dev), col]
    for s, qn in zip(seqs, q_next):
        s.q = qn
    engine._finish_all(finished)
