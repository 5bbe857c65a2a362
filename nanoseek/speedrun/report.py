"""The speedrun's report card: one markdown table over all stages, the learning checks, and PNG plots."""
from __future__ import annotations

import json
import platform
from pathlib import Path

from nanoseek.eval import PASS_KS
from nanoseek.hardware import describe_device


def metrics_rows(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def _pct(v) -> str:
    return "–" if v is None else f"{100 * v:.1f}"


def _plot(root: Path, results: dict) -> list[Path]:
    import matplotlib  # heavy, and only the plots need it
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = root / "plots"
    out.mkdir(exist_ok=True)
    paths = []

    def save(fig, name: str) -> None:
        fig.tight_layout()
        paths.append(out / f"{name}.png")
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)

    fig, ax = plt.subplots(figsize=(9, 4))
    labels = [r["label"] for r in results.values()]
    ax.bar(range(len(labels)), [100 * (r["pass@1"] or 0) for r in results.values()], color="#4c72b0", label="pass@1")
    ax.plot(range(len(labels)), [100 * (r["cons@k"] or 0) for r in results.values()], "o", color="#dd8452",
            label="cons@k")
    ax.set_xticks(range(len(labels)), labels, rotation=25, ha="right", fontsize=8)
    ax.set_ylabel("held-out accuracy (%)")
    ax.set_title("accuracy per stage")
    ax.legend()
    save(fig, "accuracy")

    fig, ax = plt.subplots(figsize=(7, 4))
    for stage in ("pretrain", "sft", "sft2"):
        rows = [r for r in metrics_rows(root / stage / "metrics.jsonl") if "loss" in r]
        if rows:
            ax.plot([r["step"] for r in rows], [r.get("lm_loss", r["loss"]) for r in rows], label=stage)
    ax.set_xlabel("step")
    ax.set_ylabel("next-token loss")
    ax.set_yscale("log")
    ax.legend()
    ax.set_title("training loss")
    save(fig, "loss")

    fig, ax = plt.subplots(figsize=(7, 4))
    for stage in ("grpo", "r1-zero", "student-grpo"):
        rows = [r for r in metrics_rows(root / stage / "metrics.jsonl") if "reward" in r]
        if rows:
            x = [r["step"] for r in rows]
            y = [r["reward"] for r in rows]
            s = [r.get("reward_std", 0) for r in rows]
            ax.plot(x, y, label=stage)
            ax.fill_between(x, [a - b for a, b in zip(y, s)], [a + b for a, b in zip(y, s)], alpha=0.15)
    ax.set_xlabel("GRPO step")
    ax.set_ylabel("reward (mean ± std over samples)")
    ax.legend()
    ax.set_title("reward during RL")
    save(fig, "reward")

    rows = [r for r in metrics_rows(root / "r1-zero" / "metrics.jsonl") if "reward" in r]
    if rows:  # the R1 paper's Figure 2/3 at toy scale: does the response grow as accuracy rises?
        fig, ax = plt.subplots(figsize=(7, 4))
        x = [r["step"] for r in rows]
        ax.plot(x, [100 * r["accuracy"] for r in rows], label="accuracy (rollouts)")
        ax.plot(x, [100 * r["reward_format"] for r in rows], label="format rate (rollouts)")
        ax.set(xlabel="R1-Zero GRPO step", ylabel="% of rollouts", ylim=(0, 100))
        ax2 = ax.twinx()
        ax2.plot(x, [r["response_len"] for r in rows], color="#55a868", label="mean response length")
        ax2.set_ylabel("tokens")
        ax.legend(handles=ax.get_lines() + ax2.get_lines(), fontsize=8, loc="lower right")
        ax.set_title("R1-Zero from the base: accuracy, format and length")
        save(fig, "r1_zero")

    rows = [r for r in metrics_rows(root / "pretrain" / "metrics.jsonl") if "load_max_over_mean" in r]
    if rows:
        fig, ax = plt.subplots(figsize=(7, 4))
        ax.plot([r["step"] for r in rows], [r["load_max_over_mean"] for r in rows])
        ax.set_xlabel("pretraining step")
        ax.set_ylabel("max / mean expert load")
        ax.set_title("expert load balance (aux-loss-free bias)")
        save(fig, "expert_load")
    return paths


def paired_two_se(xs: list[float] | None, ys: list[float] | None) -> tuple[int, float]:
    """(n, 2 x standard error of mean(y - x)) over questions answered by both; (0, inf) without data."""
    if not xs or not ys or len(xs) != len(ys) or len(xs) < 2:
        return 0, float("inf")
    d = [y - x for x, y in zip(xs, ys)]
    m = sum(d) / len(d)
    var = sum((v - m) ** 2 for v in d) / (len(d) - 1)
    return len(d), 2 * (var / len(d)) ** 0.5


def _checks(results: dict) -> list[str]:
    """Each claim of the R1 report, judged against the noise of the held-out questions: a change within
    two standard errors of the mean per-question difference (both stages answer the same questions)
    is reported as noise, not as a win."""
    def acc(stage):
        r = results.get(stage)
        return None if r is None else r["pass@1"]

    lines = []
    for a, b, what in [("pretrain", "sft", "cold-start SFT raises held-out accuracy over the base"),
                       ("sft", "grpo", "GRPO raises held-out accuracy over cold-start SFT"),
                       ("pretrain", "r1-zero", "R1-Zero (GRPO on the base) raises accuracy over the base"),
                       ("student-grpo", "distill-sft", "the distilled student beats the same student trained "
                                                       "by GRPO alone for the same wall time")]:
        x, y = acc(a), acc(b)
        if x is None or y is None:
            continue
        verdict, two_se, n = _verdict(results, a, b)
        if not n:  # no per-question data: the bare comparison
            lines.append(f"- {what}: {'yes' if y > x else '**no**'} ({_pct(x)} % → {_pct(y)} %)")
            continue
        lines.append(f"- {what}: {verdict} ({_pct(x)} % → {_pct(y)} %; two standard errors of the paired "
                     f"difference ±{100 * two_se:.1f} pts over {n} questions)")
    return lines


def r1_zero_length(root: Path) -> str | None:
    """Whether R1-Zero's responses grow, as in the R1 paper: mean length over the first vs the last tenth of steps."""
    rows = [r for r in metrics_rows(root / "r1-zero" / "metrics.jsonl") if "reward" in r]
    if len(rows) < 2:
        return None
    tenth = max(1, len(rows) // 10)
    mean = lambda rs, k: sum(r[k] for r in rs) / len(rs)  # noqa: E731
    first, last = rows[:tenth], rows[-tenth:]
    a, b = mean(first, "response_len"), mean(last, "response_len")
    change = "grows" if b > 1.1 * a else "shrinks" if b < a / 1.1 else "stays about the same"
    return (f"- R1-Zero's mean response length {change}: {a:.0f} → {b:.0f} tokens ({b / a:.2f}×) from the first to the "
            f"last tenth of its {len(rows)} steps, while rollout accuracy goes {100 * mean(first, 'accuracy'):.0f} → "
            f"{100 * mean(last, 'accuracy'):.0f} % and the format rate {100 * mean(first, 'reward_format'):.0f} → "
            f"{100 * mean(last, 'reward_format'):.0f} % (plot: r1_zero.png).")


def mismatch_lines(root: Path, stages) -> list[str]:
    """One line per RL stage that logged the rollout/trainer mismatch (GRPO's mismatch.py): the mean of its
    mismatch_kl over the steps (and the worst step), the largest |Δ log p|, and the router flips where they
    were recorded (--log-router-flips; under --routing-replay rollout, also the flips replay prevented)."""
    lines = []
    for stage in stages:
        rows = [r for r in metrics_rows(root / stage / "metrics.jsonl") if "mismatch_kl" in r]
        if not rows:
            continue
        kl = [r["mismatch_kl"] for r in rows]
        line = (f"- {stage}: mismatch_kl {sum(kl) / len(kl):.2g} per token (worst step {max(kl):.2g}), max |Δ log p| "
                f"{max(r['mismatch_max_dlogp'] for r in rows):.3g} over {len(rows)} steps")
        for key, what in (("router_flip_rate", "router flips"), ("router_flip_rate_unreplayed", "without replay")):
            if flips := [r for r in rows if key in r]:
                tokens = key.replace("rate", "tokens")
                line += (f"; {what} {100 * sum(r[key] for r in flips) / len(flips):.2f} % of routing decisions "
                         f"({100 * sum(r[tokens] for r in flips) / len(flips):.2f} % of tokens)")
        lines.append(line)
    return lines


def _verdict(results: dict, a: str, b: str) -> tuple[str, float, int]:
    """(yes / **no** / **within noise**, two standard errors, questions) for "b beats a"."""
    x, y = results[a]["pass@1"], results[b]["pass@1"]
    n, two_se = paired_two_se(results[a].get("per_question"), results[b].get("per_question"))
    return ("yes" if y - x > two_se else "**no**" if x - y > two_se else "**within noise**"), two_se, n


def seed_table(results: dict, top_k: int | None) -> list[str]:
    """One row per seed of each repeated RL stage: its gain over the stage it started from, the paired test,
    and (GRPO) the share of the starting model's pass@k - pass@1 gap it closed; then mean +- spread."""
    lines = []
    for rl, parent, what in (("grpo", "sft", "GRPO (R1) over cold-start SFT"),
                             ("r1-zero", "pretrain", "R1-Zero over the base")):
        runs = sorted((k for k in results if k == rl or k.startswith(rl + "-seed")), key=lambda k: (k != rl, k))
        if len(runs) < 2 or parent not in results:
            continue
        p1, pk = results[parent]["pass@1"], results[parent].get(f"pass@{top_k}") if top_k else None
        lines += ["", f"**{what}**, {len(runs)} seeds from the same starting model:", "",
                  f"| seed | pass@1 % | gain (pts) | ±2 SE (paired) | verdict | pass@{top_k or 'k'} − pass@1 gap closed |",
                  "|---|---:|---:|---:|---|---:|"]
        gains, wins = [], 0
        for k in runs:
            verdict, two_se, _ = _verdict(results, parent, k)
            gain = results[k]["pass@1"] - p1
            gains.append(gain)
            wins += verdict == "yes"
            # from the base, pass@k is no ceiling for RL (R1-Zero learns the format first): GRPO only
            closed = f"{100 * gain / (pk - p1):.0f} %" if rl == "grpo" and pk is not None and pk - p1 > 0 else "–"
            lines.append(f"| {results[k]['label'].rsplit('seed ', 1)[-1]} | {_pct(results[k]['pass@1'])} | "
                         f"{100 * gain:+.1f} | {100 * two_se:.1f} | {verdict} | {closed} |")
        m = sum(gains) / len(gains)
        sd = (sum((g - m) ** 2 for g in gains) / (len(gains) - 1)) ** 0.5
        lines += ["", f"Mean gain {100 * m:+.1f} ± {100 * sd:.1f} pts (sample std over seeds), starting from "
                      f"{_pct(p1)} %; {wins} of {len(runs)} "
                      "seeds beat the starting model by more than two standard errors."]
    return lines


def task_table(results: dict, above: dict, difficulty: int) -> list[str]:
    """pass@1 per task and stage at the trained difficulty, then one level above it for the stages asked there."""
    tasks = sorted({t for r in results.values() for t in r.get("tasks", {})})
    if not tasks:
        return []
    lines = [f"| stage | {' | '.join(tasks)} | all |", "|---|" + "---:|" * (len(tasks) + 1)]

    def row(label, r):
        return f"| {label} | " + " | ".join(_pct(r["tasks"].get(t)) for t in tasks) + f" | {_pct(r['pass@1'])} |"
    lines += [row(r["label"], r) for r in results.values() if "tasks" in r]
    if above:
        lines += ["", f"One level above the trained range (difficulty {difficulty + 1}: never in pretraining, SFT or RL):",
                  "", lines[0], lines[1]] + [row(r["label"], r) for r in above.values()]
    return lines


def render_report(root: Path, o, results: dict, stages: dict, tokens_fn,
                  above: dict | None = None, extra: tuple[list[str], list[Path]] = ([], [])) -> tuple[str, list[Path]]:
    """The report's markdown and its plots; `extra` is an optional section (lines, plots) placed before the plots."""
    total = sum(s["wall_s"] for s in stages.values())
    top_k = max((j for j in PASS_KS if j <= o.eval_k), default=None)  # the widest pass@k the samples allow
    lines = ["# nanoseek speedrun report", "",
             f"Machine: {describe_device()}, {platform.system()}; preset `{o.preset}`"
             f"{' (quick CI variant)' if o.quick else ''}; tasks {', '.join(o.tasks)} at difficulty {o.difficulty}; "
             f"seed {o.seed}{f' (RL stages repeated with {o.seeds} seeds)' if o.seeds > 1 else ''}. "
             f"Total wall time of all stages: **{total / 60:.1f} min**.", "",
             f"Held-out test questions: {o.eval_n} per task, k samples each at temperature 0.6 / top-p 0.95 (as the "
             f"R1 report): k = {o.eval_k} for the cold start and GRPO, {min(o.eval_k, o.eval_k_rest)} for the other "
             "stages, whose pass@k no claim rests on; greedy = one greedy sample; pass@k (unbiased, from the same "
             "samples) − pass@1 is what RL can sharpen into pass@1; sound reasoning = right *and* every arithmetic "
             "step of the shown chain of thought right, at the chat's default sampling (temperature 0.6). "
             "Cost = wall time × "
             f"${o.price_per_hour:.2f}/machine-hour.", "",
             f"| stage | k | pass@1 % | greedy % | cons@k % | pass@{top_k or 'k'} % | sound reasoning % | "
             "format ok % | mean length | wall time | tokens (trained / rolled out) | cost $ |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for stage, r in results.items():
        st = stages.get(stage, {})
        tok = tokens_fn(root / stage)
        fmt = None if r.get("format_error") is None else 1 - r["format_error"]
        lines.append(f"| {r['label']} | {r.get('k', o.eval_k)} | {_pct(r['pass@1'])} | {_pct(r.get('greedy'))} | "
                     f"{_pct(r['cons@k'])} | {_pct(r.get(f'pass@{top_k}'))} | {_pct(r.get('sound'))} | {_pct(fmt)} | "
                     f"{r['mean_len']:.0f} | {st.get('wall_s', 0):.0f} s | "
                     f"{'–' if tok is None else f'{tok:,}'} | {st.get('wall_s', 0) / 3600 * o.price_per_hour:.4f} |")
    if per_task_lines := task_table(results, above or {}, o.difficulty):
        lines += ["", f"pass@1 % per task at difficulty {o.difficulty}:", ""] + per_task_lines
    lines += ["", "Stages not evaluated (data or bookkeeping): " + ", ".join(
        f"{s} {d['wall_s']:.0f} s" for s, d in stages.items() if s not in results), ""]
    lines += ["## Did each stage buy what the R1 report says it does?", ""] + (_checks(results) or ["- (no stages)"])
    if zero := r1_zero_length(root):
        lines.append(zero)
    if mismatch := mismatch_lines(root, stages):
        lines += ["", "## Rollout engine vs trainer in the RL stages", "",
                  "Log-probs of the trained tokens under the rollout engine and under the trainer (k3 KL per token, "
                  "mean over steps), and the MoE routing decisions that differ between them:", ""] + mismatch
    if seeds := seed_table(results, top_k):
        lines += ["", "## Seeds: the RL stages repeated"] + seeds
    plots = _plot(root, results) + extra[1]
    lines += extra[0]
    lines += ["", "## Plots", ""] + [f"![{p.stem}](plots/{p.name})" for p in plots]
    lines += ["", "Per-stage details: each stage folder has config.yaml, metrics.jsonl, plots/ and its final model "
              "(HF layout); `eval/<stage>.md` has the per-task tables.", ""]
    return "\n".join(lines), plots
