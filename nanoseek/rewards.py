"""Rule-based rewards for GRPO, as in DeepSeek-R1: accuracy + format + language consistency.

Every reward is a pure function of (sample, completion text), so rewards can be computed on
CPU worker threads before the policy/reference forward passes, and replayed from logs.

  accuracy : the answer after </think> is correct (verify.check_answer). Nothing inside the
             think block counts, and an answer region that still holds think tags scores 0.
  format   : exactly one think block (the `<think>` the chat template put in the prompt
             counts: completions usually hold only `reasoning </think> answer`), non-empty
             reasoning, a non-empty answer, and not a degenerate repetition loop.
  language : share of the reasoning's letters written in the prompt's script (R1's fix for
             language mixing); prompts without letters ask for one consistent script.
  length   : DAPO's soft overlong penalty, off by default: 0 up to max_len - cache_len, then
             linear down to -1 at max_len and beyond.
"""
from __future__ import annotations

import zlib
from dataclasses import asdict, dataclass, field

from nanoseek.data.chat import Parsed, parse_completion
from nanoseek.data.verify import check_answer


@dataclass
class RewardConfig:
    accuracy: float = 1.0
    format: float = 0.2
    language: float = 0.1
    length: float = 0.0          # weight of the overlong penalty (DAPO uses 1.0); 0 = off
    max_len: int = 512           # length unit: tokens when n_tokens is given, else characters
    cache_len: int = 128         # soft zone before max_len where the penalty ramps to -1
    min_compression: float = 0.1  # zlib ratio below this (long text) = repetition loop -> format 0


@dataclass
class RewardBreakdown:
    total: float
    accuracy: float
    format: float
    language: float
    length: float
    answer: str                  # the parsed answer text (after </think>)
    reasons: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


# --------------------------------------------------------------------------------------------
# the individual rewards (each in [0, 1] except length in [-1, 0])

def accuracy_reward(sample, parsed: Parsed) -> tuple[float, str]:
    if not parsed.answer:  # a model that does not think at all (reasoning None) is still graded on its answer
        return 0.0, "no answer after </think>"
    if "think>" in parsed.answer:
        return 0.0, "think tags in the answer"
    check = check_answer(sample, parsed.answer)
    return float(check.correct), check.reason


def is_repetitive(text: str, min_ratio: float = 0.1, min_chars: int = 400) -> bool:
    """Long text that compresses extremely well is a loop ("wait wait wait ...")."""
    if len(text) < min_chars:
        return False
    data = text.encode()
    return len(zlib.compress(data, 1)) / len(data) < min_ratio


def format_reward(parsed: Parsed, min_compression: float = 0.1) -> tuple[float, str]:
    if not parsed.well_formed:
        return 0.0, parsed.reason
    if is_repetitive(parsed.reasoning or "", min_compression):
        return 0.0, "repetition loop"
    return 1.0, "one think block, reasoning and answer"


_SCRIPTS = (  # (name, ranges) for the scripts we tell apart; other letters are "other"
    ("latin", ((0x41, 0x5A), (0x61, 0x7A), (0xC0, 0x24F))),
    ("hangul", ((0xAC00, 0xD7A3), (0x1100, 0x11FF), (0x3130, 0x318F))),
    ("kana", ((0x3040, 0x30FF),)),
    ("han", ((0x4E00, 0x9FFF), (0x3400, 0x4DBF), (0xF900, 0xFAFF))),
    ("cyrillic", ((0x400, 0x4FF),)),
    ("greek", ((0x370, 0x3FF),)),
    ("arabic", ((0x600, 0x6FF),)),
)


def script_of(ch: str) -> str | None:
    if not ch.isalpha():
        return None
    o = ord(ch)
    for name, ranges in _SCRIPTS:
        if any(lo <= o <= hi for lo, hi in ranges):
            return name
    return "other"


def script_counts(text: str) -> dict[str, int]:
    counts: dict[str, int] = {}
    for ch in text:
        s = script_of(ch)
        if s:
            counts[s] = counts.get(s, 0) + 1
    return counts


def language_reward(prompt: str, parsed: Parsed) -> tuple[float, str]:
    reasoning = parsed.reasoning or ""
    if not reasoning.strip():
        return 0.0, "no reasoning"
    cot = script_counts(reasoning)
    if not cot:
        return 1.0, "no letters in reasoning"
    ask = script_counts(prompt)
    if ask:
        target = max(ask, key=ask.get)
        # Japanese mixes kana and kanji; count both as the prompt's language
        if target == "kana" or (target == "han" and "kana" in ask):
            share = (cot.get("kana", 0) + cot.get("han", 0)) / sum(cot.values())
        else:
            share = cot.get(target, 0) / sum(cot.values())
        return share, f"{share:.0%} of reasoning letters in {target}"
    target = max(cot, key=cot.get)
    share = cot[target] / sum(cot.values())
    return share, f"{share:.0%} in one script ({target})"


def length_penalty(length: int, max_len: int, cache_len: int) -> float:
    """DAPO soft overlong punishment."""
    if length <= max_len - cache_len:
        return 0.0
    if length <= max_len:
        return (max_len - cache_len - length) / cache_len
    return -1.0


# --------------------------------------------------------------------------------------------

def compute_reward(sample, completion: str, cfg: RewardConfig | None = None, prompt_opened_think: bool = True,
                   n_tokens: int | None = None) -> RewardBreakdown:
    """Weighted sum of the rewards for one completion (the text generated after the prompt).
    prompt_opened_think: the prompt ended with `<think>` (R1 chat template, R1-Zero prompt)."""
    cfg = cfg or RewardConfig()
    parsed = parse_completion(completion if isinstance(completion, str) else "", opened_think=prompt_opened_think)
    acc, acc_why = accuracy_reward(sample, parsed)
    fmt, fmt_why = format_reward(parsed, cfg.min_compression)
    lang, lang_why = language_reward(sample.prompt, parsed)
    length = length_penalty(n_tokens if n_tokens is not None else len(completion or ""), cfg.max_len, cfg.cache_len) \
        if cfg.length else 0.0
    total = cfg.accuracy * acc + cfg.format * fmt + cfg.language * lang + cfg.length * length
    return RewardBreakdown(total, acc, fmt, lang, length, parsed.answer,
                           {"accuracy": acc_why, "format": fmt_why, "language": lang_why})


def compute_rewards(samples, completions, cfg: RewardConfig | None = None, prompt_opened_think: bool = True,
                    n_tokens: list[int] | None = None) -> list[RewardBreakdown]:
    """Batch helper for GRPO: one breakdown per (sample, completion) pair."""
    n_tokens = n_tokens or [None] * len(completions)
    return [compute_reward(s, c, cfg, prompt_opened_think, n) for s, c, n in zip(samples, completions, n_tokens)]
