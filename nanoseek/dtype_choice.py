"""Which dtype a training run computes in: fp32, or bf16 autocast over fp32 master weights.

`hardware.pick_dtype` decides from what the hardware says it supports. That is enough for a GPU
(bf16 where supported) and for a CPU without the BF16 instructions (fp32: bf16 falls back to slow
scalar code there, ~100x off, so there is nothing to measure). But a CPU that *has* AVX512-BF16 is
not always faster in bf16: without AMX, for a small model, autocast's casts around every matmul and
its slower bf16 kernels for small shapes can cost more than the matmuls gain. So on such a CPU,
`choose_dtype` times a few real training steps of the run's model, at the run's batch shape, in
each dtype and takes bf16 only when it is clearly faster (BF16_MARGIN). The answer depends only on
the machine, the software and the shapes, so it is cached in a small JSON file (see `cache_path`)
keyed by exactly those; a second run with the same key reads it and measures nothing.

Overrides, strongest first: `--dtype fp32|bf16` (the user asked), NANOSEEK_CPU_BF16=1|0 (forces
either side on any CPU; CI runs the dtype-sensitive tests on both), then the measurement.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from nanoseek import hardware
from nanoseek.model.moe import moe_layers

CACHE_VERSION = 1
BF16_MARGIN = 1.1  # bf16 autocast is chosen only when it measures at least this much faster than fp32
NAMES = {None: "fp32", torch.bfloat16: "bf16"}  # autocast dtype -> the name in the cache and run metadata


@dataclass
class DtypeChoice:
    """The autocast dtype a run uses (None: plain fp32) and why, for the log and the run metadata."""

    autocast: torch.dtype | None
    reason: str                  # "requested", "measured", "cached", "NANOSEEK_CPU_BF16=1", ...
    tokens_per_s: dict[str, float] = field(default_factory=dict)  # {"fp32": ..., "bf16": ...} when timed
    cache: str = ""              # the cache file read or written; "" when none was
    note: str = ""               # e.g. why the cache could not be written

    @property
    def name(self) -> str:
        return "fp32" if self.autocast is None else f"{NAMES[self.autocast]} autocast"

    def describe(self) -> str:
        """One log line, e.g. "dtype: fp32 (measured on this CPU for this model: fp32 N tok/s, ...)"."""
        why = self.reason
        if self.reason in ("measured", "cached"):
            speeds = ", ".join(f"{'fp32' if k == 'fp32' else k + ' autocast'} {v:,.0f} tok/s"
                               for k, v in self.tokens_per_s.items())
            where = _home_relative(self.cache)
            if self.reason == "cached":
                why = f"cached choice for this CPU and model, from {where}: {speeds} when measured"
            else:
                cached = f"cached in {where}" if where else "not cached"
                why = f"measured on this CPU for this model: {speeds}; {cached}"
        return f"dtype: {self.name} ({why}{'; ' + self.note if self.note else ''})"

    def to_dict(self) -> dict:
        d = {"dtype": NAMES[self.autocast], "reason": self.reason}
        if self.tokens_per_s:
            d["tokens_per_s"] = dict(self.tokens_per_s)
        return d


def choose_dtype(device: str | torch.device, requested: str, model: torch.nn.Module,
                 loss_fn: Callable[[dict[str, torch.Tensor]], torch.Tensor], batch_size: int,
                 seq_len: int) -> DtypeChoice:
    """The training dtype for `model` on `device`: `hardware.pick_dtype`'s answer, except that
    "auto" on a CPU whose flags claim fast bf16 is settled by timing `loss_fn` (forward; the caller's
    training loss of a batch dict with input_ids / targets / doc_ids / loss_mask) in both dtypes,
    or by the cached result of an earlier timing with the same key."""
    _, amp = hardware.pick_dtype(device, requested)
    dev = torch.device(device)
    forced = os.environ.get("NANOSEEK_CPU_BF16", "")
    if requested.lower() != "auto":
        return DtypeChoice(amp, "requested")
    if dev.type != "cpu":
        return DtypeChoice(amp, f"{dev.type} {'supports bf16' if amp else 'without bf16'}")
    if forced:
        return DtypeChoice(amp, f"NANOSEEK_CPU_BF16={forced}")
    if amp is None:
        return DtypeChoice(None, "CPU has no fast bf16")

    path, key = cache_path(), cache_key(model, batch_size, seq_len)
    hit = _read_cache(path).get(key)
    if hit is not None:
        return DtypeChoice(hit["autocast"], "cached", hit["tokens_per_s"], str(path))
    speeds = {k: round(v, 1) for k, v in probe_speeds(model, loss_fn, batch_size, seq_len, dev).items()}
    # fp32 is the exact path: bf16 must win clearly, as a near tie on a shared machine is noise
    autocast = torch.bfloat16 if speeds["bf16"] > BF16_MARGIN * speeds["fp32"] else None
    note = _write_cache(path, key, autocast, speeds)
    return DtypeChoice(autocast, "measured", speeds, "" if note else str(path), note)


# --------------------------------------------------------------------------- the measurement

def probe_speeds(model: torch.nn.Module, loss_fn: Callable[[dict], torch.Tensor], batch_size: int, seq_len: int,
                 device: torch.device) -> dict[str, float]:
    """Training tokens/s of `loss_fn` forward + backward in fp32 and in bf16 autocast.

    The run must not notice the probe: the random batches come from their own generator and the
    global RNG state is restored (dropout-free models draw nothing, but a step_fn might), gradients
    are put back as they were, and so are the buffers (the MoE layers count routed tokens in `load`,
    which the first routing-bias update reads) and each MoE layer's last `aux_loss`."""
    g = torch.Generator().manual_seed(0)

    def new_batch() -> dict[str, torch.Tensor]:
        ids = torch.randint(0, model.config.vocab_size, (batch_size, seq_len + 1), generator=g)
        batch = {"input_ids": ids[:, :-1], "targets": ids[:, 1:],
                 "doc_ids": torch.zeros_like(ids[:, 1:]),  # packed rows carry them: the same attention path
                 "loss_mask": torch.ones(batch_size, seq_len, dtype=torch.bool)}
        return {k: v.to(device) for k, v in batch.items()}

    params = list(model.parameters())
    grads = [p.grad for p in params]
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    aux = [(m, m.aux_loss) for m in moe_layers(model)]
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            return _interleaved_speeds(model, loss_fn, new_batch, device)
    finally:
        with torch.no_grad():
            for p, gr in zip(params, grads):
                p.grad = gr
            for b, saved in buffers:
                b.copy_(saved)
        for m, a in aux:
            m.aux_loss = a


def _interleaved_speeds(model, loss_fn, new_batch, device, rounds: int = 3) -> dict[str, float]:
    """One warm-up step per dtype (kernel selection, allocator), then `rounds` timed steps of each,
    alternating, so that another process's load falls on both alike; the fastest step of each dtype
    counts, as other processes can only add time. Every step gets a new batch, as in training: the
    tokens routed to each expert, so the expert matmuls' shapes, change from step to step, and a
    repeated batch would favour kernels that are prepared once per shape (as oneDNN's are)."""
    for amp in NAMES:
        time_step(model, loss_fn, new_batch(), amp, device)
    best = {amp: float("inf") for amp in NAMES}
    for _ in range(rounds):
        for amp in NAMES:
            batch = new_batch()
            best[amp] = min(best[amp], time_step(model, loss_fn, batch, amp, device))
    return {NAMES[amp]: batch["input_ids"].numel() / t for amp, t in best.items()}


def time_step(model: torch.nn.Module, loss_fn: Callable[[dict], torch.Tensor], batch: dict,
              autocast: torch.dtype | None, device: torch.device) -> float:
    """Seconds for one forward + backward of `batch` with `autocast` (None: fp32); no gradients left."""
    for p in model.parameters():
        p.grad = None
    t0 = time.perf_counter()
    with torch.autocast(device.type, dtype=autocast) if autocast is not None else contextlib.nullcontext():
        loss = loss_fn(batch)
    loss.backward()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    dt = time.perf_counter() - t0
    for p in model.parameters():
        p.grad = None
    return dt


# --------------------------------------------------------------------------- the cache

def cache_path() -> Path:
    """$NANOSEEK_CACHE_DIR/dtype.json, else $XDG_CACHE_HOME/nanoseek/dtype.json, else ~/.cache/nanoseek/dtype.json."""
    if os.environ.get("NANOSEEK_CACHE_DIR"):
        return Path(os.environ["NANOSEEK_CACHE_DIR"]) / "dtype.json"
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "nanoseek" / "dtype.json"


def cache_key(model: torch.nn.Module, batch_size: int, seq_len: int) -> str:
    """What the answer depends on: the CPU, the cores and threads it runs on, torch, the model, the batch shape."""
    blob = json.dumps({"class": type(model).__name__, **model.config.to_dict()}, sort_keys=True, default=str)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return (f"{hardware._cpu_model_name()} | {cores} cores, {torch.get_num_threads()} threads | "
            f"torch {torch.__version__} | model {hashlib.sha256(blob.encode()).hexdigest()[:12]} | "
            f"{batch_size}x{seq_len}")


def _raw_entries(path: Path) -> dict:
    """The cache file's entries as stored; a missing, unreadable or other-version file has none."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    ok = isinstance(data, dict) and data.get("version") == CACHE_VERSION and isinstance(data.get("entries"), dict)
    return data["entries"] if ok else {}


def _read_cache(path: Path) -> dict[str, dict]:
    """key -> {"autocast", "tokens_per_s"}; a malformed entry is no entry."""
    out = {}
    for key, e in _raw_entries(path).items():
        try:
            speeds = {k: float(e["tokens_per_s"][k]) for k in ("fp32", "bf16")}
            out[key] = {"autocast": {"fp32": None, "bf16": torch.bfloat16}[e["dtype"]], "tokens_per_s": speeds}
        except (KeyError, TypeError, ValueError):
            continue
    return out


def _write_cache(path: Path, key: str, autocast: torch.dtype | None, speeds: dict[str, float]) -> str:
    """Add one entry, atomically (temp file + os.replace: a reader never sees half a file). Returns ""
    or, where the cache cannot be written, why (the run goes on without it)."""
    data = {"version": CACHE_VERSION, "entries": _raw_entries(path)}
    data["entries"][key] = {"dtype": NAMES[autocast], "tokens_per_s": speeds,
                            "measured": time.strftime("%Y-%m-%d %H:%M:%S"), "host": platform.node()}
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".dtype-", suffix=".json", dir=path.parent)
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1, sort_keys=True)
            f.write("\n")
        os.replace(tmp, path)
        return ""
    except OSError as e:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        return f"cache not written: {e.strerror or e}"


def _home_relative(path: str) -> str:
    home = str(Path.home())
    return "~" + path[len(home):] if path and path.startswith(home + os.sep) else path
