"""Peak training memory (weights + grads + AdamW state + activations): nanoseek vs HF DeepseekV3ForCausalLM.

Each side runs in its own fresh process, loading the same checkpoint, so one side's allocations cannot
hide in the other's peak. CPU: peak resident memory (sampled every ms) over the RSS before the model loads; CUDA: the allocator's
peak. Two optimizer steps (the second one has AdamW's state allocated).
"""
from __future__ import annotations

import json
import subprocess
import sys
import tempfile

from benchmarks.common import Row


def _child(side: str, path: str, batch: int, seq: int, device: str) -> None:
    import os
    import threading

    import torch
    from transformers import AutoModelForCausalLM

    from nanoseek.kernels import speedup
    from nanoseek.hf.load import from_pretrained

    page_mb = os.sysconf("SC_PAGE_SIZE") / 2**20
    peak_seen = [0.0]

    def rss_mb() -> float:  # current resident set (the process's high-water mark also counts imports)
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * page_mb

    def poll(stop: threading.Event) -> None:
        while not stop.is_set():
            peak_seen[0] = max(peak_seen[0], rss_mb())
            stop.wait(0.001)

    torch.manual_seed(0)
    x = torch.randint(0, 512, (batch, seq + 1), device=device)
    base = rss_mb()
    if side == "ours":
        if device == "cpu":
            from nanoseek.train.heap import retain_freed_memory
            retain_freed_memory()  # as nanoseek's trainer does
        model = from_pretrained(path).to(device).train()
        speedup(model, for_="train")  # as nanoseek's trainer does
        loss_fn = lambda: model.loss(x[:, :-1], x[:, 1:])["loss"]  # noqa: E731
    else:
        model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="sdpa").to(device).train()
        loss_fn = lambda: model(input_ids=x[:, :-1], labels=x[:, :-1].clone()).loss  # noqa: E731
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)  # both trainers' default
    cuda = device.startswith("cuda")
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else torch.autocast("cpu", enabled=False)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    stop = threading.Event()
    watcher = threading.Thread(target=poll, args=(stop,), daemon=True)
    watcher.start()
    for _ in range(2):
        with amp:
            loss = loss_fn()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    stop.set()
    watcher.join()
    peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else max(peak_seen[0], rss_mb()) - base
    print(json.dumps({"peak_mb": peak}))


def run(preset: str = "tiny", batch: int = 8, seq: int = 256, reps: int = 1, device: str = "cpu") -> list[Row]:
    import torch

    from nanoseek.config import get_preset
    from nanoseek.model.transformer import Transformer

    torch.manual_seed(0)
    cfg = get_preset(preset).replace(num_nextn_predict_layers=0)  # HF has no MTP: like for like
    out = {}
    with tempfile.TemporaryDirectory() as d:
        Transformer(cfg).save_pretrained(d)
        for side in ("ours", "hf"):
            code = f"from benchmarks.train_memory import _child; _child({side!r}, {d!r}, {batch}, {seq}, {device!r})"
            done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
            out[side] = json.loads(done.stdout.strip().splitlines()[-1])["peak_mb"]
    what = "allocator peak" if device.startswith("cuda") else "peak RSS over the RSS before loading"
    return [Row(f"peak train memory ({preset}, {batch}x{seq}, {device})", out["ours"], out["hf"], "MiB",
                out["hf"] / out["ours"], f"{what}, 2 AdamW steps, each side in a fresh process")]
