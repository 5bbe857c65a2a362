"""Pretraining step (forward + backward + AdamW) tokens/s: nanoseek vs HF DeepseekV3ForCausalLM, same config and weights."""
from __future__ import annotations

import contextlib
import tempfile

import torch

from benchmarks.common import Row, time_pair
from nanoseek.config import get_preset
from nanoseek.model.transformer import Transformer


def run(preset: str = "tiny", batch: int = 8, seq: int = 256, reps: int = 5, device: str = "cpu") -> list[Row]:
    """fp32 on CPU; bf16 autocast (fp32 master weights) on CUDA, for both sides."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    cfg = get_preset(preset)
    ours = Transformer(cfg.replace(num_nextn_predict_layers=0))  # HF has no MTP: compare like for like
    with tempfile.TemporaryDirectory() as d:
        ours.save_pretrained(d)
        hf = AutoModelForCausalLM.from_pretrained(d, attn_implementation="sdpa")
    ours, hf = ours.to(device).train(), hf.to(device).train()
    x = torch.randint(0, cfg.vocab_size, (batch, seq + 1), device=device)
    cuda = device.startswith("cuda")
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else contextlib.nullcontext()
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    # fused AdamW on both sides: nanoseek's trainer uses it, and so does HF's Trainer by default (adamw_torch_fused)
    opt_a = torch.optim.AdamW(ours.parameters(), lr=1e-4, fused=True)
    opt_b = torch.optim.AdamW(hf.parameters(), lr=1e-4, fused=True)

    def step_ours():
        with amp:
            loss = ours.loss(x[:, :-1], x[:, 1:])["loss"]
        opt_a.zero_grad(set_to_none=True)
        loss.backward()
        opt_a.step()
        sync()

    def step_hf():
        with amp:
            loss = hf(input_ids=x[:, :-1], labels=x[:, :-1].clone()).loss  # HF shifts labels itself
        opt_b.zero_grad(set_to_none=True)
        loss.backward()
        opt_b.step()
        sync()

    a, b = time_pair(step_ours, step_hf, reps=reps)
    tokens = batch * seq
    dtype = "bf16 autocast" if cuda else "fp32"
    # MFU: model FLOPs (6 x active matmul params + causal attention, per token) over the peak
    # measured now, in this process (CPU: fp32 matmul; GPU: datasheet bf16)
    from nanoseek.cost import flops_per_token
    from nanoseek.hardware import device_peak_flops
    peak = device_peak_flops(device)
    per_tok = flops_per_token(cfg.replace(num_nextn_predict_layers=0), seq)
    return [Row(f"train step fwd+bwd+AdamW ({preset}, {batch}x{seq}, {dtype}, {device})", tokens / a, tokens / b,
                "tokens/s", b / a, "no MTP on either side"),
            Row(f"train MFU ({preset}, {batch}x{seq}, {dtype}, {device})", 100 * tokens / a * per_tok / peak,
                100 * tokens / b * per_tok / peak, "% of peak", b / a,
                f"peak {peak / 1e9:,.0f} GFLOP/s measured in this run; {per_tok / 1e6:.1f} MFLOP/token")]
