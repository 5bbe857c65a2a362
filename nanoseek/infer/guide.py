"""The per-sequence token constraint the engine applies before sampling: a reasoning budget, then a grammar.

A request with a thinking budget or a `response_format` gets an `OutputGuide` for each of its sequences
(SamplingParams.guide is the factory). The engine asks it which tokens may come next (`allowed`, a bool
mask, None for any) and tells it the token chosen (`accept`). Phases:

    think  : free text until `</think>` appears; after `budget` tokens the guide forces the close
    close  : the tokens of "\\n</think>\\n\\n", one per step
    answer : the grammar's mask (llguidance) when there is one, else free

Only the answer is constrained: the reasoning stays the model's own. Log-probs stay those of the model's
distribution (the engine records them from the raw logits).
"""
from __future__ import annotations

from typing import Callable, Protocol

import torch

from nanoseek.data.chat import THINK_END


class TokenMatcher(Protocol):
    def allowed(self) -> torch.Tensor: ...     # bool [V]
    def accept(self, token: int) -> None: ...


class OutputGuide:
    def __init__(self, vocab_size: int, stop_ids: frozenset[int], tokenizer, thinking: bool,
                 budget: int | None = None, answer: Callable[[], TokenMatcher] | None = None):
        self.V, self.stop_ids, self.tok = vocab_size, stop_ids, tokenizer
        self.budget, self.make_answer = budget, answer
        self.phase = "think" if thinking else "answer"
        self.thought: list[int] = []       # reasoning tokens so far
        self.forced: list[int] = []        # close tokens still to emit
        self.matcher = answer() if answer is not None and not thinking else None

    def allowed(self) -> torch.Tensor | None:
        if self.phase == "think" and self.budget is not None and len(self.thought) >= self.budget:
            self.phase, self.forced = "close", self.tok.encode("\n" + THINK_END + "\n\n")
        if self.phase == "close":
            return self._only([self.forced[0]])
        if self.phase == "answer" and self.matcher is not None:
            mask = self.matcher.allowed()
            return mask if bool(mask.any()) else self._only(self.stop_ids)  # a dead grammar ends the answer
        return None

    def accept(self, token: int) -> None:
        if self.phase == "think":
            self.thought.append(token)
            if self._closed_thinking():
                self._start_answer()
        elif self.phase == "close":
            self.forced.pop(0)
            if not self.forced:
                self._start_answer()
        elif self.matcher is not None:
            self.matcher.accept(token)

    def _closed_thinking(self) -> bool:
        end = self.tok.think_end_id
        if end is not None:
            return self.thought[-1] == end
        return THINK_END in self.tok.decode(self.thought[-8:])  # `</think>` spread over several tokens

    def _start_answer(self) -> None:
        self.phase = "answer"
        if self.make_answer is not None:
            self.matcher = self.make_answer()

    def _only(self, ids) -> torch.Tensor:
        mask = torch.zeros(self.V, dtype=torch.bool)
        mask[list(ids)] = True
        return mask
