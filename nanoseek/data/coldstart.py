"""Cold-start data: short, readable worked solutions for our own tasks.

R1's first stage fine-tunes the base model on a few thousand readable chains of thought
before RL, so RL starts from a model that already writes `reasoning </think> answer`.
We have no R1 to write them, but our tasks have structure: the solution is built from the
problem itself (column addition with carries, one line per digit, and so on). Solutions are
kept short because the tiny model's context is 256-512 tokens.

`worked_solution(sample) -> reasoning text`; `coldstart_record(sample)` -> a chat record
{"messages": [user, assistant with reasoning_content]}; `coldstart_dataset(...)` for SFT.
"""
from __future__ import annotations

from nanoseek.data.task_registry import Sample
from nanoseek.data.tasks import get_task, mix
from nanoseek.errors import UsageError

_PLACES = ["ones", "tens", "hundreds", "thousands", "ten-thousands", "hundred-thousands", "millions"]


def _place(i: int) -> str:
    return _PLACES[i] if i < len(_PLACES) else f"digit {i + 1}"


def _add(m: dict) -> str:
    a, b = m["a"], m["b"]
    da, db = str(a)[::-1], str(b)[::-1]
    lines, carry = [], 0
    for i in range(max(len(da), len(db))):
        x, y = int(da[i]) if i < len(da) else 0, int(db[i]) if i < len(db) else 0
        s = x + y + carry
        lines.append(f"{_place(i)}: {x} + {y}" + (f" + {carry}" if carry else "") + f" = {s}"
                     + (f", write {s % 10} carry 1" if s >= 10 else ""))
        carry = s // 10
    if carry:
        lines.append("write the carry 1")
    return "\n".join(lines + [f"so {a} + {b} = {a + b}"])


def _sub(m: dict) -> str:
    a, b = m["a"], m["b"]
    da, db = str(a)[::-1], str(b)[::-1]
    lines, borrow = [], 0
    for i in range(len(da)):
        x, y = int(da[i]) - borrow, int(db[i]) if i < len(db) else 0
        if x < y:
            lines.append(f"{_place(i)}: {x} < {y}, borrow: {x + 10} - {y} = {x + 10 - y}")
            borrow = 1
        else:
            lines.append(f"{_place(i)}: {x} - {y} = {x - y}")
            borrow = 0
    return "\n".join(lines + [f"so {a} - {b} = {a - b}"])


def _mul(m: dict) -> str:
    a, b = m["a"], m["b"]
    if b < 10:  # one short factor: digit by digit with carries
        lines, carry = [], 0
        for i, ch in enumerate(str(a)[::-1]):
            p = int(ch) * b + carry
            lines.append(f"{_place(i)}: {ch} * {b}" + (f" + {carry}" if carry else "") + f" = {p}"
                         + (f", write {p % 10} carry {p // 10}" if p >= 10 else ""))
            carry = p // 10
        if carry:
            lines.append(f"write the carry {carry}")
        return "\n".join(lines + [f"so {a} * {b} = {a * b}"])
    tens, ones = b // 10 * 10, b % 10  # two-digit factor: split it
    return (f"{b} = {tens} + {ones}\n{a} * {ones} = {a * ones}\n{a} * {tens} = {a * tens}\n"
            f"{a * ones} + {a * tens} = {a * b}\nso {a} * {b} = {a * b}")


def _sort(m: dict) -> str:
    rest, out, lines = list(m["numbers"]), [], []
    while len(rest) > 1:
        k = min(rest)
        rest.remove(k)
        out.append(k)
        lines.append(f"smallest of the rest is {k}")
    out += rest
    return "\n".join(lines + [f"last is {rest[0]}", f"sorted: {', '.join(map(str, out))}"])


def _max(m: dict) -> str:
    xs = m["numbers"]
    best, lines = xs[0], [f"start with {xs[0]}"]
    for x in xs[1:]:
        if x > best:
            lines.append(f"{x} > {best}, take {x}")
            best = x
        else:
            lines.append(f"{x} <= {best}, keep {best}")
    return "\n".join(lines + [f"the largest is {best}"])


def _compare(m: dict) -> str:
    a, b = m["a"], m["b"]
    sa, sb = str(a), str(b)
    if len(sa) != len(sb):
        sym = "<" if len(sa) < len(sb) else ">"
        return f"{a} has {len(sa)} digits, {b} has {len(sb)} digits\nso {a} {sym} {b}"
    for i, (x, y) in enumerate(zip(sa, sb)):
        if x != y:
            sym = "<" if x < y else ">"
            return f"same number of digits\nfirst difference at digit {i + 1}: {x} vs {y}\nso {a} {sym} {b}"
    return f"all digits are the same\nso {a} = {b}"


def _countdown(m: dict) -> str:
    return "\n".join([f"numbers {', '.join(map(str, m['numbers']))}, target {m['target']}"] + m["steps"]
                     + [f"reached {m['target']}"])


def _lineq(m: dict) -> str:
    a, b, c = m["a"], m["b"], m["c"]
    x = (c - b) // a
    ax = "x" if a == 1 else "-x" if a == -1 else f"{a}x"
    lines = []
    if b:
        lines.append(f"{'subtract' if b > 0 else 'add'} {abs(b)} on both sides: "
                     f"{ax} = {c} {'-' if b > 0 else '+'} {abs(b)} = {c - b}")
    if a != 1:
        lines.append(f"divide by {a}: x = {c - b} / {a} = {x}")
    return "\n".join(lines + [f"check: {a} * {x} {'-' if b < 0 else '+'} {abs(b)} = {c}"])


def _word(m: dict) -> str:
    lines = [f"{expr} = {value}" for expr, value in m["steps"]]
    return "\n".join(lines + [f"{m['name']} has {m['steps'][-1][1]} {m['item']}"])


SOLVERS = {"add": _add, "sub": _sub, "mul": _mul, "sort": _sort, "max": _max, "compare": _compare,
           "countdown": _countdown, "lineq": _lineq, "word": _word}


def worked_solution(sample: Sample) -> str:
    """The reasoning text (what goes inside <think>) for a sample of one of our own tasks."""
    if sample.task not in SOLVERS:
        raise KeyError(f"no worked solutions for task {sample.task!r}; have {sorted(SOLVERS)}")
    return SOLVERS[sample.task](sample.meta)


def coldstart_record(sample: Sample) -> dict:
    return {"messages": [
        {"role": "user", "content": sample.prompt},
        {"role": "assistant", "reasoning_content": worked_solution(sample), "content": sample.answer},
    ]}


def require_solvers(tasks: list[str], command: str) -> None:
    """The built-in cold-start set and corpus have worked solutions for our own tasks only."""
    if unknown := [t for t in tasks if t not in SOLVERS]:
        raise UsageError(f"{command} --tasks: no worked solutions for {', '.join(unknown)}; the built-in set covers "
                         f"{', '.join(SOLVERS)} (bring your own data with --data FILE)")


def coldstart_dataset(n: int, tasks: list[str] | None = None, difficulty: int | None = None,
                      seed: int = 0, split: str = "train", max_difficulty: int | None = None) -> list[dict]:
    """n chat records drawn evenly from `tasks` (default: every task with a solver); difficulty None mixes
    each task's levels, up to max_difficulty when given."""
    names = [t for t in (tasks or list(SOLVERS)) if get_task(t) and t in SOLVERS]
    return [coldstart_record(s) for s in mix(names, n, split, difficulty, seed, max_difficulty)]
