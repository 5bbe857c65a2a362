"""Grade an answer text against a Sample: `check_answer(sample, text) -> Check`.

The checker runs inside RL loops thousands of times a step, so it must be cheap, must never
hang or raise on garbage model output, and must not be fooled by listing several candidates:
  * int     : fast path, no parsing library. The answer must name exactly one distinct number.
  * list    : the integers in the answer, in order, equal the reference list.
  * symbol  : exactly one of < > = appears, and it is the reference.
  * countdown: the expression is parsed with `ast` (never eval), may only use + - * / ( ) and
              integers, must use the given numbers exactly once each, and must hit the target.
  * gym     : reasoning-gym's own scorer (score 1.0 = correct).
  * string  : normalized exact match (case, surrounding whitespace and a final period ignored).
  * auto/math: integers take the fast path; otherwise math-verify. Its signal-based timeouts
              only work in the main thread, so elsewhere they are off and the input is bounded
              instead: length cap, and no power towers / huge exponents / huge factorials, the
              inputs on which sympy would hang. Strings fall back to a normalized exact match.
"""
from __future__ import annotations

import ast
import logging
import re
import threading
import time
from collections import Counter
from dataclasses import dataclass
from fractions import Fraction

from nanoseek.data.gym import score as gym_score

MAX_ANSWER_CHARS = 300   # longer "answers" are not answers; also bounds every parser below
_INT = re.compile(r"[-−]?\d+")
_PLAIN_INT = re.compile(r"^\s*[-−]?\d+\s*\.?\s*$")
_BOXED_OPEN = re.compile(r"\\(?:boxed|fbox)\s*\{")


@dataclass
class Check:
    correct: bool
    reason: str

    def __bool__(self) -> bool:
        return self.correct


def _to_int(s: str) -> int:
    return int(s.replace("−", "-"))


def last_boxed(text: str) -> str | None:
    """The content of the last \\boxed{...} (or \\fbox{...}) in text, nested braces included
    ("\\boxed{\\frac{1}{2}}" -> "\\frac{1}{2}"); None if there is none or it never closes."""
    starts = [m.end() for m in _BOXED_OPEN.finditer(text)]  # just after each box's "{"
    if not starts:
        return None
    closing, stack = {}, []  # one pass pairs every "{" with its "}" (linear in the text)
    for i in range(starts[0] - 1, len(text)):
        if text[i] == "{":
            stack.append(i)
        elif text[i] == "}" and stack:
            closing[stack.pop()] = i
    return next((text[s:closing[s - 1]] for s in reversed(starts) if s - 1 in closing), None)


def checker_of(sample) -> str:
    """The name of the checker that grades `sample` (reports): its meta["check"], "auto" read as math."""
    kind = sample.meta.get("check", "auto")
    return "math" if kind == "auto" else kind


def _final_part(text: str) -> str:
    """The part of an answer that states the result: a \\boxed{} if any, else what follows the last
    '=' ("12 + 30 = 42" -> "42"), else the whole text. Commas between digits are separators."""
    boxed = last_boxed(text)
    if boxed is not None:
        return boxed
    if "=" in text:
        text = text.rsplit("=", 1)[1]
    return re.sub(r"(?<=\d),(?=\d{3}\b)", "", text)


def check_int(reference: str, text: str) -> Check:
    if _PLAIN_INT.match(text):  # the common case in RL: just the number
        ok = _to_int(text.strip().rstrip(".").strip()) == _to_int(reference)
        return Check(ok, "exact integer" if ok else "wrong integer")
    values = {_to_int(x) for x in _INT.findall(_final_part(text))}
    if not values:
        return Check(False, "no number in answer")
    if len(values) > 1:
        return Check(False, f"ambiguous: {len(values)} different numbers")
    ok = values.pop() == _to_int(reference)
    return Check(ok, "integer in text" if ok else "wrong integer")


def check_list(reference: str, text: str) -> Check:
    want = [_to_int(x) for x in _INT.findall(reference)]
    got = [_to_int(x) for x in _INT.findall(text)]
    if got == want:
        return Check(True, "list matches")
    return Check(False, "wrong order" if sorted(got) == sorted(want) else "list differs")


def check_symbol(reference: str, text: str) -> Check:
    present = {c for c in "<>=" if c in text}
    if present == {reference}:
        return Check(True, "symbol matches")
    return Check(False, "no comparison symbol" if not present else f"symbols {''.join(sorted(present))}")


_OPS = {ast.Add: lambda a, b: a + b, ast.Sub: lambda a, b: a - b, ast.Mult: lambda a, b: a * b,
        ast.Div: lambda a, b: a / b}


def _eval(node, used: list[int]) -> Fraction:
    if isinstance(node, ast.Constant) and type(node.value) is int:
        used.append(node.value)
        return Fraction(node.value)
    if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
        return _OPS[type(node.op)](_eval(node.left, used), _eval(node.right, used))
    raise ValueError(f"not allowed: {type(node).__name__}")


def check_countdown(numbers: list[int], target: int, text: str) -> Check:
    expr = text.replace("×", "*").replace("÷", "/").replace("−", "-").strip().rstrip(".")
    if "=" in expr:  # "3 * 7 = 21": the expression is the side without the bare target
        parts = [p.strip() for p in expr.split("=")]
        expr = next((p for p in parts if p and p != str(target)), "")
    if not re.fullmatch(r"[\d\s+\-*/()]+", expr or "x"):
        return Check(False, "not an arithmetic expression")
    try:
        used: list[int] = []
        value = _eval(ast.parse(expr, mode="eval").body, used)
    except ZeroDivisionError:
        return Check(False, "division by zero")
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return Check(False, "unparsable expression")
    if Counter(used) != Counter(numbers):
        return Check(False, "must use each given number exactly once")
    return Check(value == target, "reaches target" if value == target else f"evaluates to {value}, not {target}")


_STEP = re.compile(r"(?<![\d.])(-?\d{1,12}(?:\s*[-+*/]\s*-?\d{1,12})+)\s*=\s*(-?\d{1,15})(?![\d.])")
_COMPARISON = re.compile(r"(?<![\d.])(\d{1,15})\s*(<=|>=|<|>)\s*(\d{1,15})(?![\d.])")
_COMPARE = {"<": lambda a, b: a < b, ">": lambda a, b: a > b, "<=": lambda a, b: a <= b, ">=": lambda a, b: a >= b}


def reasoning_steps(reasoning: str) -> tuple[int, int]:
    """(steps checked, steps wrong) in a chain of thought: every `a + b (+ c ...) = d` with integers (+ - * /,
    usual precedence) and every `a < b` / `a >= b` comparison is recomputed. A wrong step in a right answer
    is a lucky guess, not reasoning; 0 checked steps means there was nothing arithmetic to check."""
    checked = wrong = 0
    for m in _STEP.finditer(reasoning[:4000]):
        try:
            value = _eval(ast.parse(m.group(1), mode="eval").body, [])
        except (SyntaxError, ValueError, ZeroDivisionError, RecursionError):
            continue
        checked += 1
        wrong += value != int(m.group(2))
    for m in _COMPARISON.finditer(reasoning[:4000]):
        checked += 1
        wrong += not _COMPARE[m.group(2)](int(m.group(1)), int(m.group(3)))
    return checked, wrong


def _normalize(s: str) -> str:
    return re.sub(r"\s+", " ", s.strip().strip(".").strip().lower())


_EXPONENT = re.compile(r"\^\s*\{?\s*\(?\s*-?(\d+)")
_FACTORIAL = re.compile(r"([)}\]]|\d+)\s*!(?!=)")


def _too_heavy(text: str) -> bool:
    """Would sympy try to build an astronomically large number? (power towers, 10^99999, 10^9!)"""
    t = text.replace("**", "^")
    if re.search(r"\d{40,}", t) or re.search(r"\^\s*\{[^}]*(\^|\}\s*\^)|\^\s*\(?[\d.]+\)?\s*\^", t):
        return True
    if any(int(e) > 1000 for e in _EXPONENT.findall(t)):
        return True
    return any(not n.isdigit() or int(n) > 100 for n in _FACTORIAL.findall(t))  # (..)! is unbounded


def check_math(reference: str, text: str) -> Check:
    ref = reference.strip()
    if _PLAIN_INT.match(ref):
        return check_int(ref, text)
    if not re.search(r",|;|\bor\b", ref):  # a single value: "0.7 or 0.5" must not pass
        parts = [p for p in re.split(r",|;|\bor\b|\n", _final_part(text)) if p.strip()]
        if len(parts) > 1:
            checks = [_check_math_one(ref, p) for p in parts]
            ok = all(c.correct for c in checks)
            return Check(ok, "all parts equal" if ok else f"ambiguous: {len(parts)} candidate answers")
    return _check_math_one(ref, text)


def _check_math_one(ref: str, text: str) -> Check:
    try:
        from math_verify import parse, verify  # optional (the tasks extra): exact match without it
        logging.getLogger("math_verify").setLevel(logging.ERROR)  # "timeout disabled": we bound input instead
    except ImportError:
        ok = _normalize(text) == _normalize(ref)
        return Check(ok, "string match (math-verify not installed)" if ok else "string differs")
    if _too_heavy(text):
        return Check(False, "expression too heavy to verify")
    # math-verify's timeouts use SIGALRM: a safety net in the main thread only; elsewhere the
    # _too_heavy screen is what keeps sympy from evaluating astronomically large numbers
    limit = 5 if threading.current_thread() is threading.main_thread() else None
    try:
        gold = parse(ref if "$" in ref or "\\" in ref else f"${ref}$", parsing_timeout=limit)
        # as written, and as LaTeX ("1+x^2" only parses as math mode); first match only, so a
        # list of candidates does not pass because one of them is right
        for candidate in ([text] if "$" in text else [text, f"${text}$"]):
            pred = parse(candidate, parsing_timeout=limit, extraction_mode="first_match")
            if gold and pred and verify(gold, pred, timeout_seconds=limit):
                return Check(True, "math-verify")
    except Exception as e:  # noqa: BLE001 - a checker never raises on model output
        return Check(False, f"math-verify error: {type(e).__name__}")
    ok = _normalize(text) == _normalize(ref)
    return Check(ok, "string match" if ok else "math-verify: not equivalent")


def check_answer(sample, text) -> Check:
    """Is `text` (the answer part of a completion, after </think>) a correct answer to `sample`?"""
    if not isinstance(text, str) or not text.strip():
        return Check(False, "empty answer")
    if len(text) > MAX_ANSWER_CHARS:
        return Check(False, f"answer longer than {MAX_ANSWER_CHARS} characters")
    kind = sample.meta.get("check", "auto")
    try:
        if kind == "int":
            return check_int(sample.answer, text)
        if kind == "list":
            return check_list(sample.answer, text)
        if kind == "symbol":
            return check_symbol(sample.answer, text)
        if kind == "countdown":
            return check_countdown(sample.meta["numbers"], sample.meta["target"], text)
        if kind == "gym":
            s = gym_score(sample.meta, text.strip())
            return Check(s >= 1.0, "reasoning-gym score 1" if s >= 1.0 else f"reasoning-gym score {s:.2f}")
        if kind == "string":
            ok = _normalize(text) == _normalize(sample.answer)
            return Check(ok, "string match" if ok else "string differs")
        return check_math(sample.answer, text)
    except Exception as e:  # noqa: BLE001 - garbage in, False out
        return Check(False, f"checker error: {type(e).__name__}")


def throughput(samples, answers, repeat: int = 1) -> float:
    """Answers checked per second (for the data CLI and benchmarks)."""
    t0 = time.perf_counter()
    for _ in range(repeat):
        for s, a in zip(samples, answers):
            check_answer(s, a)
    return repeat * len(samples) / max(time.perf_counter() - t0, 1e-9)
