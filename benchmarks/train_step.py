"""Pretraining step (forward + backward + AdamW) tokens/s: nanoseek vs HF DeepseekV3ForCausalLM, same config and weights."""
from __future__ import annotations

import tempfile

import torch

from benchmarks.common import Row, time_pair
from nanoseek.config import get_preset
from nanoseek.model.transformer import Transformer


def run(preset: str = "tiny", batch: int = 8, seq: int = 256, reps: int = 5) -> list[Row]:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    cfg = get_preset(preset)
    ours = Transformer(cfg.replace(num_nextn_predict_layers=0)).train()  # HF has no MTP: compare like for like
    with tempfile.TemporaryDirectory() as d:
        ours.save_pretrained(d)
        hf = AutoModelForCausalLM.from_pretrained(d, attn_implementation="sdpa").train()
    x = torch.randint(0, cfg.vocab_size, (batch, seq + 1))
    opt_a = torch.optim.AdamW(ours.parameters(), lr=1e-4)
    opt_b = torch.optim.AdamW(hf.parameters(), lr=1e-4)

    def step_ours():
        loss = ours.loss(x[:, :-1], x[:, 1:])["loss"]
        opt_a.zero_grad(set_to_none=True)
        loss.backward()
        opt_a.step()

    def step_hf():
        loss = hf(input_ids=x[:, :-1], labels=x[:, :-1].clone()).loss  # HF shifts labels itself
        opt_b.zero_grad(set_to_none=True)
        loss.backward()
        opt_b.step()

    a, b = time_pair(step_ours, step_hf, reps=reps)
    tokens = batch * seq
    return [Row(f"train step fwd+bwd+AdamW ({preset}, {batch}x{seq}, fp32)", tokens / a, tokens / b, "tokens/s",
                b / a, "no MTP on either side")]
