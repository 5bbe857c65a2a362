"""Pretraining documents: worked task problems, plus any text the user brings.

A base model only learns to reason in RL if it has seen question -> reasoning -> answer
patterns before (R1-Zero works on a base model pretrained on web text full of worked
solutions). Our web text is the task generators: each problem is written out with its
worked solution, in a few surface forms, at a mix of difficulties:
  * the R1 chat rendering (so the template's tokens are familiar before SFT),
  * the R1-Zero plain-text form: R1-Zero's own prompt, instruction preamble included, then the reasoning
    and the <think> / <answer> tags (a tiny base that never read the preamble answers that prompt with
    noise, 0 % and no format, though it writes the format for the bare "User: ... Assistant: <think>"),
  * plain "Question / Solution / Answer" text.
User files (txt, JSONL with a `text` field, Parquet, HF `datasets` dirs) are mixed in as is.
The same documents train the tokenizer.
"""
from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Iterator

from nanoseek.data.chat import format_r1_zero_prompt, render_chat
from nanoseek.data.coldstart import SOLVERS, coldstart_record, worked_solution
from nanoseek.data.tasks import mix


def render_document(sample, style: str) -> str:
    reasoning = worked_solution(sample)
    if style == "chat":
        return render_chat(coldstart_record(sample)["messages"])
    if style == "zero":
        return format_r1_zero_prompt(sample.prompt) + f"\n{reasoning}\n</think>\n<answer>{sample.answer}</answer>"
    return f"Question: {sample.prompt}\nSolution:\n{reasoning}\nAnswer: {sample.answer}"


STYLES = ("chat", "zero", "plain")


def iter_text_file(path: str | Path, text_field: str = "text") -> Iterator[str]:
    """Documents from one file or dataset folder: a .txt file is split on blank lines."""
    p = Path(path)
    if p.is_dir():
        import datasets  # the data extra: only dataset folders need it
        ds = datasets.load_from_disk(str(p))
        if isinstance(ds, datasets.DatasetDict):
            ds = ds["train"] if "train" in ds else next(iter(ds.values()))
        yield from (r[text_field] for r in ds if r.get(text_field))
    elif p.suffix == ".parquet":
        import pyarrow.parquet as pq  # the data extra: only Parquet files need it
        yield from (t for t in pq.read_table(p, columns=[text_field]).column(text_field).to_pylist() if t)
    elif p.suffix in (".jsonl", ".json"):
        with p.open() as f:
            for line in f:
                if line.strip():
                    t = json.loads(line).get(text_field)
                    if t:
                        yield t
    else:
        yield from (d.strip() for d in p.read_text().split("\n\n") if d.strip())


def iter_documents(n_docs: int, seed: int = 0, tasks: list[str] | None = None, difficulty: int | None = None,
                   files: list[str] | None = None, split: str = "train", max_difficulty: int | None = None) -> Iterator[str]:
    """n_docs task documents (train split only, so eval problems are never pretrained on), levels up to
    max_difficulty when given, followed by every document of `files`."""
    rng = random.Random(f"corpus/{seed}")
    for sample in mix(list(tasks or SOLVERS), n_docs, split, difficulty, seed, max_difficulty):  # shuffled mixture
        yield render_document(sample, rng.choice(STYLES))
    for f in files or []:
        yield from iter_text_file(f)


def default_corpus(n_docs: int = 20000, seed: int = 0) -> list[str]:
    """The corpus the speedrun pretrains on and trains its tokenizer with."""
    return list(iter_documents(n_docs, seed))
