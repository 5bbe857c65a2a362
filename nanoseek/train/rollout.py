"""Rollouts for GRPO and rejection sampling: n sampled completions per prompt.

`engine_rollout` runs nanoseek's own engine on the policy's current weights (no copy, no sync).
Every backend has the same signature, so GRPO and rejection sampling take any of them.
"""
from __future__ import annotations

import torch


def engine_rollout(model, prompts: list[list[int]], n: int, max_new_tokens: int, eos_id: int | None,
                   temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0,
                   pad_id: int = 0) -> list[list[int]]:
    """n completions per prompt (prompt-major), each ending at (and including) eos, through
    nanoseek.infer.engine: continuous batching (finished sequences leave the batch), each prompt
    prefilled once and its cache shared by its n samples; the j-th sample of every prompt draws
    from the stream seeded by (seed, j), so a prompt's completions do not depend on its batch."""
    from nanoseek.infer.engine import Engine
    from nanoseek.infer.sampling import SamplingParams
    was_training = model.training
    engine = Engine(model, max_batch=min(len(prompts) * n, 512), max_len=max(map(len, prompts)) + max_new_tokens)
    params = SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k, max_tokens=max_new_tokens,
                            stop_token_ids=[eos_id] if eos_id is not None else [], seed=seed, logprobs=False, n=n,
                            ignore_eos=eos_id is None)
    try:
        with torch.no_grad():
            outs = engine.generate(prompts, params)
    finally:
        model.train(was_training)  # the engine puts the model in eval mode
    return [list(c.token_ids) for r in outs for c in r.outputs]


BACKENDS = ("engine", "vllm")


def make_rollout(name: str):
    """The rollout function for `--rollout NAME`."""
    if name == "engine":
        return engine_rollout
    raise SystemExit(f"error: --rollout must be one of {', '.join(BACKENDS)}, got {name!r}")
