"""Export a model to HF layout (DeepseekV3ForCausalLM / Qwen2ForCausalLM), optionally in another dtype
or with FP8 weights (`--fp8`: DeepSeek-V3's release layout, hf/fp8_export.py).

The result loads in transformers' AutoModelForCausalLM without trust_remote_code and in vLLM
(MoE exports carry DeepSeek's routing fields and the MTP layers). `--verify` loads it back in
transformers and prints the max abs logit difference against nanoseek.
"""
from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch

from nanoseek.hf.fp8_export import save_fp8_pretrained
from nanoseek.hf.load import from_pretrained
from nanoseek.tokenizer import load_tokenizer

POSITIONAL = (("model", "source model directory (HF layout, ours or transformers')"),)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class Options:
    model: str = field(default="", metadata={"help": "source model directory"})
    out: str = field(default="", metadata={"help": "output directory (default: <model>-export)"})
    dtype: str = field(default="fp32", metadata={"help": "weight dtype: fp32, bf16 or fp16"})
    fp8: bool = field(default=False, metadata={
        "help": "store every Linear but the head, and the routed experts, as e4m3 with a weight_scale_inv per "
                "128x128 block (DeepSeek-V3's FP8 release layout; --dtype sets the rest)"})
    mtp: bool = field(default=True, metadata={"help": "keep the MTP layers (needed for speculative decoding)"})
    verify: bool = field(default=False, metadata={"help": "load the export in transformers and compare logits"})


def export(opts: Options) -> Path:
    if opts.dtype not in DTYPES:
        raise SystemExit(f"error: --dtype must be one of {sorted(DTYPES)}, got {opts.dtype!r}")
    src = Path(opts.model)
    out = Path(opts.out or f"{src.as_posix().rstrip('/')}-export")
    model = from_pretrained(src, mtp=opts.mtp)
    print(f"loaded {type(model).__name__} from {src} ({model.num_parameters() / 1e6:.2f}M parameters)")
    tok = None
    if (src / "tokenizer.json").exists():
        tok = load_tokenizer(src)
    if opts.fp8:
        save_fp8_pretrained(model, out, tokenizer=tok, dtype=DTYPES[opts.dtype])
    else:
        model.save_pretrained(out, tokenizer=tok, dtype=DTYPES[opts.dtype])
    for extra in ("generation_config.json",):
        if (src / extra).exists():
            shutil.copy(src / extra, out / extra)
    weights = f"fp8 e4m3 + 128x128 scales, the rest {opts.dtype}" if opts.fp8 else opts.dtype
    print(f"wrote {out} ({weights}, MTP {'kept' if opts.mtp and len(model.mtp) else 'dropped'})")
    if opts.verify:
        from transformers import AutoModelForCausalLM  # optional: --verify only
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()  # the MTP layers are "unexpected" to transformers, by design
        hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
        ours = from_pretrained(out, dtype=torch.float32)  # same rounded weights on both sides
        ids = torch.randint(0, model.config.vocab_size, (1, 32))
        with torch.no_grad():
            diff = (hf(ids).logits - ours(ids)).abs().max().item()
        print(f"verify: transformers loads it as {type(hf).__name__}; max abs logit diff {diff:.2e}")
    return out


def run(opts: Options) -> None:
    if not opts.model:
        raise SystemExit("error: give the source model directory: nanoseek export MODEL_DIR")
    export(opts)
