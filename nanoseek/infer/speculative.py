"""MTP self-speculative decoding (DeepSeek-V3 §2.2 / §5.4.3), batched over the engine's active sequences.

Every sequence carries a draft distribution q for the token after its last one, made by the MTP
module. One step verifies all drafts in a single [B, 2] forward of the main model on (last, draft):
a draft is kept with probability min(1, p/q) (greedy: iff it is the argmax), else the token is drawn
from norm(max(0, p - q)); a kept draft also yields the main model's next token for free. Output
follows the main model's distribution exactly (greedy: the same tokens as plain decoding), at up to
2 tokens per main-model forward. Rows advance by 1 or 2 positions: the cache is per-row positional
and masks keys past each query, so a rejected draft's cache entry is simply overwritten later.

A step costs the [B, 2] verify forward, the MTP block's [B, 2] forward and the acceptance math; the
head runs only where its logits are used (the verify's two positions, one MTP position per row).
"""
from __future__ import annotations

import torch

from nanoseek.infer.sampling import filter_logits, sampling_tensors, speculative_accept, truncates
from nanoseek.model.transformer import attention_mask


def mtp_forward(engine, h: torch.Tensor, next_ids: torch.Tensor, pos: torch.Tensor, rows: slice) -> torch.Tensor | None:
    """Depth-1 MTP over pairs (h_i [B, T, D], t_{i+1} [B, T]) at positions pos [B, T], writing the MTP
    block's cache rows; returns its hidden states [B, T, D] (before the head norm), None when T == 0."""
    if h.shape[1] == 0:
        return None
    model, cache = engine.model, engine.cache
    kv_len = int(pos.max()) + 1
    cache.limit, cache.rows = kv_len, rows
    cos, sin = model.rotary(pos, h.dtype)
    return model.mtp_hidden(1, h, next_ids, rotary=model.rotary, cos=cos, sin=sin, positions=pos,
                            mask=attention_mask(pos, kv_len, None), cache=cache, absorb=True)


def draft_logits(engine, h1: torch.Tensor) -> torch.Tensor:
    """The MTP head on hidden states [..., D]: the draft logits [..., V] (fp32) for the token after next."""
    return engine.model.mtp_logits(1, h1).float()


def _probs(logits: torch.Tensor, seqs) -> torch.Tensor:
    """The sampling distribution of each row (temperature, top-k/p, min-p): [B, V] -> [B, V]."""
    P = [s.params for s in seqs]
    t, top_k, top_p, min_p = sampling_tensors(P, logits.device)
    x = logits / t.clamp_min(1e-5).unsqueeze(-1)
    return (filter_logits(x, top_k, top_p, min_p) if truncates(P) else x).softmax(-1)


def _verify(seqs, q: torch.Tensor, draft: torch.Tensor, p_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Accept or correct each row's draft against the main model's logits p_logits [B, V]:
    (accepted [B], token [B])."""
    tok = p_logits.argmax(-1)
    accepted = tok == draft
    if all(s.params.temperature == 0 for s in seqs):
        return accepted, tok
    greedy = torch.tensor([s.params.temperature == 0 for s in seqs], device=draft.device)
    u = torch.tensor([s.uniform() for s in seqs], device=draft.device)
    acc_s, tok_s = speculative_accept(_probs(p_logits, seqs), _probs(q, seqs), draft, u, [s.gen for s in seqs])
    return torch.where(greedy, accepted, acc_s), torch.where(greedy, tok, tok_s)


def speculative_step(engine, events: list) -> None:
    seqs = list(engine.active)
    B, dev = len(seqs), engine.device
    # draft and target are both taken after the repetition penalty, as plain decoding samples
    q = engine._adjust(torch.stack([s.q for s in seqs]), seqs)                     # [B, V] draft logits
    draft = engine._draw(q, seqs)                                                  # d ~ q (argmax when greedy)
    last = torch.tensor([[s.last, s.pos] for s in seqs], device=dev)               # [B, 2]: (last token, its position)
    ids = torch.stack([last[:, 0], draft], 1)                                      # [B, 2]: (last, draft)
    pos = last[:, 1:] + torch.arange(2, device=dev)                                # [B, 2]
    engine.cache.rows = slice(0, B)
    h, _ = engine.model.hidden_states(ids, pos, engine.cache, kv_len=max(s.pos for s in seqs) + 2)  # [B, 2, D]
    lg = engine.model.lm_head(h).float()                                           # [B, 2, V]
    accepted, tok = _verify(seqs, q, draft, engine._adjust(lg[:, 0], seqs))
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
    # next drafts: MTP at (h_p, t_{p+1}) and (h_{p+1}, t_{p+2}), both written to its cache; a row drafts
    # from its last pair: the 2nd when the draft was accepted
    h1 = mtp_forward(engine, h, torch.stack([tok, tok2], 1), pos, slice(0, B))   # [B, 2, D]
    q_next = draft_logits(engine, h1[torch.arange(B, device=dev), accepted.long()])  # [B, V]
    for s, qn in zip(seqs, q_next):
        s.q = qn
    engine._finish_all(finished)
