"""python -m benchmarks [--only NAME ...] [--json PATH] : run the side-by-side benchmarks, print a table."""
from __future__ import annotations

import argparse
import importlib
import inspect
import json
import platform
import subprocess
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path

import torch

from benchmarks.common import Row, print_table, write_json

SUITES = ["train_step", "train_memory", "generate", "grpo_step", "serve_load", "serve_cache", "serve_speculative",
          "logprob_mismatch"]


def _suite(name: str, kw_json: str, out: str) -> None:
    """Child side: run one suite, write its rows as JSON."""
    fn = importlib.import_module(f"benchmarks.{name}").run
    kw = {k: v for k, v in json.loads(kw_json).items() if k in inspect.signature(fn).parameters}
    Path(out).write_text(json.dumps([asdict(r) for r in fn(**kw)]))


def _run_in_child(name: str, args) -> list[Row]:
    """Each suite runs in a fresh process: one suite's allocator settings (the trainer's
    `retain_freed_memory`), threads or warm caches cannot change the next suite's timings."""
    kw = {"reps": args.reps, **{k: v for k, v in (("device", args.device), ("preset", args.preset)) if v is not None}}
    with tempfile.TemporaryDirectory() as d:
        out = f"{d}/rows.json"
        code = f"from benchmarks.__main__ import _suite; _suite({name!r}, {json.dumps(kw)!r}, {out!r})"
        if subprocess.run([sys.executable, "-c", code]).returncode:
            raise SystemExit(f"error: benchmark suite {name} failed (its output is above)")
        return [Row(**{**r, "suite": name}) for r in json.loads(Path(out).read_text())]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    p.add_argument("--only", nargs="*", choices=SUITES, help="run only these suites")
    p.add_argument("--json", default="benchmarks/results.json",
                   help="where to write the rows as JSON (with --only, the other suites' rows in it are kept)")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--device", default="cpu", help="cpu or cuda (suites that support it)")
    p.add_argument("--preset", default=None, help="model preset for suites that take one (default: each suite's)")
    args = p.parse_args(argv)
    torch.set_num_threads(torch.get_num_threads())
    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    rows = []
    for name in args.only or SUITES:
        print(f"running {name} ...", flush=True)
        rows += _run_in_child(name, args)
    print_table(rows)
    write_json(rows, args.json, set(args.only) if args.only else None)


if __name__ == "__main__":
    main()
