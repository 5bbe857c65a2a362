"""nanoseek: a small, readable, complete DeepSeek-V3 / DeepSeek-R1 system."""
from __future__ import annotations

__version__ = "0.1.0"


def from_pretrained(path, **kwargs):
    """Load a DeepseekV3 (MoE) or Qwen2 (dense) checkpoint in HF layout as a torch.nn.Module."""
    # imported on use: `import nanoseek` (and so `nanoseek --help`) stays free of torch
    from nanoseek.hf.load import from_pretrained as _load
    return _load(path, **kwargs)


__all__ = ["from_pretrained", "__version__"]
