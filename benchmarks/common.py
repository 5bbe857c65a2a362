"""Timing harness shared by the benchmarks: warm-up, alternating repetitions, medians, table + JSON."""
from __future__ import annotations

import json
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable


@dataclass
class Row:
    work: str
    ours: float
    reference: float
    unit: str
    ratio: float  # > 1: nanoseek is better
    note: str = ""
    suite: str = ""  # the benchmarks/ module that measured it (set by __main__)


def time_pair(ours: Callable[[], object], ref: Callable[[], object], reps: int = 5, warmup: int = 1) -> tuple[float, float]:
    """Median seconds of each, run alternately so drift in machine speed hits both equally."""
    a, b = time_alternating([ours, ref], reps, warmup)
    return a, b


def time_alternating(fns: list[Callable[[], object]], reps: int = 5, warmup: int = 1) -> list[float]:
    """Median seconds of each of fns, run in turn within every repetition."""
    for _ in range(warmup):
        for fn in fns:
            fn()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(reps):
        for fn, ts in zip(fns, times):
            t = time.perf_counter(); fn(); ts.append(time.perf_counter() - t)
    return [statistics.median(ts) for ts in times]


def time_each(fn: Callable[[], object], reps: int = 5, warmup: int = 1) -> float:
    """Median seconds of fn alone (for a side that cannot share the process's memory with the other)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter(); fn(); times.append(time.perf_counter() - t)
    return statistics.median(times)


def print_table(rows: list[Row]) -> None:
    w = max(len(r.work) for r in rows)
    print(f"\n{'work':<{w}}  {'nanoseek':>12}  {'reference':>12}  {'unit':<10}  {'ratio':>6}  note")
    for r in rows:
        print(f"{r.work:<{w}}  {r.ours:>12.4g}  {r.reference:>12.4g}  {r.unit:<10}  {r.ratio:>6.2f}x  {r.note}")


def write_json(rows: list[Row], path: str | Path | None, replace_suites: set[str] | None = None) -> None:
    """Write rows as JSON. With replace_suites (a run of some suites only), the rows of the other suites already
    in the file stay, so `--only X` refreshes X's rows instead of discarding the rest of the last full run."""
    if not path:
        return
    path = Path(path)
    kept = []
    if replace_suites is not None and path.exists():
        fresh = {r.work for r in rows}
        kept = [r for r in json.loads(path.read_text())
                if r.get("suite") not in replace_suites and r.get("work") not in fresh]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(kept + [asdict(r) for r in rows], indent=2) + "\n")
    print(f"wrote {path}" + (f" (kept {len(kept)} rows of other suites)" if kept else ""))
