"""nanoseek speedrun: the whole DeepSeek-R1 recipe at toy scale, from nothing to a report card.

    tokenizer + pretrain (MoE, MLA, MTP)      -> base
    R1-Zero branch: GRPO straight on the base -> r1-zero
    cold-start SFT on worked solutions        -> sft
    GRPO with rule rewards (R1 mode)          -> grpo
    rejection sampling of the RL model        -> traces.jsonl
    second SFT on the kept traces             -> sft2 (the "R1" model)
    distillation into the dense student       -> distill-sft (SFT on traces), distill-logits (top-k KL)
    baseline: the student trained by GRPO alone for the distillation's wall time -> student-grpo
    optional (--rl-objectives): GRPO / + routing replay / GSPO / CISPO on a bf16 engine -> rl-<arm>
    evaluation of every stage on held-out test questions -> report.md, report.json, plots/

--tasks takes built-in tasks, gym:NAME and data files (data/sources.py). A data file is split by
prompt hash, so no question is both trained on and evaluated: RL and rejection sampling use FILE@train,
evaluation FILE@test. The cold-start SFT writes worked solutions for the built-in tasks among --tasks
(all of them if there are none: it teaches the answer format).

Each finished stage leaves `<stage>/stage.json`; a rerun skips those and continues (stages also resume
from their own checkpoints), so an interrupted speedrun loses at most part of one stage.
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from nanoseek.config import get_student_preset
from nanoseek.data.coldstart import SOLVERS, coldstart_dataset
from nanoseek.data.sources import column_option, resolve_all, with_split
from nanoseek.eval import evaluate, write_report as write_eval
from nanoseek.model.dense import DenseTransformer
from nanoseek.options import save_options
from nanoseek.speedrun import rl_objectives
from nanoseek.speedrun.report import render_report
from nanoseek.tokenizer import load_tokenizer
from nanoseek.train import distill, grpo, pretrain, rejection, sft
from nanoseek.train.grpo_prompts import MODES as WEIGHTING_MODES

STAGES = ["pretrain", "r1-zero", "sft", "grpo", "rejection", "sft2", "distill-sft", "distill-logits",
          "student-grpo", "eval", "report"]


@dataclass
class Options:
    out: str = field(default="runs/speedrun", metadata={"help": "run folder (rerun to resume)"})
    preset: str = field(default="tiny", metadata={"help": "model preset: tiny (CPU), small (one GPU)"})
    quick: bool = field(default=False, metadata={"help": "CI variant: tiny everything, a couple of minutes"})
    tasks: list[str] = field(default_factory=lambda: ["add", "sub", "compare", "max"], metadata={
        "help": "reasoning tasks for SFT, RL and evaluation: built-in tasks, gym:NAME, data files (split by "
                "prompt hash: FILE@train for RL, FILE@test for evaluation)"})
    prompt_field: str = column_option("prompt")
    answer_field: str = column_option("answer")
    difficulty: int = field(default=2, metadata={
        "help": "task difficulty of RL and evaluation; pretraining and the cold start see levels 1..difficulty"})
    pretrain_steps: int = field(default=400, metadata={"help": "pretraining optimizer steps"})
    sft_steps: int = field(default=300, metadata={
        "help": "cold-start SFT steps (at 150 its accuracy depended on the base: 50-70 %; at 300, 76-81 %)"})
    grpo_steps: int = field(default=200, metadata={"help": "GRPO steps on the cold-start SFT model (R1)"})
    r1_zero_steps: int = field(default=40, metadata={
        "help": "GRPO steps of the R1-Zero branch (on the base; the --grpo-* settings below are R1-Zero's too)"})
    grpo_lr: float = field(default=5e-5, metadata={"help": "GRPO learning rate (R1 and R1-Zero)"})
    grpo_beta: float = field(default=0.2, metadata={
        "help": "KL weight to the starting model in GRPO (k3, as R1's objective; the cold start, and the base in "
                "R1-Zero; 0 = no reference model): without it GRPO's gain stayed within noise in three seeds, and "
                "pass@16 fell"})
    grpo_temperature: float = field(default=0.8, metadata={"help": "GRPO rollout temperature (R1 and R1-Zero)"})
    grpo_prompts: int = field(default=16, metadata={
        "help": "prompts per GRPO step (R1 and R1-Zero); it trains only on the groups whose rewards differ"})
    grpo_task_weighting: str = field(default="even", metadata={
        "help": "how GRPO splits a step's prompts over the tasks: even, or learnable (each task by its recent "
                "share of groups whose rewards differ; grpo --task-weighting)"})
    sft2_steps: int = field(default=60, metadata={"help": "steps of the second (rejection-sampling) SFT"})
    distill_steps: int = field(default=200, metadata={"help": "distillation steps per method"})
    rejection_prompts: int = field(default=1024, metadata={
        "help": "prompts sampled for rejection sampling (one kept answer each: the second SFT's steps then see "
                "its data about twice, as R1's two epochs)"})
    eval_n: int = field(default=100, metadata={
        "help": "held-out test questions per task (two standard errors of GRPO's paired gain: ~3.5 points at 50, "
                "~2.5 at 100)"})
    eval_k: int = field(default=16, metadata={
        "help": "samples per question for the cold start and the GRPO models (pass@1, cons@k, pass@k up to k: "
                "the pass@k - pass@1 gap is what GRPO can sharpen)"})
    eval_k_rest: int = field(default=4, metadata={
        "help": "samples per question for every other evaluation (their pass@1 and the paired tests need no "
                "pass@16, and the base's looping completions make k = 16 the evaluation's largest cost)"})
    max_new_tokens: int = field(default=96, metadata={"help": "completion length in RL, sampling and eval"})
    r1_zero: bool = field(default=True, metadata={"help": "also run the R1-Zero branch (GRPO on the base)"})
    seed: int = field(default=0, metadata={"help": "seed for every stage"})
    seeds: int = field(default=1, metadata={
        "help": "repeat the RL stages (GRPO on the SFT model, R1-Zero on the base) with seeds seed..seed+N-1, all "
                "from the same SFT model and base: the report gives each seed's gain and the mean +- spread"})
    device: str = field(default="auto", metadata={"help": "auto | cpu | cuda"})
    batch_size: int = field(default=8, metadata={"help": "sequences per step in pretraining, SFT and distillation "
                                                         "(the global batch when --nproc > 1)"})
    nproc: int = field(default=1, metadata={
        "help": "processes (GPUs) for the training and GRPO stages, launched with torchrun + FSDP (GRPO's "
                "prompts per step must divide among them); sampling and evaluation run in this process"})
    rl_objectives: list[str] = field(default_factory=list, metadata={
        "help": "optional stages: comma separated arms of " + ",".join(rl_objectives.ARMS) + " trained from the "
                "cold-start model with a bf16 rollout engine, each with every seed (speedrun/rl_objectives.py); "
                "the report compares held-out accuracy, mismatch, router flips and collapses"})
    rl_objectives_steps: int = field(default=100, metadata={"help": "GRPO steps of each --rl-objectives arm"})
    price_per_hour: float = field(default=0.10, metadata={"help": "$ per machine-hour for the cost column"})


def quick(o: Options) -> Options:
    """Smallest settings that still run every stage end to end (CI)."""
    o.pretrain_steps, o.sft_steps, o.grpo_steps, o.sft2_steps, o.distill_steps = 30, 20, 3, 10, 15
    o.r1_zero_steps, o.grpo_prompts = 3, 8
    o.rejection_prompts, o.eval_n, o.eval_k, o.max_new_tokens = 16, 4, 2, 24  # eval_k_rest is capped by eval_k
    o.tasks, o.difficulty = o.tasks[:2], 1  # level 1: the answers fit the short completions
    return o


class Run:
    """Stage bookkeeping: done markers, timing, progress across stages."""

    WEIGHT = {"pretrain": 6, "sft": 5, "grpo": 12, "rejection": 1, "sft2": 1, "distill-sft": 2, "distill-logits": 2,
              "r1-zero": 4, "student-grpo": 2, "rl": 6, "eval": 4, "report": 0.1}

    def __init__(self, o: Options):
        self.o, self.root = o, Path(o.out)
        self.root.mkdir(parents=True, exist_ok=True)
        self.t0 = time.time()
        self.spent, self.ran_weight = 0.0, 0.0
        self.stages = stage_names(o)

    def weight(self, stage: str) -> float:
        return self.WEIGHT["rl" if stage.startswith("rl-") else stage.split("-seed")[0]]

    def marker(self, stage: str) -> Path:
        return self.root / stage / "stage.json"

    def done(self, stage: str) -> dict | None:
        m = self.marker(stage)
        return json.loads(m.read_text()) if m.exists() else None

    def run(self, stage: str, fn) -> dict:
        if (d := self.done(stage)) is not None:
            print(f"[speedrun] {stage}: done earlier ({d['wall_s']:.0f}s), skipping")
            return d
        i = self.stages.index(stage)
        left = sum(self.weight(s) for s in self.stages[i:] if not self.done(s))
        # rate from the stages run in this session only (a resumed run skipped the others)
        eta = (f", ETA {self.spent / self.ran_weight * left / 60:.0f} min"
               if self.ran_weight and self.spent > 30 else "")
        print(f"\n[speedrun] stage {i + 1}/{len(self.stages)}: {stage}{eta}", flush=True)
        t = time.time()
        out = fn(self.root / stage)
        d = {"stage": stage, "wall_s": round(time.time() - t, 1), **out}
        self.spent += d["wall_s"]
        self.ran_weight += self.weight(stage)
        self.marker(stage).parent.mkdir(parents=True, exist_ok=True)
        self.marker(stage).write_text(json.dumps(d, indent=2) + "\n")
        return d


def extra_seeds(o: Options) -> list[int]:
    """The seeds the RL stages are repeated with, besides o.seed."""
    return [o.seed + i for i in range(1, max(1, o.seeds))]


def objective_stages(o: Options) -> list[tuple[str, str, int]]:
    """(stage, arm, seed) of the optional --rl-objectives stages, seed by seed: an interrupted run has whole seeds."""
    seeds = [o.seed] + extra_seeds(o)
    return [(rl_objectives.stage(arm, s, o.seed), arm, s) for s in seeds for arm in o.rl_objectives]


def r1_zero_stages(o: Options) -> list[tuple[str, int]]:
    """(stage, seed) of the R1-Zero branch: one per seed, the first seed's without a suffix."""
    seeds = [o.seed] + extra_seeds(o) if o.r1_zero else []
    return [("r1-zero" + ("" if s == o.seed else f"-seed{s}"), s) for s in seeds]


def stage_names(o: Options) -> list[str]:
    """Every stage of this run in order: the fixed ones, the R1-Zero branch off the base (every seed) right after
    pretraining, one GRPO per extra seed before the student baseline, the optional RL-objective arms before the
    evaluation."""
    zero = [name for name, _ in r1_zero_stages(o)]
    fixed = [s for s in STAGES if s != "r1-zero"]
    i, j = fixed.index("student-grpo"), fixed.index("eval")
    return (fixed[:1] + zero + fixed[1:i] + [f"grpo-seed{s}" for s in extra_seeds(o)] + fixed[i:j]
            + [s for s, _, _ in objective_stages(o)] + fixed[j:])


def _tokens(stage_dir: Path) -> int | None:
    """Tokens a stage processed: trained tokens from cost.json, or GRPO's rollout tokens."""
    costs = sorted(stage_dir.glob("cost.json")) + sorted(stage_dir.glob("*/cost.json"))
    if costs:
        return json.loads(costs[0].read_text()).get("tokens")
    m = stage_dir / "metrics.jsonl"
    if m.exists():
        rows = [json.loads(x) for x in m.read_text().splitlines() if x.strip()]
        return int(sum(r.get("rollout_tokens_per_s", 0) * r.get("time_rollout", 0) for r in rows)) or None
    return None


def speedrun(o: Options) -> Path:
    if o.quick:
        o = quick(o)
    fields = dict(prompt_field=o.prompt_field, answer_field=o.answer_field)
    for split in ("train", "test"):  # bad tasks or data files fail before the run folder exists
        resolve_all(with_split(o.tasks, split), **fields)
    for arm in o.rl_objectives:
        rl_objectives.arm_options(arm, {}, o.rl_objectives_steps, o.seed, 0)  # an unknown arm fails here too
    if o.grpo_task_weighting not in WEIGHTING_MODES:
        raise SystemExit(f"speedrun: --grpo-task-weighting must be one of {', '.join(WEIGHTING_MODES)}, "
                         f"got {o.grpo_task_weighting!r}")
    train_tasks = with_split(o.tasks, "train")
    torch.manual_seed(o.seed)
    run = Run(o)
    save_options(o, run.root / "config.yaml")
    print(f"[speedrun] run folder {run.root.resolve()} (rerun the same command to resume)")
    common = dict(seed=o.seed, device=o.device)
    tcommon = dict(common, batch_size=o.batch_size, seq_len=seq_len(o))  # training stages
    small = o.preset != "tiny"

    # The base reads worked problems of the run's own tasks at levels 1..difficulty, and the cold start mixes
    # those levels: the held-out questions are then new combinations of steps it has seen (every single-digit
    # fact, never the operand pair), which RL can sharpen; difficulty + 1 stays unseen (length generalization).
    pre = run.run("pretrain", lambda d: train("pretrain", pretrain.pretrain, pretrain.Options(
        out=str(d), preset=o.preset, steps=o.pretrain_steps, n_docs=(1500 if o.quick else corpus_docs(o)),
        tasks=coldstart_tasks(o), max_difficulty=o.difficulty, save_every=100, resume=True, **tcommon), o.nproc))
    base = pre["model"]
    grpo_kw = dict(tasks=train_tasks, **fields, difficulty=o.difficulty, steps=o.grpo_steps, max_new_tokens=o.max_new_tokens,
                   eval_n=(8 if o.quick else 64), save_every=20, resume=True, **common)
    # On the SFT model a gentle, well-averaged update pays: lr 1e-4 lowered held-out accuracy, 5e-5 raised it,
    # and more so with 16 prompts per step of which only the informative groups train (2/3 of the groups agree:
    # with 8 prompts a step rests on ~3 of them), and over 200 steps rather than 100: Adam moves every weight by
    # ~lr per step whatever its signal, so the noise of a step averages out only over many of them. The KL term to
    # the starting model holds back the drift of what the informative groups do not train (without it the gain
    # stayed within noise in three seeds and pass@16 fell). R1-Zero runs the same GRPO from the base: with R1-Zero's
    # former lr 2e-4 on 8 prompts, every group trained, held-out accuracy fell below the base's. The README's
    # speedrun section has the runs.
    r1_kw = dict(grpo_kw, lr=o.grpo_lr, temperature=o.grpo_temperature, prompts_per_step=o.grpo_prompts,
                 beta=o.grpo_beta, task_weighting=o.grpo_task_weighting, filter_zero_var=True)
    # R1-Zero branches off the base, so it runs first: its answer (does RL alone teach the base?) comes early
    r0_kw = {**r1_kw, "steps": o.r1_zero_steps}
    for name, seed in r1_zero_stages(o):
        run.run(name, lambda d, s=seed: train("grpo", grpo.grpo, grpo.Options(
            model=base, mode="r1-zero", out=str(d), **{**r0_kw, "seed": s}), o.nproc))
    sft1 = run.run("sft", lambda d: train("sft", sft.sft, sft.Options(
        model=base, out=str(d), steps=o.sft_steps, n_examples=(200 if o.quick else 4000), tasks=coldstart_tasks(o),
        difficulty=None, max_difficulty=o.difficulty, save_every=100, resume=True, **tcommon), o.nproc))
    rl = run.run("grpo", lambda d: train("grpo", grpo.grpo, grpo.Options(model=sft1["model"], mode="r1", out=str(d), **r1_kw),
                                         o.nproc))
    rej = run.run("rejection", lambda d: {"data": str(rejection.rejection_sample(
        rl["model"], out=str(d), tasks=train_tasks, **fields, difficulty=o.difficulty, n_prompts=o.rejection_prompts,
        max_new_tokens=o.max_new_tokens, seed=o.seed))})
    sft2 = run.run("sft2", lambda d: train("sft", sft.sft, sft.Options(
        model=rl["model"], data=str(mixed_sft_data(d, rej["data"], o)), out=str(d), steps=o.sft2_steps, lr=3e-4,
        resume=True, **tcommon), o.nproc))
    dist = {}
    for method in ("sft", "logits"):
        dist[method] = run.run(f"distill-{method}", lambda d, m=method: train("distill", distill.distill, distill.Options(
            teacher=sft2["model"], data=str(mixed_sft_data(d, rej["data"], o)), method=m, out=str(d),
            steps=o.distill_steps, student_preset=("small" if small else "tiny"), **tcommon), o.nproc,
            final=d / m / "final"))
    for seed in extra_seeds(o):  # the RL stages again, from the same starting models: is the gain the seed's luck?
        run.run(f"grpo-seed{seed}", lambda d, s=seed: train("grpo", grpo.grpo, grpo.Options(
            model=sft1["model"], mode="r1", out=str(d), **{**r1_kw, "seed": s}), o.nproc))
    budget = dist["sft"]["wall_s"]
    run.run("student-grpo", lambda d: student_grpo_baseline(d, base, o, budget, grpo_kw))
    heldout = o.eval_n * len(o.tasks)
    for name, arm, seed in objective_stages(o):
        kw = rl_objectives.arm_options(arm, r1_kw, o.rl_objectives_steps, seed, heldout)
        run.run(name, lambda d, kw=kw: train("grpo", grpo.grpo, grpo.Options(model=sft1["model"], mode="r1", out=str(d),
                                                                             **kw), o.nproc))
    ev = run.run("eval", lambda d: evaluate_all(d, run, o))
    run.run("report", lambda d: write_report(run, ev))
    print(f"\n[speedrun] done in {(time.time() - run.t0) / 60:.1f} min this session: "
          f"report {run.root / 'report.md'}, plots in {run.root / 'plots'}")
    return run.root / "report.md"


def coldstart_tasks(o: Options) -> list[str]:
    """The built-in tasks among --tasks (the ones with worked solutions); none: all of them."""
    return [t for t in o.tasks if t in SOLVERS]


def seq_len(o: Options) -> int:
    return 128 if o.quick else 256


def corpus_docs(o: Options, tokens_per_doc: int = 200) -> int:
    """Task documents for pretraining: at least 20K, more for longer runs (at most ~3 epochs, capped)."""
    return min(500_000, max(20_000, o.pretrain_steps * o.batch_size * seq_len(o) // (3 * tokens_per_doc)))


def train(command: str, fn, opts, nproc: int, final: Path | None = None) -> dict:
    """A training stage in this process, or with nproc > 1 as `torchrun -m nanoseek <command>` with FSDP
    (the same code, fed the same options through a config file); returns {"model": final dir}."""
    if nproc <= 1:
        return {"model": str(fn(opts))}
    opts.parallel = "fsdp"
    cfg = save_options(opts, Path(opts.out) / "launch.yaml")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "nanoseek", command, "--config", str(cfg)]
    print(f"[speedrun] {' '.join(cmd)}", flush=True)
    rc = subprocess.run(cmd).returncode
    if rc:
        raise SystemExit(f"[speedrun] {command} under torchrun failed (exit {rc}); the output above says why. "
                         "Rerun the same speedrun command to resume from the last checkpoint.")
    return {"model": str(final or Path(opts.out) / "final")}


def mixed_sft_data(d: Path, traces: str, o: Options, min_records: int = 256) -> Path:
    """The RL model's kept traces, topped up with cold-start worked solutions when there are few.

    R1's second SFT mixes ~600K reasoning traces with ~200K other samples; at toy scale a weak RL
    model may keep only a handful of traces, and an SFT on (almost) nothing would undo the cold start.
    """
    lines = [x for x in Path(traces).read_text().splitlines() if x.strip()]
    extra = max(0, min_records - len(lines))
    records = (coldstart_dataset(extra, tasks=coldstart_tasks(o) or None, difficulty=o.difficulty, seed=o.seed + 17)
               if extra else [])
    d.mkdir(parents=True, exist_ok=True)
    out = d / "sft_data.jsonl"
    out.write_text("".join(x + "\n" for x in lines) + "".join(json.dumps(r) + "\n" for r in records))
    print(f"[speedrun] SFT data: {len(lines)} rejection-sampled traces + {len(records)} cold-start solutions -> {out}")
    return out


def student_grpo_baseline(d: Path, base: str, o: Options, budget_s: float, grpo_kw: dict) -> dict:
    """The dense student from scratch, trained by GRPO alone for the wall time distillation took."""
    tok = load_tokenizer(base)
    init = d / "init"
    cfg = get_student_preset("small" if o.preset != "tiny" else "tiny").replace(
        vocab_size=tok.vocab_size, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)
    DenseTransformer(cfg).save_pretrained(init, tokenizer=tok)
    t0 = time.time()
    # one step first to learn its cost, then as many as fit the budget
    probe = grpo.grpo(grpo.Options(model=str(init), mode="r1", out=str(d / "probe"), **{**grpo_kw, "steps": 1, "eval_n": 0}))
    per_step = max(1e-3, time.time() - t0)
    steps = max(1, int(budget_s / per_step))
    model = grpo.grpo(grpo.Options(model=str(probe), mode="r1", out=str(d), **{**grpo_kw, "steps": steps}))
    return {"model": str(model), "steps": steps, "budget_s": round(budget_s, 1)}


EVALUATED = [("base (pretrain)", "pretrain", "r1-zero"), ("cold-start SFT", "sft", "r1"), ("GRPO (R1)", "grpo", "r1"),
             ("rejection-sampling SFT (R1)", "sft2", "r1"), ("R1-Zero (GRPO on base)", "r1-zero", "r1-zero"),
             ("student: distill, SFT on traces", "distill-sft", "r1"),
             ("student: distill, top-k logits", "distill-logits", "r1"),
             ("student: GRPO alone, same wall time", "student-grpo", "r1")]


def evaluated(o: Options) -> list[tuple[str, str, str]]:
    """(label, stage, template) of every stage the report evaluates, the extra seeds' RL stages included."""
    out = []
    for label, stage, template in EVALUATED:
        out.append((label + (f", seed {o.seed}" if extra_seeds(o) and stage in ("grpo", "r1-zero") else ""), stage, template))
        if stage in ("grpo", "r1-zero"):
            out += [(f"{label}, seed {s}", f"{stage}-seed{s}", template) for s in extra_seeds(o)]
    return out


ABOVE = ("sft", "grpo", "sft2")  # also asked one level above the trained range: does the procedure carry over?


def eval_k(o: Options, stage: str, difficulty: int) -> int:
    """Samples per question: the full k where the report needs pass@k (the cold start and GRPO at the trained
    difficulty), fewer elsewhere."""
    gap = stage in ("sft", "grpo") or stage.startswith("grpo-seed")
    return o.eval_k if gap and difficulty == o.difficulty else min(o.eval_k, o.eval_k_rest)


def evaluate_all(d: Path, run: Run, o: Options) -> dict:
    def ask(stage, template, difficulty, name, max_tokens=o.max_new_tokens):
        r = evaluate(run.done(stage)["model"], tasks=with_split(o.tasks, "test"), n=o.eval_n,
                     k=eval_k(o, stage, difficulty),
                     difficulty=difficulty, template=template, max_tokens=max_tokens, seed=o.seed + 1,
                     prompt_field=o.prompt_field, answer_field=o.answer_field)
        write_eval(r, d / name)
        return r

    results, above = {}, {}
    for label, stage, template in evaluated(o):
        if not run.done(stage):
            continue
        r = ask(stage, template, o.difficulty, f"{stage}.json")
        ov = r["overall"]
        print(f"[speedrun] eval {label}: pass@1 {ov['pass@1']:.1%}, cons@{r['k']} {ov['cons@k']:.1%}, "
              f"format errors {ov['format_error']:.1%}")
        results[stage] = {"label": label, "template": template, "k": r["k"], **ov, "tasks": per_task(r),
                          "per_question": [q["pass@1"] for q in r["questions"]]}
        if stage in ABOVE and coldstart_tasks(o):
            # longer questions have longer chains of thought: room for them, so a cut-off is not a wrong answer
            r = ask(stage, template, o.difficulty + 1, f"{stage}-difficulty{o.difficulty + 1}.json", 2 * o.max_new_tokens)
            print(f"[speedrun] eval {label} at difficulty {o.difficulty + 1}: pass@1 {r['overall']['pass@1']:.1%}")
            above[stage] = {"label": label, "pass@1": r["overall"]["pass@1"], "tasks": per_task(r)}
    return {"results": results, "above": above}


def per_task(report: dict) -> dict:
    return {t: r["pass@1"] for t, r in report["tasks"].items()}


def write_report(run: Run, ev: dict) -> dict:
    stages = {s: run.done(s) for s in run.stages if run.done(s)}
    objectives = rl_objectives.section(run.root, run.o.rl_objectives, [run.o.seed] + extra_seeds(run.o), stages)
    md, plots = render_report(run.root, run.o, ev["results"], stages, _tokens, ev.get("above", {}), objectives)
    (run.root / "report.md").write_text(md)
    return {"report": str(run.root / "report.md"), "plots": [str(p) for p in plots]}


def run(opts: Options) -> None:
    speedrun(opts)
