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

_EXPERT = re.compile(r"^(model\.layers\.\d+\.mlp\.experts)\.(gate_proj|up_proj|down_proj)$")
_MTP = re.compile(r"^mtp\.(\d+)\.(.*)$")
_HF_EXPERT = re.compile(r"^(model\.layers\.\d+\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")


def build_model(cfg: ModelConfig | DenseConfig) -> nn.Module:
    if isinstance(cfg, DenseConfig):
        from nanoseek.model.dense import DenseTransformer
        return DenseTransformer(cfg)
    from nanoseek.model.transformer import Transformer
    return Transformer(cfg)


# ---------------------------------------------------------------------- name mapping
def _hf_name(name: str, n_layers: int) -> str:
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
        hf = _hf_name(name, n)
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


def from_hf_state_dict(model: nn.Module, sd: dict[str, torch.Tensor], source: str = "checkpoint") -> None:
    """Load HF-named tensors into `model`, strictly: every parameter must be present with its shape."""
    cfg = model.config
    n = cfg.num_hidden_layers
    ours = model.state_dict()
    experts: dict[str, dict[int, torch.Tensor]] = {}
    mapped: dict[str, torch.Tensor] = {}
    hf_of = {name: _hf_name(name, n) for name in ours}
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
    sd = _read_safetensors(path)
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
