"""Scaling curves of nanoseek alone: tokens/s vs batch size and vs sequence length, training and decoding.

    python -m benchmarks.scaling [--preset tiny] [--device cpu] [--out docs/scaling-cpu]

Training: one fwd+bwd+AdamW step (no MTP), batch 1..16 at 256 tokens, and 256..4096 tokens at batch 1.
Decoding: engine decode steps only (prefill excluded), batch 1..128 at a 256-token context, and contexts
256..4096 at batch 8. Writes <out>.png (four panels) and <out>.json.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from nanoseek.config import get_preset
from nanoseek.infer.engine import Engine
from nanoseek.kernels import speedup
from nanoseek.infer.sampling import SamplingParams
from nanoseek.model.transformer import Transformer

BATCHES_TRAIN, SEQS = (1, 2, 4, 8, 16), (256, 512, 1024, 2048, 4096)
BATCHES_DECODE, CONTEXTS = (1, 4, 16, 64, 128), (256, 512, 1024, 2048, 4096)
NEW = 32  # decoded tokens per measurement


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def train_tokens_per_s(model, batch: int, seq: int, device: str, reps: int) -> float:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randint(0, model.config.vocab_size, (batch, seq + 1), device=device)
    times = []
    for i in range(reps + 1):  # the first step allocates AdamW's state: not timed
        t = time.perf_counter()
        model.loss(x[:, :-1], x[:, 1:])["loss"].backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        _sync(device)
        if i:
            times.append(time.perf_counter() - t)
    return batch * seq / statistics.median(times)


@torch.inference_mode()
def decode_tokens_per_s(model, batch: int, context: int, device: str) -> float:
    engine = Engine(model, max_batch=batch, max_len=context + 1)
    sp = SamplingParams(temperature=0, max_tokens=NEW, ignore_eos=True)
    for _ in range(batch):
        engine.add_request(torch.randint(2, model.config.vocab_size, (context - NEW,)).tolist(), sp)
    engine.step()  # prefill + first token
    _sync(device)
    t, steps = time.perf_counter(), 0
    while engine.has_work():
        engine.step()
        steps += 1
    _sync(device)
    return batch * steps / (time.perf_counter() - t)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.scaling", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny")
    p.add_argument("--device", default="cpu")
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--out", default="docs/scaling-cpu", help="output path without extension (.png and .json)")
    a = p.parse_args(argv)
    torch.manual_seed(0)
    cfg = get_preset(a.preset).replace(num_nextn_predict_layers=0, max_position_embeddings=max(SEQS + CONTEXTS) + 1)
    model = Transformer(cfg).to(a.device)
    res: dict[str, dict[int, float]] = {"train_batch": {}, "train_seq": {}, "decode_batch": {}, "decode_context": {}}
    model.train()
    speedup(model, for_="train")  # as nanoseek's trainer does (the engine adds its decode kernels)
    for b in BATCHES_TRAIN:
        res["train_batch"][b] = train_tokens_per_s(model, b, 256, a.device, a.reps)
        print(f"train  batch {b:>4} x 256     {res['train_batch'][b]:>9,.0f} tokens/s", flush=True)
    for s in SEQS:
        res["train_seq"][s] = train_tokens_per_s(model, 1, s, a.device, a.reps)
        print(f"train  batch    1 x {s:<5}   {res['train_seq'][s]:>9,.0f} tokens/s", flush=True)
    model.eval()
    for b in BATCHES_DECODE:
        res["decode_batch"][b] = decode_tokens_per_s(model, b, 256, a.device)
        print(f"decode batch {b:>4}, context 256  {res['decode_batch'][b]:>9,.0f} tokens/s", flush=True)
    for c in CONTEXTS:
        res["decode_context"][c] = decode_tokens_per_s(model, 8, c, a.device)
        print(f"decode batch    8, context {c:<5} {res['decode_context'][c]:>9,.0f} tokens/s", flush=True)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"preset": a.preset, "device": a.device, **res}, indent=2) + "\n")
    plot(res, out.with_suffix(".png"), f"{a.preset} preset, {a.device}, {torch.get_num_threads()} threads")
    print(f"wrote {out.with_suffix('.png')} and {out.with_suffix('.json')}")


def plot(res: dict, path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.6))
    labels = [("train_batch", "training: batch (x 256 tokens)"), ("train_seq", "training: tokens per sequence"),
              ("decode_batch", "decoding: batch (context 256)"), ("decode_context", "decoding: context (batch 8)")]
    for ax, (key, xlabel) in zip(axes, labels):
        xs = sorted(res[key])
        ax.plot(xs, [res[key][x] for x in xs], marker="o")
        ax.set_xscale("log", base=2)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("tokens/s")
        ax.grid(alpha=0.3)
    fig.suptitle(f"nanoseek throughput scaling ({title})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
