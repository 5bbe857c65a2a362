"""Procedural, verifiable reasoning tasks with difficulty levels.

Every task makes `Sample`s (prompt, reference answer, difficulty, meta). `meta["check"]` names
how verify.check_answer grades an answer, and meta carries whatever the checker and the
cold-start solution writer need (operands, numbers, ...), so a Sample saved as JSON can be
graded later without the generator.

Sample, Task, the splits and the registry are in task_registry.py (gym.py builds on them too); this
module adds our own generators and looks tasks up by name.

Our own tasks are sized for a tiny model trained on a CPU: difficulty 1 prompts
are ~10 tokens and the answers a few digits. reasoning-gym tasks are wrapped in gym.py (built on
first use by get_task("gym:<dataset>")); user files and the `--tasks` syntax are in sources.py.
"""
from __future__ import annotations

import random
from fractions import Fraction

from nanoseek.data.gym import LEVELS, gym_task
from nanoseek.data.task_registry import REGISTRY, Sample, Task, register


def get_task(name: str) -> Task:
    """A registered task, or `gym:<dataset>` for any reasoning-gym dataset. KeyError if unknown
    (sources.resolve turns a user's `--tasks` entry into a one-line UsageError instead)."""
    if name in REGISTRY:
        return REGISTRY[name]
    if name.startswith("gym:"):
        return gym_task(name[len("gym:"):])
    raise KeyError(f"unknown task {name!r}; known: {', '.join(list_tasks())}")


def list_tasks(own_only: bool = False) -> list[str]:
    """Our own tasks, then (unless own_only) the reasoning-gym tasks with difficulty levels; any other
    reasoning-gym dataset works too as gym:<name>."""
    own = [n for n in REGISTRY if not n.startswith("gym:")]
    return own if own_only else own + [f"gym:{n}" for n in LEVELS]


def mix(tasks: list[str] | None, n: int, split: str = "train", difficulty: int | None = None,
        seed: int = 0, max_difficulty: int | None = None) -> list[Sample]:
    """n samples drawn evenly from several tasks (default: all own tasks), shuffled. difficulty None: each
    sample's level uniform over its task's range, up to max_difficulty when given."""
    names = list(tasks) if tasks else list_tasks(own_only=True)
    counts = [n // len(names) + (i < n % len(names)) for i in range(len(names))]
    out = [s for name, k in zip(names, counts) if k
           for s in get_task(name).generate(k, split, difficulty, seed, max_difficulty)]
    random.Random(f"mix/{seed}").shuffle(out)
    return out


# --------------------------------------------------------------------------------------------
# our own generators. Each returns a Sample whose meta holds the problem's structure.

def _digits(rng: random.Random, n: int) -> int:
    """A number with exactly n digits (0-9 for n=1)."""
    return rng.randint(0, 9) if n == 1 else rng.randint(10 ** (n - 1), 10 ** n - 1)


def _add(rng, d):
    a, b = _digits(rng, d), _digits(rng, d)
    return Sample("add", f"What is {a} + {b}?", str(a + b), d, {"check": "int", "a": a, "b": b})


def _sub(rng, d):
    a, b = _digits(rng, d), _digits(rng, d)
    a, b = max(a, b), min(a, b)  # non-negative results: borrowing is the skill, not signs
    return Sample("sub", f"What is {a} - {b}?", str(a - b), d, {"check": "int", "a": a, "b": b})


_MUL_SHAPES = {1: (1, 1), 2: (1, 2), 3: (1, 3), 4: (1, 4), 5: (2, 2), 6: (2, 3)}


def _mul(rng, d):
    na, nb = _MUL_SHAPES[d]
    a, b = _digits(rng, nb), max(2, _digits(rng, na))  # a: the long factor, b: the short one
    return Sample("mul", f"What is {a} * {b}?", str(a * b), d, {"check": "int", "a": a, "b": b})


def _sort(rng, d):
    xs = [rng.randint(0, 99) for _ in range(d + 1)]
    return Sample("sort", f"Sort in ascending order: {', '.join(map(str, xs))}",
                  ", ".join(map(str, sorted(xs))), d, {"check": "list", "numbers": xs})


def _max(rng, d):
    xs = [rng.randint(0, 99) for _ in range(d + 1)]
    return Sample("max", f"What is the largest of {', '.join(map(str, xs))}?", str(max(xs)), d,
                  {"check": "int", "numbers": xs})


def _compare(rng, d):
    a, b = _digits(rng, d), _digits(rng, d)
    if rng.random() < 0.1:
        b = a
    sym = "<" if a < b else ">" if a > b else "="
    return Sample("compare", f"Compare {a} and {b}. Answer <, > or =.", sym, d,
                  {"check": "symbol", "a": a, "b": b})


def _countdown(rng, d):
    """Combine d+1 numbers with + - * / (each exactly once) into a target. Built forwards from a
    random combination, so a solution always exists; meta keeps the steps for cold start."""
    hi = 10 if d <= 2 else 25 if d == 3 else 50
    while True:
        nums = [rng.randint(1, hi) for _ in range(d + 1)]
        pool = [(Fraction(x), str(x)) for x in nums]
        steps = []
        while len(pool) > 1:
            (x, ex), (y, ey) = pool.pop(rng.randrange(len(pool))), pool.pop(rng.randrange(len(pool)))
            if x < y:
                (x, ex), (y, ey) = (y, ey), (x, ex)
            ops = ["+", "-", "*"] + (["/"] if y != 0 and x % y == 0 and y != 1 else [])
            op = rng.choice(ops)
            z = {"+": x + y, "-": x - y, "*": x * y, "/": x / y if y else x}[op]
            steps.append(f"{x} {op} {y} = {z}")
            pool.append((z, f"({ex} {op} {ey})"))
        target, expr = pool[0]
        if 1 <= target <= 999:  # positive, readable targets
            expr = expr[1:-1] if expr.startswith("(") else expr
            prompt = f"Use {', '.join(map(str, nums))} to make {target}. Use each number once with + - * /."
            return Sample("countdown", prompt, expr, d,
                          {"check": "countdown", "numbers": nums, "target": int(target), "steps": steps})


def _lineq(rng, d):
    x = rng.randint(0, 9) if d == 1 else rng.randint(-20, 20) if d >= 3 else rng.randint(0, 20)
    a = 1 if d == 1 else rng.choice([k for k in range(-9 if d >= 3 else 2, 10) if k not in (0, 1)])
    b = rng.randint(0, 20) if d <= 2 else rng.randint(-50, 50)
    if d >= 4:
        a, b = rng.choice([k for k in range(-30, 31) if k not in (0, 1)]), rng.randint(-200, 200)
    c = a * x + b
    lhs = f"{'' if a == 1 else '-' if a == -1 else a}x" + (f" + {b}" if b > 0 else f" - {-b}" if b < 0 else "")
    return Sample("lineq", f"Solve for x: {lhs} = {c}", str(x), d,
                  {"check": "int", "a": a, "b": b, "c": c})


_NAMES = ["Ana", "Ben", "Mia", "Leo", "Sara", "Tom", "Yuna", "Omar", "Lily", "Max"]
_ITEMS = ["apples", "books", "coins", "pens", "stickers", "cookies", "marbles", "cards"]


def _word(rng, d):
    """Word problems: d=1 one small step, d=2 one step with bigger numbers or a product, d=3 two steps."""
    name, item = rng.choice(_NAMES), rng.choice(_ITEMS)
    hi = 10 if d == 1 else 50
    a, b = rng.randint(2, hi), rng.randint(1, hi)
    kind = rng.choice(["gain", "lose"] if d == 1 else ["gain", "lose", "groups"])
    if kind == "lose":
        a, b = max(a, b) + 1, min(a, b)
    if kind == "groups":
        a, b = rng.randint(2, 9), rng.randint(2, 12)
        text, value, expr = f"{name} has {a} boxes with {b} {item} in each box.", a * b, f"{a} * {b}"
    elif kind == "gain":
        text, value, expr = f"{name} has {a} {item} and gets {b} more.", a + b, f"{a} + {b}"
    else:
        text, value, expr = f"{name} has {a} {item} and gives away {b}.", a - b, f"{a} - {b}"
    steps = [(text, expr, value)]
    if d >= 3:
        c = rng.randint(1, value) if rng.random() < 0.5 else -rng.randint(1, 20)
        if c > 0:
            text2, value2, expr2 = f"Then {name} gives {c} to a friend.", value - c, f"{value} - {c}"
        else:
            text2, value2, expr2 = f"Then {name} finds {-c} more.", value - c, f"{value} + {-c}"
        steps.append((text2, expr2, value2))
    prompt = " ".join(s[0] for s in steps) + f" How many {item} does {name} have now?"
    return Sample("word", prompt, str(steps[-1][2]), d,
                  {"check": "int", "steps": [[s[1], s[2]] for s in steps], "item": item, "name": name})


register(Task("add", _add, 1, 6, "a + b, both with `difficulty` digits"))
register(Task("sub", _sub, 1, 6, "a - b >= 0, both with `difficulty` digits"))
register(Task("mul", _mul, 1, 6, "1x1, 1x2, 1x3, 1x4, 2x2, 2x3 digit products"))
register(Task("sort", _sort, 1, 6, "sort difficulty+1 numbers in 0..99 ascending"))
register(Task("max", _max, 1, 6, "largest of difficulty+1 numbers in 0..99"))
register(Task("compare", _compare, 1, 6, "<, > or = between two difficulty-digit numbers"))
register(Task("countdown", _countdown, 1, 4, "reach a target with difficulty+1 numbers, each once"))
register(Task("lineq", _lineq, 1, 4, "solve a*x + b = c for integer x"))
register(Task("word", _word, 1, 3, "word problems with one or two arithmetic steps"))

