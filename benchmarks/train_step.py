"""Pretraining step (forward + backward + AdamW) tokens/s: nanoseek vs HF DeepseekV3ForCausalLM, same config and weights."""
from __future__ import annotations

import contextlib
import gc
import tempfile

import torch

from benchmarks.common import Row, time_each, time_pair
from nanoseek.config import get_preset
from nanoseek.kernels import speedup
from nanoseek.model.transformer import Transformer


def _fits_twice(model: torch.nn.Module, device: str) -> bool:
    """Do two copies of the training state (weights, gradients, AdamW: 16 bytes per fp32
    parameter) fit in half of the free memory? `small` on a 24 GiB CPU host does not (13 GiB each)."""
    need = 2 * 16 * sum(p.numel() for p in model.parameters())
    if device.startswith("cuda"):
        free = torch.cuda.mem_get_info(torch.device(device))[0]
    else:  # pages free + reclaimable (Linux); elsewhere assume it fits
        import os
        free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else float("inf")
    return need < free / 2


def run(preset: str = "tiny", batch: int = 8, seq: int = 256, reps: int = 5, device: str = "cpu") -> list[Row]:
    """fp32 on CPU; bf16 autocast (fp32 master weights) on CUDA, for both sides. When both models'
    training state does not fit in memory at once, each side runs alone: ours, then HF's."""
    from transformers import AutoModelForCausalLM

    from nanoseek.train.heap import retain_freed_memory
    if device == "cpu":
        retain_freed_memory()  # as nanoseek's trainer does; HF's side, in this process, gains from it too

    torch.manual_seed(0)
    cfg = get_preset(preset)
    ours = Transformer(cfg.replace(num_nextn_predict_layers=0))  # HF has no MTP: compare like for like
    d = tempfile.TemporaryDirectory()
    ours.save_pretrained(d.name)
    together = _fits_twice(ours, device)
    load_hf = lambda: AutoModelForCausalLM.from_pretrained(d.name, attn_implementation="sdpa").to(device).train()  # noqa: E731
    ours = ours.to(device).train()
    speedup(ours, for_="train")  # as nanoseek's trainer does
    hf = load_hf() if together else None
    x = torch.randint(0, cfg.vocab_size, (batch, seq + 1), device=device)
    cuda = device.startswith("cuda")
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else contextlib.nullcontext()
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    # fused AdamW on both sides: nanoseek's trainer uses it, and so does HF's Trainer by default (adamw_torch_fused)
    opt_a = torch.optim.AdamW(ours.parameters(), lr=1e-4, fused=True)
    opt_b = torch.optim.AdamW(hf.parameters(), lr=1e-4, fused=True) if together else None

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

    if together:
        a, b = time_pair(step_ours, step_hf, reps=reps)
    else:
        print(f"  {preset}: two copies of the training state do not fit in memory; timing ours, then HF's", flush=True)
        a = time_each(step_ours, reps)
        del ours, opt_a
        gc.collect()
        hf = load_hf()
        opt_b = torch.optim.AdamW(hf.parameters(), lr=1e-4, fused=True)
        b = time_each(step_hf, reps)
    d.cleanup()
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
                f"peak {peak / 1e9:,.0f} GFLOP/s measured in this run; {per_tok / 1e6:.1f} MFLOP/token"
                + ("" if together else "; sides timed one after the other (memory)"))]
