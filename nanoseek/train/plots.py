"""PNG plots of a run from its metrics.jsonl (matplotlib, Agg: no display needed).

`plot_metrics(path, out_dir, panels)` draws one PNG per panel; a panel is a list of metric keys
drawn against step. A key whose value is a list (e.g. the per-layer expert load) becomes one line
per element. Stages pass their own panels (GRPO: reward, KL, length ...); keys a run did not log
are skipped, so one panel set works for every stage.
"""
from __future__ import annotations

import json
from pathlib import Path

TRAIN_PANELS: dict[str, dict] = {
    "loss": {"keys": ["loss", "lm_loss", "mtp_loss"], "ylabel": "cross-entropy (nats)", "log": True},
    "lr": {"keys": ["lr"], "ylabel": "learning rate"},
    "expert_load": {"keys": ["load_max_over_mean_per_layer"], "ylabel": "max / mean tokens per expert",
                    "title": "MoE load balance (1 = perfect)"},
    "tokens_per_s": {"keys": ["tokens_per_s"], "ylabel": "tokens / s", "smooth": 10},
}


def read_metrics(path: str | Path) -> list[dict]:
    return [json.loads(ln) for ln in Path(path).read_text().splitlines() if ln.strip()]


def _smooth(ys: list[float], k: int) -> list[float]:
    out, acc = [], 0.0
    for i, y in enumerate(ys):  # trailing moving average: keeps the first points honest
        acc += y - (ys[i - k] if i >= k else 0.0)
        out.append(acc / min(i + 1, k))
    return out


def plot_metrics(path: str | Path, out_dir: str | Path, panels: dict[str, dict] | None = None) -> list[Path]:
    import matplotlib  # heavy, and only the plots need it
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(path)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, spec in (panels or TRAIN_PANELS).items():
        lines: dict[str, tuple[list, list]] = {}
        for r in rows:
            for key in spec["keys"]:
                v = r.get(key)
                if v is None:
                    continue
                for label, y in ([(f"{key}[{i}]", y) for i, y in enumerate(v)] if isinstance(v, list) else [(key, v)]):
                    xs, ys = lines.setdefault(label, ([], []))
                    xs.append(r["step"])
                    ys.append(y)
        if not lines:
            continue
        fig, ax = plt.subplots(figsize=(7, 4))
        for label, (xs, ys) in lines.items():
            ax.plot(xs, _smooth(ys, spec["smooth"]) if spec.get("smooth") else ys, label=label, linewidth=1.2)
        if spec.get("log"):
            ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_ylabel(spec.get("ylabel", name))
        ax.set_title(spec.get("title", name))
        ax.grid(alpha=0.3)
        if len(lines) > 1:
            ax.legend(fontsize=8)
        fig.tight_layout()
        p = out / f"{name}.png"
        fig.savefig(p, dpi=110)
        plt.close(fig)
        written.append(p)
    return written
