"""`nanoseek data`: show samples of every task or data file, check the references, export JSONL.

For each `--task` entry (a built-in task, gym:NAME for any reasoning-gym dataset, or a data file:
see sources.py) it prints how many samples there are and which checkers grade them, a few samples
(prompt, reference answer, the checker's verdict on the reference, which must be True, and a worked
solution where we have one), then the checker's throughput, and writes all samples to --out as
JSONL (one Sample per line; with --chat, the cold-start chat records instead). Generated entries
give --n samples of --split; a file gives every row (FILE@test: its test split by prompt hash).
`--list` names every accepted task and reasoning-gym dataset.
"""
from __future__ import annotations

import json
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import List

from nanoseek.data.coldstart import SOLVERS, coldstart_record, worked_solution
from nanoseek.data.gym import LEVELS, gym_datasets
from nanoseek.data.sources import column_option, resolve_all
from nanoseek.data.tasks import get_task, list_tasks
from nanoseek.data.verify import check_answer, checker_of, throughput


@dataclass
class Options:
    # typing.List: in this class body the field `list` (below) shadows the builtin
    task: List[str] = field(default_factory=lambda: [], metadata={
        "help": "tasks, gym:NAME or data files, comma separated (default: all built-in and leveled gym tasks)"})
    n: int = field(default=3, metadata={"help": "samples per generated task (a file gives all its rows)"})
    split: str = field(default="train", metadata={"help": "train, validation or test"})
    difficulty: int | None = field(default=None, metadata={"help": "difficulty level (default: mixed over each task's range)"})
    seed: int = field(default=0, metadata={"help": "generation seed"})
    prompt_field: str = column_option("prompt")
    answer_field: str = column_option("answer")
    out: str | None = field(default=None, metadata={"help": "JSONL file to write the samples to"})
    chat: bool = field(default=False, metadata={"help": "write cold-start chat records instead of samples"})
    show: int = field(default=2, metadata={"help": "samples printed per task"})
    list: bool = field(default=False, metadata={"help": "list the built-in tasks and every reasoning-gym dataset"})


def _indent(text: str, pad: str = "      ") -> str:
    return "\n".join(pad + line for line in text.splitlines())


def list_sources() -> None:
    print("built-in tasks (difficulty range):")
    for name in list_tasks(own_only=True):
        t = get_task(name)
        print(f"  {name:10s} {t.min_difficulty}..{t.max_difficulty}  {t.description}")
    print(f"reasoning-gym with difficulty levels: {', '.join('gym:' + n for n in LEVELS)}")
    try:
        names = gym_datasets()
        print(f"any reasoning-gym dataset as gym:NAME (its default config), {len(names)}: {', '.join(names)}")
    except ImportError:
        print("reasoning-gym is not installed: pip install 'nanoseek[tasks]' for gym:NAME")
    print("data files: .jsonl, .json, .parquet, .csv or a datasets save_to_disk folder "
          "(--prompt-field / --answer-field name the columns; FILE@test keeps its test split)")


def run(opts: Options) -> list:
    if opts.list:
        list_sources()
        return []
    sources = resolve_all(opts.task or list_tasks(), opts.prompt_field, opts.answer_field)
    rows, all_samples, bad, file_bad = [], [], 0, 0
    for src in sources:
        if src.generated():
            task = get_task(src.name)
            try:
                samples = task.generate(opts.n, opts.split, opts.difficulty, opts.seed)
            except ImportError as e:
                print(f"[{src.name}] skipped: {e}")
                continue
            about = f"difficulty {task.min_difficulty}..{task.max_difficulty}: {task.description}"
        else:
            samples = src.rows
            about = f"{len(samples)} rows of {src.spec}"
        checkers = Counter(checker_of(s) for s in samples)
        print(f"[{src.name}] {about}; {len(samples)} samples, checkers: "
              f"{', '.join(f'{k} {v}' for k, v in checkers.most_common())}")
        for i, s in enumerate(samples):
            check = check_answer(s, s.answer) if s.answer else None  # some gym datasets have no reference
            if check is not None and not check.correct:
                bad += src.generated()
                file_bad += not src.generated()
            if i < opts.show:
                verdict = "no reference (the scorer alone grades)" if check is None else check.correct
                print(f"  d={s.difficulty} prompt: {s.prompt[:300]!r}\n      answer: {s.answer!r}  "
                      f"checker: {checker_of(s)}  check(reference): {verdict}")
                if src.kind == "task" and src.name in SOLVERS:
                    print(_indent(worked_solution(s)))
            if opts.chat and src.kind == "task" and src.name in SOLVERS:
                rows.append(coldstart_record(s))
            elif not opts.chat:
                rows.append(s.to_dict())
        all_samples += samples
    if all_samples:
        rate = throughput(all_samples, [s.answer for s in all_samples], repeat=max(1, 2000 // len(all_samples)))
        print(f"checker: {rate:,.0f} answers/s on these references; {bad} reference(s) failed their own check")
    if file_bad:
        print(f"warning: {file_bad} file row(s) have a reference their checker does not accept (a `check` column "
              "can choose another: int, math, string, list, symbol)")
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
