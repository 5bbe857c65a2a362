"""`nanoseek extend`: the context-extension stage, DeepSeek-V3 report §4.3 at small scale.

V3 extends 4K -> 32K -> 128K with YaRN (rope scaling applied to the decoupled rope part of the
keys and queries only): scale factor 40, beta_fast 32, beta_slow 1, mscale = mscale_all_dim =
1.0 (so the softmax scale grows by (0.1 ln s + 1)^2), two short phases of 1000 steps each. Here:
one phase, from the length a model was trained at to `factor` times it.

  * the model is rebuilt with `rope_scaling` = YaRN and `max_position_embeddings` = the new
    length, the weights carried over unchanged; the exported config carries the scaling, so
    transformers and vLLM run the extended model with the same positions;
  * the data are long documents: task documents chained into one document per row (attention
    spans the whole row, no document mask, as V3 packs without cross-sample masking), half of
    them with a pass key hidden at a random depth and asked for at the end;
  * activation checkpointing per block (--activation-checkpointing) trades a second forward for the
    activations of the longer rows;
  * before and after, `nanoseek long-eval`'s probes (pass key retrieval and a held-out task
    question after unrelated text) at 1, 2, 4, 8x the original length: a table and a plot.
"""
from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml

from nanoseek.errors import UsageError
from nanoseek.long_context import PROBES, ProbeBuilder, default_tasks, evaluate_lengths, plot, table
from nanoseek.hf.load import build_model, from_pretrained
from nanoseek.parallel.activation_checkpoint import checkpoint_blocks
from nanoseek.tokenizer import load_tokenizer
from nanoseek.train.data import BatchIterator, Packed
from nanoseek.train.pretrain import finish, start_run
from nanoseek.train.run_options import stage_default
from nanoseek.train.trainer import TrainOptions, Trainer

POSITIONAL = (("model", "pretrained model directory (HF layout with tokenizer); or --model", True),)


@dataclass
class Options(TrainOptions):
    model: str = field(default="", metadata={"help": "pretrained model directory (HF layout with tokenizer)"})
    factor: float = field(default=4.0, metadata={"help": "YaRN scale factor: the new length over the original"})
    rope_scaling: str = field(default="yarn", metadata={
        "help": "yarn | none (the control: positions as pretrained, the same training otherwise)"})
    original_len: int = field(default=0, metadata={
        "help": "the length the model was trained at (0: the seq_len of the run folder the model came from, "
                "else its max_position_embeddings)"})
    beta_fast: float = field(default=32.0, metadata={"help": "YaRN: dims rotating more often than this keep their frequency"})
    beta_slow: float = field(default=1.0, metadata={"help": "YaRN: dims rotating less often than this are interpolated"})
    mscale: float = field(default=1.0, metadata={"help": "YaRN mscale (V3: 1.0)"})
    mscale_all_dim: float = field(default=1.0, metadata={"help": "YaRN mscale_all_dim (V3: 1.0)"})
    seq_len: int = field(default=0, metadata={"help": "training length (0: original_len x factor)"})
    steps: int = field(default=150, metadata={"help": "optimizer steps (V3: 1000 per phase)"})
    batch_size: int = field(default=4, metadata={"help": "sequences per micro-batch"})
    lr: float = field(default=3e-4, metadata={"help": "peak learning rate (about a tenth of pretraining's)"})
    warmup_steps: int = stage_default(TrainOptions, "warmup_steps", 10)
    mtp_weight: float = field(default=0.1, metadata={"help": "MTP loss weight lambda (V3's late value)"})
    bias_gamma: float = field(default=0.0, metadata={"help": "MoE routing bias update speed (0: frozen, as after pretraining)"})
    passkey_frac: float = field(default=0.5, metadata={"help": "share of training rows with a hidden pass key"})
    tasks: list[str] = field(default_factory=list, metadata={
        "help": "tasks of the long documents and the probes (default add,sub,compare,max)"})
    difficulty: int = field(default=2, metadata={"help": "task difficulty of the long documents and the probes"})
    activation_checkpointing: bool = field(default=False, metadata={
        "help": "recompute each block in the backward instead of keeping its activations (for models whose "
                "activations dominate memory; the tiny preset's do not)"})
    eval_n: int = field(default=50, metadata={"help": "long-eval probes per length and kind, before and after (0: skip)"})
    eval_multiples: list[int] = field(default_factory=lambda: [1, 2, 4, 8], metadata={
        "help": "long-eval lengths as multiples of the original length"})


def trained_length(model_dir: Path, cfg) -> int:
    """The length a model was trained at: YaRN's original length if it was extended before, the
    seq_len in the config.yaml of the nanoseek run it came from, else max_position_embeddings."""
    rs = cfg.rope_scaling or {}
    if rs.get("original_max_position_embeddings"):
        return int(cfg.max_position_embeddings)
    run_config = model_dir.resolve().parent / "config.yaml"
    if run_config.is_file():
        seq_len = (yaml.safe_load(run_config.read_text()) or {}).get("seq_len")
        if isinstance(seq_len, int) and seq_len > 0:
            return seq_len
    return int(cfg.max_position_embeddings)


def extended_config(cfg, original: int, opts: Options):
    """The model config with YaRN scaling to original x factor (the V3 config's fields); with
    --rope-scaling none only the longer max_position_embeddings."""
    if opts.rope_scaling == "none":
        return cfg.replace(max_position_embeddings=max(cfg.max_position_embeddings, int(original * opts.factor)))
    scaling = {"type": "yarn", "factor": opts.factor, "original_max_position_embeddings": original,
               "beta_fast": opts.beta_fast, "beta_slow": opts.beta_slow, "mscale": opts.mscale,
               "mscale_all_dim": opts.mscale_all_dim}
    return cfg.replace(rope_scaling=scaling, max_position_embeddings=int(original * opts.factor))


def long_rows(builder: ProbeBuilder, n: int, seq_len: int, passkey_frac: float, seed: int) -> Packed:
    """n rows of seq_len + 1 tokens, each one document (one id, full attention); a share of them end
    by asking for a pass key hidden earlier in the row."""
    rng = random.Random(f"extend/{seed}")
    rows = [builder.passkey(seq_len + 1, rng).ids if rng.random() < passkey_frac
            else builder.long_document(seq_len + 1, rng) for _ in range(n)]
    tokens = torch.tensor(rows, dtype=torch.long)
    return Packed(tokens, torch.zeros_like(tokens), torch.ones_like(tokens, dtype=torch.bool))


def extend(opts: Options) -> Path:
    """Run the stage; returns the extended model's directory (HF layout, with tokenizer)."""
    if not opts.model:
        raise UsageError("extend: a model directory is required: nanoseek extend DIR --factor 4")
    if opts.factor <= 1:
        raise UsageError(f"extend --factor must be > 1, got {opts.factor}")
    if opts.rope_scaling not in ("yarn", "none"):
        raise UsageError(f"extend --rope-scaling must be yarn or none, got {opts.rope_scaling!r}")
    t0 = time.time()
    tok = load_tokenizer(opts.model)
    base = from_pretrained(opts.model)
    original = opts.original_len or trained_length(Path(opts.model), base.config)
    opts.seq_len = opts.seq_len or int(original * opts.factor)
    builder = ProbeBuilder(tok, default_tasks(opts.tasks), opts.difficulty, opts.seed)
    lengths = [original * m for m in opts.eval_multiples]
    for kind in PROBES if opts.eval_n else ():  # a probe longer than the shortest length refuses the run now
        builder.probes(kind, min(lengths), 1)
    out = start_run(opts, "extend")  # after everything that can refuse the run
    print(f"extend: run folder {out}, model {opts.model}\n"
          f"  {original} -> {int(original * opts.factor)} positions ("
          + (f"YaRN factor {opts.factor:g}, beta_fast {opts.beta_fast:g}, beta_slow {opts.beta_slow:g}"
             if opts.rope_scaling == "yarn" else "no rope scaling: the control") + f"), training at {opts.seq_len} tokens")
    results = {}
    if opts.eval_n:
        print(f"long-eval before: {opts.eval_n} probes per length and kind")
        results["before"] = evaluate_lengths(base, builder, lengths, opts.eval_n, opts.seed)

    model = build_model(extended_config(base.config, original, opts))
    model.load_state_dict(base.state_dict())  # the rotary frequencies are buffers rebuilt from the config
    del base
    if opts.activation_checkpointing:
        print(f"activation checkpointing: {checkpoint_blocks(model)} blocks recompute in the backward")
    data = long_rows(builder, opts.steps * opts.batch_size * opts.grad_accum, opts.seq_len, opts.passkey_frac,
                     opts.seed)
    print(f"data: {len(data)} long documents of {opts.seq_len + 1} tokens ({opts.passkey_frac:.0%} with a pass key)")
    trainer = Trainer(model, opts, BatchIterator(data, opts.batch_size, seed=opts.seed), out)
    row = trainer.fit()
    final = finish(trainer, opts, out, tok, row, "extend", t0)

    if opts.eval_n:
        print("long-eval after:")
        results["after"] = evaluate_lengths(from_pretrained(final), builder, lengths, opts.eval_n, opts.seed)
        (out / "long_context.json").write_text(json.dumps(results, indent=2) + "\n")
        png = plot(results, original, out / "plots" / "long_context.png")
        print(table(results, original))
        print(f"  long-context results: {out / 'long_context.json'}\n  plot:                 {png}")
    return final


def run(opts: Options) -> None:
    extend(opts)
