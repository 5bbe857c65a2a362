"""`nanoseek rejection-sample MODEL`: R1's stage 3 data. Sample k answers per prompt from the RL
model, keep only the correct, well-formed, single-language, finished ones, drop duplicates,
prefer the shortest (the most readable at this scale), and write them as SFT chat records:

    {"messages": [{"role": "user", "content": q},
                  {"role": "assistant", "reasoning_content": r, "content": a}]}

plus summary.json (prompts, kept share, mean lengths). `nanoseek sft --data FILE` trains on it.
"""
from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from nanoseek.data.chat import describe_template, parse_completion, prompt_opens_think
from nanoseek.data.sources import column_option, resolve_all, train_samples
from nanoseek.hf.load import from_pretrained
from nanoseek.rewards import RewardConfig, compute_reward
from nanoseek.tokenizer import load_tokenizer
from nanoseek.train.grpo import make_prompt
from nanoseek.train.pretrain import run_dir
from nanoseek.train.rollout import engine_rollout
from nanoseek.train.trainer import resolve_device

POSITIONAL = (("model", "model directory (HF layout with tokenizer), e.g. the final/ of a GRPO run"),)


@dataclass
class Options:
    model: str = field(default="", metadata={"help": "model directory to sample from"})
    out: str = field(default="", metadata={"help": "output directory (default: runs/rejection-<time>)"})
    mode: str = field(default="r1", metadata={"help": "prompt format: r1 (chat template) or r1-zero"})
    tasks: list[str] = field(default_factory=lambda: ["add"], metadata={
        "help": "comma separated: built-in tasks, gym:NAME (any reasoning-gym dataset), data files (.jsonl, .json, "
                ".parquet, .csv, datasets folders: every row is a prompt)"})
    prompt_field: str = column_option("prompt")
    answer_field: str = column_option("answer")
    difficulty: int = field(default=1, metadata={"help": "task difficulty (0 = each task's full range)"})
    n_prompts: int = field(default=256, metadata={"help": "prompts of the generated tasks (train split); files add all their rows"})
    k: int = field(default=8, metadata={"help": "answers sampled per prompt"})
    keep_per_prompt: int = field(default=1, metadata={"help": "kept answers per prompt (the shortest distinct ones)"})
    temperature: float = field(default=0.8, metadata={"help": "sampling temperature"})
    top_p: float = field(default=0.95, metadata={"help": "nucleus top-p"})
    max_new_tokens: int = field(default=128, metadata={"help": "completion length limit (unfinished ones are dropped)"})
    min_language: float = field(default=0.95, metadata={"help": "minimum language-consistency score to keep"})
    batch_prompts: int = field(default=16, metadata={"help": "prompts per sampling batch (x k sequences)"})
    seed: int = field(default=0, metadata={"help": "seed of prompts and sampling"})
    device: str = field(default="auto", metadata={"help": "auto | cpu | cuda | cuda:N"})


def _norm(text: str) -> str:
    return " ".join(text.split())


def select(sample, completions: list[str], finished: list[bool], o: Options, n_tokens: list[int],
           opened_think: bool = True) -> list[dict]:
    """The kept records for one prompt: correct + well formed + one language + finished, distinct
    (whitespace-insensitive), shortest first. opened_think: the prompt opened the think block."""
    cfg = RewardConfig(length=0.0)
    seen, good = set(), []
    for text, fin, n in zip(completions, finished, n_tokens):
        r = compute_reward(sample, text, cfg, prompt_opened_think=opened_think)
        if not fin or r.accuracy < 1 or r.format < 1 or r.language < o.min_language:
            continue
        p = parse_completion(text, opened_think=opened_think)
        key = (_norm(p.reasoning or ""), _norm(p.answer))
        if key in seen:
            continue
        seen.add(key)
        good.append((n, len(text), p))
    good.sort(key=lambda g: (g[0], g[1]))  # fewest tokens first; ties by characters (stable)
    return [{"messages": [{"role": "user", "content": sample.prompt},
                          {"role": "assistant", "reasoning_content": p.reasoning, "content": p.answer}]}
            for _, _, p in good[:o.keep_per_prompt]]


def rejection_sample(model_dir: str | Path, opts: Options | None = None, sampler: Callable | None = None,
                     **overrides) -> Path:
    """Write rejection.jsonl (+ summary.json) and return the JSONL path. `sampler(prompts, k, seed)
    -> token id lists` replaces the model's sampling (tests, other engines)."""
    o = dataclasses.replace(opts or Options(), model=str(model_dir), **overrides)
    t0 = time.time()
    # tasks and data files first: a bad one fails before the output folder exists or the model loads
    samples = train_samples(resolve_all(o.tasks, o.prompt_field, o.answer_field), o.n_prompts, o.difficulty or None,
                            o.seed)
    tok = load_tokenizer(model_dir)
    template = describe_template(tok, o.mode)
    if sampler is None:
        torch.manual_seed(o.seed)
        model = from_pretrained(model_dir).to(resolve_device(o.device)).eval()

        def sampler(prompts, k, seed):
            return engine_rollout(model, prompts, k, o.max_new_tokens, tok.stop_ids, o.temperature, 0, o.top_p, seed,
                                  tok.pad_id)
    out = run_dir(o.out, "rejection")  # after everything that can refuse the run
    out.mkdir(parents=True, exist_ok=True)
    records, n_prompts_kept, n_done = [], 0, 0
    opened = prompt_opens_think(tok, o.mode)
    print(f"rejection sampling: {template}")
    for b in range(0, len(samples), o.batch_prompts):
        batch = samples[b:b + o.batch_prompts]
        comps = sampler([make_prompt(tok, s.prompt, o.mode) for s in batch], o.k, o.seed * 1_000_003 + b)
        for i, s in enumerate(batch):
            group = comps[i * o.k:(i + 1) * o.k]
            texts = [tok.decode_completion(c) for c in group]
            kept = select(s, texts, [bool(c) and c[-1] in tok.stop_ids for c in group], o, [len(c) for c in group],
                          opened)
            records += kept
            n_prompts_kept += bool(kept)
        n_done += len(batch)
        print(f"rejection sampling: {n_done}/{len(samples)} prompts, {len(records)} kept", flush=True)
    path = out / "rejection.jsonl"
    with open(path, "w") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    mean = lambda xs: sum(xs) / len(xs) if xs else 0.0  # noqa: E731
    reasoning = [r["messages"][1]["reasoning_content"] for r in records]
    summary = {"model": str(model_dir), "prompts": len(samples), "samples": len(samples) * o.k, "kept": len(records),
               "kept_share_of_samples": len(records) / max(1, len(samples) * o.k),
               "prompts_with_a_kept_answer": n_prompts_kept / max(1, len(samples)),
               "mean_reasoning_tokens": mean([len(tok.encode(x)) for x in reasoning]),
               "mean_reasoning_chars": mean([len(x) for x in reasoning]), "seconds": time.time() - t0,
               "options": dataclasses.asdict(o)}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"kept {len(records)} of {summary['samples']} samples ({summary['kept_share_of_samples']:.1%}); "
          f"{summary['prompts_with_a_kept_answer']:.1%} of prompts have one; mean reasoning "
          f"{summary['mean_reasoning_tokens']:.0f} tokens -> {path}")
    return path


def run(opts: Options) -> None:
    if not opts.model:
        raise SystemExit("rejection-sample: MODEL is required")
    rejection_sample(opts.model, opts)
