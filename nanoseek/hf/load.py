"""HF-layout checkpoints: config.json + model.safetensors, as DeepseekV3ForCausalLM / Qwen2ForCausalLM.

Our module tree differs from HF's in two places only: routed experts are stacked tensors
(`mlp.experts.gate_proj` [E, I, D]) where HF stores `mlp.experts.{e}.gate_proj.weight`, and MTP
modules live in `mtp.{k}` where DeepSeek's checkpoints store them as layer `num_hidden_layers + k`
(enorm, hnorm, eh_proj, shared_head.{norm,head}, embed_tokens, and the block's own names).
Everything else is the HF name minus the `model.` prefix.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch
from torch import nn

from nanoseek.config import CheckpointError, DenseConfig, ModelConfig, load_config
from nanoseek.errors import MissingPathError
from nanoseek.model.dense import DenseTransformer
from nanoseek.hf.save import hf_name
from nanoseek.model.transformer import Transformer

_HF_EXPERT = re.compile(r"^(model\.layers\.\d+\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")


def build_model(cfg: ModelConfig | DenseConfig) -> nn.Module:
    return DenseTransformer(cfg) if isinstance(cfg, DenseConfig) else Transformer(cfg)


# ---------------------------------------------------------------------- load
def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    index = path / "model.safetensors.index.json"
    files = ([path / f for f in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
             if index.exists() else [path / "model.safetensors"])
    out: dict[str, torch.Tensor] = {}
    for f in files:
        if not f.exists():
            raise CheckpointError(f"missing weights file {f}: the checkpoint is incomplete")
        try:
            out.update(load_file(str(f)))
        except Exception as e:  # safetensors raises its own error types for truncated/corrupt files
            raise CheckpointError(f"cannot read {f}: the file is corrupt or truncated ({e})") from e
    return out


def dequantize_blocks(q: torch.Tensor, scale: torch.Tensor, block: tuple[int, int] = (128, 128)) -> torch.Tensor:
    """Block-quantized weights [..., N, K] with one scale per block of `block` (the last ones partial) ->
    fp32 weights: each value times its block's scale (DeepSeek-V3's `weight_scale_inv`)."""
    n, k = q.shape[-2:]
    per_element = scale.float().repeat_interleave(block[0], -2).repeat_interleave(block[1], -1)
    return q.float() * per_element[..., :n, :k]


def dequantize_fp8(sd: dict[str, torch.Tensor], block: tuple[int, int] = (128, 128)) -> dict[str, torch.Tensor]:
    """DeepSeek-V3's FP8 release layout -> plain weights, in place: each e4m3 `X.weight` with its
    `X.weight_scale_inv` becomes an fp32 `X.weight`."""
    for key in [k for k in sd if k.endswith(".weight_scale_inv")]:
        name = key.removesuffix("_scale_inv")
        sd[name] = dequantize_blocks(sd[name], sd.pop(key), block)
    return sd


def _weight_block_size(path: Path) -> tuple[int, int]:
    """`quantization_config.weight_block_size` of an FP8 checkpoint's config.json (V3's default 128 × 128)."""
    conf = json.loads((path / "config.json").read_text())
    rows, cols = (conf.get("quantization_config") or {}).get("weight_block_size") or (128, 128)
    return int(rows), int(cols)


def from_hf_state_dict(model: nn.Module, sd: dict[str, torch.Tensor], source: str = "checkpoint") -> None:
    """Load HF-named tensors into `model`, strictly: every parameter must be present with its shape."""
    cfg = model.config
    n = cfg.num_hidden_layers
    ours = model.state_dict()
    experts: dict[str, dict[int, torch.Tensor]] = {}
    mapped: dict[str, torch.Tensor] = {}
    hf_of = {name: hf_name(name, n) for name in ours}
    wanted = {v: k for k, v in hf_of.items()}
    for key, t in sd.items():
        m = _HF_EXPERT.match(key)
        if m:
            experts.setdefault(f"{m.group(1)}.{m.group(3)}", {})[int(m.group(2))] = t
        elif key in wanted:
            mapped[wanted[key]] = t
    for stacked, per_expert in experts.items():
        name = wanted.get(stacked)
        if name is None:
            continue
        E = ours[name].shape[0]
        missing = sorted(set(range(E)) - set(per_expert))
        if missing:
            raise CheckpointError(f"{source}: {stacked} is missing experts {missing[:8]}")
        mapped[name] = torch.stack([per_expert[e] for e in range(E)])
    if cfg.tie_word_embeddings:
        mapped.pop("lm_head.weight", None)
    skip = {k for k in ours if k.startswith("rotary.") or k.endswith(".load")
            or (cfg.tie_word_embeddings and k == "lm_head.weight")}
    missing = [k for k in ours if k not in mapped and k not in skip]
    # HF checkpoints may omit the routing bias buffer (zero-initialised) - fine; nothing else is.
    missing = [k for k in missing if not k.endswith("e_score_correction_bias")]
    if missing:
        raise CheckpointError(f"{source}: {len(missing)} tensor(s) missing, e.g. "
                              f"{', '.join(hf_of[k] for k in missing[:5])}; the checkpoint does not match its config.json")
    for k, t in mapped.items():
        if tuple(t.shape) != tuple(ours[k].shape):
            raise CheckpointError(f"{source}: tensor {hf_of.get(k, k)} has shape {tuple(t.shape)}, "
                                  f"config.json implies {tuple(ours[k].shape)}")
    with torch.no_grad():
        for k, t in mapped.items():
            ours[k].copy_(t.to(ours[k].dtype))


def from_pretrained(path: str | os.PathLike, dtype: torch.dtype | None = None, device: str | torch.device = "cpu",
                    mtp: bool = True) -> nn.Module:
    """Load a DeepseekV3ForCausalLM / Qwen2ForCausalLM directory (ours or transformers')."""
    path = Path(path)
    if not path.is_dir():
        why = "is not a model directory" if path.exists() else "does not exist"
        raise MissingPathError(f"{path} {why}: give a directory in HF layout (config.json + model.safetensors)")
    cfg = load_config(path)
    sd = dequantize_fp8(_read_safetensors(path), _weight_block_size(path))
    if isinstance(cfg, ModelConfig):
        # Keep only the MTP depth actually stored (transformers' own saves drop MTP weights).
        n = cfg.num_hidden_layers
        stored = 0
        while any(k.startswith(f"model.layers.{n + stored}.eh_proj") for k in sd):
            stored += 1
        cfg = cfg.replace(num_nextn_predict_layers=min(cfg.num_nextn_predict_layers, stored) if mtp else 0)
    model = build_model(cfg)
    from_hf_state_dict(model, sd, source=str(path))
    if dtype is not None:
        model = model.to(dtype)
        for m in model.modules():  # routing bias stays fp32 (see Gate)
            if hasattr(m, "e_score_correction_bias"):
                m.e_score_correction_bias.data = m.e_score_correction_bias.data.float()
    return model.to(device).eval()
