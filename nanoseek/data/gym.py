"""reasoning-gym datasets behind our Task interface (names `gym:<dataset>`).

Any of reasoning-gym's datasets (offline, 100+ generators with their own scorers) can be used:
`gym_task(name)` builds its Task on first use. For the datasets in LEVELS, difficulty maps to
the dataset's config knobs; every other dataset runs with its default config at one level.
reasoning-gym is imported lazily, so the rest of nanoseek works without it. The entry reasoning-gym
returns is kept in meta so its own `score_answer` grades the answer later. Some datasets wrap the
reference in <answer> tags: we strip them. A few datasets (propositional_logic, graph_color, ...)
have no single reference answer: their samples carry answer "" and only the scorer grades them.
Entries whose reference their own scorer rejects are skipped (gsm_symbolic's scorer misreads a
negative answer, e.g.): no answer could earn a reward on them.
"""
from __future__ import annotations

import difflib
import json
import random
import re
import warnings
from functools import lru_cache

from nanoseek.data.task_registry import Sample, Task, register
from nanoseek.errors import UsageError

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
        raise UsageError("gym:* tasks need reasoning-gym: pip install 'nanoseek[tasks]'") from e
    return reasoning_gym


SIZE = 10 ** 9  # LEVELS datasets build entry i on access from (seed, i): a huge size costs nothing
# Other datasets may do work per entry up front (gsm_symbolic draws a template per index, acre builds
# its examples), and a few refuse large sizes: 10k entries (~1k test, ~8k train problems) is plenty.
GENERIC_SIZE = 10_000


def gym_datasets() -> list[str]:
    """Every reasoning-gym dataset name."""
    with warnings.catch_warnings():  # reasoning-gym warns about optional extras on import
        warnings.simplefilter("ignore")
        from reasoning_gym.factory import DATASETS
    return sorted(DATASETS)


def check_name(name: str) -> None:
    """UsageError unless `name` is a reasoning-gym dataset (with the closest names as suggestions)."""
    _rg()
    names = gym_datasets()
    if name not in names:
        close = difflib.get_close_matches(name, names, n=3, cutoff=0.5)
        hint = f"did you mean {', '.join('gym:' + c for c in close)}? " if close else ""
        raise UsageError(f"unknown reasoning-gym dataset {name!r}; {hint}`nanoseek data --list` shows all "
                         f"{len(names)}")


@lru_cache(maxsize=None)
def _dataset(name: str, difficulty: int):
    rg = _rg()
    if name in LEVELS:
        return rg.create_dataset(name, size=SIZE, seed=0, **LEVELS[name][difficulty])
    try:
        try:
            return rg.create_dataset(name, size=GENERIC_SIZE, seed=0)
        except ValueError:  # a few datasets cannot make that many distinct problems: their default size
            return rg.create_dataset(name, seed=0)
    except Exception as e:  # noqa: BLE001 - e.g. `composite` needs a config of other datasets
        why = (str(e).splitlines() or [""])[0][:150]
        raise UsageError(f"gym:{name} cannot be built with its default config ({type(e).__name__}: {why}); "
                         "choose another dataset") from e


def _jsonable(x):
    return json.loads(json.dumps(x, default=str))


def _maker(name: str):
    def make(rng: random.Random, d: int) -> Sample:
        ds = _dataset(name, d)
        for _ in range(100):
            index = rng.randrange(len(ds))  # our rng picks the entry, so our seeds and splits rule
            entry = ds[index]
            # an entry whose reference its own scorer rejects could never be rewarded: draw another
            if entry["answer"] is None or ds.score_answer(strip_answer_tags(str(entry["answer"])), entry) >= 1.0:
                break
        meta = {"check": "gym", "gym": {"name": name, "difficulty": d, "index": index,
                                        "entry": _jsonable({k: entry[k] for k in ("question", "answer", "metadata")})}}
        answer = "" if entry["answer"] is None else strip_answer_tags(str(entry["answer"]))
        return Sample(f"gym:{name}", entry["question"].strip(), answer, d, meta)
    return make


@lru_cache(maxsize=None)
def gym_task(name: str) -> Task:
    """The Task `gym:<name>` for any reasoning-gym dataset (UsageError naming close ones if unknown),
    built and registered on first use."""
    if name not in LEVELS:
        check_name(name)
    levels = LEVELS.get(name, {1: {}})
    _dataset(name, min(levels))  # fails here, before a command starts, if it cannot be built
    kind = "difficulty sets its config" if name in LEVELS else "its default config"
    return register(Task(f"gym:{name}", _maker(name), min(levels), max(levels), f"reasoning-gym {name} ({kind})"))


def score(meta: dict, answer: str) -> float:
    """reasoning-gym's own scorer for an answer to a gym sample (0..1)."""
    g = meta["gym"]
    ds = _dataset(g["name"], g["difficulty"])
    return float(ds.score_answer(answer, g["entry"]) or 0.0)
