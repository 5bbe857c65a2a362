"""Model configurations.

`ModelConfig` is the DeepSeek-V3 MoE model; its field names are those of HF `DeepseekV3Config`
so a config.json round-trips unchanged. `DenseConfig` is the Qwen2-style student used for
distillation, with HF `Qwen2Config` field names.
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nanoseek.errors import MissingPathError, UsageError


class CheckpointError(UsageError):
    """A checkpoint that cannot be loaded; the message says which file/tensor and why."""


def _check(cond: bool, field_name: str, why: str) -> None:
    if not cond:
        raise UsageError(f"invalid config: {field_name}: {why}")


def _rope_from_parameters(d: dict[str, Any]) -> dict[str, Any]:
    """transformers >= 5 nests rope_theta / scaling in `rope_parameters`; map back to the flat fields."""
    rp = d.get("rope_parameters")
    if not isinstance(rp, dict):
        return {}
    out: dict[str, Any] = {}
    if "rope_theta" in rp:
        out["rope_theta"] = rp["rope_theta"]
    kind = rp.get("rope_type", rp.get("type", "default"))
    if kind not in ("default", None) and not d.get("rope_scaling"):
        out["rope_scaling"] = {k: v for k, v in rp.items() if k not in ("rope_theta", "rope_type")} | {"type": kind}
    return out


@dataclass
class ModelConfig:
    """DeepSeek-V3: MLA attention, DeepSeekMoE feed-forward, multi-token prediction."""

    vocab_size: int = 4096
    hidden_size: int = 256
    intermediate_size: int = 768  # dense FFN (first_k_dense_replace layers)
    moe_intermediate_size: int = 128  # one routed / shared expert
    num_hidden_layers: int = 4
    num_attention_heads: int = 8
    num_key_value_heads: int = 8  # unused by MLA (every head has its own K/V); saved = num_attention_heads
    # MLA
    q_lora_rank: int | None = 128  # None: plain q_proj
    kv_lora_rank: int = 64
    qk_nope_head_dim: int = 32
    qk_rope_head_dim: int = 16
    v_head_dim: int = 32
    # DeepSeekMoE
    n_routed_experts: int | None = 16
    n_shared_experts: int | None = 1
    num_experts_per_tok: int | None = 4
    n_group: int = 4
    topk_group: int = 2
    routed_scaling_factor: float = 2.5
    norm_topk_prob: bool = True
    first_k_dense_replace: int = 1
    # sequence-wise balance loss weight (alpha); the V3 report uses a tiny value
    aux_loss_alpha: float = 1e-4
    # positions
    max_position_embeddings: int = 1024
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # {"type": "yarn", "factor", "original_max_position_embeddings", ...}
    rope_interleave: bool = True
    rms_norm_eps: float = 1e-6
    # MTP depth D (DeepSeek's checkpoint keeps these as layers num_hidden_layers .. +D-1)
    num_nextn_predict_layers: int = 1
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    initializer_range: float = 0.02
    hidden_act: str = "silu"
    bos_token_id: int | None = 0
    eos_token_id: int | None = 1
    pad_token_id: int | None = None

    model_type = "deepseek_v3"
    architecture = "DeepseekV3ForCausalLM"

    def __post_init__(self) -> None:
        self.validate()

    # ------------------------------------------------------------------ derived sizes
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def num_moe_layers(self) -> int:
        return max(0, self.num_hidden_layers - self.first_k_dense_replace) if self.n_routed_experts else 0

    def is_moe_layer(self, layer_idx: int) -> bool:
        return bool(self.n_routed_experts) and layer_idx >= self.first_k_dense_replace

    @property
    def yarn_factor(self) -> float:
        rs = self.rope_scaling or {}
        return float(rs.get("factor", 1.0)) if rs.get("rope_type", rs.get("type")) == "yarn" else 1.0

    def softmax_scale(self) -> float:
        """1/sqrt(d_qk), times YaRN's mscale^2 when long-context scaling is on."""
        scale = self.qk_head_dim ** -0.5
        rs = self.rope_scaling or {}
        if self.yarn_factor > 1 and rs.get("mscale_all_dim"):
            m = 0.1 * float(rs["mscale_all_dim"]) * math.log(self.yarn_factor) + 1.0
            scale *= m * m
        return scale

    def cache_values_per_token(self) -> int:
        """Values cached per token per layer by the absorbed MLA decode path: c_kv + k_pe."""
        return self.kv_lora_rank + self.qk_rope_head_dim

    def naive_cache_values_per_token(self) -> int:
        """Per-head K and V, as a standard multi-head cache would hold."""
        return self.num_attention_heads * (self.qk_head_dim + self.v_head_dim)

    # ------------------------------------------------------------------ checks
    def validate(self) -> None:
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                     "kv_lora_rank", "qk_rope_head_dim", "v_head_dim", "max_position_embeddings"):
            _check(int(getattr(self, name)) > 0, name, f"must be > 0, got {getattr(self, name)}")
        _check(self.qk_nope_head_dim >= 0, "qk_nope_head_dim", "must be >= 0")
        _check(self.qk_rope_head_dim % 2 == 0, "qk_rope_head_dim", f"must be even, got {self.qk_rope_head_dim}")
        _check(self.q_lora_rank is None or self.q_lora_rank > 0, "q_lora_rank", "must be None or > 0")
        _check(0 <= self.first_k_dense_replace <= self.num_hidden_layers, "first_k_dense_replace",
               f"must be in [0, num_hidden_layers={self.num_hidden_layers}]")
        _check(self.num_nextn_predict_layers >= 0, "num_nextn_predict_layers", "must be >= 0")
        _check(self.rms_norm_eps > 0, "rms_norm_eps", "must be > 0")
        _check(self.hidden_act == "silu", "hidden_act", f"only 'silu' is supported, got {self.hidden_act!r}")
        if self.n_routed_experts:
            e, k = self.n_routed_experts, self.num_experts_per_tok
            _check(k is not None and 0 < k <= e, "num_experts_per_tok",
                   f"must be in [1, n_routed_experts={e}], got {k}")
            _check(self.n_group > 0 and e % self.n_group == 0, "n_group",
                   f"n_routed_experts={e} must be divisible by n_group={self.n_group}")
            _check(0 < self.topk_group <= self.n_group, "topk_group",
                   f"must be in [1, n_group={self.n_group}], got {self.topk_group}")
            per_group = e // self.n_group
            _check(self.n_group == 1 or per_group >= 2, "n_group",
                   "group-limited routing scores groups by their top-2 experts: need >= 2 experts per group")
            _check(self.topk_group * per_group >= k, "topk_group",
                   f"topk_group*experts_per_group={self.topk_group * per_group} < num_experts_per_tok={k}")
            _check(self.moe_intermediate_size > 0, "moe_intermediate_size", "must be > 0")
        if self.first_k_dense_replace > 0 or not self.n_routed_experts:
            _check(self.intermediate_size > 0, "intermediate_size", "must be > 0")
        rs = self.rope_scaling
        if rs is not None:
            kind = rs.get("rope_type", rs.get("type"))
            _check(kind in ("yarn", "default", None), "rope_scaling", f"only 'yarn' is supported, got {kind!r}")
            if kind == "yarn":
                _check(float(rs.get("factor", 0)) >= 1, "rope_scaling.factor", "YaRN factor must be >= 1")

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["model_type"] = self.model_type
        d["architectures"] = [self.architecture]
        d["head_dim"] = self.qk_rope_head_dim  # what HF's DeepseekV3Config derives
        d["num_key_value_heads"] = self.num_attention_heads
        # transformers >= 5 reads rope_parameters; DeepSeek's own format and vLLM read rope_scaling.
        d["rope_parameters"] = {"rope_type": "default", "rope_theta": self.rope_theta}
        if self.rope_scaling:
            d["rope_parameters"] = {**self.rope_scaling, "rope_type": self.rope_scaling.get("rope_type", self.rope_scaling.get("type")),
                                    "rope_theta": self.rope_theta}
        if self.n_routed_experts:
            # vLLM/SGLang read DeepSeek's original fields to enable e_score_correction_bias.
            d.update(topk_method="noaux_tc", scoring_func="sigmoid", seq_aux=True)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in d.items() if k in names}
        kw.update(_rope_from_parameters(d))
        if "num_mtp_layers" in d and "num_nextn_predict_layers" not in d:
            kw["num_nextn_predict_layers"] = d["num_mtp_layers"]
        if kw.get("num_key_value_heads") is None and "num_attention_heads" in kw:
            kw["num_key_value_heads"] = kw["num_attention_heads"]
        return cls(**kw)

    def replace(self, **kw: Any) -> "ModelConfig":
        return dataclasses.replace(self, **kw)


@dataclass
class DenseConfig:
    """Qwen2-style dense decoder (GQA, SwiGLU, RoPE, q/k/v bias): the distillation student."""

    vocab_size: int = 4096
    hidden_size: int = 256
    intermediate_size: int = 768
    num_hidden_layers: int = 4
    num_attention_heads: int = 8
    num_key_value_heads: int = 2
    max_position_embeddings: int = 1024
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = True
    initializer_range: float = 0.02
    hidden_act: str = "silu"
    bos_token_id: int | None = 0
    eos_token_id: int | None = 1
    pad_token_id: int | None = None

    model_type = "qwen2"
    architecture = "Qwen2ForCausalLM"

    def __post_init__(self) -> None:
        self.validate()

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def validate(self) -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "max_position_embeddings"):
            _check(int(getattr(self, name)) > 0, name, f"must be > 0, got {getattr(self, name)}")
        _check(self.hidden_size % self.num_attention_heads == 0, "num_attention_heads",
               f"must divide hidden_size={self.hidden_size}")
        _check(self.head_dim % 2 == 0, "hidden_size", "head_dim (hidden_size/num_attention_heads) must be even")
        _check(self.num_attention_heads % self.num_key_value_heads == 0, "num_key_value_heads",
               f"must divide num_attention_heads={self.num_attention_heads}")
        _check(self.hidden_act == "silu", "hidden_act", f"only 'silu' is supported, got {self.hidden_act!r}")

    def cache_values_per_token(self) -> int:
        return 2 * self.num_key_value_heads * self.head_dim

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.update(model_type=self.model_type, architectures=[self.architecture], use_sliding_window=False,
                 rope_parameters={"rope_type": "default", "rope_theta": self.rope_theta})
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "DenseConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in d.items() if k in names}
        kw.update(_rope_from_parameters(d))
        kw.pop("rope_scaling", None)
        if kw.get("num_key_value_heads") is None and "num_attention_heads" in kw:
            kw["num_key_value_heads"] = kw["num_attention_heads"]
        return cls(**kw)

    def replace(self, **kw: Any) -> "DenseConfig":
        return dataclasses.replace(self, **kw)


# ---------------------------------------------------------------------- presets
PRESETS: dict[str, ModelConfig] = {
    # CPU default: trains in minutes on 2 cores.
    "tiny": ModelConfig(),
    # One GPU.
    "small": ModelConfig(
        vocab_size=32768, hidden_size=1024, intermediate_size=2816, moe_intermediate_size=352,
        num_hidden_layers=12, num_attention_heads=16, num_key_value_heads=16, q_lora_rank=384,
        kv_lora_rank=256, qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64,
        n_routed_experts=64, n_shared_experts=1, num_experts_per_tok=6, n_group=8, topk_group=4,
        first_k_dense_replace=1, max_position_embeddings=4096,
    ),
    # The real DeepSeek-V3 / R1 shape (671B total, 37B active).
    "deepseek-v3": ModelConfig(
        vocab_size=129280, hidden_size=7168, intermediate_size=18432, moe_intermediate_size=2048,
        num_hidden_layers=61, num_attention_heads=128, num_key_value_heads=128, q_lora_rank=1536,
        kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
        n_routed_experts=256, n_shared_experts=1, num_experts_per_tok=8, n_group=8, topk_group=4,
        routed_scaling_factor=2.5, first_k_dense_replace=3, max_position_embeddings=163840,
        rope_scaling={"type": "yarn", "factor": 40.0, "original_max_position_embeddings": 4096,
                      "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0},
        num_nextn_predict_layers=1, aux_loss_alpha=1e-4, bos_token_id=0, eos_token_id=1,
    ),
}

STUDENT_PRESETS: dict[str, DenseConfig] = {
    "tiny": DenseConfig(),
    "small": DenseConfig(vocab_size=32768, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                         num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=4096),
}


def get_preset(name: str) -> ModelConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return dataclasses.replace(PRESETS[name])


def get_student_preset(name: str) -> DenseConfig:
    if name not in STUDENT_PRESETS:
        raise ValueError(f"unknown student preset {name!r}; choose one of {sorted(STUDENT_PRESETS)}")
    return dataclasses.replace(STUDENT_PRESETS[name])


def config_from_dict(d: dict[str, Any]) -> ModelConfig | DenseConfig:
    """Pick the config class from `model_type` / `architectures` (HF config.json)."""
    mt = d.get("model_type")
    archs = d.get("architectures") or []
    if mt == "deepseek_v3" or "DeepseekV3ForCausalLM" in archs:
        return ModelConfig.from_dict(d)
    if mt == "qwen2" or "Qwen2ForCausalLM" in archs:
        return DenseConfig.from_dict(d)
    raise CheckpointError(
        f"unknown architecture (model_type={mt!r}, architectures={archs}): "
        "nanoseek loads DeepseekV3ForCausalLM and Qwen2ForCausalLM checkpoints")


def load_config(path: str | Path) -> ModelConfig | DenseConfig:
    p = Path(path)
    if p.is_dir():
        p = p / "config.json"
    if not p.exists():
        raise MissingPathError(f"no config.json at {p}: is this a model directory saved by save_pretrained?")
    try:
        d = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{p} is not valid JSON ({e}); the file is corrupt") from e
    return config_from_dict(d)
