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
"""
from __future__ import annotations

import torch

AGGREGATIONS = ("token", "sequence", "dr_grpo")


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


def grpo_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
              norm: torch.Tensor, ref_logp: torch.Tensor | None = None, beta: float = 0.0,
              eps_low: float = 0.2, eps_high: float = 0.28) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped-ratio GRPO loss of a (micro-)batch.

    logp, old_logp, ref_logp, mask: [B, T] over completion tokens (mask 1 = a generated token);
    advantages [B]; norm from `normalizer` (its rows sliced to this micro-batch for 'sequence').
    Returns (loss, stats) where stats hold *sums* over this micro-batch's tokens (kl, clipped,
    ratio) for the caller to average.
    """
    mask = mask.float()
    adv = advantages.unsqueeze(-1)
    ratio = torch.exp(logp - old_logp)
    unclipped = ratio * adv
    clipped = torch.clamp(ratio, 1 - eps_low, 1 + eps_high) * adv
    per_token = -torch.minimum(unclipped, clipped)
    kl = None
    if ref_logp is not None and beta != 0:
        kl = k3_kl(logp, ref_logp)
        per_token = per_token + beta * kl
    if norm.dim() == 1:  # 'sequence': each row by its own length (times the number of rows)
        loss = ((per_token * mask).sum(-1) / norm).sum()
    else:
        loss = (per_token * mask).sum() / norm
    with torch.no_grad():
        # a token is clipped when the clip (not the ratio) decided the minimum
        is_clipped = ((ratio < 1 - eps_low) & (adv < 0)) | ((ratio > 1 + eps_high) & (adv > 0))
        stats = {"clipped": (is_clipped.float() * mask).sum(), "ratio": (ratio * mask).sum(),
                 "kl": (kl * mask).sum() if kl is not None else torch.zeros(())}
    return loss, stats


def on_policy_weights(advantages: torch.Tensor, mask: torch.Tensor, norm: torch.Tensor) -> torch.Tensor:
    """d loss / d logp [B, T] of `grpo_loss` when old = current and there is no KL term (one update
    per rollout, beta = 0): the ratio is exactly 1, so nothing is clipped and the gradient is that
    of the advantage-weighted log-likelihood sum_t w_t logp_t with w_t = -A * mask_t / norm."""
    w = -advantages.unsqueeze(-1) * mask.float()
    return w / (norm.unsqueeze(-1) if norm.dim() == 1 else norm)


def policy_logprobs(model, ids: torch.Tensor, mask: torch.Tensor, temperature: float, mtp_weight: float = 0.0,
                    entropy: bool = False, grad_hint: torch.Tensor | None = None):
    """Per-token log-probs of ids[:, 1:] [B, T-1] where mask [B, T-1] is set (0 elsewhere); entropy;
    the MTP CE on the masked tokens. grad_hint [B, T-1]: the gradient the log-probs will get (on policy)."""
    mtp_mask = mask[:, 1:] if mtp_weight and ids.shape[1] > 2 else None
    return model.token_logprobs(ids[:, :-1], ids[:, 1:], temperature, entropy, mtp_mask, mask, grad_hint)
