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
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import time
from pathlib import Path

import numpy as np
import torch

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
    state = _load_file(ckpt, "trainer.pt", meta)
    if scheduler is not None and state.get("scheduler") is not None:
        scheduler.load_state_dict(state["scheduler"])
    if restore_rng:
        set_rng_state(state["rng"])
    return state
