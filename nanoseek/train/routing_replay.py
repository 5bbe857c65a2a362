"""Rollout routing replay (R3; Ma et al. 2025, "Stabilizing MoE Reinforcement Learning by Aligning Training
and Inference Routers"): the training forward of a GRPO step routes every token to the experts the rollout
engine chose for it, so a router that flips between the engine's forward (bf16, decode kernels) and the
trainer's cannot send a sampled token to other experts than the ones that sampled it.

The engine's choices are recorded during the rollout (`mismatch.EngineRouting`: indices only, per MoE layer
of the main stack, for every prompt and generated token); `replayed` hands them to the gates for one forward
(`Gate.replay`). Only the selection is replayed: the gate's weights are the current affinities at the
replayed experts, normalized as usual, so the router still gets its gradient. The MTP block's MoE layer is not
replayed (the engine runs no MTP forward during a rollout), and positions the engine never ran (padding, each
sequence's last token) route as usual: neither is a trained log-prob.

`--routing-replay old` is the weaker variant of the GSPO paper (Zheng et al. 2025, its "Routing Replay"): with
mu > 1 the trainer's own routing of the old-policy forward is replayed in every update of the step, so the
ratio pi / pi_old compares two policies over the same experts; it leaves the engine/trainer flips alone.
"""
from __future__ import annotations

import contextlib

import torch

from nanoseek.train.mismatch import trunk_gates

MODES = ("off", "rollout", "old")  # old: R2, the mu > 1 updates route as the old policy's forward did (GSPO's)


@contextlib.contextmanager
def replayed(model, experts: torch.Tensor | None):
    """Within the block, the model's forward over [B, T] tokens uses experts [layers, B, T, k] (-1: the gate
    chooses). None: no replay (a plain block)."""
    if experts is None:
        yield
        return
    gates = trunk_gates(model)
    assert len(gates) == experts.shape[0], f"{experts.shape[0]} recorded MoE layers for {len(gates)} gates"
    for g, e in zip(gates, experts):
        g.replay = e.reshape(-1, e.shape[-1])
    try:
        yield
    finally:
        for g in gates:
            g.replay = None
