"""FP8 weight-only checkpoints in DeepSeek-V3's HF release layout.

Each weight that FP8 training runs in e4m3 (`fp8.fp8_modules`: every Linear but the head, and every
routed expert) is stored as float8_e4m3fn `X.weight` plus fp32 `X.weight_scale_inv`, one per 128×128
block: the scale that multiplies the e4m3 values back (block amax / 448). The embedding, the head,
the router, the norms and the routing bias stay in the export's dtype. config.json says so in
`quantization_config`, which transformers reads as its fine-grained FP8 scheme; nanoseek's loader
(`hf.load.dequantize_fp8`) multiplies the blocks back into plain weights.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

from nanoseek.kernels.fp8 import TILE, fp8_modules, quantize_blocks
from nanoseek.hf.save import hf_name, to_hf_state_dict

QUANTIZATION_CONFIG = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                       "weight_block_size": [TILE, TILE]}


def fp8_checkpoint_names(model: nn.Module) -> set[str]:
    """The HF names of the weights an FP8 export stores in e4m3 (the routed experts one by one)."""
    n = model.config.num_hidden_layers
    names = set()
    for name, m in fp8_modules(model):
        if isinstance(m, nn.Linear):
            names.add(hf_name(f"{name}.weight", n))
            continue
        for proj in ("gate_proj", "up_proj", "down_proj"):
            prefix = hf_name(f"{name}.{proj}", n).removesuffix(f".{proj}")
            names.update(f"{prefix}.{e}.{proj}.weight" for e in range(getattr(m, proj).shape[0]))
    return names


def save_fp8_pretrained(model: nn.Module, path: str | os.PathLike, tokenizer=None,
                        dtype: torch.dtype | None = None) -> Path:
    """`save_pretrained`, then the FP8 weights in place of their plain ones, quantized from the
    model's own (not the `dtype`-rounded) values, and `quantization_config` in config.json."""
    from safetensors.torch import load_file, save_file

    path = Path(path)
    model.save_pretrained(path, tokenizer=tokenizer, dtype=dtype)
    tensors = load_file(path / "model.safetensors")
    source = to_hf_state_dict(model)
    for name in fp8_checkpoint_names(model):
        q, scale = quantize_blocks(source[name].cpu())
        tensors[name], tensors[f"{name}_scale_inv"] = q.contiguous(), scale
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    conf = json.loads((path / "config.json").read_text())
    conf["quantization_config"] = QUANTIZATION_CONFIG
    (path / "config.json").write_text(json.dumps(conf, indent=2) + "\n")
    return path
