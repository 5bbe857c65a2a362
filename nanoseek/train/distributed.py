"""The training stages under torchrun: glue between the Trainer and nanoseek/parallel.

`--parallel ddp|fsdp [--ep N]` (or any launch with WORLD_SIZE > 1) makes a stage join the
process group, wrap the model with `parallelize` and train each rank on its own equal slice
of the global micro-batch, so N ranks step like one process on the same batches. Rank 0 alone
prints, logs and writes files; the run folder must be on a filesystem every rank sees (ranks
read the tokenizer rank 0 trained, and every rank writes its own checkpoint shards there).
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from nanoseek.hf.load import build_model
from nanoseek.parallel.parallelize import MODES, full_state_dict, init_distributed, parallelize


def wanted(opts) -> bool:
    """Does this stage run distributed? (options without a `parallel` field never do)"""
    if not hasattr(opts, "parallel"):
        return False
    return opts.parallel != "none" or int(os.environ.get("WORLD_SIZE", "1")) > 1


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def join(opts, device: torch.device) -> tuple[int, int, torch.device]:
    """Join torchrun's process group once (a no-op when already joined or in one process),
    check the options against the world size, and silence stdout on ranks > 0."""
    if opts.parallel not in MODES:
        raise SystemExit(f"error: --parallel must be one of {', '.join(MODES)}, got {opts.parallel!r}")
    w = int(os.environ.get("WORLD_SIZE", "1"))  # checked before joining: a bad option fails at once
    for name in ("batch_size", "prompts_per_step"):  # the global batch of a trainer stage / of GRPO
        if getattr(opts, name, 0) % w:
            flag = "--" + name.replace("_", "-")
            raise SystemExit(f"error: {flag} {getattr(opts, name)} (the global batch) is not divisible by the world "
                             f"size {w}: every rank trains on an equal slice of it")
    if w % opts.ep:
        raise SystemExit(f"error: --ep {opts.ep} must divide the world size {w} "
                         f"(launch with torchrun --nproc_per_node <a multiple of {opts.ep}>)")
    # 30 min: rank 0 alone may train a tokenizer, rejection-sample or export while the others wait
    r, w, dev = init_distributed(device="cpu" if device.type == "cpu" else None, timeout_s=1800)
    if r > 0 and sys.stdout is sys.__stdout__:
        sys.stdout = open(os.devnull, "w")  # one copy of every message (errors still reach stderr)
    return r, w, dev


def broadcast(obj):
    """Rank 0's value of a small picklable object (e.g. a run folder named after the time)."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def wrap(model: torch.nn.Module, opts, world_size: int) -> torch.nn.Module:
    """parallelize() with the run's mode; inside torchrun "none" still has to average gradients."""
    mode = "ddp" if opts.parallel == "none" and world_size > 1 else opts.parallel
    return parallelize(model, mode=mode, ep=opts.ep)


def shard(batch: dict, r: int, w: int) -> dict:
    """This rank's rows of the global micro-batch."""
    if w == 1:
        return batch
    if not isinstance(batch, dict):
        raise TypeError(f"distributed training needs batches that are dicts of tensors, got {type(batch).__name__}")
    per = next(v for v in batch.values() if torch.is_tensor(v)).shape[0] // w
    return {k: v[r * per:(r + 1) * per] if torch.is_tensor(v) else v for k, v in batch.items()}


def global_token_mean(out: dict, batch: dict, mtp_weight: float) -> dict:
    """Per-slice token means -> this rank's part of the token mean over the global micro-batch.

    The slices hold different numbers of trained targets (packed rows mask the targets that cross
    a document boundary; SFT masks prompts), so the plain mean of the ranks' means would weight
    tokens unequally. Scaled by count_rank * world / count_all, the ranks' values, and the
    gradients the wrappers average, become exactly the one-process ones. MTP: exact at depth 1
    (V3's); deeper MTP is scaled by depth 1's counts. The balance loss is a mean over sequences,
    of which every slice holds equally many: unchanged."""
    mask = batch["loss_mask"].float() if "loss_mask" in batch else torch.ones_like(batch["targets"], dtype=torch.float)
    doc = batch.get("doc_ids")
    mtp_mask = mask[:, 1:] * (doc[:, 1:] == doc[:, :-1]) if doc is not None else mask[:, 1:]
    counts = torch.stack([mask.sum(), mtp_mask.sum()]).double()
    total = counts.clone()
    dist.all_reduce(total)
    s_lm, s_mtp = (counts * world() / total.clamp_min(1)).tolist()
    res = dict(out, lm_loss=out["lm_loss"] * s_lm)
    res["loss"] = res["lm_loss"]  # rebuilt in model.loss's order: lm + lambda * mtp + balance
    if "mtp_loss" in out:
        res["mtp_loss"] = out["mtp_loss"] * s_mtp
        res["loss"] = res["loss"] + mtp_weight * res["mtp_loss"]
    if "balance_loss" in out:
        res["loss"] = res["loss"] + out["balance_loss"]
    return res


def reduce_row(sums: dict[str, float], tokens: int, device: torch.device) -> tuple[dict[str, float], int]:
    """Mean of the per-rank averages (the global-batch value for equal shards), total tokens."""
    if world() == 1:
        return sums, tokens
    keys = sorted(sums)  # the same step_fn on every rank: the same keys
    t = torch.tensor([sums[k] for k in keys] + [float(tokens)], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    vals = t.tolist()
    return {k: v / world() for k, v in zip(keys, vals)}, int(vals[-1])


def save_pretrained(model: torch.nn.Module, path: str | Path, tokenizer=None) -> None:
    """The HF export. Collective under a process group: shards are gathered into rank 0, which
    loads them into an unwrapped copy of the model (built on the meta device, so no second
    init) and saves that; the other ranks write nothing."""
    if world() == 1:
        model.save_pretrained(path, tokenizer=tokenizer)
        return
    sd = full_state_dict(model, rank0_only=True)
    if is_main():
        with torch.device("meta"):
            plain = build_model(model.config)
        plain.to_empty(device="cpu").load_state_dict(sd)
        plain.save_pretrained(path, tokenizer=tokenizer)
    barrier()


def gather_lists(items: list) -> list:
    """Every rank's list of small picklable items, concatenated in rank order (rewards, completions)."""
    if world() == 1:
        return items
    parts = [None] * world()
    dist.all_gather_object(parts, items)
    return [x for part in parts for x in part]
