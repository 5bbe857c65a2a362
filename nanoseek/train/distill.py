"""`nanoseek distill --teacher DIR`: distil a (MoE) teacher into the dense Qwen2-style student.

Two methods, run on the same packed teacher traces so they compare in one report:

  sft    : plain SFT on the teacher's correct reasoning traces (rejection sampling output).
           This is all the R1 report does for its Distill-Qwen/Llama models.
  logits : forward KL(teacher || student) on the teacher's top-k next-token distribution at
           every assistant token (teacher run under no_grad on the same sequences), optionally
           mixed with the SFT cross-entropy: loss = (1 - alpha) * KL + alpha * CE.
  both   : train one student per method from the same init on the same batches, then compare.

Top-k KL: storing full teacher distributions is what makes logit distillation expensive at
scale (vocab 129K), so only the top-k log-probs are used. By default the teacher's remaining
mass is kept as one extra "rest of the vocabulary" bucket on both sides: the k+1 buckets sum
to 1 without renormalizing, and the student is also taught how much mass belongs outside the
top-k (with plain renormalization over the top-k it never is, and the logits of all other
tokens drift freely). `--no-kd-tail` gives the plain renormalized version.

The run folder holds traces.jsonl (when generated), one sub-folder per method (metrics.jsonl,
plots/, final/ in HF Qwen2 layout with the tokenizer), distill.json and report.md.
"""
from __future__ import annotations

import inspect
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from nanoseek.config import get_student_preset
from nanoseek.errors import UsageError
from nanoseek.eval import evaluate
from nanoseek.kernels import speedup
from nanoseek.hf.load import build_model, from_pretrained
from nanoseek.tokenizer import load_tokenizer
from nanoseek.train import distributed
from nanoseek.train.data import BatchIterator, make_batch, pack_examples
from nanoseek.train.pretrain import finish, start_run
from nanoseek.train.rejection import rejection_sample
from nanoseek.train.run_options import stage_default
from nanoseek.train.sft import encode_records, read_chat_jsonl
from nanoseek.train.trainer import TrainOptions, Trainer, resolve_device, seed_everything

METHODS = ("sft", "logits")


@dataclass
class Options(TrainOptions):
    teacher: str = field(default="", metadata={"help": "teacher model directory (HF layout, with tokenizer)"})
    data: str = field(default="", metadata={
        "help": "teacher traces, chat JSONL (default: rejection-sample them from the teacher)"})
    method: str = field(default="sft", metadata={"help": "sft | logits | both"})
    alpha: float = field(default=0.0, metadata={"help": "logits: weight of the SFT cross-entropy in the loss"})
    top_k: int = field(default=20, metadata={"help": "logits: teacher log-probs kept per token"})
    kd_tail: bool = field(default=True, metadata={
        "help": "logits: keep the teacher's mass outside the top-k as one bucket (else renormalize)"})
    student: str = field(default="", metadata={"help": "initialize the student from this Qwen2 dir"})
    student_preset: str = field(default="tiny", metadata={"help": "student preset when --student is not given"})
    student_overrides: dict = field(default_factory=dict, metadata={
        "help": 'JSON of DenseConfig fields to override, e.g. {"num_hidden_layers": 2}', "metavar": "JSON"})
    n_prompts: int = field(default=500, metadata={"help": "prompts to rejection-sample when --data is absent"})
    val_frac: float = field(default=0.05, metadata={"help": "traces held out to compare the methods"})
    eval_n: int = field(default=0, metadata={"help": "if > 0: nanoseek eval each student (and the teacher) "
                                                     "on this many test questions per task"})
    steps: int = field(default=200, metadata={"help": "optimizer steps per method"})
    warmup_steps: int = stage_default(TrainOptions, "warmup_steps", 10)


# --------------------------------------------------------------------------------------------
# the losses

def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum() / mask.sum().clamp_min(1.0)


def teacher_topk(teacher_logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The teacher's top-k log-probs (of the full softmax) and their token ids, [B, T, k] each."""
    return torch.log_softmax(teacher_logits.float(), -1).topk(k, dim=-1)


def _with_rest(logp: torch.Tensor) -> torch.Tensor:
    """Append log(1 - sum(p)) as bucket k+1 (clamped: the teacher may put ~all mass on its top-k)."""
    rest = torch.log1p(-torch.logsumexp(logp, -1, keepdim=True).exp().clamp(max=1 - 1e-6))
    return torch.cat([logp, rest], -1)


def topk_kl(student_logits: torch.Tensor, t_logp: torch.Tensor, t_idx: torch.Tensor, mask: torch.Tensor,
            tail: bool = True) -> torch.Tensor:
    """Forward KL(teacher || student) over the teacher's top-k tokens (+ the rest bucket if tail),
    averaged over the masked positions. 0 iff the student matches the teacher there."""
    s_logp = torch.log_softmax(student_logits.float(), -1).gather(-1, t_idx)
    if tail:
        t, s = _with_rest(t_logp), _with_rest(s_logp)
    else:
        t, s = torch.log_softmax(t_logp, -1), torch.log_softmax(s_logp, -1)
    kl = (t.exp() * (t - s)).sum(-1)
    return masked_mean(kl, mask.float())


def masked_ce(logits: torch.Tensor, batch: dict) -> torch.Tensor:
    """The student's cross-entropy on the batch's assistant tokens (the SFT loss)."""
    mask = batch["loss_mask"].float()
    return masked_mean(F.cross_entropy(logits.float().flatten(0, 1), batch["targets"].flatten(),
                                       reduction="none").view_as(mask), mask)


def logits_step(teacher: torch.nn.Module, top_k: int, alpha: float, tail: bool):
    """A Trainer step_fn: teacher top-k under no_grad, then KL (+ alpha * CE) for the student."""
    def step(model, batch, trainer=None):
        x, doc, mask = batch["input_ids"], batch.get("doc_ids"), batch["loss_mask"].float()
        with torch.no_grad():
            t_logits = teacher(x, doc_ids=doc)[..., :model.config.vocab_size]
            t_logp, t_idx = teacher_topk(t_logits, top_k)
            del t_logits  # free the [B, T, vocab] tensor before the student's forward
        s_logits = model(x, doc_ids=doc)
        kl = topk_kl(s_logits, t_logp, t_idx, mask, tail)
        ce = masked_ce(s_logits, batch)
        return {"loss": (1 - alpha) * kl + alpha * ce, "kl": kl, "ce": ce}
    return step


@torch.no_grad()
def validate(student, teacher, batches: list[dict], top_k: int, tail: bool) -> dict:
    """Held-out assistant-token CE and top-k KL to the teacher: the same yardstick for both methods.
    teacher None (its vocabulary is not the student's): the CE alone."""
    student.eval()
    if teacher is None:
        rows = [{"ce": masked_ce(student(b["input_ids"], doc_ids=b.get("doc_ids")), b)} for b in batches]
    else:
        step = logits_step(teacher, top_k, 0.0, tail)
        rows = [step(student, b) for b in batches]
    student.train()
    out = {"val_ce": sum(r["ce"].item() for r in rows) / len(rows)}
    if teacher is not None:
        out["val_kl"] = sum(r["kl"].item() for r in rows) / len(rows)
    return out


def same_vocabulary(a, b) -> bool:
    """Do two tokenizers map every token to the same id (logit distillation compares ids)?"""
    return a.tk.get_vocab(with_added_tokens=True) == b.tk.get_vocab(with_added_tokens=True)


# --------------------------------------------------------------------------------------------
# data and models

def teacher_traces(opts: Options, out: Path) -> Path:
    """opts.data, or correct teacher traces sampled with rejection sampling into out/traces.jsonl
    (by rank 0 alone under torchrun; the others wait and read its file)."""
    if opts.data:
        return Path(opts.data)
    # pass only the arguments this version of rejection_sample knows (its options may grow)
    wanted = {"out": out / "traces.jsonl", "out_path": out / "traces.jsonl", "n_prompts": opts.n_prompts,
              "n": opts.n_prompts, "seed": opts.seed}
    params = inspect.signature(rejection_sample).parameters
    path = None
    if distributed.is_main():
        path = str(rejection_sample(opts.teacher, **{k: v for k, v in wanted.items() if k in params}))
    return Path(distributed.broadcast(path))


def make_student(opts: Options, vocab_size: int, tok):
    if opts.student:
        return from_pretrained(opts.student)
    cfg = get_student_preset(opts.student_preset).replace(**opts.student_overrides).replace(
        vocab_size=vocab_size, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)
    if cfg.max_position_embeddings < opts.seq_len + 1:
        cfg = cfg.replace(max_position_embeddings=opts.seq_len + 1)
    seed_everything(opts.seed)  # the same init for every method
    return build_model(cfg)


def _split(examples: list, val_frac: float) -> tuple[list, list]:
    n_val = max(1, int(len(examples) * val_frac)) if len(examples) > 1 else 0
    return examples[n_val:], examples[:n_val]


# --------------------------------------------------------------------------------------------

def distill(opts: Options) -> Path:
    """Train the student(s); returns the final student directory (method 'both': the sft one).
    The run folder (its parent's parent) holds distill.json and report.md comparing the methods."""
    if not opts.teacher:
        raise SystemExit("distill: --teacher DIR is required")
    methods = list(METHODS) if opts.method == "both" else [opts.method]
    if any(m not in METHODS for m in methods):
        raise SystemExit(f"distill: --method must be sft, logits or both, got {opts.method!r}")
    t_start = time.time()
    teacher_tok = load_tokenizer(opts.teacher)
    # traces are text: a student with its own tokenizer learns them re-tokenized (SFT); logits need one vocabulary
    tok = load_tokenizer(opts.student) if opts.student else teacher_tok
    shared_vocab = same_vocabulary(tok, teacher_tok)
    if "logits" in methods and not shared_vocab:
        raise UsageError(f"logit distillation compares token ids, but the student {opts.student} has another "
                         f"vocabulary than the teacher: use --method sft (training on the teacher's traces), or a "
                         f"student with the teacher's tokenizer")
    given = read_chat_jsonl(opts.data) if opts.data else None  # a bad --data file fails here, folder-less
    out = start_run(opts, "distill")  # after the checks: a refused run leaves no folder behind
    device = resolve_device(opts.device)
    teacher = from_pretrained(opts.teacher).to(device).eval().requires_grad_(False)
    speedup(teacher, for_="train")  # its no-grad forward takes the batched expert kernels
    traces = teacher_traces(opts, out)
    train_ex, val_ex = _split(encode_records(tok, given if given is not None else read_chat_jsonl(traces)), opts.val_frac)
    data = pack_examples(train_ex, opts.seq_len, tok.pad_id)
    val = pack_examples(val_ex, opts.seq_len, tok.pad_id) if val_ex else None
    val_batches = [{k: v.to(device) for k, v in make_batch(val, torch.arange(i, min(i + opts.batch_size, len(val)))).items()}
                   for i in range(0, len(val), opts.batch_size)] if val else []
    print(f"distill: teacher {opts.teacher}, {len(train_ex)} traces from {traces} in {len(data)} rows "
          f"(+{len(val_ex)} held out), methods {', '.join(methods)}, run folder {out}")

    results, finals = {}, {}
    for method in methods:
        t0 = time.time()
        student = make_student(opts, len(tok), tok)
        step = None if method == "sft" else logits_step(teacher, opts.top_k, opts.alpha, opts.kd_tail)
        trainer = Trainer(student, opts, BatchIterator(data, opts.batch_size, seed=opts.seed), out / method, step)
        if method == "sft":
            print(f"student: {student.num_parameters() / 1e6:.2f}M parameters (teacher "
                  f"{teacher.num_parameters() / 1e6:.2f}M), device {trainer.device}")
        row = trainer.fit()
        finals[method] = finish(trainer, opts, out / method, tok, row, f"distill ({method})", t0)
        first = json.loads((out / method / "metrics.jsonl").read_text().splitlines()[0])
        results[method] = {"first_loss": first["loss"], "last_loss": row["loss"], "time_s": time.time() - t0,
                           "tokens_per_s": row["tokens_per_s"], "model": str(finals[method]),
                           **(validate(trainer.model, teacher if shared_vocab else None, val_batches, opts.top_k,
                                       opts.kd_tail)
                              if val_batches else {})}
    if not distributed.is_main():  # the report is rank 0's
        return finals["sft" if "sft" in finals else methods[0]]
    if opts.eval_n > 0:
        for name, path in [("teacher", opts.teacher), *finals.items()]:
            r = evaluate(str(path), n=opts.eval_n, seed=opts.seed)
            results.setdefault(name, {})["eval"] = r["overall"]
    summary = {"teacher": opts.teacher, "traces": str(traces), "n_train": len(train_ex), "n_val": len(val_ex),
               "steps": opts.steps, "top_k": opts.top_k, "alpha": opts.alpha, "kd_tail": opts.kd_tail,
               "results": results, "time_s": time.time() - t_start}
    (out / "distill.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out / "report.md").write_text(report_markdown(summary))
    print(report_markdown(summary))
    return finals["sft" if "sft" in finals else methods[0]]


def report_markdown(s: dict) -> str:
    def f(v, pct=False):
        return "–" if v is None else f"{100 * v:.1f}" if pct else f"{v:.3f}"
    lines = [f"## Distillation of `{s['teacher']}`", "",
             f"{s['n_train']} teacher traces ({s['n_val']} held out), {s['steps']} steps per method; "
             f"logits: top-{s['top_k']} forward KL, alpha {s['alpha']}, tail bucket {s['kd_tail']}", "",
             "| method | train loss first → last | held-out CE | held-out top-k KL | pass@1 % | greedy % | "
             "format errors % | time s |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    for name, r in s["results"].items():
        e = r.get("eval", {})
        loss = f"{r['first_loss']:.3f} → {r['last_loss']:.3f}" if "first_loss" in r else "–"  # teacher: eval only
        secs = f"{r['time_s']:.0f}" if "time_s" in r else "–"
        lines.append(f"| {name} | {loss} | {f(r.get('val_ce'))} | {f(r.get('val_kl'))} | {f(e.get('pass@1'), True)} "
                     f"| {f(e.get('greedy'), True)} | {f(e.get('format_error'), True)} | {secs} |")
    return "\n".join(lines) + "\n"


def run(opts: Options) -> None:
    distill(opts)
