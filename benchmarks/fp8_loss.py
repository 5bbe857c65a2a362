"""FP8 training's loss against fp32's: the same short pretraining twice, --precision default and fp8.

    OMP_NUM_THREADS=1 python -m benchmarks.fp8_loss [--steps 150] [--batch-size 8] [--seq-len 128] [--bf16-control]

Both runs: tiny preset, fp32 (no autocast), the same seed, so the same initial weights, tokenizer and
batches; only the GEMMs of `nanoseek.kernels.fp8` differ. The V3 report's bar: FP8's relative loss
error against its high-precision baseline stays below 0.25 %. A short run's trajectories drift apart
after any change of rounding, so `--bf16-control` adds a third run in bf16 autocast: its gap to fp32
is that drift for a precision change the field accepts. Writes <out>.json (per-step losses, the
per-step relative differences and their summaries) and <out>.png, and prints the gaps.
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

from nanoseek.train.pretrain import Options, pretrain

PAPER_BOUND = 0.0025  # V3 report §3.3: relative loss error below 0.25 %


def train(precision: str, dtype: str, run: Path, tokenizer: str, steps: int, batch: int, seq: int,
          seed: int) -> list[float]:
    """Next-token loss per step of one pretraining run."""
    opts = Options(out=str(run), steps=steps, batch_size=batch, seq_len=seq, dtype=dtype, device="cpu", seed=seed,
                   precision=precision, tokenizer=tokenizer, save_every=0, progress=False)
    pretrain(opts)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line]
    return [r["lm_loss"] for r in rows]


def summarize(fp32: list[float], other: list[float], window: int) -> dict:
    """Per-step relative differences (other - fp32) / fp32, their mean and mean magnitude, and the
    relative gap of the two runs' mean loss over the last `window` steps."""
    rel = [(b - a) / a for a, b in zip(fp32, other)]
    last32, last = statistics.fmean(fp32[-window:]), statistics.fmean(other[-window:])
    return {"relative_difference": rel, "mean_relative_difference": statistics.fmean(rel),
            "mean_abs_relative_difference": statistics.fmean(abs(r) for r in rel),
            "last_window_loss_fp32": last32, "last_window_loss": last,
            "last_window_relative_gap": (last - last32) / last32}


def plot(fp32: list[float], fp8: list[float], rel: list[float], control: list[float] | None, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = range(1, len(fp32) + 1)
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 6), sharex=True, height_ratios=(2, 1))
    top.plot(steps, fp32, label="fp32")
    top.plot(steps, fp8, label="fp8 (e4m3, 1x128 / 128x128 scales)", alpha=0.8)
    top.set_ylabel("next-token loss")
    top.legend()
    bottom.plot(steps, [100 * r for r in rel], color="C1", label="fp8")
    if control is not None:
        bottom.plot(steps, [100 * r for r in control], color="C2", alpha=0.7, label="bf16 autocast")
        bottom.legend(fontsize="small")
    for bound in (-100 * PAPER_BOUND, 100 * PAPER_BOUND):
        bottom.axhline(bound, color="grey", linestyle="--", linewidth=0.8)
    bottom.set_ylabel("(run - fp32) / fp32, %")
    bottom.set_xlabel("step")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.fp8_loss", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--window", type=int, default=20, help="last steps whose mean losses give the gap")
    p.add_argument("--bf16-control", action="store_true", help="a third run in bf16 autocast (module docstring)")
    p.add_argument("--out", default="docs/fp8-loss", help="writes <out>.json and <out>.png")
    a = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        runs = Path(tmp)
        shape = (a.steps, a.batch_size, a.seq_len, a.seed)
        fp32 = train("default", "fp32", runs / "fp32", "", *shape)
        tok = str(runs / "fp32" / "tokenizer")  # the first run's: the same tokens, so the same batches
        fp8 = train("fp8", "fp32", runs / "fp8", tok, *shape)
        bf16 = train("default", "bf16", runs / "bf16", tok, *shape) if a.bf16_control else None
    window = min(a.window, a.steps)
    s = summarize(fp32, fp8, window)
    control = {} if bf16 is None else {"loss_bf16": bf16, "bf16_vs_fp32": summarize(fp32, bf16, window)}
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    setup = {"preset": "tiny", "steps": a.steps, "batch_size": a.batch_size, "seq_len": a.seq_len, "seed": a.seed,
             "last_window": window}
    out.with_suffix(".json").write_text(
        json.dumps({**setup, "loss_fp32": fp32, "loss_fp8": fp8, "fp8_vs_fp32": s, **control}, indent=1) + "\n")
    plot(fp32, fp8, s["relative_difference"], control and control["bf16_vs_fp32"]["relative_difference"],
         out.with_suffix(".png"))
    print(f"fp8 vs fp32 next-token loss, {a.steps} steps of {a.batch_size} x {a.seq_len}: "
          f"last {window} steps {s['last_window_loss']:.4f} vs {s['last_window_loss_fp32']:.4f}, "
          f"relative gap {100 * s['last_window_relative_gap']:+.3f} %; per step mean "
          f"{100 * s['mean_relative_difference']:+.3f} %, mean |.| {100 * s['mean_abs_relative_difference']:.3f} % "
          f"(V3 report: < {100 * PAPER_BOUND:.2f} %) -> {out}.json, {out}.png")
    if control:
        c = control["bf16_vs_fp32"]
        print(f"bf16 autocast vs fp32 (the control): last {window} steps relative gap "
              f"{100 * c['last_window_relative_gap']:+.3f} %; "
              f"per step mean {100 * c['mean_relative_difference']:+.3f} %, "
              f"mean |.| {100 * c['mean_abs_relative_difference']:.3f} %")

if __name__ == "__main__":
    main()
