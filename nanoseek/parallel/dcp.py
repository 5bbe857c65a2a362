"""Distributed checkpoints (torch.distributed.checkpoint) that load on any world size.

Every rank writes only its own shards (FSDP shards, EP expert shards) in parallel; the
checkpoint records the global shape of each tensor, so a run saved on 2 ranks resumes on 1,
4 or 64, with any mix of DDP / FSDP / EP. `get_state_dict` / `set_state_dict` give model
and optimizer states keyed by parameter names (FQNs) whatever the wrapping, so the
optimizer state follows its parameter through the resharding.

    save(path, model, optimizer, extra={"step": 100})
    extra = load(path, model, optimizer)          # after parallelize() and building the optimizer

The consolidated HF export (save_pretrained) is a separate, rank-0 step for serving.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict


def _state(model: nn.Module, optimizer: torch.optim.Optimizer | None) -> dict:
    if optimizer is None:
        msd, _ = get_state_dict(model, [])
        return {"model": msd}
    msd, osd = get_state_dict(model, optimizer)
    return {"model": msd, "optim": osd}


def save(path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
         extra: dict | None = None) -> None:
    """Collective: every rank calls it. `extra` holds small replicated values (step, rng seed...)."""
    state = _state(model, optimizer)
    if extra:
        state["extra"] = dict(extra)
    dcp.save(state, checkpoint_id=str(path))


def load(path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
         extra: dict | None = None) -> dict:
    """Collective: load into an already parallelized model (and its optimizer) in place.
    `extra`: the keys (with default values) to read back from the saved `extra`."""
    state = _state(model, optimizer)
    if extra:
        state["extra"] = dict(extra)
    dcp.load(state, checkpoint_id=str(path))
    set_state_dict(model, optimizer if optimizer is not None else [], model_state_dict=state["model"],
                   optim_state_dict=state.get("optim", {}), options=StateDictOptions(strict=True))
    return state.get("extra", {})
