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

import torch
import torch.nn.functional as F
from torch import nn

_scope = threading.local()  # the server's engine runs in its own thread


def _stamp(module: nn.Module) -> tuple:
    # all parameters below the module: MLA's copies come from its child kv_b_proj
    return tuple((p._version, p.data_ptr()) for p in module.parameters())


def engine_copies(module: nn.Module) -> tuple[torch.Tensor, ...] | None:
    """The module's decode-layout copies when a no-grad forward runs in the engine's scope and
    they still match its parameters, else None."""
    if not getattr(_scope, "on", False) or torch.is_grad_enabled():
        return None
    cached = module.__dict__.get("_engine_copies")  # not a buffer: never saved, moved or trained
    if cached is None:
        return None
    # torch.compile cannot trace version counters: the engine's compiled decode checks every
    # module's stamp before each call instead (copies_current)
    return cached[0] if torch.compiler.is_compiling() or cached[1] == _stamp(module) else None


def copies_current(model: nn.Module) -> bool:
    """Whether every decode-layout copy in the model still matches its module's parameters."""
    return all(c[1] == _stamp(m) for m in model.modules() if (c := m.__dict__.get("_engine_copies")) is not None)


class Linear(nn.Linear):
    def decode_copies(self) -> tuple[torch.Tensor, ...]:
        return (self.weight.detach().t().contiguous(),)                  # [in, out]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        copies = engine_copies(self)
        if copies is not None:
            y = x @ copies[0]
            return y + self.bias if self.bias is not None else y
        return F.linear(x, self.weight, self.bias)


def cache_transposed(model: nn.Module) -> None:
    """Give every module of the model that offers them its decode-layout copies (CPU inference)."""
    for m in model.modules():
        make = getattr(m, "decode_copies", None)
        copies = make() if make is not None else None
        if copies is not None:
            m.__dict__["_engine_copies"] = (copies, _stamp(m))


@contextlib.contextmanager
def transposed_weights():
    """No-grad forwards in this block (this thread) use the cached copies."""
    before = getattr(_scope, "on", False)
    _scope.on = True
    try:
        yield
    finally:
        _scope.on = before
