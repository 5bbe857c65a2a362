"""Saving in HF layout: our parameter names -> DeepseekV3ForCausalLM / Qwen2ForCausalLM names (the
mapping `load.py` reads back), config.json, model.safetensors, generation_config.json."""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch
from torch import nn

_EXPERT = re.compile(r"^(model\.layers\.\d+\.mlp\.experts)\.(gate_proj|up_proj|down_proj)$")
_MTP = re.compile(r"^mtp\.(\d+)\.(.*)$")


# ---------------------------------------------------------------------- name mapping
def hf_name(name: str, n_layers: int) -> str:
    """Our parameter name -> the HF checkpoint's (stacked experts keep their stacked name here)."""
    m = _MTP.match(name)
    if m:
        layer, rest = n_layers + int(m.group(1)), m.group(2)
        rest = rest.removeprefix("block.")
        rest = "shared_head.norm.weight" if rest == "head_norm.weight" else rest
        return f"model.layers.{layer}.{rest}"
    return name if name == "lm_head.weight" else "model." + name


def to_hf_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Our state dict -> HF names (experts unstacked, MTP as extra layers with shared copies)."""
    cfg = model.config
    n = cfg.num_hidden_layers
    out: dict[str, torch.Tensor] = {}
    for name, t in model.state_dict().items():
        if name.startswith("rotary.") or (name == "lm_head.weight" and cfg.tie_word_embeddings):
            continue
        hf = hf_name(name, n)
        m = _EXPERT.match(hf)
        if m:
            for e in range(t.shape[0]):
                # clone: safetensors refuses tensors that share storage
                out[f"{m.group(1)}.{e}.{m.group(2)}.weight"] = t[e].clone()
            continue
        out[hf] = t
    for k in range(len(getattr(model, "mtp", ()))):
        # DeepSeek's checkpoints carry the shared embedding / head inside each MTP layer too.
        out[f"model.layers.{n + k}.embed_tokens.weight"] = model.embed_tokens.weight.clone()
        out[f"model.layers.{n + k}.shared_head.head.weight"] = model.lm_head.weight.clone()
    return {k: v.detach().contiguous() for k, v in out.items()}


# ---------------------------------------------------------------------- save
def _atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_pretrained(model: nn.Module, path: str | os.PathLike, tokenizer=None, dtype: torch.dtype | None = None,
                    generation_config: dict | None = None) -> Path:
    """Write config.json, model.safetensors, generation_config.json (+ tokenizer files)."""
    from safetensors.torch import save

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    cfg = model.config
    sd = to_hf_state_dict(model)
    tensors = {}
    for k, v in sd.items():
        if dtype is not None and v.is_floating_point() and "e_score_correction_bias" not in k:
            v = v.to(dtype)
        tensors[k] = v.cpu()
    _atomic_write_bytes(path / "model.safetensors", save(tensors, metadata={"format": "pt"}))
    conf = cfg.to_dict()
    conf["torch_dtype"] = str(dtype or next(model.parameters()).dtype).removeprefix("torch.")
    _atomic_write_bytes(path / "config.json", (json.dumps(conf, indent=2) + "\n").encode())
    stops = list(getattr(tokenizer, "stop_ids", None) or [])  # a tokenizer with several stop ids keeps them all
    gen = {"bos_token_id": cfg.bos_token_id, "eos_token_id": stops if len(stops) > 1 else cfg.eos_token_id,
           "do_sample": True,
           "temperature": 0.6, "top_p": 0.95, **(generation_config or {})}
    _atomic_write_bytes(path / "generation_config.json", (json.dumps(gen, indent=2) + "\n").encode())
    if tokenizer is not None:
        tokenizer.save(path)
    return path
