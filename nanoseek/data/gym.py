"""A handful of reasoning-gym tasks behind our Task interface (names `gym:<dataset>`).

reasoning-gym (offline, 100+ generators with their own scorers) is imported lazily, so the
rest of nanoseek works without it. Difficulty maps to the dataset's config knobs; the entry
reasoning-gym returns is kept in meta so its own `score_answer` grades the answer later.
Some datasets wrap the reference in <answer> tags: we strip them.
"""
from __future__ import annotations

import json
import random
import re
from functools import lru_cache

from nanoseek.data.tasks import Sample, Task, register

# dataset -> difficulty -> config overrides (difficulty 1 = shortest prompts)
LEVELS: dict[str, dict[int, dict]] = {
    "chain_sum": {d: dict(min_terms=2, max_terms=d + 1, min_digits=1, max_digits=min(d, 4)) for d in range(1, 5)},
    "basic_arithmetic": {d: dict(min_terms=2, max_terms=d + 1, min_digits=1, max_digits=min(d, 3),
                                 allow_parentheses=d >= 3, allow_negation=d >= 4) for d in range(1, 5)},
    "products": {d: dict(min_terms=2, max_terms=2, min_digits=1, max_digits=d) for d in range(1, 5)},
    "leg_counting": {d: dict(min_animals=1, max_animals=d + 1, min_instances=1, max_instances=3 * d) for d in range(1, 5)},
    "spell_backward": {d: dict(min_word_len=3, max_word_len=3 + 2 * d) for d in range(1, 5)},
    "simple_equations": {d: dict(min_terms=2, max_terms=1 + d, min_value=1, max_value=10 * d) for d in range(1, 4)},
    "gcd": {d: dict(min_numbers=2, max_numbers=2, min_value=1, max_value=10 ** (d + 1)) for d in range(1, 4)},
    "letter_counting": {d: dict(min_words=2, max_words=2 + 3 * d) for d in range(1, 4)},
    "word_sequence_reversal": {d: dict(min_words=2, max_words=2 + 2 * d) for d in range(1, 4)},
}

_TAGGED = re.compile(r"^\s*<answer>(.*)</answer>\s*$", re.S)


def strip_answer_tags(text: str) -> str:
    m = _TAGGED.match(text or "")
    return (m.group(1) if m else text or "").strip()


def _rg():
    try:
        import reasoning_gym
    except ImportError as e:  # pragma: no cover - depends on the install
        raise ImportError("gym:* tasks need reasoning-gym: pip install 'nanoseek[tasks]'") from e
    return reasoning_gym


SIZE = 10 ** 9  # reasoning-gym builds entry i on access from (seed, i): a huge size costs nothing


@lru_cache(maxsize=None)
def _dataset(name: str, difficulty: int):
    return _rg().create_dataset(name, size=SIZE, seed=0, **LEVELS[name][difficulty])


def _jsonable(x):
    return json.loads(json.dumps(x, default=str))


def _maker(name: str):
    def make(rng: random.Random, d: int) -> Sample:
        index = rng.randrange(SIZE)  # our rng picks the entry, so our seeds and splits rule
        entry = _dataset(name, d)[index]
        meta = {"check": "gym", "gym": {"name": name, "difficulty": d, "index": index,
                                        "entry": _jsonable({k: entry[k] for k in ("question", "answer", "metadata")})}}
        return Sample(f"gym:{name}", entry["question"].strip(), strip_answer_tags(str(entry["answer"])), d, meta)
    return make


def score(meta: dict, answer: str) -> float:
    """reasoning-gym's own scorer for an answer to a gym sample (0..1)."""
    g = meta["gym"]
    ds = _dataset(g["name"], g["difficulty"])
    return float(ds.score_answer(answer, g["entry"]) or 0.0)


for _name, _levels in LEVELS.items():
    register(Task(f"gym:{_name}", _maker(_name), min(_levels), max(_levels), f"reasoning-gym {_name}"))
