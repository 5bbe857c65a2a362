"""Training checkpoints: everything needed to continue a run bit-exactly, written atomically.

A checkpoint is a directory `step_000123/` holding
  model.pt      model state dict (includes the MoE routing biases: they are buffers)
  optimizer.pt  AdamW moments and step counts
  trainer.pt    scheduler, step, RNG states (python, numpy, torch, cuda), data position, extras
  meta.json     step, and size + sha256 of each file above: written last, so its presence
                means the checkpoint is complete, and the hashes catch later corruption.
It is written to `tmp-step_000123-<pid>/`, every file fsync'd, then renamed into place (rename
is atomic on POSIX), so a run killed mid-save leaves only a temp dir that `latest_checkpoint`
ignores and the next save removes.

Distributed runs (`save_sharded_checkpoint`) use the same scheme with the model and optimizer
as a torch.distributed.checkpoint (DCP) instead of model.pt / optimizer.pt: every rank writes
its own shards (`*.distcp`, `.metadata`), then rank 0 adds trainer.pt and meta.json
(`"format": "dcp"`) and renames. `load_checkpoint` reads either format; a DCP checkpoint
reshards on load, so it resumes on any world size and layout, a single process included.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import re
import shutil
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

FILES = ("model.pt", "optimizer.pt", "trainer.pt")
_STEP_DIR = re.compile(r"^step_(\d+)$")


class CheckpointError(RuntimeError):
    pass


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write(obj, path: Path) -> dict:
    with open(path, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    return {"bytes": path.stat().st_size, "sha256": _sha256(path)}


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def rng_state() -> dict:
    np_state = np.random.get_state()
    state = {"python": random.getstate(), "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    n = state["numpy"]
    np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), *n[2:]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(ckpt_dir: str | Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler=None, data_state: dict | None = None, extra: dict | None = None,
                    keep_last: int = 3) -> Path:
    """Write step_<step>/ atomically under ckpt_dir; keep only the newest `keep_last` (0 = all)."""
    root = Path(ckpt_dir)
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob("tmp-*"):  # left by a run killed mid-save
        shutil.rmtree(stale, ignore_errors=True)
    final = root / f"step_{step:06d}"
    tmp = root / f"tmp-{final.name}-{os.getpid()}"
    tmp.mkdir()
    meta = {"step": step, "time": time.time(), "files": {}}
    meta["files"]["model.pt"] = _write(model.state_dict(), tmp / "model.pt")
    if os.environ.get("NANOSEEK_TEST_SLOW_SAVE"):  # test hook: widen the window for a kill mid-save
        time.sleep(float(os.environ["NANOSEEK_TEST_SLOW_SAVE"]))
    meta["files"]["optimizer.pt"] = _write(optimizer.state_dict(), tmp / "optimizer.pt")
    _finish(root, tmp, final, meta, step, scheduler, data_state, extra, keep_last)
    return final


def _finish(root: Path, tmp: Path, final: Path, meta: dict, step: int, scheduler, data_state, extra,
            keep_last: int) -> None:
    """trainer.pt, then meta.json (the completion mark), then the atomic rename and pruning."""
    trainer_state = {"step": step, "rng": rng_state(), "data": data_state, "extra": extra or {},
                     "scheduler": scheduler.state_dict() if scheduler is not None else None}
    meta["files"]["trainer.pt"] = _write(trainer_state, tmp / "trainer.pt")
    with open(tmp / "meta.json", "w") as f:
        json.dump(meta, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    _fsync_dir(tmp)
    if final.exists():  # re-saving the same step (e.g. after a resume): replace it
        shutil.rmtree(final)
    os.rename(tmp, final)
    _fsync_dir(root)
    if keep_last > 0:
        for old in list_checkpoints(root)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)


def save_sharded_checkpoint(ckpt_dir: str | Path, step: int, model: torch.nn.Module,
                            optimizer: torch.optim.Optimizer, scheduler=None, data_state: dict | None = None,
                            extra: dict | None = None, keep_last: int = 3) -> Path:
    """Collective (every rank calls it): step_<step>/ as a DCP checkpoint plus rank 0's trainer.pt
    and meta.json. RNG and data position are rank 0's: every rank holds the same ones."""
    from nanoseek.parallel import dcp  # imports torch.distributed.checkpoint, slow to load: sharded runs only
    rank0 = not dist.is_initialized() or dist.get_rank() == 0
    barrier = dist.barrier if dist.is_initialized() else (lambda: None)
    root = Path(ckpt_dir)
    final = root / f"step_{step:06d}"
    tmp = root / f"tmp-{final.name}"  # one name for all ranks (a pid would differ per rank)
    if rank0:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob("tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
    barrier()
    with _single_process_ok():
        dcp.save(tmp, model, optimizer)
    barrier()  # every rank's shards are on disk
    if rank0:
        # sizes only: hashing every shard on rank 0 would re-read the whole (large) checkpoint
        meta = {"step": step, "time": time.time(), "format": "dcp",
                "files": {p.name: {"bytes": p.stat().st_size} for p in sorted(tmp.iterdir())}}
        _finish(root, tmp, final, meta, step, scheduler, data_state, extra, keep_last)
    barrier()  # nobody starts the next save (which clears tmp-*) or reads before the rename
    return final


def list_checkpoints(ckpt_dir: str | Path) -> list[Path]:
    """Complete checkpoints (renamed into place, with meta.json), oldest first."""
    root = Path(ckpt_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir()
             if (m := _STEP_DIR.match(p.name)) and (p / "meta.json").exists()]
    return [p for _, p in sorted(found)]


def latest_checkpoint(ckpt_dir: str | Path) -> Path | None:
    found = list_checkpoints(ckpt_dir)
    return found[-1] if found else None


def _load_file(ckpt: Path, name: str, meta: dict):
    path = ckpt / name
    hint = (f"delete {ckpt} to resume from the previous checkpoint, or start the run again without --resume")
    if not path.exists():
        raise CheckpointError(f"checkpoint file {path} is missing; {hint}")
    want = meta["files"].get(name, {})
    if path.stat().st_size != want.get("bytes") or _sha256(path) != want.get("sha256"):
        raise CheckpointError(f"checkpoint file {path} is corrupt (size or sha256 differs from meta.json); {hint}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means the same thing
        raise CheckpointError(f"cannot read checkpoint file {path} ({e}); {hint}") from e


def load_checkpoint(ckpt: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None,
                    scheduler=None, restore_rng: bool = True) -> dict:
    """Restore model/optimizer/scheduler (and the RNGs) in place; return trainer.pt's dict
    (step, data, extra). Raises CheckpointError naming the bad file and what to do."""
    ckpt = Path(ckpt)
    meta_path = ckpt / "meta.json"
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{meta_path} is missing or not valid JSON ({e}): {ckpt} is not a complete "
                              "checkpoint; delete it to resume from the previous one") from e
    if meta.get("format") == "dcp":
        _load_sharded(ckpt, meta, model, optimizer)
    else:
        _load_plain(ckpt, meta, model, optimizer)
    state = _load_file(ckpt, "trainer.pt", meta)
    if scheduler is not None and state.get("scheduler") is not None:
        scheduler.load_state_dict(state["scheduler"])
    if restore_rng:
        set_rng_state(state["rng"])
    return state


def _load_plain(ckpt: Path, meta: dict, model: torch.nn.Module, optimizer) -> None:
    from torch.distributed.tensor import DTensor  # slow to import; only sharded runs have DTensors
    if any(isinstance(p, DTensor) for p in model.parameters()):
        raise CheckpointError(f"{ckpt} was written by a single-process run: resume it in one process without "
                              "--parallel (its next checkpoints stay single-process), or start a fresh --out")
    sd = _load_file(ckpt, "model.pt", meta)
    try:
        model.load_state_dict(sd)
    except RuntimeError as e:
        raise CheckpointError(f"{ckpt / 'model.pt'} does not fit this model (was it written with another model "
                              f"config?): {str(e).splitlines()[0]} ... Resume with the run's original options "
                              "(its config.yaml) or start a fresh --out directory") from e
    if optimizer is not None:
        try:
            optimizer.load_state_dict(_load_file(ckpt, "optimizer.pt", meta))
        except ValueError as e:
            raise CheckpointError(f"{ckpt / 'optimizer.pt'} does not fit this optimizer ({e}); resume with the "
                                  "run's original options or start a fresh --out directory") from e


def _load_sharded(ckpt: Path, meta: dict, model: torch.nn.Module, optimizer) -> None:
    """Collective when a process group exists; reshards onto this run's world size and layout."""
    from nanoseek.parallel import dcp  # as in save_sharded_checkpoint: sharded runs only
    for name, want in meta["files"].items():
        path = ckpt / name
        if not path.exists() or path.stat().st_size != want["bytes"]:
            raise CheckpointError(f"checkpoint file {path} is missing or truncated (size differs from meta.json); "
                                  f"delete {ckpt} to resume from the previous checkpoint")
    try:
        with _single_process_ok():
            dcp.load(ckpt, model, optimizer)
    except Exception as e:  # noqa: BLE001 - DCP raises several types for a state that does not fit
        raise CheckpointError(f"{ckpt} does not fit this model/optimizer (was it written with another model "
                              f"config?): {str(e).splitlines()[0]} ... Resume with the run's original options "
                              "(its config.yaml) or start a fresh --out directory") from e


@contextlib.contextmanager
def _single_process_ok():
    """DCP warns when no process group exists; one process (--parallel without torchrun, or a
    resume on one process) is a case this module supports on purpose."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "torch.distributed is disabled")
        yield
