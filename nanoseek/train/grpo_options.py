"""The options of `nanoseek grpo` (each flag's help says what it does; the module doc of grpo.py, how a step runs):
the ones every run has (run_options.py) with GRPO's defaults, and its own."""
from __future__ import annotations

from dataclasses import dataclass, field

from nanoseek.data.sources import column_option
from nanoseek.train.run_options import RunOptions, stage_default


@dataclass
class Options(RunOptions):
    model: str = field(default="", metadata={"help": "model directory to start from (HF layout with tokenizer)"})
    mode: str = field(default="r1", metadata={"help": "r1 (chat template, + language reward) or r1-zero (plain prompt)"})
    tasks: list[str] = field(default_factory=lambda: ["add"], metadata={
        "help": "comma separated: built-in tasks, gym:NAME (any reasoning-gym dataset), data files (.jsonl, .json, "
                ".parquet, .csv, datasets folders: every row trains; FILE@train holds FILE@test out for the eval)"})
    prompt_field: str = column_option("prompt")
    answer_field: str = column_option("answer")
    difficulty: int = field(default=1, metadata={"help": "task difficulty at the start"})
    max_difficulty: int = field(default=0, metadata={"help": "curriculum: ramp linearly to this level (0 = fixed)"})
    task_weighting: str = field(default="even", metadata={
        "help": "even (each step's prompts from the whole pool in a fixed shuffled order) | learnable (each task's "
                "share of a step's prompts follows its recent share of groups whose rewards differ, the only ones "
                "that teach: tasks already solved, or not solved at all, give way; grpo_prompts.py)"})
    n_prompts: int = field(default=2000, metadata={"help": "training prompts per difficulty level"})
    steps: int = field(default=60, metadata={"help": "GRPO steps (rollout + update)"})
    prompts_per_step: int = field(default=8, metadata={"help": "prompts per step"})
    group_size: int = field(default=8, metadata={"help": "G: completions sampled per prompt"})
    max_new_tokens: int = field(default=128, metadata={"help": "completion length limit"})
    temperature: float = field(default=1.0, metadata={"help": "sampling temperature of rollouts"})
    top_k: int = field(default=0, metadata={"help": "rollout top-k (0 = off)"})
    top_p: float = field(default=1.0, metadata={"help": "rollout nucleus top-p (1 = off)"})
    rollout: str = field(default="engine", metadata={"help": "rollout backend: engine (built-in) or vllm (when installed)"})
    rollout_dtype: str = field(default="fp32", metadata={
        "help": "rollout engine precision: fp32 or bf16 (autocast; the trainer stays fp32): the mismatch it causes "
                "is logged (mismatch_kl, router flips)"})
    compile: bool = field(default=False, metadata={
        "help": "engine rollouts decode through torch.compile (tiny on a 2-core CPU: ~1.3x faster decoding "
                "after ~1-2 min of compiling once per run)"})
    lr: float = stage_default(RunOptions, "lr", 2e-4)
    warmup_steps: int = stage_default(RunOptions, "warmup_steps", 0)
    min_lr_ratio: float = field(default=1.0, metadata={"help": "final lr / peak (1 = constant, usual for RL)"})
    weight_decay: float = stage_default(RunOptions, "weight_decay", 0.0)
    beta: float = field(default=0.0, metadata={"help": "KL weight to the frozen reference (0 = no reference model)"})
    eps_low: float = field(default=0.2, metadata={"help": "ratio clip below 1"})
    eps_high: float = field(default=0.28, metadata={"help": "ratio clip above 1 (clip-higher, DAPO)"})
    scale_rewards: str = field(default="group", metadata={"help": "group (divide by group std) or none (Dr. GRPO)"})
    loss: str = field(default="grpo", metadata={
        "help": "policy objective: grpo (clipped token ratio) | gspo (one length-normalized ratio per sequence, "
                "clipped per sequence, a mean over sequences; its paper clips at --eps-low 3e-4 --eps-high 4e-4) | "
                "cispo (clipped stop-gradient importance weight on every token). With mu = 1 all three have the "
                "plain policy gradient (ratio 1): they differ with mu > 1"})
    loss_agg: str = field(default="token", metadata={
        "help": "token (DAPO) | sequence (GRPO) | dr_grpo (gspo: always sequence)"})
    tis_cap: float = field(default=0.0, metadata={
        "help": "truncated importance sampling: weight each token by min(pi_trainer / pi_engine, CAP) against the "
                "rollout engine's log-probs (0 = off; 2 is usual)"})
    mask_offpolicy: float = field(default=0.0, metadata={
        "help": "DeepSeek-V3.2's off-policy sequence masking: drop negative-advantage sequences whose mean "
                "log(pi_engine / pi) per token exceeds DELTA (0 = off)"})
    keep_sampling_mask: bool = field(default=False, metadata={
        "help": "with --top-k / --top-p rollouts: the trainer's log-probs under the same truncation (DeepSeek-V3.2's "
                "Keep Sampling Mask; full-vocabulary logits per micro-batch)"})
    log_mismatch: bool = field(default=True, metadata={
        "help": "log mismatch_kl and mismatch_max_dlogp (engine vs trainer log-probs of the trained tokens; "
                "no extra forward)"})
    log_router_flips: bool = field(default=False, metadata={
        "help": "log router_flip_rate (+ per layer): the engine's expert choices recorded by hooks during rollouts "
                "(slower rollouts; not with --compile or vllm)"})
    routing_replay: str = field(default="off", metadata={
        "help": "off | rollout | old: routing replay. rollout (R3): the training forwards route each token to the "
                "MoE experts the rollout engine chose for it (recorded by hooks, as --log-router-flips; the gate's "
                "weights stay its own, so it still learns); logs router_flip_rate (0) and router_flip_rate_unreplayed "
                "(the trainer's own choice against the engine's). old (R2, with --mu > 1): the updates route as the "
                "old-policy forward did"})
    mu: int = field(default=1, metadata={"help": "optimizer steps per rollout batch"})
    micro_batch: int = field(default=32, metadata={"help": "sequences per forward/backward"})
    filter_zero_var: bool = field(default=False, metadata={
        "help": "train only on groups whose rewards differ (DAPO's dynamic sampling without the resampling): the "
                "loss is normalized by the informative tokens alone, so a step of mostly equal groups still counts"})
    dynamic_sampling: int = field(default=0, metadata={
        "help": "DAPO's dynamic sampling: up to N extra rounds of prompts-per-step new prompts until prompts-per-step "
                "groups have reward variance; only those train (implies --filter-zero-var; 0 = off)"})
    nan_policy: str = field(default="skip", metadata={"help": "non-finite loss: skip (counted) or error"})
    accuracy_weight: float = field(default=1.0, metadata={"help": "reward weight of correctness"})
    format_weight: float = field(default=0.2, metadata={"help": "reward weight of the think/answer format"})
    language_weight: float = field(default=-1.0, metadata={"help": "language-consistency weight (-1: 0.1 in r1, 0 in r1-zero)"})
    length_weight: float = field(default=0.0, metadata={"help": "DAPO overlong penalty weight (0 = off)"})
    mtp_weight: float = field(default=0.1, metadata={"help": "keep MTP fitted: its CE on the rollouts (trunk detached)"})
    bias_gamma: float = field(default=0.0, metadata={
        "help": "MoE routing-bias update speed (0 = frozen, as V3 ends pretraining with it: RL batches are few "
                "tokens, padded, and repeat each prompt G times, so their load would drift the bias; the README's "
                "speedrun section has the runs)"})
    eval_every: int = field(default=0, metadata={"help": "held-out greedy accuracy every N steps (0 = start/end)"})
    eval_n: int = field(default=64, metadata={"help": "held-out (test split) prompts per evaluation (0 = none)"})
    save_every: int = stage_default(RunOptions, "save_every", 50)
