"""`speedup(model, for_=...)`: swap the model's reference modules for their fast drop-ins.

Each fast module is a subclass of the reference one with the same parameters and the same
forward contract, so a swapped model saves, loads, trains and shards exactly like the plain one
(FSDP wraps the blocks around these modules, expert parallelism replaces `Experts` whole).
Swapping the class in place keeps every parameter object, so optimizers and hooks are unaffected.

    module         for_="train"    for_="decode"   what it buys
    Experts        FastExperts     FastExperts     grouped / padded / all-experts GEMMs instead of a loop
    MLP            FastMLP         FastMLP         training keeps 2 activations instead of 5
    RMSNorm        FastRMSNorm     FastRMSNorm     training keeps x and 1/rms only; one fused op without grad
    LMHead         ChunkedLMHead   DecodeLMHead    CE / log-probs in row chunks, no [N, V] logits kept;
                                                   decode: CPU head on an [in, out] weight copy
    MLA            FastMLA         DecodeMLA       flash-friendly SDPA, heads as query rows of the latent;
                                                   decode: CPU absorption as one bmm over heads
    nn.Linear      -               DecodeLinear    CPU decode on [in, out] weight copies

A model swapped for training and then for decoding (GRPO's policy is its own rollout model) keeps
the training kernels: each decode kernel extends the training one.

NANOSEEK_KERNELS=0 in the environment turns all of it off: the model runs as model/ defines it.
"""
from __future__ import annotations

import os
from collections.abc import Callable

from torch import nn

from nanoseek.kernels.chunked_head import ChunkedLMHead
from nanoseek.kernels.decode_weights import DecodeLinear, DecodeLMHead, DecodeMLA, cache_transposed
from nanoseek.kernels.expert_ffn import FastMLP
from nanoseek.kernels.experts import FastExperts
from nanoseek.kernels.mla import FastMLA
from nanoseek.kernels.rms_norm import FastRMSNorm
from nanoseek.model.head import LMHead
from nanoseek.model.mla import MLA
from nanoseek.model.moe import MLP, Experts
from nanoseek.model.norm import RMSNorm

_TRAIN = {Experts: FastExperts, MLP: FastMLP, RMSNorm: FastRMSNorm, LMHead: ChunkedLMHead, MLA: FastMLA}
_DECODE = {**_TRAIN, nn.Linear: DecodeLinear, LMHead: DecodeLMHead, ChunkedLMHead: DecodeLMHead,
           MLA: DecodeMLA, FastMLA: DecodeMLA}


def enabled() -> bool:
    """False when NANOSEEK_KERNELS=0: every model keeps its reference modules."""
    return os.environ.get("NANOSEEK_KERNELS", "1") != "0"


def speedup(model: nn.Module, for_: str = "train") -> Callable[[], bool]:
    """Swap the model's modules for the fast ones `for_` training or decoding (module docstring).
    Modules already swapped, or of other classes, stay as they are; call it again after adding
    modules. For decoding on CPU also makes the decode-layout weight copies (a snapshot: call it
    again after changing the weights) and returns a check that they still match the weights;
    otherwise the check is always true."""
    if for_ not in ("train", "decode"):
        raise ValueError(f"speedup: for_ must be 'train' or 'decode', got {for_!r}")
    if not enabled():
        return lambda: True
    swaps = _TRAIN if for_ == "train" else _DECODE
    for m in model.modules():
        fast = swaps.get(type(m))
        if fast is not None:
            m.__class__ = fast
    p = next(model.parameters(), None)
    if for_ == "decode" and p is not None and p.device.type == "cpu":
        return cache_transposed(model)
    return lambda: True
