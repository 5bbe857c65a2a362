"""Optional speedrun stages (`--rl-objectives`): RL's stability machinery compared on the MoE policy.

Every arm starts from the cold-start SFT model, samples its rollouts with a **bf16** engine while the trainer stays
fp32 (the rollout/trainer mismatch the machinery is for), and takes the same number of steps with the same prompts
per step, so each arm sees as many rollouts and takes about the same wall time:

    grpo      the clipped token ratio (PPO / GRPO with DAPO's clip-higher), as the GRPO stage
    grpo-r3   the same + rollout routing replay: the trainer routes each token to the experts the engine chose
    gspo      one length-normalized ratio per sequence, clipped at GSPO's 3e-4 / 4e-4 (Qwen, 2025)
    cispo     the importance weight clipped above at 1.28, stop-gradient, on every token (MiniMax-M1, 2025)

Each arm takes two optimizer steps per rollout batch (--mu 2): with one, the ratio to the old policy is exactly 1
and the three objectives have the same gradient. Held-out accuracy is GRPO's own greedy evaluation at the first and
last step on the run's test questions; the report adds mismatch KL, router flips, clipping and whether a run
collapsed, per arm over the seeds (`--seeds`).
"""
from __future__ import annotations

from pathlib import Path

from nanoseek.speedrun.report import metrics_rows

ARMS = {
    "grpo": {},
    "grpo-r3": {"routing_replay": "rollout"},
    "gspo": {"loss": "gspo", "eps_low": 3e-4, "eps_high": 4e-4},
    "cispo": {"loss": "cispo", "eps_low": 1e9},  # MiniMax: no lower bound on the weight
}
SHARED = {"rollout_dtype": "bf16", "mu": 2, "log_router_flips": True}
COLLAPSE_DROP = 0.10  # held-out accuracy lost over the run that counts as a collapse
SMOOTH = 10  # steps in the reward plot's moving average: one step's reward is too noisy to show a trend


def stage(arm: str, seed: int, first_seed: int) -> str:
    return f"rl-{arm}" + ("" if seed == first_seed else f"-seed{seed}")


def arm_options(arm: str, base: dict, steps: int, seed: int, heldout: int) -> dict:
    """GRPO options of one arm: the GRPO stage's (`base`), the shared bf16-engine setting, the arm's own."""
    if arm not in ARMS:
        raise SystemExit(f"speedrun: unknown --rl-objectives arm {arm!r} (choose from {', '.join(ARMS)})")
    return {**base, **SHARED, **ARMS[arm], "steps": steps, "seed": seed, "eval_n": heldout}


def _mean(xs) -> float | None:
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def arm_summary(stage_dir: Path) -> dict | None:
    """One run's figures from its metrics.jsonl: held-out greedy accuracy first/last, rewards, mismatch, flips."""
    rows = metrics_rows(stage_dir / "metrics.jsonl")
    evals = [r for r in rows if "eval_accuracy" in r]
    steps = [r for r in rows if "reward" in r]
    if len(evals) < 2 or not steps:
        return None
    tenth = max(1, len(steps) // 10)
    out = {"start": evals[0]["eval_accuracy"], "end": evals[-1]["eval_accuracy"],
           "reward_first": _mean(r["reward"] for r in steps[:tenth]),
           "reward_last": _mean(r["reward"] for r in steps[-tenth:]),
           "mismatch_kl": _mean(r.get("mismatch_kl") for r in steps),
           "clip_frac": _mean(r.get("clip_frac") for r in steps),
           "flips": _mean(r.get("router_flip_rate") for r in steps),
           "flips_unreplayed": _mean(r.get("router_flip_rate_unreplayed") for r in steps),
           "skipped": steps[-1].get("skipped", 0), "steps": steps}
    out["collapsed"] = out["end"] < out["start"] - COLLAPSE_DROP or out["skipped"] > 0
    return out


def _fmt(v, scale=100.0, digits=1) -> str:
    return "–" if v is None else f"{scale * v:.{digits}f}"


def _spread(xs: list[float]) -> str:
    m = sum(xs) / len(xs)
    sd = (sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) ** 0.5 if len(xs) > 1 else 0.0
    return f"{100 * m:.1f} ± {100 * sd:.1f}"


def section(root: Path, arms: list[str], seeds: list[int], stages: dict) -> tuple[list[str], list[Path]]:
    """The report's table (one row per arm, seeds pooled) and plot; nothing when no arm ran."""
    runs = {a: [(s, arm_summary(root / stage(a, s, seeds[0]))) for s in seeds] for a in arms}
    runs = {a: [(s, r) for s, r in rs if r] for a, rs in runs.items()}
    runs = {a: rs for a, rs in runs.items() if rs}
    if not runs:
        return [], []
    lines = ["", "## RL objectives on a bf16 rollout engine (optional stages)", "",
             "Each arm from the cold-start SFT model, bf16 engine + fp32 trainer, two optimizer steps per rollout "
             "batch, the same steps and prompts per step (module doc of `speedrun/rl_objectives.py`). Held-out = "
             "greedy accuracy on the seed's draw of test questions before and after (mean ± sample std over seeds); "
             "gain = after − before on the same questions, each seed's and their mean; collapse = a seed losing "
             f"more than {100 * COLLAPSE_DROP:.0f} points or skipping non-finite steps.", "",
             "| arm | seeds | held-out before % | held-out after % | gain per seed (pts) | mean gain | "
             "reward first → last tenth | mismatch KL / token | router flips % | flips without replay % | "
             "clipped % | wall time / seed | collapsed |",
             "|---|---:|---:|---:|---|---:|---|---:|---:|---:|---:|---:|---|"]
    for arm, rs in runs.items():
        ss = [r for _, r in rs]
        gains = [100 * (r["end"] - r["start"]) for r in ss]
        walls = [stages[stage(arm, s, seeds[0])]["wall_s"] for s, _ in rs if stage(arm, s, seeds[0]) in stages]
        lines.append(
            f"| {arm} | {len(ss)} | {_spread([r['start'] for r in ss])} | {_spread([r['end'] for r in ss])} | "
            f"{' / '.join(f'{g:+.1f}' for g in gains)} | {sum(gains) / len(gains):+.1f} | "
            f"{_mean(r['reward_first'] for r in ss):.3f} → {_mean(r['reward_last'] for r in ss):.3f} | "
            f"{_mean(r['mismatch_kl'] for r in ss):.2g} | {_fmt(_mean(r['flips'] for r in ss), digits=2)} | "
            f"{_fmt(_mean(r['flips_unreplayed'] for r in ss), digits=2)} | "
            f"{_fmt(_mean(r['clip_frac'] for r in ss), digits=2)} | "
            f"{(_mean(walls) or 0):.0f} s | {sum(r['collapsed'] for r in ss)} of {len(ss)} |")
    return lines, [_plot(root, runs)]


def _moving_average(xs: list[float], k: int) -> list[float]:
    return [sum(xs[max(0, i - k + 1):i + 1]) / (i + 1 - max(0, i - k + 1)) for i in range(len(xs))]


def _plot(root: Path, runs: dict) -> Path:
    import matplotlib  # heavy, and only the plot needs it
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for i, (arm, rs) in enumerate(runs.items()):
        color = f"C{i}"
        for j, (_, r) in enumerate(rs):
            x = [row["step"] for row in r["steps"]]
            ax1.plot(x, _moving_average([row["reward"] for row in r["steps"]], SMOOTH), color=color, alpha=0.7, lw=1,
                     label=arm if j == 0 else None)
            ax2.plot(x, [row.get("mismatch_kl", float("nan")) for row in r["steps"]], color=color, alpha=0.7, lw=1,
                     label=arm if j == 0 else None)
    ax1.set(xlabel="step", ylabel="mean reward of the rollouts",
            title=f"reward, {SMOOTH}-step moving average (a line per seed)")
    ax2.set(xlabel="step", ylabel="k3 KL per token", yscale="log", title="engine (bf16) vs trainer (fp32) mismatch")
    ax1.legend(fontsize=8)
    ax2.legend(fontsize=8)
    fig.tight_layout()
    out = root / "plots" / "rl_objectives.png"
    out.parent.mkdir(exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
