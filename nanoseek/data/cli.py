"""`nanoseek data`: show samples of every task, check the references, export JSONL.

For each task it prints a few samples (prompt, reference answer, the checker's verdict on the
reference, which must be True, and a worked solution where we have one), then the checker's
throughput, and writes all samples to --out as JSONL (one Sample per line; with --chat, the
cold-start chat records instead).
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from nanoseek.data.coldstart import SOLVERS, coldstart_record, worked_solution
from nanoseek.data.tasks import get_task, list_tasks
from nanoseek.data.verify import check_answer, throughput


@dataclass
class Options:
    task: list[str] = field(default_factory=list, metadata={"help": "tasks, comma separated (default: all)"})
    n: int = field(default=3, metadata={"help": "samples per task"})
    split: str = field(default="train", metadata={"help": "train, validation or test"})
    difficulty: int | None = field(default=None, metadata={"help": "difficulty level (default: mixed over each task's range)"})
    seed: int = field(default=0, metadata={"help": "generation seed"})
    out: str | None = field(default=None, metadata={"help": "JSONL file to write the samples to"})
    chat: bool = field(default=False, metadata={"help": "write cold-start chat records instead of samples"})
    show: int = field(default=2, metadata={"help": "samples printed per task"})


def _indent(text: str, pad: str = "      ") -> str:
    return "\n".join(pad + line for line in text.splitlines())


def run(opts: Options) -> list:
    names = opts.task or list_tasks()
    rows, all_samples, bad = [], [], 0
    for name in names:
        task = get_task(name)
        try:
            samples = task.generate(opts.n, opts.split, opts.difficulty, opts.seed)
        except ImportError as e:
            print(f"[{name}] skipped: {e}")
            continue
        print(f"[{name}] difficulty {task.min_difficulty}..{task.max_difficulty}: {task.description}")
        for i, s in enumerate(samples):
            check = check_answer(s, s.answer)
            bad += not check.correct
            if i < opts.show:
                print(f"  d={s.difficulty} prompt: {s.prompt!r}\n      answer: {s.answer!r}  check(reference): {check.correct}")
                if name in SOLVERS:
                    print(_indent(worked_solution(s)))
            if opts.chat and name in SOLVERS:
                rows.append(coldstart_record(s))
            elif not opts.chat:
                rows.append(s.to_dict())
        all_samples += samples
    if all_samples:
        rate = throughput(all_samples, [s.answer for s in all_samples], repeat=max(1, 2000 // len(all_samples)))
        print(f"checker: {rate:,.0f} answers/s on these references; {bad} reference(s) failed their own check")
    if opts.out:
        out = Path(opts.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        with out.open("w") as f:
            for r in rows:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
        print(f"wrote {len(rows)} {'chat records' if opts.chat else 'samples'} to {out}")
    if bad:
        raise SystemExit(f"error: {bad} reference answer(s) failed the checker")
    return rows


if __name__ == "__main__":  # python -m nanoseek.data.cli
    t0 = time.time()
    run(Options())
    print(f"{time.time() - t0:.1f}s")
