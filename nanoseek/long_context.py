"""`nanoseek long-eval`: accuracy against context length, the check for context extension (`nanoseek extend`).

Two probes, each at multiples of the length the model was trained at:

  passkey   filler text (task documents) with "The pass key is 48213. Remember it." at a random
            depth; the sequence ends "What is the pass key? The pass key is 48213" and the digits
            are scored: retrieval across the whole context.
  task      the same filler, then a held-out chat question (test split) and its worked solution;
            the whole assistant turn (chain of thought and answer) is scored: the model must still
            reason with a long stretch of unrelated text before the question.
  far loss  the next-token loss over the second half of long documents: positions past the trained
            length are where a model without context extension breaks down first.

Both are scored by teacher forcing: a sample is right when the model's argmax at every scored
position is the reference token, which is exactly when greedy decoding writes the reference. One
forward pass per sample and no sampling noise, so "before" and "after" differ by the model only.
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from nanoseek.data.coldstart import SOLVERS, coldstart_record
from nanoseek.data.corpus import iter_documents
from nanoseek.data.tasks import mix
from nanoseek.errors import UsageError
from nanoseek.hf.load import from_pretrained
from nanoseek.tokenizer import load_tokenizer

PROBES = ("passkey", "task")
METRICS = (*PROBES, "far_loss")
LABELS = {"passkey": "pass key", "task": "task", "far_loss": "far-half loss"}


@dataclass
class Probe:
    """One scored sequence: ids [L] and the positions (indices into ids) whose token is scored."""
    ids: list[int]
    scored: list[int]


class ProbeBuilder:
    """Builds passkey and task-at-depth sequences of an exact token length for one tokenizer."""

    def __init__(self, tok, tasks: list[str], difficulty: int, seed: int = 0, n_filler: int = 2000):
        self.tok, self.tasks, self.difficulty = tok, tasks, difficulty
        docs = iter_documents(n_filler, seed=seed + 7919, tasks=tasks, max_difficulty=difficulty)
        self.filler = [ids for ids in tok.encode_batch([d + "\n\n" for d in docs]) if ids]

    def _filler(self, n: int, rng: random.Random) -> list[list[int]]:
        """Whole filler documents totalling exactly n tokens (the last one cut)."""
        out, left = [], n
        while left > 0:
            doc = rng.choice(self.filler)[:left]
            out.append(doc)
            left -= len(doc)
        return out

    def _frame(self, tail: list[int], length: int) -> tuple[list[int], int]:
        """The head ([bos] or nothing) and how many filler tokens make head + filler + tail `length` long."""
        head = [self.tok.bos_id] if self.tok.bos_id is not None else []
        n = length - len(head) - len(tail)
        if n < 0:
            raise UsageError(f"long-eval: length {length} is shorter than the probe itself ({len(head) + len(tail)} "
                             "tokens): give longer lengths")
        return head, n

    def long_document(self, length: int, rng: random.Random) -> list[int]:
        """[bos] + task documents chained into one document of exactly `length` tokens."""
        head, n = self._frame([], length)
        return head + [t for d in self._filler(n, rng) for t in d]

    def passkey(self, length: int, rng: random.Random) -> Probe:
        key = f"{rng.randrange(10_000, 100_000)}"
        needle = self.tok.encode(f"The pass key is {key}. Remember it.\n\n")
        question = self.tok.encode("What is the pass key? The pass key is ")
        answer = self.tok.encode(key)
        head, n = self._frame(needle + question + answer, length)
        docs = self._filler(n, rng)
        at = rng.randrange(len(docs) + 1)  # the needle's depth, at a document boundary
        body = [t for d in docs[:at] for t in d] + needle + [t for d in docs[at:] for t in d]
        ids = head + body + question + answer
        return Probe(ids, list(range(len(ids) - len(answer), len(ids))))

    def task(self, length: int, sample) -> Probe:
        ids, mask = self.tok.encode_chat(coldstart_record(sample)["messages"])
        if self.tok.bos_id is not None and ids and ids[0] == self.tok.bos_id:
            ids, mask = ids[1:], mask[1:]
        head, n = self._frame(ids, length)
        rng = random.Random(f"task-filler/{length}/{sample.prompt}")
        full = head + [t for d in self._filler(n, rng) for t in d] + ids
        start = len(full) - len(ids)
        return Probe(full, [start + i for i, m in enumerate(mask) if m])

    def probes(self, kind: str, length: int, n: int, seed: int = 0) -> list[Probe]:
        rng = random.Random(f"{kind}/{length}/{seed}")
        if kind == "passkey":
            return [self.passkey(length, rng) for _ in range(n)]
        samples = mix(self.tasks, n, "test", self.difficulty, seed)
        return [self.task(length, s) for s in samples]


@torch.no_grad()
def score(model, probes: list[Probe], batch_size: int = 4) -> float:
    """Share of probes whose every scored token is the model's argmax (greedy would write it)."""
    device = next(model.parameters()).device
    right = 0
    for i in range(0, len(probes), batch_size):
        chunk = probes[i:i + batch_size]
        ids = torch.tensor([p.ids for p in chunk], device=device)
        pred = model(ids[:, :-1]).argmax(-1)  # pred[:, j] is the guess for ids[:, j + 1]
        for b, p in enumerate(chunk):
            at = torch.tensor(p.scored, device=device)
            right += bool((pred[b, at - 1] == ids[b, at]).all())
    return right / max(1, len(probes))


@torch.no_grad()
def far_loss(model, rows: list[list[int]], batch_size: int = 4) -> float:
    """Mean next-token loss (nats) over the second half of each row's positions: how well the model
    predicts text far into a long context, where positions past its trained length first appear."""
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for i in range(0, len(rows), batch_size):
        ids = torch.tensor(rows[i:i + batch_size], device=device)
        logits = model(ids[:, :-1]).float()
        half = logits.shape[1] // 2
        nll = F.cross_entropy(logits[:, half:].flatten(0, 1), ids[:, half + 1:].flatten(), reduction="sum")
        total, count = total + nll.item(), count + ids[:, half + 1:].numel()
    return total / max(1, count)


def evaluate_lengths(model, builder: ProbeBuilder, lengths: list[int], n: int, seed: int = 0,
                     progress=print) -> dict:
    """{"passkey": {length: acc}, "task": {length: acc}, "far_loss": {length: nats}} for each length
    (the loss on min(n, 8) long documents)."""
    model.eval()
    out: dict[str, dict[int, float]] = {k: {} for k in METRICS}
    for length in lengths:
        for kind in PROBES:
            out[kind][length] = score(model, builder.probes(kind, length, n, seed))
        rng = random.Random(f"far-loss/{length}/{seed}")
        out["far_loss"][length] = far_loss(model, [builder.long_document(length + 1, rng) for _ in range(min(n, 8))])
        progress(f"  length {length:>6}: passkey {out['passkey'][length]:6.1%}   task {out['task'][length]:6.1%}   "
                 f"loss over the far half {out['far_loss'][length]:.3f}")
    return out


def table(results: dict[str, dict], base_len: int) -> str:
    """Markdown table of {model: evaluate_lengths(...)}: one row per length, one column per (model, metric)."""
    names = list(results)
    lengths = sorted({L for r in results.values() for L in r["passkey"]})

    def cell(m: str, k: str, L: int) -> str:
        v = results[m][k].get(L, float("nan"))
        return f"{v:.3f}" if k == "far_loss" else f"{v:.0%}"

    head = "| length | × trained | " + " | ".join(f"{m}: {LABELS[k]}" for m in names for k in METRICS) + " |"
    rule = "|---:|---:|" + "---:|" * (len(names) * len(METRICS))
    rows = [f"| {L} | {L / base_len:g} | " + " | ".join(cell(m, k, L) for m in names for k in METRICS) + " |"
            for L in lengths]
    return "\n".join([head, rule, *rows])


def plot(results: dict[str, dict], base_len: int, path: Path) -> Path:
    """Accuracy (left) and far-half loss (right) against length on a log2 axis, one line per model and probe."""
    import matplotlib  # optional heavy dependency, only for the picture
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (acc, loss) = plt.subplots(1, 2, figsize=(10, 3.6))
    for m, r in results.items():
        for kind, style in zip(PROBES, ("-o", "--s")):
            xs = sorted(r[kind])
            acc.plot([x / base_len for x in xs], [100 * r[kind][x] for x in xs], style, label=f"{m}: {LABELS[kind]}")
        xs = sorted(r["far_loss"])
        loss.plot([x / base_len for x in xs], [r["far_loss"][x] for x in xs], "-o", label=m)
    for ax in (acc, loss):
        ax.set_xscale("log", base=2)
        ax.set_xlabel(f"context length (× the trained {base_len} tokens)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    acc.set_ylabel("accuracy %")
    acc.set_ylim(-3, 103)
    loss.set_ylabel("loss over the far half (nats/token)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def default_tasks(tasks: list[str]) -> list[str]:
    tasks = tasks or ["add", "sub", "compare", "max"]
    if unknown := [t for t in tasks if t not in SOLVERS]:
        raise UsageError(f"long-eval --tasks: no worked solutions for {', '.join(unknown)}; "
                         f"have {', '.join(SOLVERS)}")
    return tasks


POSITIONAL = (("model", "model directory (HF layout with tokenizer); or --model", True),)


@dataclass
class Options:
    model: str = field(default="", metadata={"help": "model directory (HF layout with tokenizer)"})
    base_len: int = field(default=256, metadata={"help": "the sequence length the model was trained at"})
    multiples: list[int] = field(default_factory=lambda: [1, 2, 4, 8], metadata={
        "help": "lengths to test, as multiples of --base-len, comma separated"})
    n: int = field(default=50, metadata={"help": "probes per length and kind"})
    tasks: list[str] = field(default_factory=list, metadata={
        "help": "tasks of the filler and the task probe (default add,sub,compare,max)"})
    difficulty: int = field(default=2, metadata={"help": "task difficulty of filler and questions"})
    seed: int = field(default=0, metadata={"help": "probe seed"})
    out: str = field(default="", metadata={"help": "folder for long_context.json and the plot (default: none)"})


def run(opts: Options) -> None:
    if not opts.model:
        raise UsageError("long-eval: a model directory is required: nanoseek long-eval DIR")
    tok = load_tokenizer(opts.model)
    model = from_pretrained(opts.model)
    lengths = [opts.base_len * m for m in opts.multiples]
    print(f"long-eval: {opts.model}, lengths {lengths}, {opts.n} probes each")
    builder = ProbeBuilder(tok, default_tasks(opts.tasks), opts.difficulty, opts.seed)
    res = {"model": evaluate_lengths(model, builder, lengths, opts.n, opts.seed)}
    print(table(res, opts.base_len))
    if opts.out:
        out = Path(opts.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "long_context.json").write_text(json.dumps(res, indent=2) + "\n")
        png = plot(res, opts.base_len, out / "long_context.png")
        print(f"  results: {out / 'long_context.json'}\n  plot:    {png}")
