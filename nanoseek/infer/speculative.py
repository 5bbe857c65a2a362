"""Self-speculative decoding with the MTP module (DeepSeek-V3 §2.2 / §5.4.3), one sequence at a time.

Each step drafts token t+1 with the MTP head, then verifies [t, draft] in one 2-token forward of
the main model: the draft is kept with probability min(1, p/q) (always the argmax match when
greedy), else a token is drawn from norm(max(0, p - q)); when kept, the main model's prediction
after it comes for free. Output follows the main model's distribution exactly (greedy: the same
tokens as plain decoding), at up to 2 tokens per main-model forward.
"""
from __future__ import annotations

import torch

from nanoseek.infer.sampling import SamplingParams, filter_logits, speculative_accept
from nanoseek.model.transformer import attention_mask


class _Picker:
    """The sampling distribution of one request (temperature, top-k/p, min-p) over a logits row."""

    def __init__(self, p: SamplingParams, gen: torch.Generator | None):
        self.p, self.gen = p, gen

    def probs(self, logits: torch.Tensor) -> torch.Tensor:
        one = lambda v, dt: torch.tensor([v], dtype=dt, device=logits.device)  # noqa: E731
        x = filter_logits(logits.float().unsqueeze(0) / self.p.temperature, one(self.p.top_k, torch.long),
                          one(self.p.top_p, torch.float32), one(self.p.min_p, torch.float32))
        return x.softmax(-1)[0]

    def draw(self, probs: torch.Tensor) -> int:
        return int(torch.multinomial(probs, 1, generator=self.gen)[0])

    def pick(self, logits: torch.Tensor) -> int:
        return int(logits.argmax()) if self.p.temperature == 0 else self.draw(self.probs(logits))


def _mtp_draft(model, cache, h: torch.Tensor, next_ids: list[int], start: int) -> torch.Tensor:
    """MTP depth 1 over positions start.. (pairs h_i, t_{i+1}); returns the draft logits of the last one."""
    dev = h.device
    pos = torch.arange(start, start + len(next_ids), device=dev).unsqueeze(0)
    kv_len = start + len(next_ids)
    cache.limit = kv_len
    cos, sin = model.rotary(pos, h.dtype)
    h1 = model.mtp_hidden(1, h, torch.tensor([next_ids], device=dev), rotary=model.rotary, cos=cos, sin=sin,
                          positions=pos, mask=attention_mask(pos, kv_len, None), cache=cache, absorb=True)
    return model.mtp_logits(1, h1[:, -1:])[0, -1].float()


@torch.inference_mode()
def speculative_decode(model, prompt: list[int], params: SamplingParams, max_len: int, eos_id: int | None,
                       gen: torch.Generator | None = None):
    """Returns (tokens, logprobs, finish_reason, drafted, accepted)."""
    dev = next(model.parameters()).device
    cache = model.make_cache(1, max_len, mtp=True)
    pick = _Picker(params, gen)
    toks: list[int] = []
    lps: list[float] = []
    stop_ids = set(params.stop_token_ids) | ({eos_id} if eos_id is not None and not params.ignore_eos else set())
    drafted = accepted = 0

    def emit(t: int, logits: torch.Tensor) -> str | None:
        toks.append(t)
        lps.append(float(logits.float().log_softmax(-1)[t]))
        if t in stop_ids:
            return "stop"
        if len(toks) >= params.max_tokens or len(prompt) + len(toks) >= max_len:
            return "length"
        return None

    L = len(prompt)
    h, _ = model.hidden_states(torch.tensor([prompt], device=dev), torch.arange(L, device=dev).unsqueeze(0), cache)
    logits = model.lm_head(h[0, -1]).float()
    t = pick.pick(logits)
    reason = emit(t, logits)
    draft_logits = _mtp_draft(model, cache, h, prompt[1:] + [t], 0)
    while reason is None:
        p0 = L + len(toks) - 1  # position of the last emitted token t (not yet in the main cache)
        d = pick.pick(draft_logits)
        drafted += 1
        h2, _ = model.hidden_states(torch.tensor([[t, d]], device=dev), torch.tensor([[p0, p0 + 1]], device=dev), cache)
        lg = model.lm_head(h2[0]).float()  # lg[0]: distribution of the token after t; lg[1]: after d
        if params.temperature == 0:
            ok = int(lg[0].argmax()) == d
        else:
            u = torch.rand(1, generator=gen, device=dev)
            acc, tok = speculative_accept(pick.probs(lg[0])[None], pick.probs(draft_logits)[None],
                                          torch.tensor([d], device=dev), u, [gen])
            ok = bool(acc[0])
        if ok:
            accepted += 1
            reason = emit(d, lg[0])
            if reason is None:
                t = pick.pick(lg[1])
                reason = emit(t, lg[1])
                draft_logits = _mtp_draft(model, cache, h2, [d, t], p0)
        else:
            t = int(lg[0].argmax()) if params.temperature == 0 else int(tok[0])
            reason = emit(t, lg[0])
            draft_logits = _mtp_draft(model, cache, h2[:, :1], [t], p0)
    return toks, lps, reason, drafted, accepted
