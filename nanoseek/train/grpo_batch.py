"""The training batch of a GRPO step: rounds of sampled groups, and which groups train.

A step samples its prompts_per_step prompts (round 0). Groups whose rewards are all equal teach nothing
(advantage 0); --filter-zero-var leaves them out of the update. DAPO's dynamic sampling (Yu et al. 2025,
"DAPO", sec. 3.2) goes further: it keeps sampling rounds of new prompts until the batch holds
prompts_per_step groups with reward variance, so every step trains on a full batch of signal. Here the
extra rounds are bounded (--dynamic-sampling N rounds at most; a step that still falls short trains on what
it has, and logs it), and each round's prompts and sampling seed are a pure function of (seed, step, round),
so a resumed run draws exactly the same batches.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

import torch


@dataclass
class Round:
    """One round of sampled groups. This rank's rows (prompts, comps, logprobs, experts, adv) and the
    whole round's (every rank's) rewards, completions, tasks and per-group zero-variance flags."""
    prompts: list[list[int]]                  # per row: its prompt's ids
    comps: list[list[int]]
    logprobs: list[list[float]] | None        # the engine's, per token (None: not asked for)
    experts: list[torch.Tensor] | None        # the engine's routing per row [layers, positions, k] (None: not asked)
    adv: torch.Tensor                         # [rows]
    all_rewards: list
    all_r: torch.Tensor
    all_adv: torch.Tensor
    all_comps: list[list[int]]
    all_tasks: list[str]
    zero_var: torch.Tensor                    # [groups of the round] bool


def refill_samples(pool: list, seed: int, step: int, round_: int, n: int) -> list:
    """The prompts of refill round `round_` (>= 1) of `step`: n draws from the pool, by (seed, step, round)."""
    order = random.Random(f"grpo/refill/{seed}/{step}/{round_}").sample(range(len(pool)), min(n, len(pool)))
    return [pool[i] for i in order]


def refill_seed(seed: int, step: int, round_: int) -> int:
    """The sampling seed of refill round `round_` of `step` (round 0 keeps the step's own seed)."""
    return random.Random(f"grpo/refill-seed/{seed}/{step}/{round_}").getrandbits(62)


def informative_groups(rounds: list[Round]) -> int:
    return sum(int((~r.zero_var).sum()) for r in rounds)


def trained_groups(rounds: list[Round], filter_zero_var: bool, target: int | None) -> list[bool]:
    """Per group of all rounds (round-major, global order): does it train? Without filtering every group of
    round 0 does (refills only exist with filtering); with it the groups with reward variance, and with
    dynamic sampling (target) only the first `target` of those."""
    if not filter_zero_var:
        return [True] * len(rounds[0].zero_var)
    keep, n = [], 0
    for r in rounds:
        for equal in r.zero_var.tolist():
            take = not equal and (target is None or n < target)
            n += take
            keep.append(take)
    return keep


def local_rows(rounds: list[Round], trained: list[bool], rank: int, world: int, group_size: int) -> dict:
    """This rank's rows of all rounds, concatenated, with `masked` (its group does not train)."""
    out = {"prompts": [], "comps": [], "logprobs": [], "experts": [], "adv": [], "masked": []}
    offset = 0
    for r in rounds:
        per = len(r.zero_var) // world
        for i in range(len(r.comps)):
            out["masked"].append(not trained[offset + rank * per + i // group_size])
        offset += len(r.zero_var)
        out["prompts"] += r.prompts
        out["comps"] += r.comps
        out["logprobs"] += r.logprobs if r.logprobs is not None else []
        out["experts"] += r.experts if r.experts is not None else []
        out["adv"].append(r.adv)
    out["adv"] = torch.cat(out["adv"])
    for k in ("logprobs", "experts"):
        out[k] = out[k] or None
    return out
