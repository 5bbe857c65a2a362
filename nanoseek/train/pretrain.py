"""`nanoseek pretrain`: train the DeepSeek-V3 MoE model (next-token + MTP loss) on the task corpus.

Defaults are sized for a CPU: preset tiny, a tokenizer trained on the default
corpus, 300 steps of 8 x 256 tokens. Writes the run folder: config.yaml, metrics.jsonl,
checkpoints/, plots/*.png, cost.json and final/ (HF layout, with the tokenizer).
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from nanoseek.config import get_preset
from nanoseek.cost import summarize_run
from nanoseek.data.coldstart import require_solvers
from nanoseek.data.corpus import iter_documents
from nanoseek.hardware import device_peak_flops
from nanoseek.hf.load import build_model
from nanoseek.options import save_options
from nanoseek.tokenizer import load_tokenizer, train_tokenizer
from nanoseek.train import distributed
from nanoseek.train.data import BatchIterator, pack_stream
from nanoseek.train.plots import plot_metrics
from nanoseek.train.trainer import TrainOptions, Trainer, resolve_device, seed_everything


@dataclass
class Options(TrainOptions):
    preset: str = field(default="tiny", metadata={"help": "model preset (tiny, small, deepseek-v3)"})
    model_overrides: dict = field(default_factory=dict, metadata={
        "help": 'JSON of ModelConfig fields to override, e.g. {"hidden_size": 128}', "metavar": "JSON"})
    tokenizer: str = field(default="", metadata={"help": "tokenizer dir (default: train one on the corpus)"})
    vocab_size: int = field(default=4096, metadata={"help": "vocab size when training the tokenizer"})
    n_docs: int = field(default=20000, metadata={"help": "documents drawn from the built-in task corpus"})
    tasks: list[str] = field(default_factory=list, metadata={
        "help": "tasks of the built-in corpus, comma separated (default: every task with worked solutions)"})
    max_difficulty: int = field(default=0, metadata={
        "help": "highest task difficulty in the built-in corpus (0 = each task's whole range)"})
    data: list[str] = field(default_factory=list, metadata={
        "help": "extra text files (txt / JSONL 'text' / Parquet / HF dataset dirs), comma separated"})


def run_dir(out: str, stage: str) -> Path:
    return Path(out) if out else Path("runs") / f"{stage}-{time.strftime('%Y%m%d-%H%M%S')}"


def start_run(opts, stage: str) -> Path:
    """Every stage starts alike: the run folder, its config.yaml (the resolved options), the seed.
    Under torchrun the ranks join the process group first and share rank 0's run folder."""
    if distributed.wanted(opts):
        distributed.join(opts, resolve_device(opts.device))
    out = Path(distributed.broadcast(str(run_dir(opts.out, stage))))  # default name has the time: rank 0's
    if distributed.is_main():
        out.mkdir(parents=True, exist_ok=True)
        save_options(opts, out / "config.yaml")
    distributed.barrier()
    seed_everything(opts.seed)  # the same on every rank: identical initial weights
    return out


def encode_documents(tok, docs: list[str]) -> list[list[int]]:
    """Every document framed as <bos> ... <eos> (chat-rendered documents already carry both; a tokenizer
    without a bos token, as Qwen's, frames them with eos alone)."""
    out = []
    for ids in tok.encode_batch(docs):
        if tok.bos_id is not None and (not ids or ids[0] != tok.bos_id):
            ids = [tok.bos_id] + ids
        if not ids or ids[-1] != tok.eos_id:
            ids = ids + [tok.eos_id]
        out.append(ids)
    return out


def write_cost(trainer: Trainer, out: Path, opts: TrainOptions, row: dict) -> dict:
    """cost.json: measured tokens/s, achieved FLOP/s, MFU against the measured matmul peak, dollars, dtype."""
    peak = device_peak_flops(trainer.device, trainer.amp_dtype)  # the dtype the matmuls actually ran in
    cost = summarize_run(trainer.model.config, row.get("tokens", 0), row.get("elapsed", 0.0), opts.seq_len,
                         peak_flops=peak * trainer.world)  # tokens are counted over all ranks
    cost["dtype"] = trainer.dtype_choice.to_dict()  # what the tokens/s were measured in, and why that dtype
    (out / "cost.json").write_text(json.dumps(cost, indent=2) + "\n")
    return cost


def finish(trainer: Trainer, opts: TrainOptions, out: Path, tok, row: dict, stage: str, t0: float) -> Path:
    """Shared end of a run: final HF model, plots, cost.json, and a summary of where things went.
    Every rank calls it (the export gathers the shards); rank 0 writes."""
    final = out / "final"
    trainer.save_pretrained(final, tokenizer=tok)
    if not distributed.is_main():
        return final
    plots = plot_metrics(out / "metrics.jsonl", out / "plots")
    cost = write_cost(trainer, out, opts, row)
    first = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    print(f"{stage} done in {time.time() - t0:.0f}s: loss {first['loss']:.3f} -> {row.get('loss', float('nan')):.3f}, "
          f"{cost['tokens_per_s']:,.0f} tokens/s, MFU {cost.get('mfu', 0):.1%}")
    print(f"  model (HF layout): {final}\n  metrics:           {out / 'metrics.jsonl'}\n"
          f"  plots:             {', '.join(p.name for p in plots)} in {out / 'plots'}\n"
          f"  checkpoints:       {trainer.ckpt_dir}\n  cost:              {out / 'cost.json'}\n"
          f"  config:            {out / 'config.yaml'}")
    return final


def pretrain(opts: Options) -> Path:
    """Run pretraining; returns the final model directory (HF layout, with tokenizer)."""
    t0 = time.time()
    require_solvers(opts.tasks, "pretrain")  # before the run folder exists
    out = start_run(opts, "pretrain")
    print(f"pretrain: run folder {out}")
    docs = list(iter_documents(opts.n_docs, seed=opts.seed, tasks=opts.tasks or None, files=opts.data,
                               max_difficulty=opts.max_difficulty or None))
    if opts.tokenizer:
        tok = load_tokenizer(opts.tokenizer)
        print(f"tokenizer: {opts.tokenizer} (vocab {tok.vocab_size})")
    else:
        if distributed.is_main():  # one writer; the other ranks read its files
            train_tokenizer(docs, opts.vocab_size, out / "tokenizer")
        distributed.barrier()
        tok = load_tokenizer(out / "tokenizer")
        print(f"tokenizer: trained on {len(docs)} documents, vocab {tok.vocab_size} -> {out / 'tokenizer'}")
    data = pack_stream(encode_documents(tok, docs), opts.seq_len)
    print(f"data: {len(docs)} documents, {data.tokens.numel():,} tokens in {len(data)} rows of {opts.seq_len + 1}; "
          f"{opts.steps} steps x {opts.batch_size * opts.grad_accum * opts.seq_len:,} tokens = "
          f"{opts.steps * opts.batch_size * opts.grad_accum / len(data):.1f} epochs")
    cfg = get_preset(opts.preset).replace(**opts.model_overrides).replace(
        vocab_size=tok.vocab_size, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)
    if cfg.max_position_embeddings < opts.seq_len:
        cfg = cfg.replace(max_position_embeddings=opts.seq_len)
    model = build_model(cfg)
    batches = BatchIterator(data, opts.batch_size, seed=opts.seed)
    trainer = Trainer(model, opts, batches, out)
    print(f"model: {model.num_parameters() / 1e6:.2f}M parameters ({model.num_parameters(active=True) / 1e6:.2f}M "
          f"active), device {trainer.device}, autocast {trainer.amp_dtype or 'off (fp32)'}")
    row = trainer.fit()
    return finish(trainer, opts, out, tok, row, "pretrain", t0)


def run(opts: Options) -> None:
    pretrain(opts)
