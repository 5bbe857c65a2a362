"""The prompts of a GRPO step: the pool of each difficulty level (--max-difficulty ramps through them),
and which tasks a step draws from (--task-weighting).

A group whose G rewards are all equal has advantage 0: it costs a full rollout and teaches nothing.
Once the cold start solves a task nearly always (the speedrun's compare), most of its groups are such
groups, while a task it solves some of the time (multi-digit add, sub, max) fills the batch with signal.

  even       the step's prompts come from the whole pool in a fixed shuffled order (every task in
             proportion to its share of the pool)
  learnable  each task's share of the step's prompts follows its recent share of informative groups
             (groups whose rewards differ): an exponential moving average, updated after every step
             from the step's own groups, with a floor so that no task is dropped for good and a task
             that became learnable again is noticed. Tasks the model already solves, or cannot yet
             solve at all, give way to the ones it can learn from ("learnability" sampling).

The draws of a step are a pure function of (seed, step, the averages), and the averages are saved in
the checkpoints, so a resumed run draws exactly the same prompts.
"""
from __future__ import annotations

import random

from nanoseek.data.sources import resolve_all, train_samples
from nanoseek.train.grpo_batch import refill_samples
from nanoseek.train.grpo_options import Options

MODES = ("even", "learnable")


class TaskWeights:
    """The moving average of each task's share of informative groups, and the step's draws by it."""

    def __init__(self, tasks: list[str], decay: float = 0.8, floor: float = 0.05):
        # every task starts at 1: the first step spreads evenly, and the averages follow the model from there
        self.signal = {t: 1.0 for t in tasks}
        self.decay, self.floor = decay, floor

    def shares(self) -> dict[str, float]:
        """Each task's share of the next step's prompts: its signal over the sum, each at least `floor`."""
        total = sum(self.signal.values()) or 1.0
        raw = {t: max(v / total, self.floor) for t, v in self.signal.items()}
        norm = sum(raw.values())
        return {t: v / norm for t, v in raw.items()}

    def counts(self, n: int) -> dict[str, int]:
        """n prompts split by the shares, rounded by largest remainder (ties in the tasks' order)."""
        shares = self.shares()
        exact = {t: s * n for t, s in shares.items()}
        out = {t: int(v) for t, v in exact.items()}
        rest = sorted(exact, key=lambda t: -(exact[t] - out[t]))
        for t in rest[:n - sum(out.values())]:
            out[t] += 1
        return out

    def draw(self, pools: dict[str, list], n: int, key: str) -> list:
        """The step's n samples: counts(n) from each task's pool, without repeats inside the step
        (a pool smaller than its count repeats), in an order shuffled by `key`."""
        rng = random.Random(key)
        out = []
        for task, k in self.counts(n).items():
            pool = pools[task]
            while k > 0:
                take = min(k, len(pool))
                out += rng.sample(pool, take)
                k -= take
        rng.shuffle(out)
        return out

    def update(self, group_tasks: list[str], informative: list[bool]) -> None:
        """Fold one step's groups (task of each group, does its reward vary?) into the averages;
        a task the step did not draw keeps its value."""
        by: dict[str, list[bool]] = {}
        for t, inf in zip(group_tasks, informative):
            by.setdefault(t, []).append(inf)
        for t, flags in by.items():
            if t in self.signal:
                self.signal[t] = self.decay * self.signal[t] + (1 - self.decay) * sum(flags) / len(flags)

    def state_dict(self) -> dict:
        return dict(self.signal)

    def load_state_dict(self, state: dict) -> None:
        self.signal.update({t: float(v) for t, v in state.items() if t in self.signal})


class StepPrompts:
    """The samples each step of a run trains on; `weights` is None with --task-weighting even."""

    def __init__(self, o: Options):
        self.o = o
        self._pools: dict[int, list] = {}
        self.weights = (TaskWeights(sorted({s.task for s in self.pool(o.difficulty)}))
                        if o.task_weighting == "learnable" else None)

    def difficulty_at(self, step: int) -> int:
        o = self.o
        if o.max_difficulty <= o.difficulty:
            return o.difficulty
        return o.difficulty + int((o.max_difficulty - o.difficulty + 1) * step / max(1, o.steps))

    def pool(self, d: int) -> list:
        """Level d's n_prompts generated train-split samples, plus every row of any data file."""
        o = self.o
        if d not in self._pools:
            self._pools[d] = train_samples(resolve_all(o.tasks, o.prompt_field, o.answer_field), o.n_prompts, d, o.seed)
        return self._pools[d]

    def at(self, step: int) -> list:
        """The samples of step `step`: a pure function of (seed, step) and the task weights' state."""
        o = self.o
        d = self.difficulty_at(step)
        pool = self.pool(d)
        if self.weights is not None:
            by_task: dict[str, list] = {}
            for s in pool:
                by_task.setdefault(s.task, []).append(s)
            return self.weights.draw(by_task, o.prompts_per_step, f"grpo/{o.seed}/{d}/{step}")
        out = []
        for i in range(step * o.prompts_per_step, (step + 1) * o.prompts_per_step):
            epoch, j = divmod(i, len(pool))
            order = random.Random(f"grpo/{o.seed}/{d}/{epoch}").sample(range(len(pool)), len(pool))
            out.append(pool[order[j]])
        return out

    def refill(self, step: int, round_: int) -> list:
        """Dynamic sampling's extra prompts, round `round_` >= 1 of step `step`: a pure function of (seed, step, round)."""
        return refill_samples(self.pool(self.difficulty_at(step)), self.o.seed, step, round_, self.o.prompts_per_step)
