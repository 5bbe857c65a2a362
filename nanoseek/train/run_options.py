"""The options every training run has, the Trainer's stages (`trainer.TrainOptions`) and GRPO's alike: where
the run goes, the optimizer and its schedule, the step (optimizer_step.py), the devices, checkpoints."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


def stage_default(cls: type, name: str, value: Any):
    """The field `name` of the options class `cls` with a stage's own default; its help is kept."""
    return field(default=value, metadata=cls.__dataclass_fields__[name].metadata)


@dataclass
class RunOptions:
    out: str = field(default="", metadata={"help": "run directory (default: runs/<stage>-<time>)"})
    steps: int = field(default=300, metadata={"help": "optimizer steps"})
    lr: float = field(default=3e-3, metadata={"help": "peak learning rate"})
    min_lr_ratio: float = field(default=0.1, metadata={"help": "final lr as a fraction of the peak"})
    warmup_steps: int = field(default=30, metadata={"help": "linear warmup steps"})
    weight_decay: float = field(default=0.1, metadata={"help": "AdamW decoupled weight decay (>=2-D weights only)"})
    grad_clip: float = field(default=1.0, metadata={"help": "max global grad norm (0 = off)"})
    bias_gamma: float = field(default=0.001, metadata={"help": "MoE aux-loss-free bias update speed (0 = off)"})
    mtp_weight: float = field(default=0.3, metadata={"help": "MTP loss weight lambda early in training"})
    device: str = field(default="auto", metadata={"help": "auto | cpu | cuda | cuda:N"})
    seed: int = field(default=0, metadata={"help": "seed of everything random: init, data order, sampling"})
    parallel: str = field(default="none", metadata={
        "help": "none | ddp (full replicas) | fsdp (sharded): data parallelism over the ranks torchrun starts "
                "(under torchrun, none means ddp); checkpoints become sharded DCP ones"})
    ep: int = field(default=1, metadata={
        "help": "expert-parallel degree: routed experts split over groups of this many ranks (divides the world)"})
    save_every: int = field(default=100, metadata={"help": "checkpoint every N steps (0 = only at the end)"})
    keep_last: int = field(default=2, metadata={"help": "checkpoints kept (0 = all)"})
    resume: bool = field(default=False, metadata={"help": "continue from the latest checkpoint in --out"})
