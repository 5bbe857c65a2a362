"""Decode-layout weight copies for CPU inference, and the modules that use them.

On CPU, MKL runs x @ W^T (nn.Linear's layout) several times slower than x @ W_t with W_t
contiguous when x has the few rows of a decode step. Absorbed MLA likewise decodes fastest with
W_UK and W_UV^T as contiguous per-head blocks, and the routed experts from all experts laid side
by side (experts.py). A module offers such copies through `decode_copies()`; the engine makes
them when it is created (`cache_transposed`) and runs its forwards inside `transposed_weights()`;
every other forward uses the live weights. Copies whose parameters have since changed in place
through autograd-visible ops (version counter) or been replaced are ignored too; fused
optimizers do not bump the version, which is why copies are used only inside the engine's scope
and remade with every engine.
"""
from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from nanoseek.kernels.chunked_head import ChunkedLMHead
from nanoseek.kernels.mla import FastMLA

_scope = threading.local()  # the server's engine runs in its own thread


def _slots(module: nn.Module) -> list[tuple[nn.Module, str]]:
    """Where the parameters below a module live (MLA's copies come from its child kv_b_proj)."""
    return [(m, name) for m in module.modules() for name, p in m._parameters.items() if p is not None]


def _stamp(slots: list[tuple[nn.Module, str]]) -> tuple:
    """Version and storage of the parameters now in those slots: an in-place change, a load or a
    replaced parameter changes it. Cheap enough per call: no walk over the module tree."""
    return tuple((p._version, p.data_ptr()) for p in (m._parameters[name] for m, name in slots))


def engine_copies(module: nn.Module) -> tuple[torch.Tensor, ...] | None:
    """The module's decode-layout copies when a no-grad forward runs in the engine's scope and
    they still match its parameters, else None."""
    if not getattr(_scope, "on", False) or torch.is_grad_enabled():
        return None
    cached = module.__dict__.get("_engine_copies")  # not a buffer: never saved, moved or trained
    if cached is None:
        return None
    if torch.compiler.is_compiling():  # dynamo cannot trace version counters: the engine's compiled
        return cached[0]               # decode checks every copy before each call (cache_transposed's check)
    return cached[0] if cached[2] == _stamp(cached[1]) else None


class DecodeLinear(nn.Linear):
    """nn.Linear that, in the engine's scope, multiplies by a contiguous [in, out] copy."""

    def decode_copies(self) -> tuple[torch.Tensor, ...]:
        return (self.weight.detach().t().contiguous(),)                  # [in, out]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        copies = engine_copies(self)
        if copies is None:
            return F.linear(x, self.weight, self.bias)
        y = x @ copies[0]
        return y + self.bias if self.bias is not None else y


class DecodeLMHead(ChunkedLMHead, DecodeLinear):
    """The output head: the chunked training losses, and in the engine's scope the [in, out] copy."""


class DecodeMLA(FastMLA):
    """FastMLA whose absorbed path, in the engine's scope, runs W_UK and W_UV as one bmm over heads."""

    def decode_copies(self) -> tuple[torch.Tensor, ...]:
        """W_UK [H, nope, C] and W_UV^T [H, C, v] as contiguous per-head blocks."""
        w = self.kv_b_proj.weight.detach().view(self.n_heads, self.nope + self.v_dim, self.kv_lora_rank)
        return w[:, : self.nope].contiguous(), w[:, self.nope:].transpose(1, 2).contiguous()

    def _absorb_query(self, q_nope: torch.Tensor) -> torch.Tensor:
        copies = engine_copies(self)
        if copies is None:
            return super()._absorb_query(q_nope)
        B, H, T, _ = q_nope.shape                                         # q rows [H, B*T, nope] @ W_UK [H, nope, C]
        q_lat = torch.bmm(q_nope.transpose(0, 1).reshape(H, B * T, self.nope), copies[0])
        return q_lat.view(H, B, T, -1).transpose(0, 1)                    # [B, H, T, C]

    def _absorb_output(self, o_lat: torch.Tensor) -> torch.Tensor:
        copies = engine_copies(self)
        if copies is None:
            return super()._absorb_output(o_lat)
        B, H, T, C = o_lat.shape                                          # [H, B*T, C] @ W_UV^T [H, C, v]
        o = torch.bmm(o_lat.transpose(1, 2).reshape(B * T, H, C).transpose(0, 1), copies[1])
        return o.view(H, B, T, self.v_dim).transpose(0, 1)                # [B, H, T, v]


def cache_transposed(model: nn.Module) -> Callable[[], bool]:
    """Give every module of the model that offers them its decode-layout copies (CPU inference).
    Returns a check that these copies still match the weights (one pass over all their slots)."""
    every = []
    for m in model.modules():
        make = getattr(m, "decode_copies", None)
        copies = make() if make is not None else None
        if copies is not None:
            slots = _slots(m)
            m.__dict__["_engine_copies"] = (copies, slots, _stamp(slots))
            every += slots
    every = list(dict.fromkeys(every))  # MLA's slots include its kv_b_proj's
    stamp = _stamp(every)
    return lambda: _stamp(every) == stamp


@contextlib.contextmanager
def transposed_weights():
    """No-grad forwards in this block (this thread) use the cached copies."""
    before = getattr(_scope, "on", False)
    _scope.on = True
    try:
        yield
    finally:
        _scope.on = before
