"""`nanoseek grpo`: Group Relative Policy Optimization with rule rewards (DeepSeek-R1 / R1-Zero).

One step: draw prompts, sample a group of G completions per prompt (the prompt is prefilled once
and its cache shared by the group), score them with the rule rewards *before* any policy or
reference forward (then the rollout cache is gone), turn rewards into group-relative advantages,
and take mu optimizer steps on the clipped objective (grpo_loss.py). No value model.

  --mode r1       from the cold-start SFT model, chat template, accuracy + format + language
  --mode r1-zero  from a pretrained base, the plain-text R1-Zero prompt, accuracy + format

The loss value is not a progress signal (trl #2703): watch reward (mean, spread), the share of
groups whose rewards are all equal (they teach nothing), KL, clip fraction, entropy and length,
all in metrics.jsonl and plots/. Checkpoints resume bit-exactly: the prompts and the sampling
seed of step s depend only on (seed, s).

The rollout engine is not the trainer (kernels, precision, MoE router flips): every step logs how far
its sampling log-probs are from the trainer's on the same tokens (mismatch.py), and --tis-cap,
--mask-offpolicy and --keep-sampling-mask correct for it; --loss picks GRPO, GSPO or CISPO, and
--dynamic-sampling refills the batch with informative groups (grpo_batch.py). --routing-replay rollout
routes the training forward's tokens to the experts the rollout chose (routing_replay.py).
"""
from __future__ import annotations

import copy
import functools
import time
from pathlib import Path
from typing import Callable

import torch

from nanoseek.data.chat import describe_template, prompt_opens_think, question_prompt
from nanoseek.data.sources import heldout_samples, resolve_all
from nanoseek.kernels import known_logprob_gradient, speedup
from nanoseek.hf.load import from_pretrained
from nanoseek.model.moe import balance_losses, moe_layers
from nanoseek.parallel.parallelize import all_reduce_sum, full_state_dict
from nanoseek.rewards import RewardConfig, compute_rewards
from nanoseek.tokenizer import load_tokenizer
from nanoseek.train import distributed
from nanoseek.train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint, save_sharded_checkpoint
from nanoseek.train.grpo_batch import Round, informative_groups, local_rows, refill_seed, trained_groups
from nanoseek.train.grpo_loss import (OBJECTIVES, gradient_at_ratio_one, group_advantages, grpo_loss, normalizer,
                                      offpolicy_sequence_mask, policy_logprobs, tis_weights)
from nanoseek.train.grpo_options import Options
from nanoseek.train.grpo_plots import plot_run
from nanoseek.train.grpo_prompts import MODES as WEIGHTING_MODES, StepPrompts
from nanoseek.train.heap import retain_freed_memory
from nanoseek.train.mismatch import (EngineRouting, LogprobMismatch, TrainerRouting, engine_logprob_matrix,
                                     expert_matrix, router_flips)
from nanoseek.train.optimizer_step import OptimizerStep
from nanoseek.train.pretrain import start_run
from nanoseek.train.rollout import DTYPES, engine_rollout, make_rollout
from nanoseek.train.routing_replay import MODES as REPLAY_MODES, replayed
from nanoseek.train.trainer import MetricsLog, NoLog, lr_factor, make_optimizer, resolve_device

POSITIONAL = (("model", "model directory (HF layout with tokenizer): the SFT model (r1) or a base model (r1-zero); "
                          "or --model", True),)


# ------------------------------------------------------------------------------------ one step

def make_prompt(tok, question: str, mode: str) -> list[int]:
    return tok.encode(question_prompt(tok, question, mode))


def reward_config(o: Options):
    lang = o.language_weight if o.language_weight >= 0 else (0.1 if o.mode == "r1" else 0.0)
    return RewardConfig(accuracy=o.accuracy_weight, format=o.format_weight, language=lang, length=o.length_weight,
                        max_len=o.max_new_tokens, cache_len=max(1, o.max_new_tokens // 4))


class GRPO:
    """The state of a GRPO run and its step. `step(s)` does rollout + rewards + update and returns
    the logged row; a benchmark can time exactly that."""

    def __init__(self, model, tok, o: Options, reward_fn: Callable | None = None,
                 stop_ids: list[int] | None | str = "tokenizer",
                 rollout_fn: Callable | None = None, plain: torch.nn.Module | None = None):
        """plain: when `model` is wrapped for data parallelism (under torchrun), an unwrapped copy of
        it. The ranks generate different lengths, so rollouts (and the frozen reference) run on
        plain copies, free of collectives; the policy's weights are gathered into it before each rollout."""
        self.model, self.tok, self.o = model, tok, o
        self.rank, self.world = distributed.rank(), distributed.world()
        self.rollout_model = plain if plain is not None else model
        speedup(model, for_="train")  # the engine adds its decode kernels to the rollout model
        if plain is not None:
            speedup(plain, for_="train")
        self.dev = next(model.parameters()).device
        if self.dev.type == "cpu":
            retain_freed_memory()  # large update tensors are reused, not page-faulted in again each step
        self.stop_ids = tok.stop_ids if stop_ids == "tokenizer" else stop_ids  # None: never stop (benchmarks)
        self.reward_cfg = reward_config(o)
        self.reward_fn = reward_fn or self._rule_rewards
        self.rollout_fn = rollout_fn or functools.partial(engine_rollout, dtype=o.rollout_dtype)
        # beta = 0: no reference model at all (no memory, no forward)
        self.ref = None
        if o.beta > 0:
            self.ref = copy.deepcopy(self.rollout_model).eval()
            self.ref.requires_grad_(False)
        self.optimizer = make_optimizer(model, o.lr, o.weight_decay, (0.9, 0.99))
        # the lr is a function of the step, set at the start of each one: nothing to checkpoint, and no
        # scheduler in the optimizer step (one GRPO step takes mu of those)
        self.lr_at = lambda s: o.lr * lr_factor(s, o.steps, o.warmup_steps, "cosine", o.min_lr_ratio)
        self.optimizer_step = OptimizerStep(model, self.optimizer, o.grad_clip, all_reduce=all_reduce_sum)
        self.has_moe = bool(moe_layers(model))
        # with --task-weighting learnable, the tasks' shares of each step's prompts follow their informative groups
        self.prompts = StepPrompts(o)
        self.wants_engine_logprobs = o.log_mismatch or o.tis_cap > 0 or o.mask_offpolicy > 0
        # the rollout's top-k / top-p truncation, kept in the trainer's log-probs (None: the full distribution)
        self.sampling_mask = (o.top_k, o.top_p) if o.keep_sampling_mask and (o.top_k > 0 or o.top_p < 1) else None
        # the engine's expert choices: to count router flips, or to replay them in the training forwards
        self.records_routing = self.has_moe and (o.log_router_flips or o.routing_replay == "rollout")

    # -------------------------------------------------------------- data
    def prompts_at(self, step: int) -> list:
        """The samples of step `step`: a pure function of (seed, step) and the task weights' state, which
        the checkpoints hold, so resuming needs no other data state."""
        return self.prompts.at(step)

    def encode_prompt(self, sample) -> list[int]:
        return make_prompt(self.tok, sample.prompt, self.o.mode)

    @functools.cached_property
    def opens_think(self) -> bool:
        """Do this run's prompts open the think block (read once from the template; a custom reward_fn never asks)?"""
        return prompt_opens_think(self.tok, self.o.mode)

    def extra_state(self) -> dict:
        """What a checkpoint holds beside the weights and the optimizer: skipped steps and the task weights."""
        weights = self.prompts.weights
        return {"skipped": self.skipped, **({"task_weights": weights.state_dict()} if weights is not None else {})}

    def load_extra_state(self, extra: dict) -> None:
        self.optimizer_step.skipped = extra.get("skipped", 0)
        if self.prompts.weights is not None:
            self.prompts.weights.load_state_dict(extra.get("task_weights", {}))

    @property
    def skipped(self) -> int:
        """Optimizer steps skipped for a non-finite loss or gradient norm (checkpointed)."""
        return self.optimizer_step.skipped

    def _rule_rewards(self, samples, texts, n_tokens):
        return compute_rewards(samples, texts, self.reward_cfg, self.opens_think, n_tokens)

    def rollout(self, prompts: list[list[int]], seed: int):
        """Completions [N*G], the engine's log-probs of their tokens (when the mismatch is logged or corrected
        for, else None) and its expert choices per sequence (with --log-router-flips or --routing-replay
        rollout, else None)."""
        o = self.o
        args = (self.rollout_model, prompts, o.group_size, o.max_new_tokens, self.stop_ids, o.temperature, o.top_k, o.top_p, seed,
                self.tok.pad_id)
        kw, recorded = {}, []
        if self.wants_engine_logprobs:
            kw["logprobs"] = True
        if self.records_routing:
            def watch(engine):
                recorded.append(EngineRouting(self.rollout_model, engine, prompts, o.group_size, engine.max_len))
                return recorded[0]
            kw["watch"] = watch
        out = self.rollout_fn(*args, **kw)
        comps, logprobs = out if self.wants_engine_logprobs else (out, None)
        experts = None
        if recorded:  # per sequence: the positions it ran (prompt and all but its last token)
            experts = [recorded[0].experts[:, i, :len(prompts[i // o.group_size]) + len(c)] for i, c in enumerate(comps)]
        return comps, logprobs, experts

    def sync_rollout_model(self) -> None:
        """Gather the policy's current weights into the plain rollout copy (collective)."""
        if self.rollout_model is not self.model:
            self.rollout_model.load_state_dict(full_state_dict(self.model))

    # -------------------------------------------------------------- the step
    def sample_round(self, samples: list, seed: int) -> Round:
        """Roll out this rank's share of `samples`, score it, and gather every rank's rewards."""
        o, G = self.o, self.o.group_size
        per = len(samples) // self.world
        samples = samples[self.rank * per:(self.rank + 1) * per]  # this rank's prompts; same seeds as one process
        prompts = [self.encode_prompt(s) for s in samples]
        comps, logprobs, experts = self.rollout(prompts, seed)
        # rewards first, from text only: nothing of the rollout stays alive into the update
        texts = [self.tok.decode_completion(c) for c in comps]
        group_samples = [s for s in samples for _ in range(G)]
        rewards = self.reward_fn(group_samples, texts, [len(c) for c in comps])
        # every rank's rewards and completions: the log covers the global batch; advantages are
        # per group, so this rank's are its slice of the global ones
        all_rewards, all_comps = distributed.gather_lists(rewards), distributed.gather_lists(comps)
        all_r = torch.tensor([x.total for x in all_rewards])
        all_adv, zero_var = group_advantages(all_r, G, o.scale_rewards)
        return Round([prompts[i // G] for i in range(len(comps))], comps, logprobs, experts,
                     all_adv[self.rank * len(comps):(self.rank + 1) * len(comps)], all_rewards, all_r, all_adv, all_comps,
                     distributed.gather_lists([getattr(s, "task", "?") for s in group_samples]), zero_var)

    def step(self, step: int) -> dict:
        o, G = self.o, self.o.group_size
        t0 = time.perf_counter()
        for g in self.optimizer.param_groups:
            g["lr"] = self.lr_at(step)
        self.sync_rollout_model()
        rounds = [self.sample_round(self.prompts_at(step), seed=o.seed * 1_000_003 + step)]
        while o.dynamic_sampling and informative_groups(rounds) < o.prompts_per_step and len(rounds) <= o.dynamic_sampling:
            r = len(rounds)
            rounds.append(self.sample_round(self.prompts.refill(step, r), seed=refill_seed(o.seed, step, r)))
        t_roll = time.perf_counter() - t0
        first = rounds[0]  # the step's own prompts: the logged rewards follow one prompt stream, refills or not
        row = {"step": step + 1, **self._reward_stats(first.all_rewards, first.all_r, first.all_comps, first.zero_var),
               "adv_abs": first.all_adv.abs().mean().item(), **per_task_accuracy(first.all_tasks, first.all_rewards),
               "lr": self.optimizer.param_groups[0]["lr"]}
        if (weights := self.prompts.weights) is not None:  # the shares this step drew by, then its groups move them
            row.update({f"task_share/{t}": v for t, v in weights.shares().items()})
            weights.update(first.all_tasks[::G], (~first.zero_var).tolist())
        filtering = o.filter_zero_var or o.dynamic_sampling > 0
        trained = trained_groups(rounds, filtering, o.prompts_per_step if o.dynamic_sampling else None)
        row["trained_seqs"] = G * sum(trained)
        if o.dynamic_sampling:
            row.update(dynamic_rounds=len(rounds) - 1, dynamic_extra_rollouts=G * (len(trained) - len(first.zero_var)))
        b = local_rows(rounds, trained, self.rank, self.world, G)
        t1 = time.perf_counter()
        if self.world > 1 and row["trained_seqs"]:  # the same micro-batches on every rank: mask equal groups, not drop
            row.update(self.update(b["prompts"], b["comps"], b["adv"], b["masked"], b["logprobs"], b["experts"]))
        elif not all(b["masked"]):
            keep = [i for i, m in enumerate(b["masked"]) if not m]
            pick = lambda xs: [xs[i] for i in keep] if xs is not None else None  # noqa: E731
            row.update(self.update(pick(b["prompts"]), pick(b["comps"]), b["adv"][keep], None, pick(b["logprobs"]),
                                   pick(b["experts"])))
        t_train = time.perf_counter() - t1
        n_roll = sum(sum(map(len, r.all_comps)) for r in rounds)
        row.update(rollout_tokens_per_s=n_roll / max(t_roll, 1e-9), time_rollout=t_roll, time_train=t_train,
                   train_tokens_per_s=row.pop("_train_tokens", 0) * self.world * o.mu / max(t_train, 1e-9), skipped=self.skipped)
        return row

    def _reward_stats(self, rewards, r, comps, zero_var) -> dict:
        mean = lambda xs: sum(xs) / max(len(xs), 1)  # noqa: E731
        lens = [len(c) for c in comps]
        return {"reward": r.mean().item(), "reward_std": r.std().item() if len(r) > 1 else 0.0,
                "reward_accuracy": mean([x.accuracy for x in rewards]), "reward_format": mean([x.format for x in rewards]),
                "reward_language": mean([x.language for x in rewards]), "reward_length": mean([x.length for x in rewards]),
                "accuracy": mean([float(x.accuracy > 0) for x in rewards]),
                "zero_var_groups": zero_var.float().mean().item(),
                "response_len": mean(lens), "response_len_max": max(lens),
                "truncated": mean([float(self.stop_ids is not None and (not c or c[-1] not in self.stop_ids))
                                    for c in comps])}

    def _batch(self, prompts, comps):
        """Right-padded prompt+completion ids [B, T] and the completion mask over targets [B, T-1]."""
        T = max(len(p) + len(c) for p, c in zip(prompts, comps))
        ids = torch.full((len(comps), T), self.tok.pad_id, dtype=torch.long)
        mask = torch.zeros(len(comps), T - 1)
        for i, (p, c) in enumerate(zip(prompts, comps)):
            ids[i, :len(p) + len(c)] = torch.tensor(p + c)
            mask[i, len(p) - 1:len(p) + len(c) - 1] = 1.0  # target j is token j+1
        return ids.to(self.dev), mask.to(self.dev)

    @torch.no_grad()
    def _frozen_logprobs(self, net, ids, mask, replay: torch.Tensor | None) -> torch.Tensor:
        was = net.training
        net.eval()  # eval: MoE layers do not count this forward's load
        mb, out = self.o.micro_batch, []
        for i in range(0, len(ids), mb):
            with replayed(net, replay[:, i:i + mb] if replay is not None else None):
                out.append(policy_logprobs(net, ids[i:i + mb], mask[i:i + mb], self.o.temperature,
                                           sampling_mask=self.sampling_mask)[0])
        net.train(was)
        return torch.cat(out)

    def update(self, prompts, comps, adv, masked: list[bool] | None = None, engine_logprobs: list | None = None,
               engine_experts: list | None = None) -> dict:
        """masked: rows that count nowhere (loss, normalizer, MTP, stats); only the MoE balance terms see them.
        engine_logprobs / engine_experts: the rollout's, per row (mismatch metrics and corrections)."""
        o, model = self.o, self.model
        ids, mask = self._batch(prompts, comps)
        engine_lp = engine_logprob_matrix(engine_logprobs, mask) if engine_logprobs is not None else None
        if masked is not None:
            mask[torch.tensor(masked, device=mask.device)] = 0.0
        adv = adv.to(self.dev)
        # R3: every forward over the rollout's tokens (policy, old policy, reference) routes them as the engine did
        replay = (expert_matrix(engine_experts, *mask.shape) if o.routing_replay == "rollout" and engine_experts
                  else None)
        # mu = 1: the old policy *is* the current one, ratio = 1 exactly (old = current.detach())
        old_logp = None
        if o.mu > 1:
            old_routing = TrainerRouting(model) if o.routing_replay == "old" else None
            old_logp = self._frozen_logprobs(model, ids, mask, replay)
            if old_routing is not None:  # R2: the later forwards route as the old policy did
                old_routing.remove()
                replay = old_routing.stacked(*mask.shape)
        ref_logp = self._frozen_logprobs(self.ref, ids, mask, replay) if self.ref is not None else None
        corrected = o.tis_cap > 0 or o.mask_offpolicy > 0  # token weights that need the log-probs first
        # ratio == 1, no KL term (a reference exists iff beta > 0): every objective's gradient is -A / norm
        on_policy = old_logp is None and ref_logp is None and not corrected and self.sampling_mask is None
        measured = LogprobMismatch(self.dev) if o.log_mismatch and engine_lp is not None else None
        trainer_routing = TrainerRouting(model) if engine_experts is not None else None  # the first pass's forwards
        W = self.world
        n_tok, rows = mask.sum(), (mask.sum(-1) > 0).sum()
        if W > 1:
            # normalize by the global batch and scale by W: the wrappers average the ranks' gradients,
            # so the update equals one process's on all the rollouts
            n_tok, rows = all_reduce_sum(n_tok), all_reduce_sum(rows)
        # GSPO's objective is one term per sequence: a mean over sequences by definition
        norm = normalizer(mask, "sequence" if o.loss == "gspo" else o.loss_agg, o.max_new_tokens, n_tok, rows)
        n_tok = n_tok.clamp_min(1.0)
        model.train()
        sums = {"loss": 0.0, "kl": 0.0, "clipped": 0.0, "entropy": 0.0, "mtp_loss": 0.0}
        grad_norm = 0.0
        for epoch in range(o.mu):
            finite = True
            for i in range(0, len(ids), o.micro_batch):
                sl = slice(i, i + o.micro_batch)
                norm_sl = norm[sl] if norm.dim() == 1 else norm

                def policy_loss(logp, old, token_weights=None):  # this micro-batch's
                    return grpo_loss(logp, old, adv[sl], mask[sl], norm_sl, ref_logp[sl] if ref_logp is not None else None,
                                     o.beta, o.eps_low, o.eps_high, o.loss, token_weights)

                # on policy the gradient the loss sends to the log-probs is known before the forward:
                # the chunked head (kernels) then forms its own gradients there
                hint = (gradient_at_ratio_one(lambda lp: policy_loss(lp, lp.detach())[0] * W, mask[sl])
                        if on_policy else None)
                with known_logprob_gradient(hint), replayed(model, replay[:, sl] if replay is not None else None):
                    logp, ent, mtp = policy_logprobs(model, ids[sl], mask[sl], o.temperature, o.mtp_weight,
                                                     entropy=True, sampling_mask=self.sampling_mask)
                old = old_logp[sl] if old_logp is not None else logp.detach()
                if measured is not None and epoch == 0:  # pi_old: the trainer at the rollout's weights
                    measured.add(old, engine_lp[sl], mask[sl])
                token_weights = self._corrections(logp, old, engine_lp[sl], adv[sl], mask[sl]) if corrected else None
                loss, st = policy_loss(logp, old, token_weights)
                mtp_loss = o.mtp_weight * mtp * (mask[sl].sum() / n_tok) if mtp is not None else 0.0
                loss = loss + mtp_loss
                bal = balance_losses(model)  # a per-rank mean: the wrappers' average makes it the global one
                bal = bal * (len(ids[sl]) / len(ids)) if bal is not None else loss.new_zeros(())
                if W > 1:  # every rank must take the same branch (a backward is collective)
                    if all_reduce_sum(torch.isfinite(loss + bal).float().reshape(1)).item() < W:
                        loss = loss.new_tensor(float("nan"))
                if not torch.isfinite(loss + bal):
                    if o.nan_policy == "error":
                        raise FloatingPointError(f"GRPO loss is {(loss + bal).item()} at micro-batch {i // o.micro_batch}; "
                                                 "lower --lr, check rewards for NaN, or use --nan-policy skip")
                    finite = False
                    break
                (loss * W + bal).backward()  # x W: the wrappers average the ranks' gradients
                sums["loss"] += (loss.item() + bal.item() / W) / o.mu  # summed over the ranks below
                for k in ("kl", "clipped"):
                    sums[k] += st[k].item() / n_tok.item() / o.mu
                sums["entropy"] += (ent * mask[sl]).sum().item() / n_tok.item() / o.mu
                sums["mtp_loss"] += (mtp.item() * mask[sl].sum().item() / n_tok.item() / o.mu) if mtp is not None else 0.0
            if trainer_routing is not None and epoch == 0:
                trainer_routing.remove()
            # the routing bias keeps its own speed during RL (--bias-gamma; 0: frozen)
            gn, applied, _ = self.optimizer_step.step(o.bias_gamma, finite)
            if applied:
                grad_norm = gn.item()
        if W > 1:  # every rank holds its share of the global sums
            sums, _ = distributed.reduce_row(sums, 0, self.dev)
            sums = {k: v * W for k, v in sums.items()}
        sums["clip_frac"] = sums.pop("clipped")
        if measured is not None:
            sums.update(measured.row())
        if trainer_routing is not None:
            sums.update(router_flips(engine_experts, trainer_routing.stacked(*mask.shape), mask))
            if replay is not None:  # what replay prevented: the trainer's own choice against the engine's
                sums.update(router_flips(engine_experts, trainer_routing.own_stacked(*mask.shape), mask, "_unreplayed"))
        return {**sums, "grad_norm": grad_norm, "_train_tokens": ids.numel()}

    def _corrections(self, logp, old_logp, engine_logp, adv, mask) -> torch.Tensor:
        """Per-token weights [B, T] of the off-policy corrections against the engine's log-probs."""
        o = self.o
        w = tis_weights(old_logp, engine_logp, o.tis_cap) if o.tis_cap > 0 else torch.ones_like(old_logp)
        if o.mask_offpolicy > 0:
            w = w * offpolicy_sequence_mask(logp, engine_logp, adv, mask, o.mask_offpolicy).unsqueeze(-1)
        return w


def per_task_accuracy(tasks: list[str], rewards) -> dict:
    """{"accuracy/<task>": share of this step's rollouts of that task that are correct}."""
    by: dict[str, list[float]] = {}
    for t, r in zip(tasks, rewards):
        by.setdefault(t, []).append(float(r.accuracy > 0))
    return {f"accuracy/{t}": sum(v) / len(v) for t, v in sorted(by.items())}


# ------------------------------------------------------------------------------------ evaluation

def evaluate(model, tok, o: Options, n: int | None = None) -> dict:
    """Greedy accuracy and format rate on held-out (test split) prompts of the run's tasks ({} if none:
    a whole data file has no held-out part, FILE@train holds out FILE@test)."""
    samples = heldout_samples(resolve_all(o.tasks, o.prompt_field, o.answer_field), n or o.eval_n,
                              o.max_difficulty or o.difficulty, seed=o.seed + 1)
    if not samples:
        return {}
    prompts = [make_prompt(tok, s.prompt, o.mode) for s in samples]
    comps = []
    for i in range(0, len(prompts), 64):
        comps += engine_rollout(model, prompts[i:i + 64], 1, o.max_new_tokens, tok.stop_ids, temperature=0.0,
                                pad_id=tok.pad_id, compile=o.compile)
    rs = compute_rewards(samples, [tok.decode_completion(c) for c in comps], reward_config(o),
                         prompt_opens_think(tok, o.mode))
    return {"eval_accuracy": sum(r.accuracy > 0 for r in rs) / len(rs), "eval_format": sum(r.format for r in rs) / len(rs)}


# ------------------------------------------------------------------------------------ the run

def grpo(o: Options) -> Path:
    """Run GRPO from o.model; returns the final model directory (HF layout, with tokenizer)."""
    if not o.model:
        raise SystemExit("grpo: MODEL is required (the cold-start SFT model for r1, a pretrained base for r1-zero)")
    for name, ok in (("mode", ("r1", "r1-zero")), ("scale_rewards", ("group", "none")),
                     ("loss_agg", ("token", "sequence", "dr_grpo")), ("nan_policy", ("skip", "error")),
                     ("loss", OBJECTIVES), ("rollout_dtype", DTYPES), ("routing_replay", REPLAY_MODES),
                     ("task_weighting", WEIGHTING_MODES)):
        if getattr(o, name) not in ok:
            raise SystemExit(f"grpo: --{name.replace('_', '-')} must be one of {', '.join(ok)}, got {getattr(o, name)!r}")
    if o.routing_replay == "old" and o.mu < 2:
        raise SystemExit("grpo: --routing-replay old replays the old policy's routing in the updates after the "
                         "first: it needs --mu > 1 (with --mu 1 the old policy is the current one)")
    if o.group_size < 2:
        raise SystemExit("grpo: --group-size must be >= 2 (advantages are relative to the group)")
    sharded = distributed.wanted(o)
    if (o.log_router_flips or o.routing_replay == "rollout") and (o.compile or o.rollout != "engine"):
        raise SystemExit("grpo: --log-router-flips and --routing-replay rollout record the engine's routing by forward "
                         "hooks: they need --rollout engine without --compile (hooks would be traced into the compiled "
                         "decode)")
    if o.keep_sampling_mask and sharded:
        raise SystemExit("grpo: --keep-sampling-mask is single-process for now (its full-vocabulary head is not "
                         "registered with the data-parallel wrappers)")
    if sharded and o.rollout != "engine":
        raise SystemExit("grpo: under torchrun the rollouts use the built-in engine (--rollout engine); "
                         "--rollout vllm is single-process for now")
    resolve_all(o.tasks, o.prompt_field, o.answer_field)  # a bad task or data file fails before the run folder exists
    tok = load_tokenizer(o.model)
    template = describe_template(tok, o.mode)  # a template that cannot ask the questions fails here, folder-less
    t_start = time.time()
    out = start_run(o, "grpo")
    device = distributed.join(o, resolve_device(o.device))[2] if sharded else resolve_device(o.device)
    model = from_pretrained(o.model).to(device).train()
    plain = None
    if sharded:  # rollouts and the reference run on an unwrapped copy; the policy is wrapped for the update
        plain = copy.deepcopy(model)
        model = distributed.wrap(model, o, distributed.world())
    # the reference (if beta > 0) is the *initial* model, also on resume
    run = GRPO(model, tok, o, rollout_fn=make_rollout(o.rollout, o.compile, o.rollout_dtype), plain=plain)
    start, resume_step = 0, None
    if o.resume and (ckpt := latest_checkpoint(out / "checkpoints")) is not None:
        state = load_checkpoint(ckpt, model, run.optimizer)
        start = resume_step = state["step"]
        run.load_extra_state(state["extra"])
        print(f"grpo: resumed from {ckpt} (step {start})")
    log = MetricsLog(out / "metrics.jsonl", resume_step, tensorboard=False) if distributed.is_main() else NoLog()
    print(f"grpo ({o.mode}): {o.steps} steps x {o.prompts_per_step} prompts x G={o.group_size}, tasks {','.join(o.tasks)}, "
          f"{run.world} rank(s), run folder {out}")
    print(f"grpo: {template}")

    def eval_row(step):
        if o.eval_n > 0:
            run.sync_rollout_model()
            if distributed.is_main():  # rank 0 alone: greedy decoding of eval_n prompts is short
                ev = evaluate(run.rollout_model, tok, o)
                if ev:
                    log.log({"step": step, **ev})
                    print(f"step {step}: held-out accuracy {ev['eval_accuracy']:.1%}, format {ev['eval_format']:.1%}", flush=True)
                else:
                    print(f"step {step}: no held-out prompts (data files train whole; FILE@train holds out FILE@test)")
            distributed.barrier()

    if start == 0:
        eval_row(0)
    row = {}
    for s in range(start, o.steps):
        row = run.step(s)
        log.log(row)
        if s == start or (s + 1) % max(1, o.steps // 20) == 0:
            print(f"step {s + 1}/{o.steps}: reward {row['reward']:.3f} +- {row['reward_std']:.3f} acc {row['accuracy']:.2f} "
                  f"fmt {row['reward_format']:.2f} len {row['response_len']:.0f} kl {row.get('kl', 0):.4f} "
                  f"clip {row.get('clip_frac', 0):.3f} ent {row.get('entropy', 0):.2f} equal-groups {row['zero_var_groups']:.2f} "
                  f"({row['time_rollout']:.1f}s rollout, {row['time_train']:.1f}s train)", flush=True)
        if o.eval_every and (s + 1) % o.eval_every == 0 and s + 1 < o.steps:
            eval_row(s + 1)
        if (o.save_every and (s + 1) % o.save_every == 0) or s + 1 == o.steps:
            (save_sharded_checkpoint if sharded else save_checkpoint)(out / "checkpoints", s + 1, model, run.optimizer, None, {"step": s + 1},
                            run.extra_state(), keep_last=o.keep_last)
    if start < o.steps:
        eval_row(o.steps)
    log.close()
    final = out / "final"
    distributed.save_pretrained(model, final, tokenizer=tok)
    plots = plot_run(out) if distributed.is_main() else []
    print(f"grpo done in {time.time() - t_start:.0f}s: model {final}, metrics {out / 'metrics.jsonl'}, "
          f"{len(plots)} plots in {out / 'plots'}, {run.skipped} skipped steps")
    return final


def run(opts: Options) -> None:
    grpo(opts)
