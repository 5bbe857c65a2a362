"""Sampling parameters and the logits -> next-token step, vectorized over a batch of requests.

Each row has its own parameters and its own torch.Generator, so a request's seed alone decides
its random draws, whichever other requests share the batch.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

LOGPROBS_MODES = ("raw", "processed")


@dataclass
class SamplingParams:
    temperature: float = 1.0       # 0: greedy
    top_p: float = 1.0
    top_k: int = 0                 # 0: off
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    max_tokens: int = 256
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    seed: int | None = None
    logprobs: bool = True          # log-prob of each sampled token (under logprobs_mode's distribution)
    # "raw": the model's own distribution (softmax of the logits, temperature 1: what the API reports);
    # "processed": the distribution the token was drawn from (logits / temperature, top-k / top-p / min-p
    # truncation applied), what an RL trainer compares its own log-probs with (vLLM's names alike)
    logprobs_mode: str = "raw"
    top_logprobs: int = 0
    n: int = 1
    ignore_eos: bool = False
    guide: Callable[[], object] | None = None  # makes each sequence's guide.OutputGuide (None: unconstrained)

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        checks = [(self.temperature >= 0, "temperature must be >= 0"), (0 < self.top_p <= 1, "top_p must be in (0, 1]"),
                  (self.top_k >= 0, "top_k must be >= 0"), (0 <= self.min_p <= 1, "min_p must be in [0, 1]"),
                  (self.repetition_penalty > 0, "repetition_penalty must be > 0"),
                  (self.max_tokens >= 1, "max_tokens must be >= 1"), (self.n >= 1, "n must be >= 1"),
                  (0 <= self.top_logprobs <= 20, "top_logprobs must be in [0, 20]"),
                  (self.logprobs_mode in LOGPROBS_MODES, f"logprobs_mode must be one of {LOGPROBS_MODES}")]
        for ok, msg in checks:
            if not ok:
                raise ValueError(msg)


def sampling_tensors(P: list[SamplingParams], device) -> tuple[torch.Tensor, ...]:
    """Per-row temperature, top_k, top_p, min_p of a batch of sampling parameters."""
    f = lambda name, dt: torch.tensor([getattr(p, name) for p in P], dtype=dt, device=device)  # noqa: E731
    return f("temperature", torch.float32), f("top_k", torch.long), f("top_p", torch.float32), f("min_p", torch.float32)


def truncates(P: list[SamplingParams]) -> bool:
    """Does any row truncate its distribution (top-k / top-p / min-p)? If not, no row needs the sort."""
    return any(p.top_k > 0 or p.top_p < 1 or p.min_p > 0 for p in P)


def apply_repetition_penalty(logits: torch.Tensor, seen: list[list[int]], penalty: torch.Tensor) -> torch.Tensor:
    """CTRL-style: divide positive / multiply negative logits of already-seen tokens by the penalty."""
    for i, toks in enumerate(seen):
        if penalty[i] != 1.0 and toks:
            idx = torch.tensor(sorted(set(toks)), device=logits.device)
            v = logits[i, idx]
            logits[i, idx] = torch.where(v > 0, v / penalty[i], v * penalty[i])
    return logits


def filter_logits(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Mask (to -inf) tokens outside top-k, outside the top-p nucleus, or below min_p * p_max. logits [B, V]."""
    V = logits.shape[-1]
    sorted_logits, order = logits.sort(dim=-1, descending=True, stable=True)  # ties: the argmax (first) stays first
    probs = sorted_logits.softmax(-1)
    rank = torch.arange(V, device=logits.device).expand_as(probs)
    k = torch.where(top_k > 0, top_k, torch.full_like(top_k, V)).unsqueeze(-1)
    drop = rank >= k
    # nucleus: keep a token if the mass before it is < top_p (so the top token always stays)
    drop |= (probs.cumsum(-1) - probs) >= top_p.unsqueeze(-1)
    drop |= probs < min_p.unsqueeze(-1) * probs[:, :1]
    drop[:, 0] = False
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(-1, order, sorted_logits)


def sampling_logprobs(logits: torch.Tensor, tok: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor,
                      top_p: torch.Tensor, min_p: torch.Tensor, filtered: bool = True) -> torch.Tensor:
    """log q(tok) [B] under the distribution `sample` draws from: softmax(filter(logits / temperature)).
    Rows with temperature 0 (greedy) get the raw log-prob (their distribution is a point mass)."""
    greedy = temperature == 0
    x = logits / torch.where(greedy, torch.ones_like(temperature), temperature).unsqueeze(-1)
    if filtered:
        x = filter_logits(x, top_k, top_p, min_p)
    x = torch.where(greedy.unsqueeze(-1), logits, x)
    return x.gather(1, tok.unsqueeze(1)).squeeze(1) - x.logsumexp(-1)


def sample(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
           min_p: torch.Tensor, u: torch.Tensor, filtered: bool = True, any_greedy: bool = True) -> torch.Tensor:
    """logits [B, V] (fp32), u [B] uniform(0, 1) -> token ids [B]. Rows with temperature 0 are greedy.

    Inverse-CDF sampling with one uniform per row: the uniforms come from each request's own
    generator, so a row's token never depends on the other rows, and there is no per-row kernel.
    filtered=False skips the sort when no row uses top-k / top-p / min-p; any_greedy=False skips the
    argmax when the caller knows no row has temperature 0 (a [B, V] argmax costs as much as the softmax).
    """
    greedy = temperature == 0
    t = torch.where(greedy, torch.ones_like(temperature), temperature).unsqueeze(-1)
    x = logits / t
    if filtered:
        x = filter_logits(x, top_k, top_p, min_p)
    cdf = x.softmax(-1).cumsum(-1)                                           # [B, V]
    # side="right": the first token whose cdf exceeds u, so zero-probability tokens are never picked
    tok = torch.searchsorted(cdf, (u.to(cdf.dtype) * cdf[:, -1]).unsqueeze(-1), right=True).squeeze(-1)
    tok = tok.clamp_max(logits.shape[-1] - 1)
    return torch.where(greedy, logits.argmax(-1), tok) if any_greedy else tok


def speculative_accept(p: torch.Tensor, q: torch.Tensor, draft: torch.Tensor, u: torch.Tensor,
                       generators: list[torch.Generator | None] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Speculative sampling (Leviathan et al. 2023): keep draft d ~ q with probability min(1, p(d)/q(d)),
    else draw from norm(max(0, p - q)); the result is distributed exactly as p.

    p, q [N, V] target / draft probabilities, draft [N], u [N] uniform(0, 1) -> (accepted [N] bool, token [N]).
    """
    pd, qd = p.gather(1, draft[:, None])[:, 0], q.gather(1, draft[:, None])[:, 0]
    accepted = u * qd <= pd
    residual = (p - q).clamp_min(0)
    # p == q leaves no residual mass, but then the draft is always accepted: fall back to p to stay well-defined
    residual = torch.where(residual.sum(-1, keepdim=True) > 0, residual, p)
    token = draft.clone()
    rej = torch.nonzero(~accepted).flatten()
    if len(rej):
        if generators is None:
            token[rej] = torch.multinomial(residual[rej], 1)[:, 0]
        else:
            for i in rej.tolist():
                token[i] = torch.multinomial(residual[i], 1, generator=generators[i])[0]
    return accepted, token
