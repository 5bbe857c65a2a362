"""Decode-layout weight copies for CPU inference, and nn.Linear using them.

On CPU, MKL runs x @ W^T (nn.Linear's layout) 2-5x slower than x @ W_t with W_t contiguous
when x has the few rows of a decode step (measured: 16 x 256 @ 256 x 4096, the tiny preset's
head, 1.04 ms vs 0.30 ms). The routed experts likewise decode fastest from all experts laid
side by side (moe.py). A module offers such copies through `decode_copies()`; the engine makes
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

_scope = threading.local()  # the server's engine runs in its own thread


def _slots(module: nn.Module) -> list[tuple[nn.Module, str]]:
    """Where the parameters below a module live (MLA's copies come from its child kv_b_proj)."""
    return [(m, name) for m in module.modules() for name, p in m._parameters.items() if p is not None]


def _stamp(slots: list[tuple[nn.Module, str]]) -> tuple:
    """Version and storage of the parameters now in those slots: an in-place change, a load or a
    replaced parameter changes it. Per call a few µs, not a walk over the module tree."""
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


class Linear(nn.Linear):
    def decode_copies(self) -> tuple[torch.Tensor, ...]:
        return (self.weight.detach().t().contiguous(),)                  # [in, out]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        copies = engine_copies(self)
        if copies is not None:
            y = x @ copies[0]
            return y + self.bias if self.bias is not None else y
        return F.linear(x, self.weight, self.bias)


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
