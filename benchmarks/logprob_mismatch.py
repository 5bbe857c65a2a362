"""Rollout/trainer log-prob mismatch: the engine's sampling log-probs vs the GRPO update's, on the same tokens.

GRPO samples with the inference engine (KV cache, absorbed latent attention, decode-sized kernels,
eval-mode MoE routing, maybe bf16 autocast or a compiled decode) and then scores the same tokens with
the training forward (whole sequences, train mode). The update is on-policy only where the two agree;
elsewhere the samples come from a slightly different policy than the one trained (the ratio
pi_trainer / pi_engine is not 1), and a MoE router whose top-k choice flips between the two forwards
sends the token to other experts altogether (issues #21, #23).

For each (engine, trainer) pair, over N prompts x G samples at temperature 1 (the engine reports the
log-probs of the raw distribution, which at T = 1 is the one it samples from), with
Δ = log pi_trainer(token) - log pi_engine(token) per sampled token:
  mean |Δ|, p50 / p99 / max |Δ|, share of tokens with |Δ| > 0.1, share whose ratio exp(Δ) lies outside
  GRPO's clip range [1 - eps_low, 1 + eps_high], mean per-sequence |Σ Δ| (what a sequence-level ratio
  such as GSPO's sees), the mismatch KL(engine || trainer) as the mean of exp(Δ) - 1 - Δ (k3, unbiased
  on the engine's samples), and for MoE models the share of (token, layer) routing decisions whose
  top-k expert set differs between the engine's forward and the trainer's (router flips), read by
  forward hooks on the gates.

  python -m benchmarks.logprob_mismatch --quick                  # a random tiny model, well under a minute
  python -m benchmarks.logprob_mismatch --model runs/sft/final --tasks add,sub --difficulty 2
  python -m benchmarks --only logprob_mismatch                   # the runner's rows (random tiny model)
"""
from __future__ import annotations

import argparse
import contextlib
import json
import platform
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from benchmarks.common import Row
from nanoseek import hardware
from nanoseek.config import get_preset
from nanoseek.data.corpus import default_corpus
from nanoseek.data.sources import resolve_all, train_samples
from nanoseek.infer.engine import Engine
from nanoseek.infer.sampling import SamplingParams
from nanoseek.hf.load import from_pretrained
from nanoseek.model.moe import MoE
from nanoseek.model.transformer import Transformer
from nanoseek.tokenizer import load_tokenizer, train_tokenizer
from nanoseek.train.grpo import Options as GRPOOptions, make_prompt
from nanoseek.train.grpo_loss import policy_logprobs
from nanoseek.train.mismatch import EngineRouting, TrainerRouting


@dataclass(frozen=True)
class EngineSetup:
    name: str
    autocast: torch.dtype | None = None   # the engine's forwards under torch.autocast to this dtype
    compile: bool = False                 # Engine(compile=True): decode steps through torch.compile


@dataclass(frozen=True)
class TrainerSetup:
    name: str
    autocast: torch.dtype | None = None
    train: bool = True  # train mode with gradients (GRPO's update); False: eval + no_grad (its frozen log-probs)


ENGINE_FP32 = EngineSetup("fp32")
ENGINE_BF16 = EngineSetup("bf16 autocast", autocast=torch.bfloat16)
ENGINE_COMPILED = EngineSetup("fp32 compiled", compile=True)
TRAINER_FP32 = TrainerSetup("fp32 train")
TRAINER_FP32_EVAL = TrainerSetup("fp32 eval", train=False)
TRAINER_BF16 = TrainerSetup("bf16 autocast train", autocast=torch.bfloat16)

PAIRS = [(ENGINE_FP32, TRAINER_FP32), (ENGINE_FP32, TRAINER_FP32_EVAL), (ENGINE_BF16, TRAINER_FP32),
         (ENGINE_FP32, TRAINER_BF16), (ENGINE_BF16, TRAINER_BF16), (ENGINE_COMPILED, TRAINER_FP32)]
QUICK = dict(prompts=4, group=4, max_new_tokens=32)
FULL = dict(prompts=16, group=8, max_new_tokens=96)


def _autocast(device: torch.device, dtype: torch.dtype | None):
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


def _failed_compiles() -> int:
    """Frames torch.compile has failed to convert so far in this process (the compiled engine then runs
    them eagerly, with only a warning)."""
    frames = torch._dynamo.utils.counters["frames"]
    return frames["total"] - frames["ok"]


def _trunk_moe_layers(model) -> list[MoE]:
    """The MoE layers of the main stack (not the MTP block, which neither forward runs here)."""
    return [b.mlp for b in model.layers if isinstance(b.mlp, MoE)]


# ------------------------------------------------------------------------------------ the two sides

def engine_samples(model, prompts: list[list[int]], n: int, max_new_tokens: int, stop_ids: list[int] | None,
                   seed: int, setup: EngineSetup, routing: bool):
    """Completions [N*n] (prompt-major), their per-token log-probs, and the engine's routing (or None).
    The engine is built and called as `rollout.engine_rollout` does, at T = 1 (raw = sampled distribution)."""
    was_training = model.training
    max_len = max(map(len, prompts)) + max_new_tokens
    engine = Engine(model, max_batch=min(len(prompts) * n, 512), max_len=max_len, compile=setup.compile)
    params = SamplingParams(temperature=1.0, max_tokens=max_new_tokens, stop_token_ids=list(stop_ids or []),
                            seed=seed, logprobs=True, n=n, ignore_eos=True)
    recorder = EngineRouting(model, engine, prompts, n, max_len) if routing else None
    try:
        with torch.no_grad(), _autocast(engine.device, setup.autocast):
            outs = engine.generate(prompts, params)
    finally:
        if recorder is not None:
            recorder.remove()
        model.train(was_training)
    comps = [c for r in outs for c in r.outputs]
    return ([list(c.token_ids) for c in comps], [list(c.logprobs) for c in comps],
            recorder.experts if recorder is not None else None)


def batch(prompts: list[list[int]], comps: list[list[int]], n: int, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded prompt+completion ids [B, T] and the completion mask over targets [B, T-1], as
    GRPO._batch lays them out (prompts [N], each repeated for its n completions)."""
    full = [prompts[i // n] + c for i, c in enumerate(comps)]
    T = max(map(len, full))
    ids = torch.full((len(comps), T), pad_id, dtype=torch.long)
    mask = torch.zeros(len(comps), T - 1)
    for i, (seq, c) in enumerate(zip(full, comps)):
        ids[i, :len(seq)] = torch.tensor(seq)
        mask[i, len(seq) - len(c) - 1:len(seq) - 1] = 1.0  # target j is token j+1
    return ids, mask


def trainer_logprobs(model, ids: torch.Tensor, mask: torch.Tensor, setup: TrainerSetup, micro_batch: int,
                     routing: bool):
    """The log-probs [B, T-1] GRPO's update computes for these tokens (`policy_logprobs` in micro-batches,
    train mode with gradients, or eval + no_grad as for its frozen log-probs), the entropy [B, T-1], and
    the routing [layers, B, T-1, k] (or None). The MoE load counters a train-mode forward adds to are
    put back (and each layer's last balance loss): nothing here may steer a later update."""
    was_training = model.training
    moe_state = [(m, m.load.clone(), m.aux_loss) for m in _trunk_moe_layers(model)]
    recorder = TrainerRouting(model) if routing else None
    model.train(setup.train)
    logps, ents = [], []
    try:
        with torch.set_grad_enabled(setup.train), _autocast(ids.device, setup.autocast):
            for i in range(0, len(ids), micro_batch):
                logp, ent, _ = policy_logprobs(model, ids[i:i + micro_batch], mask[i:i + micro_batch], 1.0,
                                               entropy=True)
                logps.append(logp.detach())
                ents.append(ent.detach())
    finally:
        if recorder is not None:
            recorder.remove()
        model.train(was_training)
        with torch.no_grad():
            for m, load, aux_loss in moe_state:
                m.load.copy_(load)
                m.aux_loss = aux_loss
    experts = recorder.stacked(*mask.shape) if recorder is not None else None
    return torch.cat(logps).float(), torch.cat(ents).float(), experts


# ------------------------------------------------------------------------------------ the comparison

def mismatch_stats(engine_logp: torch.Tensor, trainer_logp: torch.Tensor, mask: torch.Tensor,
                   eps_low: float, eps_high: float) -> dict:
    """Δ = trainer - engine log-prob per completion token (mask [B, T-1]); the figures of the module doc."""
    on = mask.bool()
    delta = (trainer_logp.double() - engine_logp.double()) * mask
    d = delta[on]
    a, ratio = d.abs(), d.exp()
    return {"sequences": int(mask.shape[0]), "tokens": int(on.sum()),
            "mean_dlogp": d.mean().item(), "mean_abs_dlogp": a.mean().item(),
            "p50_abs_dlogp": a.quantile(0.5).item(), "p99_abs_dlogp": a.quantile(0.99).item(),
            "max_abs_dlogp": a.max().item(), "share_abs_dlogp_over_0.1": (a > 0.1).double().mean().item(),
            "share_ratio_outside_clip": ((ratio < 1 - eps_low) | (ratio > 1 + eps_high)).double().mean().item(),
            "mean_abs_seq_sum_dlogp": delta.sum(-1).abs().mean().item(),
            "mismatch_kl": (ratio - 1 - d).mean().item()}


def routing_stats(engine_experts: torch.Tensor, trainer_experts: torch.Tensor, mask: torch.Tensor,
                  prompt_lens: torch.Tensor) -> dict:
    """Router flips: (position, layer) pairs whose top-k expert *set* differs. Scored positions are those
    whose output is a sampled token's distribution (mask); prompt positions are the other prompt tokens."""
    T = trainer_experts.shape[2]
    eng = engine_experts[:, :, :T].sort(-1).values
    flips = (eng != trainer_experts.sort(-1).values).any(-1)                       # [L, B, T]
    scored = mask.bool()
    prompt = torch.arange(T).unsqueeze(0) < (prompt_lens - 1).unsqueeze(1)          # [B, T]
    assert (eng[:, scored] >= 0).all() and (eng[:, prompt] >= 0).all(), "a position the engine ran was not recorded"
    return {"router_flip_rate": flips[:, scored].double().mean().item(),
            "router_flip_rate_per_layer": flips[:, scored].double().mean(-1).tolist(),
            "tokens_with_any_flip": flips.any(0)[scored].double().mean().item(),
            "router_flip_rate_prompt": flips[:, prompt].double().mean().item() if prompt.any() else 0.0}


def measure(model, tok, questions: list[str], group: int, max_new_tokens: int, pairs=PAIRS, mode: str = "r1",
            seed: int = 0) -> list[dict]:
    """One row per (engine, trainer) pair: the mismatch on the engine's samples of `questions` x `group`.
    Each engine setup samples once (same seed); each of its trainer setups scores those samples."""
    o = GRPOOptions()
    device = next(model.parameters()).device
    prompts = [make_prompt(tok, q, mode) for q in questions]
    moe = bool(_trunk_moe_layers(model))
    rows = []
    for engine_setup in dict.fromkeys(e for e, _ in pairs):
        t0 = time.perf_counter()
        # hooks inside a compiled decode would be traced into it and change what is measured
        with_routes = moe and not engine_setup.compile
        failed_before = _failed_compiles()
        comps, lps, eng_experts = engine_samples(model, prompts, group, max_new_tokens, tok.stop_ids, seed,
                                                 engine_setup, with_routes)
        failed_compiles = _failed_compiles() - failed_before
        t_engine = time.perf_counter() - t0
        ids, mask = batch(prompts, comps, group, tok.pad_id)
        engine_logp = torch.zeros(mask.shape)
        engine_logp[mask.bool()] = torch.tensor([x for lp in lps for x in lp])  # row-major = sequence order
        prompt_lens = torch.tensor([len(prompts[i // group]) for i in range(len(comps))])
        for trainer_setup in (t for e, t in pairs if e == engine_setup):
            logp, ent, tr_experts = trainer_logprobs(model, ids.to(device), mask.to(device), trainer_setup,
                                                     o.micro_batch, with_routes)
            row = {"engine": engine_setup.name, "trainer": trainer_setup.name,
                   **mismatch_stats(engine_logp, logp.cpu(), mask, o.eps_low, o.eps_high),
                   "entropy": (ent.cpu() * mask).sum().item() / mask.sum().item(),
                   "engine_seconds": round(t_engine, 2)}
            if with_routes:
                row.update(routing_stats(eng_experts, tr_experts, mask, prompt_lens))
            elif moe:
                row["note"] = "routing not recorded: hooks would be traced into the compiled decode"
            if engine_setup.compile:
                row["failed_compiles"] = failed_compiles
                if failed_compiles:  # the engine's suppress_errors ran those steps eagerly: say so, not hide it
                    row["note"] = (row.get("note", "") + f"; {failed_compiles} compile(s) failed, "
                                   "those decode steps ran eagerly").lstrip("; ")
            rows.append(row)
            print(f"  engine {row['engine']:<14} trainer {row['trainer']:<20} mean |Δ| {row['mean_abs_dlogp']:.2e}"
                f"  ({t_engine:.0f} s sampling)")
    return rows


# ------------------------------------------------------------------------------------ models, output

def random_model(preset: str, seed: int = 0):
    """A randomly initialised model of `preset` with a small tokenizer trained on the task corpus."""
    tok = train_tokenizer(default_corpus(500, seed=1), 4096)
    torch.manual_seed(seed)
    cfg = get_preset(preset).replace(vocab_size=tok.vocab_size, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id,
                                     pad_token_id=tok.pad_id)
    return Transformer(cfg), tok


def machine() -> dict:
    flags = hardware._cpu_flags() or set()
    return {"cpu": hardware._cpu_model_name(), "avx512_bf16": "avx512_bf16" in flags,
            "amx_bf16": "amx_bf16" in flags, "threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version()}


COLUMNS = [("mean |Δ|", "mean_abs_dlogp", ".2e"), ("p50", "p50_abs_dlogp", ".1e"), ("p99", "p99_abs_dlogp", ".1e"),
           ("max", "max_abs_dlogp", ".1e"), (">0.1", "share_abs_dlogp_over_0.1", ".2%"),
           ("out clip", "share_ratio_outside_clip", ".2%"), ("seq |ΣΔ|", "mean_abs_seq_sum_dlogp", ".1e"),
           ("KL k3", "mismatch_kl", ".1e"), ("flips", "router_flip_rate", ".2%"),
           ("tok flip", "tokens_with_any_flip", ".2%")]


def print_rows(rows: list[dict]) -> None:
    print(f"\n{'engine':<14} {'trainer':<20} {'tokens':>6}" + "".join(f" {h:>9}" for h, _, _ in COLUMNS))
    for r in rows:
        cells = "".join(f" {format(r[k], f) if k in r else '-':>9}" for _, k, f in COLUMNS)
        print(f"{r['engine']:<14} {r['trainer']:<20} {r['tokens']:>6}{cells}")
    o = GRPOOptions()
    print(f"Δ = trainer - engine log p per sampled token; out clip: exp(Δ) outside GRPO's clip range "
          f"[{1 - o.eps_low:g}, {1 + o.eps_high:g}]; flips: (token, layer) top-k sets that differ; tok flip: tokens "
          "with a flip in any layer")
    for r in rows:
        if "note" in r:
            print(f"{r['engine']} / {r['trainer']}: {r['note']}")


def run(preset: str = "tiny", device: str = "cpu") -> list[Row]:
    """The runner's rows: a random `preset` model, the default sizes, every pair; the reference of each
    row is the fp32 engine vs the fp32 trainer (the same precision: kernels and batching alone)."""
    model, tok = random_model(preset)
    model.to(device)
    questions = [s.prompt for s in train_samples(resolve_all(["add"]), FULL["prompts"], 1, 0)]
    rows = measure(model, tok, questions, FULL["group"], FULL["max_new_tokens"])
    floor = rows[0]["mean_abs_dlogp"]
    what = (f"({preset}, random init, {FULL['prompts']} prompts x G={FULL['group']}, {FULL['max_new_tokens']} new "
            f"tokens, T=1, {device})")
    return [Row(f"log-prob mismatch, engine {r['engine']} vs trainer {r['trainer']} {what}", r["mean_abs_dlogp"],
                floor, "nats/token", floor / max(r["mean_abs_dlogp"], 1e-30),
                f"reference: engine fp32 vs trainer fp32; p99 {r['p99_abs_dlogp']:.1e}, max {r['max_abs_dlogp']:.1e}, "
                f"KL {r['mismatch_kl']:.1e}, ratio outside clip {r['share_ratio_outside_clip']:.2%}"
                + (f", router flips {r['router_flip_rate']:.2%}" if "router_flip_rate" in r else ""))
            for r in rows]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.logprob_mismatch", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="", help="model directory (HF layout with tokenizer); default: a random "
                                               "--preset model")
    p.add_argument("--preset", default="tiny", help="preset of the random model (without --model)")
    p.add_argument("--tasks", default="add", help="comma-separated built-in tasks the prompts come from")
    p.add_argument("--difficulty", type=int, default=1, help="task difficulty")
    p.add_argument("--mode", default="r1", choices=["r1", "r1-zero"], help="prompt template, as `nanoseek grpo --mode`")
    p.add_argument("--prompts", type=int, default=None,
                   help=f"N prompts (default {FULL['prompts']}, quick {QUICK['prompts']})")
    p.add_argument("--group", type=int, default=None,
                   help=f"G samples per prompt (default {FULL['group']}, quick {QUICK['group']})")
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help=f"completion limit (default {FULL['max_new_tokens']}, quick {QUICK['max_new_tokens']})")
    p.add_argument("--no-compile", action="store_true", help="skip the compiled-decode row (its compilation is the slow part)")
    p.add_argument("--quick", action="store_true", help="small sizes and no compiled row: well under a minute")
    p.add_argument("--seed", type=int, default=0, help="prompts, sampling and the random model")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--json", default="benchmarks/logprob_mismatch.json", help="where to write the results")
    a = p.parse_args(argv)
    sizes = {k: getattr(a, k) if getattr(a, k) is not None else (QUICK if a.quick else FULL)[k] for k in FULL}
    if a.model:
        model, tok, what = from_pretrained(a.model), load_tokenizer(a.model), a.model
    else:
        model, tok = random_model(a.preset, a.seed)
        what = f"random {a.preset} (seed {a.seed})"
    model.to(a.device)
    pairs = [(e, t) for e, t in PAIRS if not (e.compile and (a.quick or a.no_compile))]
    samples = train_samples(resolve_all(a.tasks.split(",")), sizes["prompts"], a.difficulty, a.seed)
    questions = [s.prompt for s in samples]
    info = {"model": what, "tasks": a.tasks, "difficulty": a.difficulty, "mode": a.mode, **sizes, "temperature": 1.0,
            "seed": a.seed, "device": a.device, "machine": machine()}
    print(f"log-prob mismatch: {what}, {sizes['prompts']} prompts x G={sizes['group']}, up to "
          f"{sizes['max_new_tokens']} new tokens, T=1; {info['machine']['cpu']}, {torch.get_num_threads()} threads")
    t0 = time.perf_counter()
    rows = measure(model, tok, questions, sizes["group"], sizes["max_new_tokens"], pairs, a.mode, a.seed)
    info["seconds"] = round(time.perf_counter() - t0, 1)
    print_rows(rows)
    if not any(e.compile for e, _ in pairs):
        print("compiled decode: skipped (--quick or --no-compile)")
    Path(a.json).parent.mkdir(parents=True, exist_ok=True)
    Path(a.json).write_text(json.dumps({**info, "rows": rows}, indent=1) + "\n")
    print(f"wrote {a.json} ({info['seconds']:.0f} s)")


if __name__ == "__main__":
    main()
