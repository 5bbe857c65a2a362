"""Logit parity with transformers' own DeepseekV3 / Qwen2 classes, both directions (fp32, random weights)."""
import pytest
import torch

import nanoseek
from nanoseek.config import DenseConfig, ModelConfig

transformers = pytest.importorskip("transformers")

YARN = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32, "mscale": 0.707,
        "mscale_all_dim": 1.0, "beta_fast": 32, "beta_slow": 1}
BASE = dict(vocab_size=128, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
            num_attention_heads=4, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8,
            n_routed_experts=8, num_experts_per_tok=2, max_position_embeddings=128)
CASES = {
    "qlora-moe-groups-yarn": dict(q_lora_rank=32, n_group=4, topk_group=2, first_k_dense_replace=1, rope_scaling=YARN),
    "no-qlora-moe-1group": dict(q_lora_rank=None, n_group=1, topk_group=1, first_k_dense_replace=1),
    "dense-only": dict(q_lora_rank=24, n_group=2, topk_group=1, first_k_dense_replace=3),
    "all-moe-shared2-noninterleaved": dict(q_lora_rank=32, n_group=2, topk_group=2, first_k_dense_replace=0,
                                          n_shared_experts=2, rope_interleave=False, tie_word_embeddings=True),
}
TOL = 1e-4


def _randomize_bias(model):
    for name, buf in model.named_buffers():
        if name.endswith("e_score_correction_bias"):
            buf.copy_(torch.randn_like(buf) * 0.05)


def _ids(vocab, B=2, T=40):
    return torch.randint(0, vocab, (B, T), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("case", list(CASES))
def test_nanoseek_to_transformers(case, tmp_path):
    from nanoseek.model.transformer import Transformer

    cfg = ModelConfig(**BASE, **CASES[case])
    ours = Transformer(cfg).eval()
    with torch.no_grad():
        _randomize_bias(ours)
    ours.save_pretrained(tmp_path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(hf).__name__ == "DeepseekV3ForCausalLM"
    x = _ids(cfg.vocab_size)
    with torch.no_grad():
        diff = (ours(x) - hf(x).logits).abs().max().item()
    print(f"{case}: nanoseek->HF max abs diff {diff:.2e}")
    assert diff <= TOL


@pytest.mark.parametrize("case", list(CASES))
def test_transformers_to_nanoseek(case, tmp_path):
    kw = {**BASE, **CASES[case]}
    rs = kw.pop("rope_scaling", None)
    hf_cfg = transformers.DeepseekV3Config(**kw, rope_parameters=({**rs, "rope_type": "yarn", "rope_theta": 10000.0}
                                                                if rs else None))
    hf = transformers.DeepseekV3ForCausalLM(hf_cfg).eval()
    with torch.no_grad():
        _randomize_bias(hf)
        for name, p in hf.named_parameters():
            if "layernorm" in name or "norm.weight" in name:
                p.copy_(1 + 0.1 * torch.randn_like(p))  # non-trivial norms so a skipped norm would show
    hf.save_pretrained(tmp_path)
    ours = nanoseek.from_pretrained(tmp_path)
    x = _ids(kw["vocab_size"])
    with torch.no_grad():
        diff = (ours(x) - hf(x).logits).abs().max().item()
    print(f"{case}: HF->nanoseek max abs diff {diff:.2e}")
    assert diff <= TOL


@pytest.mark.parametrize("tied", [True, False])
def test_qwen2_both_ways(tied, tmp_path):
    from nanoseek.model.dense import DenseTransformer

    cfg = DenseConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied)
    ours = DenseTransformer(cfg).eval()
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if name.endswith(".bias"):
                p.normal_(0, 0.1)  # q/k/v biases are zero at init; make them count
    ours.save_pretrained(tmp_path / "a")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "a").eval()
    assert type(hf).__name__ == "Qwen2ForCausalLM"
    x = _ids(cfg.vocab_size)
    with torch.no_grad():
        d1 = (ours(x) - hf(x).logits).abs().max().item()
    hf.save_pretrained(tmp_path / "b")
    back = nanoseek.from_pretrained(tmp_path / "b")
    with torch.no_grad():
        d2 = (back(x) - hf(x).logits).abs().max().item()
    print(f"qwen2 tied={tied}: nanoseek->HF {d1:.2e}, HF->nanoseek {d2:.2e}")
    assert d1 <= TOL and d2 <= TOL


def test_mtp_weights_use_deepseek_names(tmp_path):
    from safetensors import safe_open

    from nanoseek.model.transformer import Transformer

    cfg = ModelConfig(**BASE, **CASES["qlora-moe-groups-yarn"])
    m = Transformer(cfg)
    m.save_pretrained(tmp_path)
    keys = set(safe_open(str(tmp_path / "model.safetensors"), "pt").keys())
    n = cfg.num_hidden_layers
    for suffix in ("enorm.weight", "hnorm.weight", "eh_proj.weight", "shared_head.norm.weight",
                   "shared_head.head.weight", "embed_tokens.weight", "self_attn.kv_b_proj.weight",
                   "mlp.experts.7.down_proj.weight", "mlp.gate.e_score_correction_bias"):
        assert f"model.layers.{n}.{suffix}" in keys
    import json
    conf = json.loads((tmp_path / "config.json").read_text())
    assert conf["topk_method"] == "noaux_tc" and conf["scoring_func"] == "sigmoid"  # what vLLM needs
    back = nanoseek.from_pretrained(tmp_path)
    for (k1, v1), (k2, v2) in zip(m.state_dict().items(), back.state_dict().items()):
        assert k1 == k2 and torch.equal(v1, v2), k1
