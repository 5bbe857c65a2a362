"""The plots of a GRPO run: reward with its spread, and one panel per logged signal."""
from __future__ import annotations

from pathlib import Path

from nanoseek.train import mismatch
from nanoseek.train.plots import plot_metrics, read_metrics


PANELS = {
    "accuracy": {"keys": ["accuracy", "eval_accuracy"], "ylabel": "share correct", "title": "accuracy (train rollouts, held-out greedy)"},
    "reward_components": {"keys": ["reward_accuracy", "reward_format", "reward_language", "reward_length"], "ylabel": "mean"},
    "kl": {"keys": ["kl"], "ylabel": "k3 KL to the reference"},
    "length": {"keys": ["response_len", "response_len_max"], "ylabel": "completion tokens"},
    "clip_frac": {"keys": ["clip_frac"], "ylabel": "share of tokens clipped"},
    "entropy": {"keys": ["entropy"], "ylabel": "nats / token"},
    "zero_var_groups": {"keys": ["zero_var_groups"], "ylabel": "share of groups with equal rewards"},
    "advantage": {"keys": ["adv_abs"], "ylabel": "mean |advantage| (0 for equal-reward groups)"},
    "throughput": {"keys": ["rollout_tokens_per_s", "train_tokens_per_s"], "ylabel": "tokens / s"},
}


def plot_run(out: Path) -> list[Path]:
    """Reward mean with its spread (mean +- std over the batch) plus the line panels."""
    import matplotlib  # optional, and slow to import: only when a run plots
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = [r for r in read_metrics(out / "metrics.jsonl") if "reward" in r]
    task_keys = sorted({k for r in rows for k in r if k.startswith("accuracy/")})
    share_keys = sorted({k for r in rows for k in r if k.startswith("task_share/")})
    layer_keys = sorted({k for r in rows for k in r if k.startswith("router_flip_rate/")})
    paths = plot_metrics(out / "metrics.jsonl", out / "plots", {**PANELS, **mismatch.PANELS, "accuracy_per_task": {
        "keys": task_keys, "ylabel": "share correct (rollouts)", "smooth": 5, "title": "accuracy per task"},
        "task_share": {"keys": share_keys, "ylabel": "share of the step's prompts",
                       "title": "prompts per task (--task-weighting learnable)"},
        "router_flips_per_layer": {"keys": layer_keys, "ylabel": "share of tokens", "title": "router flips per MoE layer"}})
    if rows:
        x = [r["step"] for r in rows]
        m = [r["reward"] for r in rows]
        s = [r["reward_std"] for r in rows]
        fig, ax = plt.subplots(figsize=(7, 4))
        ax.plot(x, m, label="mean reward")
        ax.fill_between(x, [a - b for a, b in zip(m, s)], [a + b for a, b in zip(m, s)], alpha=0.25, label="+- std")
        ax.set(xlabel="step", ylabel="reward", title="GRPO reward")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / "plots" / "reward.png", dpi=110)
        plt.close(fig)
        paths.append(out / "plots" / "reward.png")
    return paths
