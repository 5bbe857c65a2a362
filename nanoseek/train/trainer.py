"""One training loop for every stage: pretrain, SFT, GRPO and distillation plug into it.

The `Trainer` owns what all stages share: AdamW (decoupled weight decay on >=2-D weights only),
warmup + cosine / WSD schedule, gradient accumulation, mixed precision, the optimizer step (clipping,
non-finite steps skipped, the MoE routing-bias update: optimizer_step.py, which GRPO takes too), the
MTP weight schedule, checkpoints that resume bit-exactly, metrics.jsonl, a progress bar and (if
installed) TensorBoard.

A stage supplies batches (any iterator; if it has state_dict/load_state_dict its position is
checkpointed) and optionally a `step_fn(model, batch, trainer) -> dict` whose "loss" entry is
back-propagated and whose other entries are logged (tensors or floats). The default step_fn is
the language-model loss of `model.loss`. The pieces are usable on their own too:
`make_optimizer`, `lr_factor`, `MetricsLog`, `checkpoint.save_checkpoint/load_checkpoint`.

Under torchrun, or with `parallel` set, the Trainer joins the process group, wraps the model with
`nanoseek.parallel.parallelize` and trains each rank on its slice of every global micro-batch
(train/distributed.py); checkpoints are then sharded (DCP) and only rank 0 logs.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch

from nanoseek.dtype_choice import choose_dtype
from nanoseek.kernels import speedup
from nanoseek.kernels.fp8 import apply_fp8
from nanoseek.parallel.parallelize import all_reduce_sum, compile_blocks
from nanoseek.train import distributed
from nanoseek.train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint, save_sharded_checkpoint
from nanoseek.train.heap import retain_freed_memory
from nanoseek.train.optimizer_step import OptimizerStep
from nanoseek.train.run_options import RunOptions


@dataclass
class TrainOptions(RunOptions):
    """Options of the stages the Trainer runs (each subclasses this and adds its own)."""

    batch_size: int = field(default=8, metadata={
        "help": "sequences per micro-batch, over all ranks (each of N ranks trains on batch_size/N of them)"})
    grad_accum: int = field(default=1, metadata={"help": "micro-batches per optimizer step"})
    seq_len: int = field(default=256, metadata={"help": "tokens per sequence"})
    schedule: str = field(default="cosine", metadata={"help": "'cosine' or 'wsd' (warmup-stable-decay)"})
    decay_frac: float = field(default=0.2, metadata={"help": "wsd: fraction of steps spent decaying"})
    beta1: float = field(default=0.9, metadata={"help": "AdamW beta1"})
    beta2: float = field(default=0.95, metadata={"help": "AdamW beta2"})
    dtype: str = field(default="auto", metadata={"help": "auto | fp32 | bf16 (autocast, fp32 master weights)"})
    precision: str = field(default="default", metadata={
        "help": "default | fp8: fp8 runs every Linear but the head, and the routed experts, on e4m3 GEMMs with "
                "DeepSeek-V3's 1x128 / 128x128 scales (forward and backward; --dtype still sets the rest)"})
    deterministic: bool = field(default=True, metadata={
        "help": "deterministic kernels on CPU (bit-exact reruns and resumes; no measured cost there)"})
    bias_freeze_frac: float = field(default=0.97, metadata={
        "help": "stop updating the MoE bias after this fraction of steps (V3: last ~3% of tokens)"})
    mtp_weight_late: float = field(default=0.1, metadata={"help": "MTP loss weight after mtp_switch_frac"})
    mtp_switch_frac: float = field(default=0.7, metadata={"help": "fraction of steps at which lambda drops"})
    progress: bool = field(default=True, metadata={"help": "show a progress bar"})
    compile: bool = field(default=False, metadata={
        "help": "torch.compile each block (tiny preset on a 2-core CPU it is slower: 0.85-0.92x a step, as each "
                "MoE block splits into 6 graphs at the data-dependent expert sizes); "
                "blocks that fail to compile run eagerly"})


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and "LOCAL_RANK" in os.environ:  # torchrun: one GPU per rank
        return torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return torch.device(name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def make_optimizer(model: torch.nn.Module, lr: float, weight_decay: float, betas=(0.9, 0.95)) -> torch.optim.AdamW:
    """AdamW; weight decay only on matrices (and embeddings): decaying norms' gains and biases
    pulls them towards 0, which only hurts. The fused kernel (one pass over each tensor instead of
    a dozen elementwise ops) where torch has it for these parameters: on the CPU ~5x faster per step."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    fused = all(p.device.type in ("cpu", "cuda") and p.dtype in (torch.float32, torch.float16, torch.bfloat16)
                for p in params)
    return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=fused or None)


def lr_factor(step: int, total: int, warmup: int, schedule: str = "cosine", min_ratio: float = 0.1,
              decay_frac: float = 0.2) -> float:
    """Multiplier of the peak lr at `step`: linear warmup, then cosine to min_ratio, or WSD
    (stable at the peak, linear decay to min_ratio over the last decay_frac of the steps)."""
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "cosine":
        t = (step - warmup) / max(1, total - warmup)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))
    if schedule == "wsd":
        decay_start = max(warmup, int(total * (1 - decay_frac)))
        if step < decay_start:
            return 1.0
        return 1.0 - (1 - min_ratio) * min(1.0, (step - decay_start) / max(1, total - decay_start))
    raise ValueError(f"schedule must be 'cosine' or 'wsd', got {schedule!r}")


class MetricsLog:
    """metrics.jsonl (one JSON object per step) plus TensorBoard scalars if tensorboard is installed."""

    def __init__(self, path: str | Path, resume_step: int | None = None, tensorboard: bool = True):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is not None and self.path.exists():  # drop steps a killed run logged after its checkpoint
            keep = [ln for ln in self.path.read_text().splitlines() if ln and json.loads(ln)["step"] <= resume_step]
            self.path.write_text("".join(ln + "\n" for ln in keep))
        elif resume_step is None:
            self.path.write_text("")
        self.tb = None
        if tensorboard:
            with contextlib.suppress(ImportError):
                from torch.utils.tensorboard import SummaryWriter  # optional: needs the tensorboard package
                self.tb = SummaryWriter(str(self.path.parent / "tensorboard"))

    def log(self, row: dict[str, Any]) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.tb is not None:
            for k, v in row.items():
                if isinstance(v, (int, float)) and k != "step":
                    self.tb.add_scalar(k, v, row["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def lm_step(model: torch.nn.Module, batch: dict[str, torch.Tensor], trainer: "Trainer") -> dict[str, torch.Tensor]:
    """The default step: next-token + MTP (+ MoE sequence balance) loss; on several ranks, each
    rank's share of the token mean over the global micro-batch."""
    kw = {"mtp_weight": trainer.mtp_weight()} if hasattr(model, "mtp") else {}
    out = model.loss(batch["input_ids"], batch["targets"], loss_mask=batch.get("loss_mask"),
                     doc_ids=batch.get("doc_ids"), **kw)
    return distributed.global_token_mean(out, batch, trainer.mtp_weight()) if trainer.world > 1 else out


class Trainer:
    def __init__(self, model: torch.nn.Module, opts: TrainOptions, batches: Iterator, out_dir: str | Path,
                 step_fn: Callable[..., dict] | None = None, log_extra: Callable[[], dict] | None = None,
                 all_reduce: Callable[[torch.Tensor], Any] | None = None):
        self.opts, self.batches, self.step_fn = opts, batches, step_fn or lm_step
        self.log_extra, self.all_reduce = log_extra, all_reduce  # all_reduce: sum expert loads over ranks
        self.out_dir = Path(out_dir)
        self.device = resolve_device(opts.device)
        self.rank, self.world, self.sharded = 0, 1, distributed.wanted(opts)
        if self.sharded:
            self.rank, self.world, self.device = distributed.join(opts, self.device)
            # every rank must apply the identical routing-bias step: sum the expert loads first
            self.all_reduce = all_reduce or all_reduce_sum
        if self.device.type == "cpu":
            retain_freed_memory()  # the step's large tensors are reused, not page-faulted in again
        if opts.deterministic and self.device.type == "cpu":
            # with >1 thread the MoE layer's scatter/gather-add kernels otherwise accumulate in a varying
            # order: losses of two identical runs differed in the 7th digit (a dense model did not)
            torch.use_deterministic_algorithms(True, warn_only=True)
        if opts.precision not in ("default", "fp8"):
            raise ValueError(f"precision must be 'default' or 'fp8', got {opts.precision!r}")
        self.model = model.to(self.device).train()
        speedup(self.model, for_="train")  # before the dtype probe times steps and before wrapping
        # after speedup, whose fast MLP reads its weights past the Linears that apply_fp8 swaps
        precision = apply_fp8(self.model) if opts.precision == "fp8" else "default"
        self.step, self.tokens, self.elapsed = 0, 0, 0.0  # (the step_fn of the dtype probe reads self.step)
        self.dtype_choice = self._choose_dtype()  # may time a few steps: before wrapping, on the final device
        self.amp_dtype = self.dtype_choice.autocast
        if self.rank == 0:
            print(self.dtype_choice.describe())
            print(f"precision: {precision}")
        if opts.compile:
            compile_blocks(self.model)
        if self.sharded:
            self.model = distributed.wrap(self.model, opts, self.world)  # before the optimizer: params become DTensors
        self.optimizer = make_optimizer(self.model, opts.lr, opts.weight_decay, (opts.beta1, opts.beta2))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: lr_factor(
            s, opts.steps, opts.warmup_steps, opts.schedule, opts.min_lr_ratio, opts.decay_frac))
        self.optimizer_step = OptimizerStep(self.model, self.optimizer, opts.grad_clip, self.scheduler, self.all_reduce)
        self.ckpt_dir = self.out_dir / "checkpoints"
        resume_step = None
        if opts.resume:
            ckpt = latest_checkpoint(self.ckpt_dir)
            if ckpt is None:
                print(f"--resume: no checkpoint in {self.ckpt_dir}, starting from step 0")
            else:
                state = load_checkpoint(ckpt, self.model, self.optimizer, self.scheduler)
                if state.get("data") is not None and hasattr(batches, "load_state_dict"):
                    batches.load_state_dict(state["data"])
                self.step, resume_step = state["step"], state["step"]
                self.tokens, self.elapsed = state["extra"].get("tokens", 0), state["extra"].get("elapsed", 0.0)
                self.optimizer_step.skipped = state["extra"].get("skipped", 0)
                print(f"resumed from {ckpt} (step {self.step})")
        self.metrics = MetricsLog(self.out_dir / "metrics.jsonl", resume_step) if self.rank == 0 else NoLog()

    def _choose_dtype(self):
        """`nanoseek.dtype_choice.choose_dtype` for this run, probing with the run's own step_fn. Several
        ranks: rank 0 decides, timing its step alone (no collectives), and tells the others, so that all
        ranks compute alike."""
        def loss(batch):
            return self.step_fn(self.model, batch, self)["loss"]

        o, choice, world = self.opts, None, self.world
        if self.rank == 0:
            self.world = 1
            try:
                choice = choose_dtype(self.device, o.dtype, self.model, loss, max(1, o.batch_size // world), o.seq_len)
            finally:
                self.world = world
        return distributed.broadcast(choice) if self.sharded else choice

    # ------------------------------------------------------------------ schedules
    def mtp_weight(self) -> float:
        o = self.opts
        return o.mtp_weight if self.step < o.mtp_switch_frac * o.steps else o.mtp_weight_late

    def bias_gamma(self) -> float:
        o = self.opts
        return o.bias_gamma if self.step < o.bias_freeze_frac * o.steps else 0.0

    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    # ------------------------------------------------------------------ loop
    def train_step(self) -> dict[str, Any]:
        """One optimizer step over grad_accum micro-batches; returns the logged row."""
        o = self.opts
        t0 = time.perf_counter()
        sums: dict[str, float] = {}
        tokens = 0
        for _ in range(o.grad_accum):
            batch = distributed.shard(next(self.batches), self.rank, self.world)
            if isinstance(batch, dict):
                batch = {k: v.to(self.device) if torch.is_tensor(v) else v for k, v in batch.items()}
            with self.autocast():
                out = self.step_fn(self.model, batch, self)
            (out["loss"] / o.grad_accum).backward()
            for k, v in out.items():
                sums[k] = sums.get(k, 0.0) + (v.item() if torch.is_tensor(v) else float(v)) / o.grad_accum
            tokens += int(out["tokens"]) if "tokens" in out else int(batch["input_ids"].numel())
        sums, tokens = distributed.reduce_row(sums, tokens, self.device)
        lr = self.optimizer.param_groups[0]["lr"]
        grad_norm, _, balance = self.optimizer_step.step(self.bias_gamma())
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        dt = time.perf_counter() - t0
        self.step += 1
        self.tokens += tokens
        self.elapsed += dt
        row = {"step": self.step, **sums, "lr": lr, "grad_norm": grad_norm.item(), "tokens": self.tokens,
               "tokens_per_s": tokens / dt, "elapsed": self.elapsed, "skipped": self.optimizer_step.skipped, **balance}
        if self.log_extra is not None:
            row.update(self.log_extra())
        return row

    def save(self) -> Path:
        data = self.batches.state_dict() if hasattr(self.batches, "state_dict") else None
        save = save_sharded_checkpoint if self.sharded else save_checkpoint
        return save(self.ckpt_dir, self.step, self.model, self.optimizer, self.scheduler, data,
                    {"tokens": self.tokens, "elapsed": self.elapsed, "skipped": self.optimizer_step.skipped},
                    keep_last=self.opts.keep_last)

    def fit(self) -> dict[str, Any]:
        """Train until opts.steps; checkpoint every save_every steps and at the end. Returns the last row."""
        o = self.opts
        bar = _progress(o.steps, self.step, o.progress and self.rank == 0)
        row: dict[str, Any] = {}
        try:
            while self.step < o.steps:
                row = self.train_step()
                self.metrics.log(row)
                bar.update(row)
                if (o.save_every and self.step % o.save_every == 0) or self.step == o.steps:
                    self.save()
        finally:
            bar.close()
            self.metrics.close()
        return row

    def save_pretrained(self, path: str | Path, tokenizer=None) -> None:
        """The HF export of the trained model (gathered from the ranks when sharded)."""
        distributed.save_pretrained(self.model, path, tokenizer)


class NoLog:
    """Ranks > 0 log nothing (rank 0 logs the all-reduced row)."""

    def log(self, row: dict) -> None:
        pass

    def close(self) -> None:
        pass


class _progress:
    """tqdm bar with tokens/s, loss, lr and ETA; plain lines when not a terminal."""

    def __init__(self, total: int, start: int, enabled: bool):
        self.bar = None
        self.every, self.total, self.start, self.t0 = max(1, total // 20), total, start, time.perf_counter()
        if enabled:
            from tqdm import tqdm  # only where a bar is shown (rank 0, --progress)
            self.bar = tqdm(total=total, initial=start, unit="step", dynamic_ncols=True, file=sys.stderr,
                            disable=not sys.stderr.isatty())
            self.plain = self.bar.disable
        else:
            self.plain = False

    def update(self, row: dict) -> None:
        desc = (f"loss {row['loss']:.3f} lr {row['lr']:.2e} {row['tokens_per_s']:,.0f} tok/s"
                + (f" load max/mean {row['load_max_over_mean']:.2f}" if "load_max_over_mean" in row else ""))
        if self.bar is not None and not self.bar.disable:
            self.bar.set_postfix_str(desc, refresh=False)
            self.bar.update(1)
        elif self.plain and (row["step"] % self.every == 0 or row["step"] == 1):
            done = row["step"] - self.start
            eta = (time.perf_counter() - self.t0) / max(done, 1) * (self.total - row["step"])
            print(f"step {row['step']}/{self.total}: {desc} ETA {eta:.0f}s", flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()

