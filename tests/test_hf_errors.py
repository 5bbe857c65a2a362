"""Bad checkpoints fail loudly with a message naming the file / tensor, never half-load."""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import nanoseek
from nanoseek.config import ModelConfig
from nanoseek.hf.load import CheckpointError
from nanoseek.model.transformer import Transformer

CFG = dict(vocab_size=64, hidden_size=32, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=2,
           num_attention_heads=2, q_lora_rank=16, kv_lora_rank=8, qk_nope_head_dim=4, qk_rope_head_dim=4,
           v_head_dim=4, n_routed_experts=4, n_group=2, topk_group=1, num_experts_per_tok=2, first_k_dense_replace=1)


@pytest.fixture
def saved(tmp_path):
    Transformer(ModelConfig(**CFG)).save_pretrained(tmp_path)
    return tmp_path


def test_roundtrip_ok(saved):
    assert isinstance(nanoseek.from_pretrained(saved), torch.nn.Module)


def test_missing_weights_file(saved):
    (saved / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model.safetensors"):
        nanoseek.from_pretrained(saved)


def test_truncated_weights_file(saved):
    f = saved / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        nanoseek.from_pretrained(saved)


def test_shape_mismatch_names_tensor(saved):
    conf = json.loads((saved / "config.json").read_text())
    conf["kv_lora_rank"] = 12
    (saved / "config.json").write_text(json.dumps(conf))
    with pytest.raises(CheckpointError, match=r"tensor model\.layers\.0\.self_attn\.kv_a.* has shape .*config.json implies"):
        nanoseek.from_pretrained(saved)


def test_missing_tensor_is_named(saved):
    sd = load_file(str(saved / "model.safetensors"))
    del sd["model.layers.1.mlp.shared_experts.up_proj.weight"]
    save_file(sd, str(saved / "model.safetensors"))
    with pytest.raises(CheckpointError, match="shared_experts.up_proj"):
        nanoseek.from_pretrained(saved)


def test_missing_expert_is_named(saved):
    sd = load_file(str(saved / "model.safetensors"))
    del sd["model.layers.1.mlp.experts.3.gate_proj.weight"]
    save_file(sd, str(saved / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"experts \[3\]"):
        nanoseek.from_pretrained(saved)


def test_unknown_architecture(saved):
    conf = json.loads((saved / "config.json").read_text())
    conf.update(model_type="llama", architectures=["LlamaForCausalLM"])
    (saved / "config.json").write_text(json.dumps(conf))
    with pytest.raises(ValueError, match="unknown architecture"):
        nanoseek.from_pretrained(saved)


def test_corrupt_config(saved):
    (saved / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="config.json"):
        nanoseek.from_pretrained(saved)


def test_not_a_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope does not exist"):
        nanoseek.from_pretrained(tmp_path / "nope")
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileNotFoundError, match="file is not a model directory"):
        nanoseek.from_pretrained(tmp_path / "file")


def test_invalid_config_values(saved):
    conf = json.loads((saved / "config.json").read_text())
    conf["topk_group"] = 7
    (saved / "config.json").write_text(json.dumps(conf))
    with pytest.raises(ValueError, match="topk_group"):
        nanoseek.from_pretrained(saved)
