"""Data parallelism applied from outside the model, torchtitan-style.

    rank, world, device = init_distributed()          # reads torchrun's env vars
    model = parallelize(model, mode="fsdp", ep=world)  # "none" | "ddp" | "fsdp"
    ... model.loss(...).backward(); opt.step()
    update_balancing_bias(model, gamma, all_reduce=all_reduce_sum)
    destroy_distributed()

The model code knows nothing of this. Both modes use the composable FSDP2 machinery:
"ddp" is `replicate` (every rank keeps full parameters, gradients are all-reduced),
"fsdp" is `fully_shard` per transformer block + root (parameters, gradients and
optimizer state sharded; each block's weights are all-gathered just for its forward and
backward). Both average gradients over ranks, so the mean of the per-rank losses on equal
shards of a batch trains exactly like one process on the whole batch.

Expert parallelism (ep > 1, see expert_parallel.py) takes the routed experts out of the
data-parallel wrapping: each rank owns E/ep experts and tokens travel to them.
"""
from __future__ import annotations

import os
from collections.abc import Callable
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn

from nanoseek.parallel.expert_parallel import apply_expert_parallel

MODES = ("none", "ddp", "fsdp")


# ---------------------------------------------------------------------- process group
def init_distributed(backend: str | None = None, device: str | None = None,
                     timeout_s: float = 600) -> tuple[int, int, torch.device]:
    """Join the process group torchrun describes (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT).

    Without those variables this is a single process: (0, 1, cuda:0 or cpu), no group.
    nccl on GPUs (one GPU per rank: cuda:LOCAL_RANK), gloo on CPU; device="cpu" forces the
    CPU/gloo path on a GPU machine (the multi-process tests do, since ranks may outnumber GPUs).
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available() and device != "cpu" and backend != "gloo"
    if cuda and local_rank >= torch.cuda.device_count():
        raise RuntimeError(f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} GPUs: launch at most "
                           f"one process per GPU (torchrun --nproc_per_node {torch.cuda.device_count()}), "
                           "or pass device='cpu' for gloo")
    dev = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend or ("nccl" if cuda else "gloo"), rank=rank, world_size=world,
                                timeout=timedelta(seconds=timeout_s), device_id=dev if cuda else None)
    return rank, world, dev


def destroy_distributed() -> None:
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum over ranks in place (no-op in one process): pass to `update_balancing_bias` so the
    expert loads are global and every rank applies the identical bias step."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
    return t


# ---------------------------------------------------------------------- parallelize
def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The units FSDP shards one by one: transformer blocks, plus each MTP module's block.

    Only the MTP *block*: the MTP module's head_norm is called outside its forward
    (model.mtp_logits), so it must stay in the root's always-gathered-for-loss group.
    """
    blocks = list(getattr(model, "layers", []))
    blocks += [m.block for m in getattr(model, "mtp", [])]
    return blocks


def compile_blocks(model: nn.Module, backend: str | Callable = "inductor") -> nn.Module:
    """torch.compile every transformer block (and MTP block) in place, from outside the model code;
    parameter names and checkpoints stay as they are. Compilation happens at the first forward.
    Where dynamo or the backend fails (no C++ compiler, an unsupported op) the block runs eagerly
    instead (dynamo's suppress_errors, with a warning), so training never stops for it."""
    import torch._dynamo  # slow to import: --compile only
    torch._dynamo.config.suppress_errors = True
    for block in transformer_blocks(model):
        block.compile(backend=backend)
    return model


def parallelize(model: nn.Module, mode: str = "none", ep: int = 1, device: torch.device | str | None = None,
                reshard_after_forward: bool = True, param_dtype: torch.dtype | None = None) -> nn.Module:
    """Apply data (and expert) parallelism in place; returns the same model object.

    mode: "none" (one process, or replicas kept in sync by the caller), "ddp", "fsdp".
    ep: expert-parallel degree, dividing the world size: experts sharded over groups of `ep`
        consecutive ranks (put a group inside a node), replicated across the world/ep groups;
        ep < world needs mode="fsdp" (the dense part is then HSDP on the same 2-D mesh).
    param_dtype: FSDP/DDP mixed precision (e.g. torch.bfloat16 on GPUs); grads reduce in fp32.
    `model.loss` / `token_logprobs` are registered as forward methods so the wrappers' hooks run around it.
    """
    if mode not in MODES:
        raise ValueError(f"parallel mode must be one of {MODES}, got {mode!r}")
    if device is not None:
        model.to(device)
    world = world_size()
    if world == 1:
        if ep > 1:
            raise ValueError(f"ep={ep} needs {ep} processes (launch with torchrun --nproc_per_node {ep})")
        return model
    if mode == "none" and ep == 1:
        return model
    # slow to import: only runs that wrap the model
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

    dev_type = next(model.parameters()).device.type
    mesh = init_device_mesh(dev_type, (world,), mesh_dim_names=("dp",))
    ignored: set[nn.Parameter] = set()
    if ep > 1:
        if world % ep:
            raise ValueError(f"ep={ep} must divide the world size {world}")
        if ep < world:
            # rows = replicas, columns = EP ranks: consecutive ranks (one node) form an EP group.
            # Every DTensor must share one mesh (grad clipping and foreach optimizers reject
            # mixed meshes), so the rest of the model is sharded HSDP-style on the same 2-D mesh:
            # sharded inside an EP group, replicated across groups.
            if mode != "fsdp":
                raise ValueError(f"ep={ep} < world={world} needs mode='fsdp' (HSDP over the EP groups)")
            mesh = init_device_mesh(dev_type, (world // ep, ep), mesh_dim_names=("ep_rep", "ep"))
        ignored = apply_expert_parallel(model, mesh)
        mode = "ddp" if mode == "none" else mode   # the rest of the model still needs its grads averaged
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32) if param_dtype else MixedPrecisionPolicy()
    kw = dict(mesh=mesh, mp_policy=mp, ignored_params=ignored or None)
    if mode == "ddp":
        try:
            from torch.distributed._composable.replicate_with_fsdp import replicate  # torch >= 2.10 only (below)
            replicate(model, **kw)
        except ImportError:
            # torch < 2.10 has no FSDP-based replicate: one FSDP group that never reshards keeps
            # the same numerics (averaged gradients), with ZeRO-2 memory instead of full replicas.
            fully_shard(model, reshard_after_forward=False, **kw)
    else:
        for block in transformer_blocks(model):
            fully_shard(block, reshard_after_forward=reshard_after_forward, **kw)
        # The root keeps embedding, final norm, head and MTP projections; they are used right
        # after the last block, so resharding the root after forward would only add an all-gather.
        fully_shard(model, reshard_after_forward=False, **kw)
    for name in ("loss", "token_logprobs"):
        if hasattr(model, name):
            register_fsdp_forward_method(model, name)
    return model


def full_state_dict(model: nn.Module, rank0_only: bool = False) -> dict[str, torch.Tensor]:
    """Unsharded fp32 CPU copy of the parameters and buffers (every rank must call it):
    DTensors (FSDP shards, EP expert shards) are gathered into plain tensors.
    rank0_only: the other ranks get {} (one full copy in host memory, not one per rank)."""
    from torch.distributed.tensor import DTensor  # slow to import: sharded runs are the ones with DTensors
    keep = not rank0_only or not dist.is_initialized() or dist.get_rank() == 0
    out = {}
    for k, v in model.state_dict().items():
        if isinstance(v, DTensor):
            v = v.full_tensor()
        if keep:
            out[k] = v.detach().float().cpu().clone()
    return out
