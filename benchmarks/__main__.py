"""python -m benchmarks [--only NAME ...] [--json PATH] : run the side-by-side benchmarks, print a table."""
from __future__ import annotations

import argparse
import importlib
import inspect
import platform

import torch

from benchmarks.common import print_table, write_json

SUITES = ["train_step", "train_memory", "generate", "grpo_step", "serve_load"]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    p.add_argument("--only", nargs="*", choices=SUITES, help="run only these suites")
    p.add_argument("--json", default="benchmarks/results.json", help="where to write the rows as JSON")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--device", default="cpu", help="cpu or cuda (suites that support it)")
    p.add_argument("--preset", default=None, help="model preset for suites that take one (default: each suite's)")
    args = p.parse_args(argv)
    torch.set_num_threads(torch.get_num_threads())
    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    rows = []
    for name in args.only or SUITES:
        print(f"running {name} ...", flush=True)
        fn = importlib.import_module(f"benchmarks.{name}").run
        params = inspect.signature(fn).parameters
        kw = {k: v for k, v in (("device", args.device), ("preset", args.preset)) if v is not None and k in params}
        rows += fn(reps=args.reps, **kw)
    print_table(rows)
    write_json(rows, args.json)


if __name__ == "__main__":
    main()
