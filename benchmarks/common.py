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


def write_json(rows: list[Row], path: str | Path | None) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps([asdict(r) for r in rows], indent=2) + "\n")
        print(f"wrote {path}")
