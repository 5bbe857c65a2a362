"""`nanoseek eval MODEL`: pass@1, greedy accuracy, cons@k and format errors on held-out tasks.

The protocol is the R1 report's: for every test question sample k completions at temperature
0.6 / top-p 0.95; pass@1 is the mean correctness over those k (a low-variance estimate of the
chance that one sample is right), cons@k grades the majority answer of the k, and greedy
decoding is reported beside them. Questions come from the tasks' *test* split only (disjoint
from the train split by construction, see data/tasks.py), or from the user's own files (their
first n rows, see data/sources.py), and grading goes through the same parser and reward functions
GRPO trains on, so "correct" means the same thing everywhere. Each task's row names the checkers
that graded it: int, math (math-verify), string, gym (reasoning-gym's scorer), ...

All questions × k go to the generator in one call, so a batched engine sees every row at
once (and can share each prompt's prefill across its k samples). The generator is a plain
function `generate(prompts, n, temperature, top_p, max_tokens, seed) -> [[Completion] * n]`,
which lets tests swap in a stub and check the scoring path without a model.
"""
from __future__ import annotations

import json
import math
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from nanoseek.data.chat import describe_template, opens_think, parse_completion, question_prompt
from nanoseek.data.sources import column_option, eval_samples, resolve_all
from nanoseek.data.task_registry import Sample
from nanoseek.data.tasks import list_tasks
from nanoseek.data.verify import checker_of, reasoning_steps
from nanoseek.infer.engine import Engine, SamplingParams
from nanoseek.hf.load import from_pretrained
from nanoseek.rewards import compute_reward
from nanoseek.tokenizer import load_tokenizer
from nanoseek.train.trainer import resolve_device

METRICS = ("pass@1", "greedy", "cons@k", "sound", "mean_len", "format_error")
PASS_KS = (4, 16, 64)  # pass@k reported beside pass@1 for every k up to the samples drawn per question


@dataclass
class Completion:
    text: str
    n_tokens: int
    finish_reason: str = "stop"  # "stop" (eos) or "length" (ran into max_tokens)


GenerateFn = Callable[[list[str], int, float, float, int, int], list[list[Completion]]]


# --------------------------------------------------------------------------------------------
# scoring (pure functions: no model involved)

def normalize_answer(answer: str) -> str:
    """Vote key: "42", " 42." and "42 " are the same vote."""
    return " ".join(answer.split()).rstrip(".").strip().lower()


def cons_at_k(answers: list[str], correct: list[bool]) -> float:
    """1.0 if the most frequent non-empty answer is correct. Ties go to the answer seen first
    (deterministic); completions without an answer (format errors) do not vote."""
    keys = [normalize_answer(a) for a in answers]
    votes = Counter(k for k in keys if k)
    if not votes:
        return 0.0
    top = max(votes.values())
    winner = next(k for k in keys if k and votes[k] == top)
    return float(correct[keys.index(winner)])


def pass_at_k(n: int, c: int, k: int) -> float:
    """The unbiased pass@k from n samples of which c are correct (Chen et al., 2021): the chance that k
    samples drawn without replacement from the n hold at least one correct, 1 - C(n-c, k) / C(n, k).
    pass@k - pass@1 is what RL can sharpen into pass@1 (RL mostly moves pass@k into pass@1)."""
    if not 1 <= k <= n:
        raise ValueError(f"pass@{k} needs 1 <= k <= n = {n}")
    return 1.0 if n - c < k else 1.0 - math.comb(n - c, k) / math.comb(n, k)


def shows_sound_reasoning(text: str, opened_think: bool) -> bool:
    """A visible chain of thought with no wrong arithmetic step in it (reasoning_steps recomputes them)."""
    reasoning = parse_completion(text, opened_think=opened_think).reasoning
    return bool(reasoning and reasoning.strip()) and reasoning_steps(reasoning)[1] == 0


def score_question(sample: Sample, completions: list[Completion], opened_think: bool = True) -> dict:
    """Grade the k completions of one question with the training rewards' accuracy and format.
    sound: the share that are right *and* show their reasoning with every checkable step right."""
    rewards = [compute_reward(sample, c.text, prompt_opened_think=opened_think) for c in completions]
    correct = [r.accuracy == 1.0 for r in rewards]
    k = max(len(completions), 1)
    sound = [ok and shows_sound_reasoning(c.text, opened_think) for ok, c in zip(correct, completions)]
    return {"pass@1": sum(correct) / k, "sound": sum(sound) / k,
            **{f"pass@{j}": pass_at_k(len(correct), sum(correct), j) for j in PASS_KS if j <= len(correct)},
            "cons@k": cons_at_k([r.answer for r in rewards], correct),
            "mean_len": sum(c.n_tokens for c in completions) / k,
            "format_error": sum(r.format < 1.0 for r in rewards) / k,
            "answers": [r.answer for r in rewards], "correct": correct}




# --------------------------------------------------------------------------------------------
# generation on the batched engine

def build_prompt(sample: Sample, template: str, tokenizer=None) -> str:
    """The prompt a test question is asked with (tokenizer None: nanoseek's own chat format)."""
    return question_prompt(tokenizer, sample.prompt, template)


def model_generator(model: torch.nn.Module, tokenizer, max_batch: int = 256, speculative: bool = False,
                    stats: dict | None = None) -> GenerateFn:
    """A GenerateFn over `model` on nanoseek.infer.engine: each prompt is prefilled once and
    shared by its n samples; rows of finished sequences are refilled with waiting ones.
    speculative: MTP self-speculative decoding; `stats` then accumulates drafted/accepted tokens."""
    def generate(prompts, n, temperature, top_p, max_tokens, seed):
        ids = [tokenizer.encode(p) for p in prompts]
        engine = Engine(model, tokenizer, max_batch=max(max_batch, n), max_len=max(map(len, ids)) + max_tokens + 1,
                        speculative=speculative)
        # one seed per question: questions get independent sample streams, and the run is repeatable
        params = [SamplingParams(temperature=temperature, top_p=top_p, max_tokens=max_tokens, n=n,
                                 seed=seed * 1_000_003 + i, stop_token_ids=list(tokenizer.stop_ids))
                  for i in range(len(ids))]
        out = [[Completion(o.text, len(o.token_ids), o.finish_reason) for o in r.outputs]
               for r in engine.generate(ids, params)]
        if stats is not None:
            for key, v in engine.spec_stats.items():
                stats[key] = stats.get(key, 0) + v
        return out
    return generate


# --------------------------------------------------------------------------------------------

def evaluate(model=None, tokenizer=None, tasks: list[str] | None = None, n: int = 20, k: int = 4,
             difficulty: int | None = 1, template: str = "r1", temperature: float = 0.6, top_p: float = 0.95,
             max_tokens: int = 128, seed: int = 0, greedy: bool = True, max_batch: int = 256,
             generate: GenerateFn | None = None, samples: list[Sample] | None = None,
             speculative: bool = False, prompt_field: str = "", answer_field: str = "", device: str = "cpu") -> dict:
    """Evaluate a model (directory or module) on n test questions per task; returns the report dict
    (per-task and overall METRICS and checkers, settings, a few example completions). tasks: --tasks
    entries (task names, gym:NAME, data files, see data/sources.py; prompt_field / answer_field map a
    file's columns). `generate` replaces the model (tests, other backends); `samples` replaces the
    task questions. speculative: decode with MTP self-speculation (same outputs) and report its
    acceptance rate."""
    t0 = time.time()
    name = str(model) if isinstance(model, (str, Path)) else type(model).__name__
    spec: dict[str, int] = {}
    if samples is None:  # before the model loads: a bad task or file fails at once
        samples = eval_samples(resolve_all(tasks, prompt_field, answer_field), n, difficulty, seed)
    if generate is None:
        if isinstance(model, (str, Path)):
            tokenizer = tokenizer or load_tokenizer(model)
            model = from_pretrained(model, device=device)
        if model is None or tokenizer is None:
            raise ValueError("evaluate needs a model directory, or a model and its tokenizer, or generate=")
        generate = model_generator(model, tokenizer, max_batch, speculative, spec)
    prompts = [build_prompt(s, template, tokenizer) for s in samples]
    sampled = generate(prompts, k, temperature, top_p, max_tokens, seed)
    greedy_out = generate(prompts, 1, 0.0, 1.0, max_tokens, seed) if greedy else [[] for _ in samples]
    per_q = []
    for s, prompt, comps, g in zip(samples, prompts, sampled, greedy_out):
        q = score_question(s, comps, opens_think(prompt))
        q["greedy"] = score_question(s, g, opens_think(prompt))["pass@1"] if g else None
        q["checker"] = checker_of(s)
        per_q.append((s, q))
    by_task: dict[str, list[dict]] = {}
    for s, q in per_q:
        by_task.setdefault(s.task, []).append(q)
    report = {
        "model": name, "template": template, "n": n, "k": k, "difficulty": difficulty, "temperature": temperature,
        "top_p": top_p, "max_tokens": max_tokens, "seed": seed,
        "tasks": {t: _aggregate(qs) for t, qs in by_task.items()},
        "overall": _aggregate([q for _, q in per_q]),
        # per question, for paired comparisons of two models on the same questions
        "questions": [{"task": s.task, "prompt": s.prompt, "pass@1": q["pass@1"]} for s, q in per_q],
        "examples": [{"task": s.task, "prompt": s.prompt, "reference": s.answer, "completion": c[0].text,
                      "answer": q["answers"][0], "correct": q["correct"][0]}
                     for (s, q), c in list(zip(per_q, sampled))[::max(1, len(per_q) // 8)] if c],
    }
    if spec.get("drafted"):
        report["mtp_acceptance"] = spec["accepted"] / spec["drafted"]
    report["time_s"] = round(time.time() - t0, 2)
    return report


def _aggregate(qs: list[dict]) -> dict:
    out = {"n": len(qs)}
    for m in (*METRICS, *(f"pass@{j}" for j in PASS_KS)):
        vals = [q[m] for q in qs if q.get(m) is not None]
        out[m] = sum(vals) / len(vals) if vals else None
    out["checker"] = "+".join(sorted({q["checker"] for q in qs if q.get("checker")}))  # e.g. "int", "math+string"
    return out


def to_markdown(report: dict) -> str:
    def cell(v, pct=True):
        return "–" if v is None else f"{100 * v:.1f}" if pct else f"{v:.1f}"
    lines = [f"## Evaluation of `{report['model']}`", "",
             f"template {report['template']}, {report['n']} test questions per task, k = {report['k']} samples "
             f"at temperature {report['temperature']} / top-p {report['top_p']}, max {report['max_tokens']} tokens, "
             f"difficulty {report['difficulty']}, seed {report['seed']}", "",
             "| task | n | pass@1 % | greedy % | cons@k % | pass@k % | sound reasoning % | format errors % | "
             "mean length (tokens) | checker |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    top = max((j for j in PASS_KS if j <= report["k"]), default=None)  # the widest pass@k the samples allow
    for name, r in [*report["tasks"].items(), ("**overall**", report["overall"])]:
        lines.append(f"| {name} | {r['n']} | {cell(r['pass@1'])} | {cell(r['greedy'])} | {cell(r['cons@k'])} | "
                     f"{cell(r.get(f'pass@{top}'))} | {cell(r.get('sound'))} | {cell(r['format_error'])} | "
                     f"{cell(r['mean_len'], False)} | "
                     f"{r.get('checker') or '–'} |")
    if top:
        lines += ["", f"pass@k column: pass@{top}, the unbiased chance that {top} samples (of the {report['k']} drawn "
                      f"per question) include a correct answer; eval.json has pass@"
                      f"{', pass@'.join(str(j) for j in PASS_KS if j <= report['k'])}"]
    lines += ["", "sound reasoning: samples that are right *and* show a chain of thought in which every arithmetic step "
                  "(a + b = c, a > b, ...) is right"]
    return "\n".join(lines) + "\n"


def write_report(report: dict, out: str | Path) -> tuple[Path, Path]:
    """out: a .json path (the .md goes beside it) or a directory (eval.json + eval.md)."""
    out = Path(out)
    js = out if out.suffix == ".json" else out / "eval.json"
    js.parent.mkdir(parents=True, exist_ok=True)
    js.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    md = js.with_suffix(".md")
    md.write_text(to_markdown(report))
    return js, md


# --------------------------------------------------------------------------------------------
# `nanoseek eval MODEL`

POSITIONAL = (("model", "model directory (HF layout, DeepseekV3 or Qwen2, with tokenizer)"),)


@dataclass
class Options:
    model: str = field(default="", metadata={"help": "model directory"})
    tasks: list[str] = field(default_factory=lambda: list_tasks(own_only=True), metadata={
        "help": "comma separated: built-in tasks, gym:NAME (any reasoning-gym dataset), or data files (.jsonl, "
                ".json, .parquet, .csv, datasets folders; named by their stem in the report)"})
    prompt_field: str = column_option("prompt")
    answer_field: str = column_option("answer")
    n: int = field(default=20, metadata={"help": "test questions per task (a data file: its first n rows)"})
    k: int = field(default=4, metadata={"help": "samples per question for pass@1 and cons@k"})
    difficulty: int | None = field(default=1, metadata={"help": "task difficulty (none = mixed)"})
    template: str = field(default="r1", metadata={"help": "r1 (chat template) or r1-zero (plain prompt)"})
    temperature: float = field(default=0.6, metadata={"help": "sampling temperature (R1 report: 0.6)"})
    top_p: float = field(default=0.95, metadata={"help": "nucleus sampling (R1 report: 0.95)"})
    max_tokens: int = field(default=128, metadata={"help": "max new tokens per completion"})
    greedy: bool = field(default=True, metadata={"help": "also decode greedily"})
    max_batch: int = field(default=256, metadata={"help": "rows decoded together"})
    seed: int = field(default=0, metadata={"help": "seed for questions and sampling"})
    out: str = field(default="", metadata={"help": "write eval.json + eval.md here (dir or .json path)"})
    speculative: bool = field(default=False, metadata={
        "help": "MTP self-speculative decoding (MoE models with MTP; same outputs), reports its acceptance rate"})
    device: str = field(default="auto", metadata={"help": "auto | cpu | cuda | cuda:N"})


def run(opts: Options) -> dict:
    if not opts.model:
        raise SystemExit("eval: a model directory is required")
    torch.manual_seed(opts.seed)
    samples = eval_samples(resolve_all(opts.tasks, opts.prompt_field, opts.answer_field), opts.n, opts.difficulty,
                           opts.seed)  # task and file errors come before the model's
    tok = load_tokenizer(opts.model)
    print(f"eval: {describe_template(tok, opts.template)}", flush=True)
    report = evaluate(opts.model, tokenizer=tok, samples=samples, n=opts.n, k=opts.k, difficulty=opts.difficulty,
                      template=opts.template, temperature=opts.temperature, top_p=opts.top_p,
                      max_tokens=opts.max_tokens, seed=opts.seed, greedy=opts.greedy, max_batch=opts.max_batch,
                      speculative=opts.speculative, device=str(resolve_device(opts.device)))
    print(to_markdown(report))
    acc = report.get("mtp_acceptance")
    print(f"({report['time_s']:.1f}s" + (f", MTP draft acceptance {acc:.1%})" if acc is not None else ")"))
    if opts.out:
        js, md = write_report(report, opts.out)
        print(f"wrote {js} and {md}")
    return report
