"""The GRPO math: advantages, the policy's per-token log-probs, the clipped objective (no data, no sampling).

    A_i      = (r_i - mean(r_group)) / (std(r_group) + eps)      scale_rewards="group" (GRPO)
             =  r_i - mean(r_group)                                scale_rewards="none"  (Dr. GRPO)
    ratio_t  = pi(o_t) / pi_old(o_t)
    obj_t    = min(ratio_t * A, clip(ratio_t, 1 - eps_low, 1 + eps_high) * A)   (clip-higher: DAPO)
    k3_t     = pi_ref/pi - log(pi_ref/pi) - 1   (unbiased, always >= 0, = 0 when pi == pi_ref)
    loss_t   = -obj_t + beta * k3_t

How the per-token losses become one number matters when completions differ in length:
  "token"    sum over all tokens / number of tokens in the batch (DAPO; long answers are not
             down-weighted per token, the default)
  "sequence" mean over sequences of the per-sequence token mean (original GRPO; a token of a
             long answer counts less, which biases towards long wrong answers)
  "dr_grpo"  sum over all tokens / (sequences * max_new_tokens): a constant, so no length bias
The normalizers are passed in (`norm`), computed once over the whole batch, so accumulating
gradients over micro-batches gives exactly the full-batch gradient.

Policy objectives (`objective`), each a per-token loss aggregated as above:
  "grpo"   the clipped token ratio above (PPO's surrogate, DeepSeekMath / R1)
  "gspo"   one length-normalized ratio per sequence, clipped per sequence (GSPO, Zheng et al. 2025)
  "cispo"  the clipped importance weight, stop-gradient, on every token's log-likelihood (CISPO, MiniMax-M1)
Off-policy corrections against the rollout engine's own log-probs (the samples come from the engine's
policy, which kernels, precision and MoE router flips make differ from the trainer's):
  tis_weights               truncated importance sampling (Yao et al. 2025)
  offpolicy_sequence_mask   DeepSeek-V3.2's masking of far-off-policy negative sequences
"""
from __future__ import annotations

from collections.abc import Callable

import torch

from nanoseek.infer.sampling import filter_logits

AGGREGATIONS = ("token", "sequence", "dr_grpo")
OBJECTIVES = ("grpo", "gspo", "cispo")


def group_advantages(rewards: torch.Tensor, group_size: int, scale_rewards: str = "group",
                     eps: float = 1e-4) -> tuple[torch.Tensor, torch.Tensor]:
    """rewards [N*G] (groups contiguous) -> (advantages [N*G], zero_variance [N] bool).
    A group whose rewards are all equal carries no signal: its advantages are exactly 0."""
    r = rewards.float().view(-1, group_size)
    centred = r - r.mean(dim=1, keepdim=True)
    zero_var = (r.max(dim=1).values - r.min(dim=1).values) == 0
    if scale_rewards == "group":
        # population std would give +-1 for two samples; the unbiased one matches the paper's code
        std = r.std(dim=1, keepdim=True) if group_size > 1 else torch.zeros_like(centred[:, :1])
        centred = centred / (std + eps)
    elif scale_rewards != "none":
        raise ValueError(f"scale_rewards must be 'group' or 'none', got {scale_rewards!r}")
    centred[zero_var] = 0.0  # exact zeros, not float residue
    return centred.reshape(-1), zero_var


def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Schulman's k3 estimator of KL(pi || pi_ref) per token; >= 0 and 0 iff the log-probs agree."""
    d = ref_logp - logp
    return torch.exp(d) - d - 1.0


def normalizer(mask: torch.Tensor, aggregation: str, max_new_tokens: int, tokens: torch.Tensor | None = None,
               rows: torch.Tensor | None = None) -> torch.Tensor:
    """The denominator(s) of the batch: a scalar for token / dr_grpo, per-sequence lengths times
    the number of sequences for 'sequence'. Compute on the *full* batch mask [B, T]; rows whose mask
    is all 0 do not count. tokens / rows: the global counts when the batch is split over ranks."""
    tokens = mask.sum() if tokens is None else tokens
    rows = (mask.sum(-1) > 0).sum() if rows is None else rows
    if aggregation == "token":
        return tokens.clamp_min(1.0)
    if aggregation == "sequence":
        return mask.sum(-1).clamp_min(1.0) * rows.clamp_min(1)  # [B]: mean over tokens, then over sequences
    if aggregation == "dr_grpo":
        return (rows.clamp_min(1) * max_new_tokens).float()
    raise ValueError(f"loss aggregation must be one of {AGGREGATIONS}, got {aggregation!r}")


def clipped_ratio_objective(logp, old_logp, adv, eps_low: float, eps_high: float):
    """GRPO / PPO per token: min(r A, clip(r, 1 - eps_low, 1 + eps_high) A), r = pi / pi_old.
    A token is clipped when the clip (not the ratio) decided the minimum: it passes no gradient."""
    ratio = torch.exp(logp - old_logp)
    obj = torch.minimum(ratio * adv, torch.clamp(ratio, 1 - eps_low, 1 + eps_high) * adv)
    clipped = ((ratio < 1 - eps_low) & (adv < 0)) | ((ratio > 1 + eps_high) & (adv > 0))
    return obj, clipped


def gspo_objective(logp, old_logp, adv, mask, eps_low: float, eps_high: float):
    """GSPO (Zheng et al. 2025, "Group Sequence Policy Optimization", eq. 5-7): one ratio per sequence,
    s_i = (pi(o_i) / pi_old(o_i))^(1/|o_i|) = exp(mean_t log r_t), the geometric mean of the token ratios,
    and the clipped objective on it: min(s_i A_i, clip(s_i, 1 - eps_low, 1 + eps_high) A_i). Returned on
    every token of the sequence (so "sequence" aggregation is GSPO's mean over sequences). The paper's
    clip range is per sequence and narrow (3e-4 / 4e-4), not the token-level 0.2 / 0.28."""
    log_s = ((logp - old_logp) * mask).sum(-1, keepdim=True) / mask.sum(-1, keepdim=True).clamp_min(1)
    s = torch.exp(log_s)
    obj = torch.minimum(s * adv, torch.clamp(s, 1 - eps_low, 1 + eps_high) * adv)
    clipped = ((s < 1 - eps_low) & (adv < 0)) | ((s > 1 + eps_high) & (adv > 0))
    return obj.expand_as(logp), clipped.expand_as(logp)


def cispo_objective(logp, old_logp, adv, eps_low: float, eps_high: float):
    """CISPO (MiniMax-M1, Chen et al. 2025, eq. 4-5): sg(clip(r_t, 1 - eps_low, 1 + eps_high)) A log pi(o_t).
    The importance weight is clipped and detached, so unlike PPO's clip no token loses its gradient:
    d obj / d logp = clip(r) A. (MiniMax sets no lower bound, i.e. a large eps_low, and tunes eps_high.)"""
    ratio = torch.exp(logp - old_logp).detach()
    weight = torch.clamp(ratio, 1 - eps_low, 1 + eps_high)
    return weight * adv * logp, (ratio < 1 - eps_low) | (ratio > 1 + eps_high)


def grpo_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
              norm: torch.Tensor, ref_logp: torch.Tensor | None = None, beta: float = 0.0,
              eps_low: float = 0.2, eps_high: float = 0.28, objective: str = "grpo",
              token_weights: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The policy loss of a (micro-)batch: -objective + beta * k3, aggregated by `norm`.

    logp, old_logp, ref_logp, mask: [B, T] over completion tokens (mask 1 = a generated token);
    advantages [B]; norm from `normalizer` (its rows sliced to this micro-batch for 'sequence');
    objective: one of OBJECTIVES; token_weights [B, T] (no grad): off-policy corrections that scale each
    token's policy term (TIS weights, V3.2's sequence mask). Returns (loss, stats) where stats hold
    *sums* over this micro-batch's tokens (kl, clipped, ratio) for the caller to average.
    """
    mask = mask.float()
    adv = advantages.unsqueeze(-1)
    if objective == "grpo":
        obj, clipped = clipped_ratio_objective(logp, old_logp, adv, eps_low, eps_high)
    elif objective == "gspo":
        obj, clipped = gspo_objective(logp, old_logp, adv, mask, eps_low, eps_high)
    elif objective == "cispo":
        obj, clipped = cispo_objective(logp, old_logp, adv, eps_low, eps_high)
    else:
        raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
    per_token = -obj if token_weights is None else -obj * token_weights
    kl = None
    if ref_logp is not None and beta != 0:
        kl = k3_kl(logp, ref_logp)
        per_token = per_token + beta * kl
    if norm.dim() == 1:  # 'sequence': each row by its own length (times the number of rows)
        loss = ((per_token * mask).sum(-1) / norm).sum()
    else:
        loss = (per_token * mask).sum() / norm
    with torch.no_grad():
        stats = {"clipped": (clipped.float() * mask).sum(), "ratio": (torch.exp(logp - old_logp) * mask).sum(),
                 "kl": (kl * mask).sum() if kl is not None else torch.zeros(())}
    return loss, stats


# ------------------------------------------------------------------------------ off-policy corrections

def tis_weights(old_logp: torch.Tensor, engine_logp: torch.Tensor, cap: float) -> torch.Tensor:
    """Truncated importance sampling (Yao et al. 2025, "Your Efficient RL Framework Secretly Brings You
    Off-Policy RL Training"): the tokens were sampled by the engine's policy pi_engine, not the trainer's
    pi_old, so each token's term is reweighted by w_t = min(pi_old(o_t) / pi_engine(o_t), cap), no gradient."""
    return torch.exp(old_logp - engine_logp).clamp(max=cap).detach()


def offpolicy_sequence_mask(logp: torch.Tensor, engine_logp: torch.Tensor, advantages: torch.Tensor,
                            mask: torch.Tensor, delta: float) -> torch.Tensor:
    """DeepSeek-V3.2 (sec. 3.1, "Off-Policy Sequence Masking"): drop a sequence [B] (0.0) when its advantage
    is negative and the sampling policy is far from the current one, measured per token on its own samples:
    (1/|o_i|) sum_t log(pi_engine(o_t) / pi(o_t)) > delta. Positive sequences always stay (1.0): learning
    from one's own far-off mistakes is what destabilizes, per the report."""
    m = mask.float()
    divergence = ((engine_logp - logp.detach()) * m).sum(-1) / m.sum(-1).clamp_min(1)
    return (~((advantages < 0) & (divergence > delta))).float()


def gradient_at_ratio_one(loss_of_logp: Callable[[torch.Tensor], torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    """d loss / d logp [B, T] on policy, where loss_of_logp(logp) takes old = logp.detach(): the ratio
    is then 1 whatever the log-probs are, so the gradient is known before they are (in closed form
    -A * mask / norm, for every objective). Taken by autograd through the loss itself (on zeros shaped
    like `like`), it is bit for bit the gradient backward will bring, which is what
    `kernels.known_logprob_gradient` asks."""
    x = torch.zeros_like(like, dtype=torch.float32, requires_grad=True)
    with torch.enable_grad():
        return torch.autograd.grad(loss_of_logp(x), x)[0]


def policy_logprobs(model, ids: torch.Tensor, mask: torch.Tensor, temperature: float, mtp_weight: float = 0.0,
                    entropy: bool = False, sampling_mask: tuple[int, float] | None = None):
    """Per-token log-probs of ids[:, 1:] [B, T-1] where mask [B, T-1] is set (0 elsewhere); entropy;
    the MTP CE on the masked tokens.
    sampling_mask (top_k, top_p): the rollout's truncation, kept in the trainer (`truncated_logprobs`)."""
    mtp_mask = mask[:, 1:] if mtp_weight and ids.shape[1] > 2 else None
    if sampling_mask is not None:
        return truncated_logprobs(model, ids, mask, temperature, *sampling_mask, entropy, mtp_mask)
    return model.token_logprobs(ids[:, :-1], ids[:, 1:], temperature=temperature, entropy=entropy, mask=mask,
                                mtp_mask=mtp_mask)


def truncated_logprobs(model, ids: torch.Tensor, mask: torch.Tensor, temperature: float, top_k: int, top_p: float,
                       entropy: bool, mtp_mask: torch.Tensor | None):
    """DeepSeek-V3.2's "Keep Sampling Mask": a rollout sampled with top-k / top-p drew every token from the
    truncated, renormalized distribution q = softmax(filter(logits / T)); the trainer's log-probs are taken
    under the same truncation, so the ratio compares like with like and no gradient pushes mass onto tokens
    the sampler can never emit. The kept set is rebuilt from the trainer's own logits (detached) with the
    rollout's top-k / top-p, plus the sampled token itself (at a near tie the two may order a boundary
    token differently). Full [B, T, V] logits: the memory of a toy-scale micro-batch, not the chunked head's."""
    targets = ids[:, 1:]
    h, kw = model.hidden_states(ids[:, :-1])
    x = model.lm_head(h).float() / temperature                                          # [B, T, V]
    B, T, V = x.shape
    with torch.no_grad():
        rows = B * T
        kept = filter_logits(x.reshape(rows, V), torch.full((rows,), top_k, device=x.device),
                             torch.full((rows,), top_p, device=x.device), torch.zeros(rows, device=x.device))
        kept = torch.isfinite(kept).view(B, T, V).scatter_(-1, targets.unsqueeze(-1), True)
    logq = x.masked_fill(~kept, float("-inf")).log_softmax(-1)
    logp = logq.gather(-1, targets.unsqueeze(-1)).squeeze(-1) * mask
    ent = None
    if entropy:
        with torch.no_grad():
            ent = -torch.where(kept, logq.exp() * logq, torch.zeros_like(logq)).sum(-1) * mask
    mtp = None
    if mtp_mask is not None and len(getattr(model, "mtp", ())):  # as model.token_logprobs fits MTP (trunk detached)
        h1 = model.mtp_hidden(1, h[:, :-1].detach(), ids[:, 1:-1], rotary=model.rotary, cos=kw["cos"][:, :-1],
                              sin=kw["sin"][:, :-1], positions=kw["positions"][:, :-1], mask=None, absorb=None)
        mtp = model.lm_head.cross_entropy(model.mtp[0].head_norm(h1), targets[:, 1:], mtp_mask)
    return logp, ent, mtp
