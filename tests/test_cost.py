"""nanoseek.cost: parameter counts, FLOPs, the V3 report table, memory, run summaries."""
import json

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from nanoseek import cost
from nanoseek.config import DenseConfig, ModelConfig, get_preset, get_student_preset


def close(a, b, rel):
    return abs(a - b) <= rel * abs(b)


def test_v3_param_counts():
    p = cost.count_params(get_preset("deepseek-v3"))
    assert close(p["total"], 671e9, 0.01)            # the report's number (no MTP)
    assert close(p["active"], 37e9, 0.03)
    assert close(p["total_hf"], 685e9, 0.01)         # HF checkpoint: MTP layer with own embed + head
    assert p["total_with_mtp"] == p["total"] + p["mtp"]


@pytest.mark.parametrize("cfg", [get_preset("tiny"), get_student_preset("tiny"),
                                 get_preset("tiny").replace(q_lora_rank=None, num_nextn_predict_layers=2)])
def test_count_params_matches_model(cfg):
    from nanoseek.model.dense import DenseTransformer
    from nanoseek.model.transformer import Transformer
    model = (DenseTransformer if isinstance(cfg, DenseConfig) else Transformer)(cfg)
    assert sum(p.numel() for p in model.parameters()) == cost.count_params(cfg)["total_with_mtp"]


@pytest.mark.parametrize("cfg", [get_preset("tiny"), get_student_preset("tiny")])
def test_flops_match_flop_counter(cfg):
    """Brute force: torch's FLOP counter over a real forward/backward. The weight matmuls (mm, addmm) are
    exactly 2 x matmul weights per token (the seq_len=0 formula). Attention shows up as bmm only
    when CPU SDPA takes its math path (MLA's value and key widths differ; a fused kernel is not
    counted): it then scores every key of the row, masked or not, i.e. the causal=False term."""
    from nanoseek.model.dense import DenseTransformer
    from nanoseek.model.transformer import Transformer
    model = (DenseTransformer if isinstance(cfg, DenseConfig) else Transformer)(cfg)
    x = torch.randint(0, cfg.vocab_size, (2, 16))
    with FlopCounterMode(display=False) as fc:
        model(x).float().sum().backward()
    counts = {str(op): n for op, n in fc.get_flop_counts()["Global"].items()}
    weights = cost.flops_per_token(cfg, 0, include_mtp=False)
    assert (counts.pop("aten.mm") + counts.pop("aten.addmm", 0)) / x.numel() == weights  # addmm: biased q/k/v
    attention = sum(counts.values()) / x.numel()
    assert attention == 0 or attention == cost.flops_per_token(cfg, 16, include_mtp=False, causal=False) - weights
    # forward only = a third; dense student: 2 x (all params - embedding - norms - biases) since the head is tied
    fwd = cost.flops_per_token(cfg, 0, include_mtp=False, training=False)
    assert fwd * 3 == cost.flops_per_token(cfg, 0, include_mtp=False)
    if isinstance(cfg, DenseConfig):
        p = cost.count_params(cfg)
        h, L = cfg.hidden_size, cfg.num_hidden_layers
        biases = L * (cfg.num_attention_heads + 2 * cfg.num_key_value_heads) * cfg.head_dim
        assert fwd == 2 * (p["total"] - p["norms"] - biases)  # embedding (tied) counted once, as the head


def test_attention_term():
    cfg = get_preset("tiny")
    T = 512
    extra = cost.flops_per_token(cfg, T, include_mtp=False, training=False) - \
        cost.flops_per_token(cfg, 0, include_mtp=False, training=False)
    per_layer = 2 * cfg.num_attention_heads * (cfg.qk_head_dim + cfg.v_head_dim) * (T / 2)
    assert extra == cfg.num_hidden_layers * per_layer
    full = cost.flops_per_token(cfg, T, include_mtp=False, training=False, causal=False)
    assert full - cost.flops_per_token(cfg, 0, include_mtp=False, training=False) == 2 * extra
    assert cost.flops_per_token(cfg, T) > cost.flops_per_token(cfg, T, include_mtp=False)


def test_v3_report_table():
    r = cost.v3_report_table()
    hours = {row["stage"]: row["gpu_hours"] for row in r["rows"]}
    assert close(hours["Pre-training"], 2664e3, 0.005)
    assert close(r["hours_per_trillion"], 180e3, 0.005)
    assert close(r["total_gpu_hours"], 2788e3, 0.005)
    assert close(r["total_dollars"], 5.576e6, 0.005)
    assert 50 < r["days_on_cluster"] < 65                       # "about two months"
    assert 0.2 < r["mfu_bf16"] < 0.6 and close(r["mfu_fp8"], r["mfu_bf16"] * 989 / 1979, 1e-9)


def test_training_cost_inverts_implied_mfu():
    v3 = get_preset("deepseek-v3")
    mfu = cost.implied_mfu(v3)
    est = cost.training_cost(v3, 14.8e12, mfu, gpu="H800")
    assert close(est["gpu_hours"], 2664e3, 1e-9) and close(est["dollars"], 5.328e6, 1e-9)
    with pytest.raises(ValueError):
        cost.training_cost(v3, 1e12, 0.4, gpu="A100", dtype="fp8")


def test_memory_monotone_in_world_size():
    for cfg in (get_preset("tiny"), get_preset("deepseek-v3"), get_student_preset("small")):
        totals = [cost.memory_estimate(cfg, world_size=w)["total"] for w in (1, 2, 8, 64)]
        assert all(a > b for a, b in zip(totals, totals[1:]))
    v3 = get_preset("deepseek-v3")
    m = cost.memory_estimate(v3, world_size=1)
    assert close(m["params"], 2 * cost.count_params(v3)["total_with_mtp"], 1e-9)   # bf16
    assert m["optimizer"] == 6 * m["params"]                                       # fp32 master + 2 moments
    no_fsdp = cost.memory_estimate(v3, world_size=8, fsdp=False, ep=8)
    assert cost.memory_estimate(v3, world_size=8)["params"] < no_fsdp["params"] < m["params"]
    ckpt = cost.memory_estimate(v3, activation_checkpointing=True)
    assert ckpt["activations"] < m["activations"]


def test_ep_comm():
    v3 = get_preset("deepseek-v3")
    c = cost.ep_comm_bytes_per_token(v3)
    assert c["per_layer"] == 2 * 8 * 7168 * 2                  # 2 x top-k x hidden x bf16
    assert c["per_token_fwd"] == 58 * c["per_layer"]
    assert cost.ep_comm_bytes_per_token(v3, 1, 2, max_targets=4)["per_layer"] == 4 * 7168 * 3


def test_summarize_run():
    cfg = get_preset("tiny")
    s = cost.summarize_run(cfg, tokens=10_000, wall_s=2.0, seq_len=256, peak_flops=1e11, price_per_hour=0.36)
    json.dumps(s)
    assert s["tokens_per_s"] == 5000
    assert close(s["flops"], 10_000 * cost.flops_per_token(cfg, 256), 1e-12)
    assert close(s["mfu"], s["achieved_flops_per_s"] / 1e11, 1e-12)
    assert close(s["dollars"], 2.0 / 3600 * 0.36, 1e-12)


def test_cli(tmp_path, capsys):
    out = cost.run(cost.Options(json=str(tmp_path / "c.json")))
    text = capsys.readouterr().out
    for needle in ("2,664K", "2,788K", "$5.576M", "180K", "MFU"):
        assert needle in text
    assert json.loads((tmp_path / "c.json").read_text())["v3_report"]["total_gpu_hours"] == out["v3_report"]["total_gpu_hours"]
    est = cost.run(cost.Options(preset="student-tiny", tokens=1e9, mfu=0.5, gpu="H100", memory=True))
    assert est["estimate"]["mfu"] == 0.5 and "tiny@8" in est["memory"]
    assert isinstance(cost.resolve_config("tiny"), ModelConfig)
