"""Run the side-by-side benchmarks (nanoseek vs HF transformers / TRL) from a source checkout.

Same as `python -m benchmarks` in the checkout: prints a table of ours / reference / ratio and writes JSON.
"""
from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Options:
    only: list[str] = field(default_factory=list, metadata={"help": "comma-separated suites to run (default: all)"})
    json: str = field(default="benchmarks/results.json", metadata={"help": "where to write the rows as JSON"})
    reps: int = field(default=5, metadata={"help": "timed repetitions per measurement (median is reported)"})


def run(opts: Options) -> None:
    root = Path(__file__).resolve().parent.parent
    if not (root / "benchmarks" / "__main__.py").exists():
        raise SystemExit("error: the benchmarks live in the source checkout (benchmarks/); run from a git clone")
    args = (["--only", *opts.only] if opts.only else []) + ["--json", str(Path(opts.json).resolve()),
                                                          "--reps", str(opts.reps)]
    rc = subprocess.run([sys.executable, "-m", "benchmarks", *args], cwd=root).returncode  # the checkout's package
    if rc:
        raise SystemExit(rc)
