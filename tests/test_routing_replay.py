"""Routing replay (R3): the rollout's recorded expert choice is exactly the gate's, a replayed choice is exactly
the one the MoE layer computes with (weights from the gate's own affinities), and GRPO with --routing-replay
rollout trains with zero router flips, also where a bf16 engine flips the trainer's own routing."""
import pytest
import torch
import torch.nn.functional as F

from nanoseek.kernels import speedup
from nanoseek.model.moe import MoE
from nanoseek.train.grpo import GRPO, Options
from nanoseek.train.mismatch import TrainerRouting, trunk_gates
from nanoseek.train.routing_replay import replayed

from test_distributed_grpo import _grpo, _rows, _weights, model_dir  # noqa: F401  (model_dir: a fixture)
from test_grpo_mismatch import BASE, run_steps, tiny_moe, tok  # noqa: F401  (tok: a fixture)


def test_recorded_routing_is_the_gates_choice_in_a_plain_forward(tok):
    model = tiny_moe(tok)
    run = GRPO(model, tok, Options(**BASE, routing_replay="rollout"))
    prompts = [tok.encode("12 + 7 ="), tok.encode("what is the larger of 3 and 41? answer:")]
    comps, _, experts = run.rollout(prompts, seed=5)
    assert len(experts) == len(comps) == 2 * BASE["group_size"]
    model.eval()
    for i, c in enumerate(comps):
        seq = prompts[i // BASE["group_size"]] + c
        ran = len(seq) - 1  # the engine never runs a sequence's last token
        watch = TrainerRouting(model)
        with torch.no_grad():
            model(torch.tensor([seq[:ran]]))
        watch.remove()
        plain = watch.stacked(1, ran)[:, 0]                                  # [layers, positions, k]
        assert experts[i].shape[:2] == (len(trunk_gates(model)), len(seq))
        assert torch.equal(experts[i][:, :ran].sort(-1).values, plain.sort(-1).values)
        assert (experts[i][:, ran:] == -1).all()


@pytest.mark.parametrize("kernels", [False, True])
def test_a_replayed_choice_is_computed_with_exactly_those_experts(tok, kernels):
    model = tiny_moe(tok)
    if kernels:
        speedup(model, for_="train")  # the fast experts follow the gate's ids as the loop does
    moe = next(m for m in model.modules() if isinstance(m, MoE))
    gate, N, D = moe.gate, 6, model.config.hidden_size
    x = torch.randn(1, N, D)
    own = gate(x[0])[1]
    # another valid choice per token: the k experts it ranks last (never its own); the last token chooses itself
    forced = F.linear(x[0], gate.weight).topk(gate.top_k, largest=False).indices
    forced[-1] = -1
    gate.replay = forced
    y = moe(x)[0]
    gate.replay = None
    used = torch.where(forced >= 0, forced, own)
    assert not torch.equal(used[:-1].sort(-1).values, own[:-1].sort(-1).values)
    scores = torch.sigmoid(x[0] @ gate.weight.T)
    w = scores.gather(1, used)
    w = w / w.sum(-1, keepdim=True) * gate.scaling
    ex = moe.experts
    hand = torch.stack([sum(w[n, j] * (F.silu(ex.gate_proj[e] @ x[0, n]) * (ex.up_proj[e] @ x[0, n])) @ ex.down_proj[e].T
                            for j, e in enumerate(used[n].tolist())) for n in range(N)])
    hand = hand + moe.shared_experts(x[0])
    torch.testing.assert_close(y, hand, rtol=1e-5, atol=1e-6)
    y.square().sum().backward()
    assert gate.weight.grad is not None and gate.weight.grad.abs().sum() > 0  # the router still learns


def test_replay_sets_the_gates_for_one_block_only(tok):
    model = tiny_moe(tok)
    gates = trunk_gates(model)
    with replayed(model, torch.zeros(len(gates), 2, 3, gates[0].top_k, dtype=torch.long)):
        assert all(g.replay.shape == (6, gates[0].top_k) for g in gates)
    assert all(g.replay is None for g in gates)
    assert all(m.gate.replay is None for m in model.mtp.modules() if isinstance(m, MoE))  # MTP: never replayed


def test_grpo_with_routing_replay_trains_with_no_flips(tok):
    plain, replay = run_steps(tok, 2, log_router_flips=True), run_steps(tok, 2, routing_replay="rollout")
    for a, b in zip(plain, replay):
        assert b["router_flip_rate"] == b["router_flip_tokens"] == 0
        # fp32: the engine and the trainer route alike, so replay changes nothing at all
        assert b["router_flip_rate_unreplayed"] == a["router_flip_rate"] == 0
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-6) and b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-6)
    # the old-policy and reference forwards replay too
    (row,) = run_steps(tok, routing_replay="rollout", mu=2, beta=0.04)
    assert row["router_flip_rate"] == 0 and row["skipped"] == 0


def test_a_bf16_engine_flips_the_trainers_routing_and_replay_removes_every_flip(tok):
    (off,) = run_steps(tok, log_router_flips=True, rollout_dtype="bf16")
    (on,) = run_steps(tok, routing_replay="rollout", rollout_dtype="bf16")
    assert off["router_flip_rate"] > 0
    assert on["router_flip_rate"] == on["router_flip_tokens"] == 0
    assert on["router_flip_rate_unreplayed"] > 0  # the trainer's own choice would have flipped


@pytest.mark.distributed
def test_routing_replay_under_two_ranks_steps_like_one_process(model_dir, tmp_path):  # noqa: F811
    """`nanoseek grpo --routing-replay rollout` (with the reference forward, beta > 0): each rank replays its own
    rows' routing, and two ranks take the steps of one process."""
    extra = ["--routing-replay", "rollout", "--bias-gamma", "0", "--save-every", "0"]
    _grpo(model_dir, tmp_path / "one", extra)
    _grpo(model_dir, tmp_path / "two", ["--parallel", "ddp", *extra], ranks=2)
    got, ref = _rows(tmp_path / "two"), _rows(tmp_path / "one")
    assert all("router_flip_rate_unreplayed" in r for r in ref)
    for a, b in zip(got, ref):
        assert a["router_flip_rate"] == b["router_flip_rate"] == 0
        assert a["router_flip_rate_unreplayed"] == b["router_flip_rate_unreplayed"]
        assert a["reward"] == pytest.approx(b["reward"], abs=1e-9) and a["loss"] == pytest.approx(b["loss"], rel=1e-4, abs=1e-7)
    wa, wb = _weights(tmp_path / "two" / "final"), _weights(tmp_path / "one" / "final")
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) < 1e-5


@pytest.mark.parametrize("mode", ["off", "old"])
def test_old_policy_replay_routes_every_update_as_the_old_policy(tok, mode):
    """R2 (--routing-replay old, mu > 1): after a large first update the gates would route differently; replayed,
    every update's forward uses the old-policy forward's experts."""
    run = GRPO(tiny_moe(tok), tok, Options(**{**BASE, "lr": 0.3, "mu": 3, "routing_replay": mode}))
    prompts = [tok.encode("12 + 7 ="), tok.encode("3 - 41 =")]
    comps, logprobs, _ = run.rollout(prompts, seed=1)
    rows = [p for p in prompts for _ in range(BASE["group_size"])]
    watch = TrainerRouting(run.model)  # the old-policy forward, then mu updates' forwards, in call order
    run.update(rows, comps, torch.linspace(-1, 1, len(comps)), engine_logprobs=logprobs)
    watch.remove()
    old, *updates = [torch.stack([c[i] for c in watch.calls]) for i in range(len(watch.calls[0]))]
    same = [torch.equal(u.sort(-1).values, old.sort(-1).values) for u in updates]
    assert same == ([True] * 3 if mode == "old" else [True, False, False])
