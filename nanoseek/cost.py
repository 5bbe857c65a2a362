"""FLOPs, parameters, GPU-hours, dollars and memory of a config; `nanoseek cost` reproduces the
DeepSeek-V3 report's cost table and the MFU it implies.

All counts are analytic (from the config alone, no model is built), so they work for the
671B preset on a laptop. Conventions:
  * a matmul with a [m, n] weight costs 2·m·n FLOPs per token forward, 2× that backward
    (input and weight grads), so training = 3 × forward;
  * causal attention: a query attends to seq_len/2 keys on average; QK^T costs
    2·heads·qk_head_dim·ctx and AV 2·heads·v_head_dim·ctx per token per layer;
  * "total" parameters exclude MTP (the report's 671B); DeepSeek's HF checkpoint also stores
    the MTP layer with its own copies of embedding and head (~685B).
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from nanoseek.config import STUDENT_PRESETS, DenseConfig, ModelConfig, get_preset, get_student_preset, load_config
from nanoseek.gpu_peaks import gpu_peak_flops
from nanoseek.hardware import describe_device, device_peak_flops

Config = ModelConfig | DenseConfig

# ---------------------------------------------------------------- the V3 report's inputs
# DeepSeek-V3 technical report, Table 1: what was *measured* (GPU-hours per stage), the rest
# (totals, dollars, days, MFU) is derived below.
V3_TOKENS = 14.8e12
V3_HOURS_PER_TRILLION = 180e3      # H800 GPU-hours per trillion pre-training tokens
V3_CONTEXT_EXT_HOURS = 119e3       # 4K->32K->128K, 1000 steps each (YaRN)
V3_POST_TRAIN_HOURS = 5e3          # SFT + RL
V3_PRICE = 2.0                     # $ per H800 GPU-hour (the report's assumed rental price)
V3_CLUSTER = 2048                  # H800s
# context extension schedule (report §4.3): (seq_len, batch size in sequences, steps)
V3_CONTEXT_STAGES = ((32768, 1920, 1000), (131072, 480, 1000))


# ---------------------------------------------------------------- parameters
def _mla_params(c: ModelConfig) -> dict[str, int]:
    h, nh = c.hidden_size, c.num_attention_heads
    q = h * nh * c.qk_head_dim if c.q_lora_rank is None else h * c.q_lora_rank + c.q_lora_rank * nh * c.qk_head_dim
    kv = h * (c.kv_lora_rank + c.qk_rope_head_dim) + c.kv_lora_rank * nh * (c.qk_nope_head_dim + c.v_head_dim)
    o = nh * c.v_head_dim * h
    norms = (c.q_lora_rank or 0) + c.kv_lora_rank
    return {"matmul": q + kv + o, "norms": norms}


def _gqa_params(c: DenseConfig) -> dict[str, int]:
    h, d = c.hidden_size, c.head_dim
    q, kv = c.num_attention_heads * d, c.num_key_value_heads * d
    return {"matmul": h * q + 2 * h * kv + q * h, "bias": q + 2 * kv}


def _layer_params(c: Config, moe: bool) -> dict[str, int]:
    """Parameters of one decoder block, split by what a token touches."""
    h = c.hidden_size
    p = {"attention": 0, "dense_ffn": 0, "routed": 0, "routed_active": 0, "shared": 0, "gate": 0, "norms": 2 * h}
    if isinstance(c, DenseConfig):
        a = _gqa_params(c)
        p["attention"] = a["matmul"] + a["bias"]
        p["dense_ffn"] = 3 * h * c.intermediate_size
        return p
    a = _mla_params(c)
    p["attention"], p["norms"] = a["matmul"], p["norms"] + a["norms"]
    if moe:
        expert = 3 * h * c.moe_intermediate_size
        p["routed"] = c.n_routed_experts * expert
        p["routed_active"] = c.num_experts_per_tok * expert
        p["shared"] = (c.n_shared_experts or 0) * expert
        p["gate"] = c.n_routed_experts * h
    else:
        p["dense_ffn"] = 3 * h * c.intermediate_size
    return p


def _sum_layers(c: Config) -> dict[str, int]:
    out: dict[str, int] = {}
    for i in range(c.num_hidden_layers):
        moe = isinstance(c, ModelConfig) and c.is_moe_layer(i)
        for k, v in _layer_params(c, moe).items():
            out[k] = out.get(k, 0) + v
    return out


def _mtp_params(c: Config) -> dict[str, int]:
    """One MTP module: enorm + hnorm + eh_proj + a (MoE if the model has experts) block + head norm."""
    if not isinstance(c, ModelConfig) or c.num_nextn_predict_layers == 0:
        return {"module": 0, "active": 0, "matmul": 0}
    h = c.hidden_size
    blk = _layer_params(c, moe=c.is_moe_layer(c.num_hidden_layers))
    matmul = 2 * h * h + blk["attention"] + blk["dense_ffn"] + blk["shared"] + blk["gate"] + blk["routed_active"]
    norms = 3 * h + blk["norms"]  # enorm, hnorm, head norm + the block's own
    return {"module": matmul - blk["routed_active"] + blk["routed"] + norms, "active": matmul + norms, "matmul": matmul}


def count_params(cfg: Config) -> dict[str, int]:
    """Analytic parameter counts.

    total: everything except MTP (= the report's 671B for V3); active: what one token touches
    (embedding row, head, attention, dense FFNs, shared + top-k routed experts, gates, norms);
    mtp: the MTP modules (they share embedding and head); total_hf: as stored in DeepSeek's HF
    checkpoint, whose MTP layer keeps its own copy of embedding and head.
    """
    h, v = cfg.hidden_size, cfg.vocab_size
    L = _sum_layers(cfg)
    emb = v * h
    head = 0 if cfg.tie_word_embeddings else v * h
    final_norm = h
    common = L["attention"] + L["dense_ffn"] + L["shared"] + L["gate"] + L["norms"] + final_norm
    mtp = _mtp_params(cfg)
    d = cfg.num_nextn_predict_layers if isinstance(cfg, ModelConfig) else 0
    total = emb + head + common + L["routed"]
    out = {
        "total": total,
        "active": emb + head + common + L["routed_active"],
        "embedding": emb,
        "lm_head": head,
        "attention": L["attention"],
        "dense_ffn": L["dense_ffn"],
        "routed_experts": L["routed"],
        "routed_experts_active": L["routed_active"],
        "shared_experts": L["shared"],
        "gate": L["gate"],
        "norms": L["norms"] + final_norm,
        "mtp": d * mtp["module"],
        "mtp_active": d * mtp["active"],
    }
    out["total_with_mtp"] = total + out["mtp"]
    out["total_hf"] = out["total_with_mtp"] + d * 2 * v * h  # MTP layer's stored embed_tokens + shared_head.head
    out["active_non_embedding"] = out["active"] - emb
    return out


# ---------------------------------------------------------------- FLOPs
def _attn_flops_per_layer(cfg: Config, ctx: float) -> float:
    if isinstance(cfg, DenseConfig):
        nh, dqk, dv = cfg.num_attention_heads, cfg.head_dim, cfg.head_dim
    else:
        nh, dqk, dv = cfg.num_attention_heads, cfg.qk_head_dim, cfg.v_head_dim
    return 2 * nh * dqk * ctx + 2 * nh * dv * ctx  # QK^T + AV


def flops_per_token(cfg: Config, seq_len: int, include_mtp: bool = True, training: bool = True,
                    causal: bool = True) -> float:
    """FLOPs per token: 2 × active matmul weights + attention; × 3 for training (fwd + bwd).

    Embedding lookups and norms are not matmuls and are left out; the head is counted even when
    tied to the embedding. `causal=False` charges attention over the full sequence (what a FLOP
    counter sees for an unmasked SDPA).
    """
    p = count_params(cfg)
    attn = p["attention"] - (_gqa_params(cfg)["bias"] * cfg.num_hidden_layers if isinstance(cfg, DenseConfig) else 0)
    head = cfg.vocab_size * cfg.hidden_size
    matmul = attn + p["dense_ffn"] + p["shared_experts"] + p["routed_experts_active"] + p["gate"] + head
    ctx = seq_len / 2 if causal else seq_len
    attn_layers = cfg.num_hidden_layers
    if include_mtp and isinstance(cfg, ModelConfig) and cfg.num_nextn_predict_layers:
        d = cfg.num_nextn_predict_layers
        matmul += d * (_mtp_params(cfg)["matmul"] + head)  # each MTP module also runs the shared head
        attn_layers += d
    fwd = 2 * matmul + attn_layers * _attn_flops_per_layer(cfg, ctx)
    return 3 * fwd if training else fwd


# ---------------------------------------------------------------- GPU-hours and dollars
def training_cost(cfg: Config, tokens: float, mfu: float, gpu: str = "H800", price_per_gpu_hour: float = 2.0,
                  seq_len: int = 4096, dtype: str = "bf16") -> dict[str, float]:
    """GPU-hours and dollars to train `cfg` on `tokens` at a given MFU (vs the GPU's dense `dtype` peak)."""
    peak = gpu_peak_flops(gpu, dtype)
    if peak is None:
        raise ValueError(f"no {dtype} peak known for GPU {gpu!r}")
    flops = tokens * flops_per_token(cfg, seq_len)
    hours = flops / (mfu * peak) / 3600
    return {"tokens": tokens, "flops": flops, "flops_per_token": flops / tokens, "mfu": mfu, "peak_flops": peak,
            "gpu_hours": hours, "dollars": hours * price_per_gpu_hour}


def implied_mfu(cfg: Config, gpu_hours_per_trillion: float = V3_HOURS_PER_TRILLION, seq_len: int = 4096,
                gpu: str = "H800", dtype: str = "bf16") -> float:
    """MFU that a reported GPU-hours-per-trillion-tokens figure implies for this config."""
    achieved = 1e12 * flops_per_token(cfg, seq_len) / (gpu_hours_per_trillion * 3600)
    return achieved / gpu_peak_flops(gpu, dtype)


def v3_report_table(tokens: float = V3_TOKENS, price: float = V3_PRICE, cfg: ModelConfig | None = None) -> dict:
    """The V3 report's training-cost table, derived from its per-stage measurements.

    The context-extension row also gets our FLOP model's estimate at the pre-training MFU: it
    comes out lower than the reported 119K because long-sequence attention runs at lower MFU.
    """
    cfg = cfg or get_preset("deepseek-v3")
    pre = V3_HOURS_PER_TRILLION * tokens / 1e12
    total = pre + V3_CONTEXT_EXT_HOURS + V3_POST_TRAIN_HOURS
    mfu = implied_mfu(cfg)
    peak = gpu_peak_flops("H800")
    ext_est = sum(flops_per_token(cfg, s) * s * b * n for s, b, n in V3_CONTEXT_STAGES) / (mfu * peak) / 3600
    rows = [("Pre-training", tokens, pre), ("Context extension", sum(s * b * n for s, b, n in V3_CONTEXT_STAGES),
                                             V3_CONTEXT_EXT_HOURS), ("Post-training", None, V3_POST_TRAIN_HOURS)]
    return {
        "rows": [{"stage": s, "tokens": t, "gpu_hours": h, "dollars": h * price} for s, t, h in rows],
        "total_gpu_hours": total, "total_dollars": total * price,
        "hours_per_trillion": V3_HOURS_PER_TRILLION, "price_per_gpu_hour": price,
        "days_on_cluster": total / V3_CLUSTER / 24, "pretrain_days_on_cluster": pre / V3_CLUSTER / 24,
        "cluster": V3_CLUSTER, "flops_per_token": flops_per_token(cfg, 4096),
        "mfu_bf16": mfu, "mfu_fp8": implied_mfu(cfg, dtype="fp8"),
        "achieved_flops_per_gpu": mfu * peak, "context_ext_estimate_hours": ext_est,
    }


# ---------------------------------------------------------------- memory and communication
_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2, "fp8": 1}


def _activation_values_per_token(cfg: Config, moe: bool) -> int:
    """Rough count of values one block keeps for backward per token (no recomputation, flash attention)."""
    h = cfg.hidden_size
    if isinstance(cfg, DenseConfig):
        q, kv = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
        attn = 2 * h + q + 2 * kv + q  # norm/attn inputs, q, k, v, attention output
        return attn + h + 3 * cfg.intermediate_size
    nh = cfg.num_attention_heads
    attn = (2 * h + (cfg.q_lora_rank or 0) + nh * cfg.qk_head_dim + 2 * cfg.kv_lora_rank + cfg.qk_rope_head_dim
            + nh * (cfg.qk_nope_head_dim + cfg.v_head_dim) + nh * cfg.qk_head_dim + nh * cfg.v_head_dim)
    if moe:  # dispatched copies of the input, SwiGLU intermediates of k routed + shared experts
        k = cfg.num_experts_per_tok
        ffn = h + k * h + 3 * cfg.moe_intermediate_size * (k + (cfg.n_shared_experts or 0))
    else:
        ffn = h + 3 * cfg.intermediate_size
    return attn + ffn


def memory_estimate(cfg: Config, world_size: int = 1, dtype: str = "bf16", optimizer: str = "adamw",
                    fsdp: bool = True, ep: int = 1, micro_batch: int = 1, seq_len: int = 4096,
                    activation_checkpointing: bool = False) -> dict[str, float]:
    """Bytes per GPU for params, grads, optimizer state and activations during training.

    FSDP shards everything over `world_size`; without it dense weights are replicated and only
    experts are split over `ep` ranks. Optimizer: fp32 master copy (unless training in fp32)
    plus AdamW's two fp32 moments. Activations are per GPU (each rank has its own micro-batch)
    and do not shrink with world size; checkpointing keeps only block inputs plus one block.
    """
    if ep < 1 or world_size % ep:
        raise ValueError(f"ep={ep} must divide world_size={world_size}")
    p = count_params(cfg)
    n = p["total_with_mtp"]
    experts = p["routed_experts"] + (p["mtp"] - p["mtp_active"]) if isinstance(cfg, ModelConfig) else 0
    local = n / world_size if fsdp else (n - experts) + experts / ep
    b = _BYTES[dtype]
    master = 0 if dtype == "fp32" else 4
    state = {"adamw": master + 8, "sgd": master, "none": 0}[optimizer]
    tokens = micro_batch * seq_len
    layers = [_activation_values_per_token(cfg, isinstance(cfg, ModelConfig) and cfg.is_moe_layer(i))
              for i in range(cfg.num_hidden_layers + (cfg.num_nextn_predict_layers if isinstance(cfg, ModelConfig) else 0))]
    per_token = (len(layers) * cfg.hidden_size + max(layers)) if activation_checkpointing else sum(layers)
    act = tokens * (per_token * b + cfg.vocab_size * 4)  # + fp32 logits for the loss
    out = {"params": local * b, "grads": local * b, "optimizer": local * state, "activations": act}
    out["total"] = sum(out.values())
    return out


def ep_comm_bytes_per_token(cfg: ModelConfig, dispatch_bytes: float = 2, combine_bytes: float = 2,
                            max_targets: int | None = None) -> dict[str, float]:
    """All-to-all bytes one token sends per MoE layer (forward), with expert parallelism.

    Each token's hidden vector goes to each of its top-k experts (dispatch) and comes back
    weighted (combine): k·hidden·(dispatch + combine bytes). V3 dispatches in FP8 and combines
    in BF16 and caps a token at 4 nodes, so it crosses InfiniBand at most 4 times, then fans out
    over NVLink: `max_targets` models that cap. Backward moves the same bytes again.
    """
    k = cfg.num_experts_per_tok or 0
    fan = min(k, max_targets) if max_targets else k
    per_layer = fan * cfg.hidden_size * (dispatch_bytes + combine_bytes)
    return {"per_layer": per_layer, "per_token_fwd": per_layer * cfg.num_moe_layers,
            "per_token_fwd_bwd": 2 * per_layer * cfg.num_moe_layers}


# ---------------------------------------------------------------- measured runs
@dataclass
class RunCost:
    """What a finished training run cost, in the units of the V3 report."""
    wall_s: float
    tokens: int
    tokens_per_s: float
    flops: float
    achieved_flops_per_s: float
    peak_flops_per_s: float
    mfu: float
    dollars: float
    price_per_hour: float
    device: str

    def as_dict(self) -> dict:
        return asdict(self)


def summarize_run(cfg: Config, tokens: int, wall_s: float, seq_len: int, peak_flops: float | None = None,
                  price_per_hour: float | None = None, training: bool = True) -> dict:
    """Trainers call this at the end and write the dict as JSON.

    peak_flops defaults to the device's (measured fp32 matmul rate on CPU, datasheet bf16 on GPU);
    price_per_hour to $2 (the V3 report's H800 rate) on GPU and $0.10 (a 2-vCPU cloud VM) on CPU.
    """
    on_gpu = torch.cuda.is_available()
    peak = peak_flops if peak_flops else device_peak_flops()
    price = price_per_hour if price_per_hour is not None else (2.0 if on_gpu else 0.10)
    flops = tokens * flops_per_token(cfg, seq_len, training=training)
    wall = max(wall_s, 1e-9)
    rc = RunCost(wall_s=wall_s, tokens=int(tokens), tokens_per_s=tokens / wall, flops=flops,
                 achieved_flops_per_s=flops / wall, peak_flops_per_s=peak, mfu=flops / wall / peak,
                 dollars=wall_s / 3600 * price, price_per_hour=price, device=describe_device())
    return rc.as_dict()


# ---------------------------------------------------------------- CLI
def resolve_config(name: str) -> Config:
    """A preset name, "student-<preset>" for the dense student, or a model dir / config.json path."""
    if name.startswith("student-") and name[8:] in STUDENT_PRESETS:
        return get_student_preset(name[8:])
    if Path(name).exists():
        return load_config(name)
    return get_preset(name)


@dataclass
class Options:
    preset: str = field(default="deepseek-v3", metadata={"help": "preset (tiny/small/deepseek-v3), student-<preset>, or a model dir"})
    tokens: float = field(default=V3_TOKENS, metadata={"help": "training tokens"})
    mfu: float | None = field(default=None, metadata={"help": "model FLOPs utilisation for the estimate (default: the one V3 implies)"})
    gpu: str = field(default="H800", metadata={"help": "GPU for the estimate (H800, H100, H200, A100, B200)"})
    price: float = field(default=V3_PRICE, metadata={"help": "$ per GPU-hour"})
    seq_len: int = field(default=4096, metadata={"help": "training sequence length"})
    memory: bool = field(default=False, metadata={"help": "also print per-GPU training memory and EP all-to-all volume"})
    world_size: int = field(default=8, metadata={"help": "GPUs for the memory table (besides 1 and 8)"})
    json: str | None = field(default=None, metadata={"help": "write every number to this JSON file"})


def _fmt(x: float, unit: str = "") -> str:
    """1.23B / 4.5M style; with a unit (bytes) the SI prefix goes on the unit: 1.37 TB."""
    for div, suf in ((1e12, "T"), (1e9, "G" if unit else "B"), (1e6, "M"), (1e3, "K")):
        if abs(x) >= div:
            return f"{x / div:,.2f}{' ' + suf + unit if unit else suf}"
    return f"{x:,.3g}{' ' + unit if unit else ''}"


def run(opts: Options) -> dict:
    con = Console()
    cfg = resolve_config(opts.preset)
    out: dict = {"preset": opts.preset, "params": count_params(cfg)}

    t = Table(title=f"Parameters: {opts.preset}")
    t.add_column("part"), t.add_column("count", justify="right")
    for k, v in out["params"].items():
        t.add_row(k, _fmt(v))
    con.print(t)
    p = out["params"]
    con.print(f"total {_fmt(p['total'])} (without MTP; {_fmt(p['total_with_mtp'])} with MTP, {_fmt(p['total_hf'])} "
              f"as stored on HF), active {_fmt(p['active'])} per token")

    if opts.preset == "deepseek-v3" and opts.mfu is None:
        r = v3_report_table(opts.tokens, opts.price, cfg)
        out["v3_report"] = r
        t = Table(title=f"DeepSeek-V3 training cost (H800, ${opts.price:g}/GPU-hour)")
        for c in ("stage", "tokens", "GPU-hours", "USD"):
            t.add_column(c, justify="right" if c != "stage" else "left")
        for row in r["rows"]:
            t.add_row(row["stage"], _fmt(row["tokens"]) if row["tokens"] else "-",
                      f"{row['gpu_hours'] / 1e3:,.0f}K", f"${row['dollars'] / 1e6:,.3f}M")
        t.add_row("Total", "", f"{r['total_gpu_hours'] / 1e3:,.0f}K", f"${r['total_dollars'] / 1e6:,.3f}M")
        con.print(t)
        con.print(f"{r['hours_per_trillion'] / 1e3:,.0f}K GPU-hours per trillion tokens; "
                  f"{r['days_on_cluster']:.1f} days on {r['cluster']:,} H800 (pre-training alone {r['pretrain_days_on_cluster']:.1f})")
        con.print(f"training FLOPs/token (seq 4096, with MTP) {_fmt(r['flops_per_token'])} -> "
                  f"{r['achieved_flops_per_gpu'] / 1e12:.0f} TFLOP/s per H800 = MFU {r['mfu_bf16']:.1%} of the "
                  f"989 TFLOP/s bf16 peak, {r['mfu_fp8']:.1%} of the 1979 TFLOP/s FP8 peak")
        con.print(f"context extension by the FLOP model at that MFU: {r['context_ext_estimate_hours'] / 1e3:,.0f}K "
                  f"GPU-hours (reported {V3_CONTEXT_EXT_HOURS / 1e3:,.0f}K: long-context attention runs at lower MFU)")
    else:
        v3 = get_preset("deepseek-v3")
        mfu = opts.mfu if opts.mfu is not None else implied_mfu(v3)
        est = training_cost(cfg, opts.tokens, mfu, opts.gpu, opts.price, opts.seq_len)
        out["estimate"] = est
        con.print(f"{_fmt(opts.tokens)} tokens × {_fmt(est['flops_per_token'])} FLOPs/token = {est['flops']:.3g} FLOPs; "
                  f"at MFU {mfu:.1%} on {opts.gpu} ({est['peak_flops'] / 1e12:.0f} TFLOP/s): "
                  f"{_fmt(est['gpu_hours'])} GPU-hours, ${est['dollars']:,.2f}")

    if opts.memory:
        out["memory"] = _print_memory(con, opts)
    if opts.json:
        Path(opts.json).parent.mkdir(parents=True, exist_ok=True)
        Path(opts.json).write_text(json.dumps(out, indent=2, default=str))
        con.print(f"wrote {opts.json}")
    return out


def _print_memory(con, opts: Options) -> dict:
    res: dict = {}
    t = Table(title=f"Training memory per GPU (bf16, AdamW, FSDP, micro-batch 1 × {opts.seq_len})")
    for c in ("preset", "GPUs", "params", "grads", "optimizer", "activations", "total"):
        t.add_column(c, justify="right" if c != "preset" else "left")
    for name in sorted({"tiny", "small", "deepseek-v3", opts.preset}):
        cfg = resolve_config(name)
        for w in sorted({1, 8, opts.world_size}):
            m = memory_estimate(cfg, world_size=w, seq_len=opts.seq_len)
            res[f"{name}@{w}"] = m
            t.add_row(name, str(w), *(_fmt(m[k], "B") for k in ("params", "grads", "optimizer", "activations", "total")))
    con.print(t)
    v3 = get_preset("deepseek-v3")
    ours = ep_comm_bytes_per_token(v3)
    theirs = ep_comm_bytes_per_token(v3, dispatch_bytes=1, combine_bytes=2, max_targets=4)
    res["ep_comm"] = {"bf16": ours, "v3_fp8_node_limited": theirs}
    con.print(f"EP all-to-all per token per MoE layer (V3 shape): bf16 dispatch+combine to top-8 "
              f"{_fmt(ours['per_layer'], 'B')}, {_fmt(ours['per_token_fwd_bwd'], 'B')} per token per step (fwd+bwd, "
              f"{v3.num_moe_layers} layers); V3 (FP8 dispatch, BF16 combine, <= 4 nodes over IB) "
              f"{_fmt(theirs['per_layer'], 'B')} / {_fmt(theirs['per_token_fwd_bwd'], 'B')}")
    return res
