"""The rollout/trainer mismatch of a GRPO step, measured on the step's own tokens.

GRPO samples with the inference engine (KV cache, absorbed latent attention, decode-sized kernels, maybe
bf16 autocast, a compiled decode or vLLM) and trains with the training forward. Where the two disagree the
samples come from a slightly different policy than the one trained, and a MoE router whose hard top-k flips
between the two forwards sends the token to other experts altogether (issue #23). Per step:

  mismatch_kl          mean over the trained tokens of exp(Δ) - 1 - Δ, Δ = log pi_trainer - log pi_engine:
                       the k3 estimate of KL(pi_engine || pi_trainer) on the engine's own samples
  mismatch_max_dlogp   max |Δ|
  router_flip_rate     share of (token, MoE layer) routing decisions whose top-k expert *set* differs
                       between the rollout's forward and the training forward (with --log-router-flips or
                       --routing-replay rollout), with router_flip_rate/layerI per layer and
                       router_flip_tokens (a flip in any layer). Under routing replay (routing_replay.py) it is
                       0 by construction; the same figures with the suffix _unreplayed compare each gate's own
                       choice (on the replayed forward's hidden states) with the engine's

The engine reports the log-prob of each token under the distribution it sampled from (temperature and
top-k / top-p applied, `logprobs_mode="processed"`), the trainer's are at the same temperature, so at T = 1
without truncation both are the model's own distribution, and otherwise like is still compared with like;
a truncated rollout against an untruncated trainer shows up as mismatch, which --keep-sampling-mask removes.
The trainer's side costs nothing: they are the update's log-probs (or its frozen old log-probs when mu > 1).
The routing side needs the engine's expert choices, recorded by read-only forward hooks on the gates
(`EngineRouting`), a Python callback per layer and step: off unless asked, and not possible inside a
compiled decode (the hooks would be traced into it) or vLLM.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from nanoseek.model.moe import MoE


def trunk_gates(model) -> list[torch.nn.Module]:
    """The gates of the main stack's MoE layers (not the MTP block's), through a data-parallel wrapper."""
    net = getattr(model, "module", model)
    return [b.mlp.gate for b in net.layers if isinstance(b.mlp, MoE)]


# ------------------------------------------------------------------------------------ log-probs

class LogprobMismatch:
    """Sums of the per-token mismatch over a step's micro-batches (and ranks), then its row."""

    def __init__(self, device: torch.device):
        self.kl, self.tokens = torch.zeros((), device=device, dtype=torch.float64), torch.zeros((), device=device)
        self.max = torch.zeros((), device=device, dtype=torch.float64)

    def add(self, trainer_logp: torch.Tensor, engine_logp: torch.Tensor, mask: torch.Tensor) -> None:
        """logp [B, T] of the same tokens (mask 1 = a trained token)."""
        on = mask.bool()
        d = (trainer_logp.detach().double() - engine_logp.double())[on]
        self.kl += (d.exp() - 1 - d).sum()
        self.tokens += on.sum()
        if d.numel():
            self.max = torch.maximum(self.max, d.abs().max())

    def row(self) -> dict:
        if dist.is_initialized():
            for t, op in ((self.kl, dist.ReduceOp.SUM), (self.tokens, dist.ReduceOp.SUM), (self.max, dist.ReduceOp.MAX)):
                dist.all_reduce(t, op=op)
        if not self.tokens.item():
            return {}
        return {"mismatch_kl": self.kl.item() / self.tokens.item(), "mismatch_max_dlogp": self.max.item()}


def engine_logprob_matrix(logprobs: list[list[float]], mask: torch.Tensor) -> torch.Tensor:
    """The engine's per-token log-probs laid out as the completion mask [B, T-1] (row-major = token order)."""
    out = torch.zeros(mask.shape, dtype=torch.float32)
    out[mask.cpu().bool()] = torch.tensor([x for lp in logprobs for x in lp], dtype=torch.float32)
    return out.to(mask.device)


# ------------------------------------------------------------------------------------ routing

class EngineRouting:
    """The top-k experts the engine picks for every token it runs, by (sequence, position).

    Read-only forward hooks: one on the embedding tells a prefill ([R, T] ids: the next R prompts in
    submission order, the order a fresh engine admits them) from a decode step ([B, 1]: row i is
    engine.active[i] at its position .pos); one per MoE gate stores the expert ids it returned. A fresh
    engine numbers its requests 0, 1, ... in submission order, so a request id is its prompt's index."""

    def __init__(self, model, engine, prompts: list[list[int]], n: int, total_len: int):
        gates = trunk_gates(model)
        self.experts = torch.full((len(gates), len(prompts) * n, total_len, gates[0].top_k if gates else 0), -1)
        self.engine, self.prompt_lens, self.n = engine, [len(p) for p in prompts], n
        self.admitted = 0
        self.rows = self.seqs = self.pos = None  # token row of the current forward -> (sequence, position)
        self.handles = [getattr(model, "module", model).embed_tokens.register_forward_pre_hook(self._on_input)]
        self.handles += [g.register_forward_hook(self._on_gate(i)) for i, g in enumerate(gates)]

    def _on_input(self, module, args) -> None:
        R, T = args[0].shape
        if T > 1:  # prefill: prompt r's token p is row r*T + p; all n samples of a prompt share it
            rows, seqs, pos = [], [], []
            for r in range(R):
                a = self.admitted + r
                for j in range(self.n):
                    rows += range(r * T, r * T + self.prompt_lens[a])
                    seqs += [a * self.n + j] * self.prompt_lens[a]
                    pos += range(self.prompt_lens[a])
            self.admitted += R
        else:
            active = self.engine.active
            rows = range(len(active))
            seqs = [s.req.request_id * self.n + s.out.index for s in active]
            pos = [s.pos for s in active]
        self.rows, self.seqs, self.pos = (torch.tensor(list(x)) for x in (rows, seqs, pos))

    def _on_gate(self, layer: int):
        def hook(module, args, out) -> None:
            self.experts[layer, self.seqs, self.pos] = out[1][self.rows].cpu()
        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


class TrainerRouting:
    """The top-k experts of every token of the trainer's forwards, in call order: [layers, B, T, k] after `stacked`.
    Under routing replay a gate uses the replayed experts; `own` then also keeps the ones it would have chosen."""

    def __init__(self, model):
        gates = trunk_gates(model)
        self.calls: list[list[torch.Tensor]] = [[] for _ in gates]
        self.own: list[list[torch.Tensor]] = [[] for _ in gates]
        self.handles = [g.register_forward_hook(self._on_gate(i)) for i, g in enumerate(gates)]

    def _on_gate(self, layer: int):
        def hook(module, args, out) -> None:
            self.calls[layer].append(out[1].detach().cpu())
            self.own[layer].append(module.select(out[2]).cpu() if module.replay is not None else self.calls[layer][-1])
        return hook

    @staticmethod
    def _stack(calls: list[list[torch.Tensor]], B: int, T: int) -> torch.Tensor | None:
        if not calls or sum(len(c) for c in calls[0]) != B * T:
            return None
        return torch.stack([torch.cat(c).view(B, T, -1) for c in calls])

    def stacked(self, B: int, T: int) -> torch.Tensor | None:
        """None when the forwards did not cover the B x T tokens (a pass stopped early: a non-finite loss)."""
        return self._stack(self.calls, B, T)

    def own_stacked(self, B: int, T: int) -> torch.Tensor | None:
        """The gates' own choices (what they chose without replay), as `stacked`."""
        return self._stack(self.own, B, T)

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def expert_matrix(engine_experts: list[torch.Tensor], B: int, T: int) -> torch.Tensor:
    """The engine's routing per sequence ([layers, positions, k], from `EngineRouting`) laid out as the
    trainer's forward over B rows of T positions: [layers, B, T, k], -1 where the engine ran no token."""
    L, _, k = engine_experts[0].shape
    out = torch.full((L, B, T, k), -1, dtype=torch.long)
    for i, e in enumerate(engine_experts):
        n = min(T, e.shape[1])
        out[:, i, :n] = e[:, :n]
    return out


def router_flips(engine_experts: list[torch.Tensor], trainer_experts: torch.Tensor | None, mask: torch.Tensor,
                 suffix: str = "") -> dict:
    """engine_experts: per sequence [layers, positions, k] (from `EngineRouting`); trainer_experts
    [layers, B, T, k]; mask [B, T]: the positions whose output is a sampled token's distribution. A flip:
    the two top-k *sets* differ. Returns the counts (summed over ranks) as the row's rates, their keys
    ending in `suffix` ({} without a complete training pass, which then happened on every rank alike)."""
    if trainer_experts is None:
        return {}
    L, B, T, _ = trainer_experts.shape
    eng = expert_matrix(engine_experts, B, T)
    scored = mask.cpu().bool()
    flips = (eng.sort(-1).values != trainer_experts.sort(-1).values).any(-1)        # [L, B, T]
    assert (eng[:, scored] >= 0).all(), "a trained position the engine ran was not recorded"
    counts = torch.cat([flips[:, scored].sum(-1), flips.any(0)[scored].sum().view(1),
                        scored.sum().view(1)]).double()
    if dist.is_initialized():
        dist.all_reduce(counts)
    tokens = counts[-1].item()
    if not tokens:
        return {}
    per_layer = (counts[:L] / tokens).tolist()
    return {f"router_flip_rate{suffix}": sum(per_layer) / L, f"router_flip_tokens{suffix}": counts[L].item() / tokens,
            **{f"router_flip_rate{suffix}/layer{i}": r for i, r in enumerate(per_layer)}}


PANELS = {
    "mismatch_kl": {"keys": ["mismatch_kl"], "ylabel": "nats / token",
                    "title": "rollout vs trainer: k3 KL(engine || trainer) per token"},
    "mismatch_max_dlogp": {"keys": ["mismatch_max_dlogp"], "ylabel": "nats", "title": "rollout vs trainer: max |Δ log p|"},
    "router_flips": {"keys": ["router_flip_rate", "router_flip_tokens", "router_flip_rate_unreplayed"], "ylabel": "share",
                     "title": "MoE router flips (per decision; tokens with one in any layer)"},
}
