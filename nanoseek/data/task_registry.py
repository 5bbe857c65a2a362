"""What a reasoning task is, and the registry every task joins.

A `Task` makes `Sample`s (prompt, reference answer, difficulty, meta) at a difficulty level, drawn
per split: a problem belongs to exactly one split, decided by a hash of its prompt (10 % test,
10 % validation, 80 % train), so no test prompt can ever appear in train, even for tasks whose
problem space is small (1-digit addition has only 100 problems). Our own generators (tasks.py) and
reasoning-gym's datasets (gym.py) both build on this module and register here.
"""
from __future__ import annotations

import hashlib
import random
from dataclasses import asdict, dataclass, field
from typing import Callable

SPLITS = ("train", "validation", "test")


@dataclass
class Sample:
    task: str
    prompt: str
    answer: str
    difficulty: int = 1
    meta: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Sample":
        return cls(task=d["task"], prompt=d["prompt"], answer=str(d["answer"]),
                   difficulty=int(d.get("difficulty", 1)), meta=dict(d.get("meta") or {}))


def split_of(prompt: str) -> str:
    """The split a problem belongs to: a stable hash of its text (not Python's salted hash)."""
    h = int.from_bytes(hashlib.blake2b(prompt.encode(), digest_size=8).digest(), "little") % 100
    return "test" if h < 10 else "validation" if h < 20 else "train"


@dataclass
class Task:
    """A generator `make(rng, difficulty) -> Sample` plus its difficulty range."""
    name: str
    make: Callable[[random.Random, int], Sample]
    min_difficulty: int = 1
    max_difficulty: int = 1
    description: str = ""

    def generate(self, n: int, split: str = "train", difficulty: int | None = None, seed: int = 0,
                 max_difficulty: int | None = None) -> list[Sample]:
        """n samples of `split`; difficulty None draws each sample's level uniformly from the range (capped at
        max_difficulty when given), an int is clipped into it. Same arguments, same samples."""
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        cap = self.clip(max_difficulty) if max_difficulty else self.max_difficulty
        capped = max_difficulty and difficulty is None
        stream = f"{self.name}/{split}/{difficulty}/{seed}" + (f"/up-to-{cap}" if capped else "")
        rng = random.Random(stream)  # per-split seed stream
        out, seen, tries = [], set(), 0
        while len(out) < n:
            tries += 1
            if tries > 2000 * n + 10000:
                raise RuntimeError(f"{self.name}: could not draw {n} {split} samples at difficulty {difficulty}")
            d = self.clip(difficulty) if difficulty is not None else rng.randint(self.min_difficulty, cap)
            s = self.make(rng, d)
            if split_of(s.prompt) != split:
                continue
            if s.prompt in seen and tries < 50 * n + 100:  # prefer distinct problems while there are any
                continue
            seen.add(s.prompt)
            out.append(s)
        return out

    def clip(self, difficulty: int) -> int:
        return max(self.min_difficulty, min(self.max_difficulty, int(difficulty)))


REGISTRY: dict[str, Task] = {}  # name -> Task, filled by register


def register(task: Task) -> Task:
    REGISTRY[task.name] = task
    return task
