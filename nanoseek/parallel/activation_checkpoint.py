"""Activation checkpointing applied from outside the model: each transformer block keeps only its
input during the forward and recomputes its inside during the backward.

Memory for activations drops from (layers x everything a block keeps) to (layers x one hidden
state + one block's inside), at the price of a second forward per block. That is what lets a
long-context stage (`nanoseek extend`) train at several times the pretraining length. Parameter
names, checkpoints and the numbers stay exactly as they are: only the forward method is wrapped.
"""
from __future__ import annotations

import functools

from torch import nn
from torch.utils.checkpoint import checkpoint

from nanoseek.parallel.parallelize import transformer_blocks


def checkpoint_blocks(model: nn.Module) -> int:
    """Wrap the forward of every transformer block (and MTP block) in `torch.utils.checkpoint`;
    returns how many were wrapped. Calling it twice wraps nothing more."""
    n = 0
    for block in transformer_blocks(model):
        if getattr(block, "activation_checkpointed", False):
            continue
        # non-reentrant: works with keyword arguments, autocast and parameters that need no grad
        block.forward = functools.partial(checkpoint, block.forward, use_reentrant=False)
        block.activation_checkpointed = True
        n += 1
    return n
