"""Multi-process equivalence on CPU (gloo): DDP, FSDP2 and expert parallelism train exactly
like one process on the whole batch, and distributed checkpoints resume on another world size.

Exact by construction: the global batch is split into equal shards with no masked tokens,
so the mean of the per-rank mean losses *is* the full-batch mean loss, and averaging the
gradients over ranks gives the full-batch gradient. Only float summation order differs.

One spawn of 2 ranks trains every mode in turn (process start-up dominates the runtime);
one spawn of 4 ranks resumes the 2-rank checkpoint. Run alone: pytest -m distributed.
"""
from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import pytest
import torch

from nanoseek.config import ModelConfig
from nanoseek.kernels import speedup
from nanoseek.model.moe import moe_layers, update_balancing_bias
from nanoseek.model.transformer import Transformer

pytestmark = pytest.mark.distributed

STEPS, BATCH, SEQ, GAMMA = 3, 4, 16, 0.01
MODES = [("ddp", 1), ("fsdp", 1), ("ddp", 2), ("fsdp", 2)]   # (mode, ep) at world 2
MODES4 = [("fsdp", 2)]                                      # at world 4: EP groups of 2, 2 replicas (HSDP)
CKPT_MODE = ("fsdp", 2)                                       # saved after STEPS steps, resumed elsewhere
TIMEOUT_S = 180  # per spawn: the 4-rank one takes 11-15 s on a 2-core CPU; room for a 10x slower one


def tiny_config() -> ModelConfig:
    return ModelConfig(vocab_size=128, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
                       num_hidden_layers=2, first_k_dense_replace=1, num_attention_heads=4,
                       q_lora_rank=32, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8,
                       n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, n_group=2, topk_group=1,
                       num_nextn_predict_layers=1, max_position_embeddings=64)


def build():
    torch.manual_seed(0)
    model = Transformer(tiny_config())
    speedup(model, for_="train")  # as the trainer does: the ranks and the single process run the same kernels
    return model


def make_opt(model):
    # default (foreach) AdamW: the trainer's; it must take FSDP and EP DTensors side by side
    return torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1)


def batch(step: int, rank: int = 0, world: int = 1):
    g = torch.Generator().manual_seed(1000 + step)
    ids = torch.randint(0, 128, (BATCH, SEQ + 1), generator=g)
    per = BATCH // world
    ids = ids[rank * per:(rank + 1) * per]
    return ids[:, :-1], ids[:, 1:]


def train_step(model, opt, step, rank=0, world=1, all_reduce=None) -> float:
    x, y = batch(step, rank, world)
    loss = model.loss(x, y)["loss"]
    loss.backward()
    # clipped at a norm below the actual one, so the global (all-shard) norm decides the step
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
    assert float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm) > 0.5
    opt.step()
    opt.zero_grad(set_to_none=True)
    update_balancing_bias(model, GAMMA, all_reduce=all_reduce)
    value = loss.detach().clone()
    if all_reduce is not None:
        all_reduce(value)
        value /= world
    return value.item()


def bias(model) -> torch.Tensor:
    return torch.stack([m.gate.e_score_correction_bias.detach().clone() for m in moe_layers(model)])


# ---------------------------------------------------------------------- worker (runs in each rank)
def _worker(rank: int, world: int, port: int, out: str, job: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    import torch.distributed as dist
    from nanoseek.parallel import dcp
    from nanoseek.parallel.parallelize import (all_reduce_sum, destroy_distributed, full_state_dict,
                                               init_distributed, parallelize)
    r, w, device = init_distributed(device="cpu", timeout_s=TIMEOUT_S)   # gloo, also on GPU hosts
    assert (r, w) == (rank, world) and dist.is_initialized()
    out = Path(out)

    def result(model, losses, **kw):
        b = bias(model)
        gathered = [torch.empty_like(b) for _ in range(w)]
        dist.all_gather(gathered, b)
        state = full_state_dict(model)             # collective: all ranks
        return dict(losses=losses, state=state, bias=b,
                    bias_same_on_ranks=all(torch.equal(g, b) for g in gathered), **kw)

    if job == "train":
        if r == 0:
            torch.save(ep_skew_check(w), out / "ep_skew.pt")
        else:
            ep_skew_check(w)
        for mode, ep in MODES:
            model = parallelize(build(), mode=mode, ep=ep)
            opt = make_opt(model)
            losses = [train_step(model, opt, s, r, w, all_reduce_sum) for s in range(STEPS)]
            res = result(model, losses, layout=layout(model))
            if (mode, ep) == CKPT_MODE:
                dcp.save(out / "ckpt", model, opt, extra={"step": STEPS})
                res["after_resume_step"] = train_step(model, opt, STEPS, r, w, all_reduce_sum)
                res["state_after"] = full_state_dict(model)
            if r == 0:
                torch.save(res, out / f"{mode}_ep{ep}_w{w}.pt")
            dist.barrier()
        # bf16 compute (FSDP mixed precision, fp32 master weights and grad reduction), EP included
        model = parallelize(build(), mode="fsdp", ep=w, param_dtype=torch.bfloat16)
        opt = make_opt(model)
        losses = [train_step(model, opt, s, r, w, all_reduce_sum) for s in range(STEPS)]
        dtypes = sorted({str(p.dtype) for p in model.parameters()})
        if r == 0:
            torch.save(dict(losses=losses, dtypes=dtypes), out / "bf16.pt")
    elif job == "resume":                          # load the world-2 checkpoint, take one more step
        model = parallelize(build(), mode="fsdp", ep=w)
        opt = make_opt(model)
        extra = dcp.load(out / "ckpt", model, opt, extra={"step": 0})
        loaded = full_state_dict(model)
        loss = train_step(model, opt, extra["step"], r, w, all_reduce_sum)
        res = result(model, [loss], loaded=loaded, step=extra["step"])
        if r == 0:
            torch.save(res, out / f"resume_w{w}.pt")
        for mode, ep in MODES4:                     # ep < world: experts replicated over 2 EP groups
            model = parallelize(build(), mode=mode, ep=ep)
            opt = make_opt(model)
            losses = [train_step(model, opt, s, r, w, all_reduce_sum) for s in range(STEPS)]
            res = result(model, losses, layout=layout(model))
            if r == 0:
                torch.save(res, out / f"{mode}_ep{ep}_w{w}.pt")
    destroy_distributed()


def layout(model) -> dict:
    """What the wrapping did: DTensor placements per parameter kind, local expert count."""
    from torch.distributed.tensor import DTensor
    experts = moe_layers(model)[0].experts
    kinds = {}
    for name, p in model.named_parameters():
        kind = "experts" if ".experts." in name else "other"
        kinds.setdefault(kind, set()).add(str(p.placements) if isinstance(p, DTensor) else "plain")
    return dict(local_experts=experts.gate_proj.to_local().shape[0] if isinstance(experts.gate_proj, DTensor)
                else experts.gate_proj.shape[0], placements={k: sorted(v) for k, v in kinds.items()})


def ep_skew_check(world: int) -> dict:
    """All tokens routed to rank 0's experts (the other ranks receive no rows): the EP output and
    gradients still equal the plain Experts on the concatenated tokens."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from nanoseek.model.moe import Experts
    from nanoseek.parallel.expert_parallel import ExpertParallelExperts
    torch.manual_seed(1)
    E, D, I, N, k = 8, 16, 8, 6, 2
    ref = Experts(E, D, I)
    for p in ref.parameters():
        torch.nn.init.normal_(p, std=0.3)
    x = torch.randn(world * N, D, requires_grad=True)
    idx = torch.stack([torch.randperm(E // world)[:k] for _ in range(world * N)])     # experts 0..E/w-1 only
    wts = torch.rand(world * N, k)
    y_ref, c_ref = ref(x, idx, wts)
    y_ref.square().sum().backward()
    mesh = init_device_mesh("cpu", (world,))
    ep = ExpertParallelExperts(ref, mesh, dist.new_group(list(range(world))))
    rank = dist.get_rank()
    sl = slice(rank * N, (rank + 1) * N)
    xl = x.detach()[sl].clone().requires_grad_(True)
    y, c = ep(xl, idx[sl], wts[sl])
    y.square().sum().backward()
    g = ep.gate_proj.grad.full_tensor() * world        # EP scales expert grads by 1/world (the DP mean)
    return dict(y=(y - y_ref[sl]).abs().max().item(), dx=(xl.grad - x.grad[sl]).abs().max().item(),
                dw=(g - ref.gate_proj.grad).abs().max().item(), counts_ok=bool(torch.equal(c, torch.bincount(idx[sl].reshape(-1), minlength=E))))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(world: int, out: Path, job: str) -> float:
    import torch.multiprocessing as mp
    t0 = time.time()
    ctx = mp.start_processes(_worker, args=(world, _free_port(), str(out), job), nprocs=world,
                             join=False, start_method="spawn")
    deadline = t0 + TIMEOUT_S
    while not ctx.join(timeout=max(1.0, deadline - time.time())):
        if time.time() > deadline:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
            pytest.fail(f"{world}-process '{job}' job timed out after {TIMEOUT_S}s")
    return time.time() - t0


# ---------------------------------------------------------------------- reference + fixtures
def max_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


def state_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys(), set(a) ^ set(b)
    return max(max_rel(a[k], b[k]) for k in a if b[k].numel())


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    torch.set_num_threads(1)
    model = build()
    opt = make_opt(model)
    ref = dict(losses=[train_step(model, opt, s) for s in range(STEPS)])
    ref.update(state={k: v.detach().float().clone() for k, v in model.state_dict().items()}, bias=bias(model))
    ref["after_resume_step"] = train_step(model, opt, STEPS)
    ref["state_after"] = {k: v.detach().float().clone() for k, v in model.state_dict().items()}
    t = spawn(2, out, "train")
    print(f"\n[distributed] world-2 run of {len(MODES)} modes x {STEPS} steps: {t:.1f}s")
    return out, ref


def _report(name, res, ref) -> tuple[float, float]:
    dl = max(abs(a - b) / abs(b) for a, b in zip(res["losses"], ref["losses"]))
    dw = state_diff(res["state"], ref["state"])
    print(f"[distributed] {name}: loss max rel diff {dl:.2e}, weights max rel diff {dw:.2e}, "
          f"bias identical on ranks: {res['bias_same_on_ranks']}, bias max abs diff vs 1 process "
          f"{(res['bias'] - ref['bias']).abs().max().item():.1e}")
    return dl, dw


@pytest.mark.parametrize("mode,ep", MODES)
def test_matches_single_process(runs, mode, ep):
    out, ref = runs
    res = torch.load(out / f"{mode}_ep{ep}_w2.pt")
    dl, dw = _report(f"{mode} ep={ep} world=2", res, ref)
    assert dl <= 1e-5
    assert dw <= 1e-4
    assert res["bias_same_on_ranks"]
    assert torch.equal(res["bias"], ref["bias"]), "balancing bias differs from the single-process run"
    assert not torch.equal(ref["bias"], torch.zeros_like(ref["bias"])), "bias update never ran"
    lay = res["layout"]
    print(f"[distributed] {mode} ep={ep} layout: {lay}")
    # EP owns E/ep experts; FSDP alone also shards the stacked experts on dim 0 (E/world rows)
    assert lay["local_experts"] == tiny_config().n_routed_experts // (2 if mode == "fsdp" or ep > 1 else 1)
    expect_other = "(Replicate(),)" if mode == "ddp" else "(Shard(dim=0),)"
    assert lay["placements"]["other"] == [expect_other]
    assert lay["placements"]["experts"] == (["(Shard(dim=0),)"] if ep > 1 else [expect_other])


def test_fsdp_ep_bf16_mixed_precision(runs):
    out, ref = runs
    res = torch.load(out / "bf16.pt")
    d = max(abs(a - b) / b for a, b in zip(res["losses"], ref["losses"]))
    print(f"[distributed] fsdp+ep bf16 compute: loss max rel diff vs fp32 1 process {d:.1e}, master dtypes {res['dtypes']}")
    assert res["dtypes"] == ["torch.float32"] and d < 2e-2


def test_expert_parallel_skewed_routing(runs):
    out, _ = runs
    d = torch.load(out / "ep_skew.pt")
    print(f"[distributed] EP with all tokens on rank 0's experts: max abs diff y {d['y']:.1e}, "
          f"dx {d['dx']:.1e}, d expert weights {d['dw']:.1e}")
    assert d["counts_ok"] and max(d["y"], d["dx"], d["dw"]) < 1e-5


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_resume_on_one_process(runs):
    """Checkpoint saved by 2 ranks (FSDP + EP shards) loads into a plain 1-process model + optimizer."""
    out, ref = runs
    from nanoseek.parallel import dcp
    saved = torch.load(out / "{}_ep{}_w2.pt".format(*CKPT_MODE))
    model = build()
    opt = make_opt(model)
    extra = dcp.load(out / "ckpt", model, opt, extra={"step": 0})
    loaded = {k: v.detach().float().clone() for k, v in model.state_dict().items()}
    assert extra["step"] == STEPS
    assert state_diff(loaded, saved["state"]) == 0.0, "weights changed through the checkpoint"
    loss = train_step(model, opt, STEPS)
    after = {k: v.detach().float().clone() for k, v in model.state_dict().items()}
    d_saved, d_ref = state_diff(after, saved["state_after"]), state_diff(after, ref["state_after"])
    print(f"[distributed] resume world 2 -> 1: loaded weights identical; next step vs world-2 run "
          f"{d_saved:.2e}, vs never-interrupted 1 process {d_ref:.2e}; loss rel diff "
          f"{abs(loss - saved['after_resume_step']) / saved['after_resume_step']:.2e}")
    assert d_saved <= 1e-4 and d_ref <= 1e-4


@pytest.fixture(scope="module")
def runs4(runs):
    out, ref = runs
    t = spawn(4, out, "resume")
    print(f"\n[distributed] world-4 run (resume + {len(MODES4)} modes): {t:.1f}s")
    return out, ref


@pytest.mark.parametrize("mode,ep", MODES4)
def test_four_ranks_expert_groups_match_single_process(runs4, mode, ep):
    """ep=2 of world 4: each expert lives on 2 ranks (one per EP group); its gradient is summed
    over both groups' tokens."""
    out, ref = runs4
    res = torch.load(out / f"{mode}_ep{ep}_w4.pt")
    dl, dw = _report(f"{mode} ep={ep} world=4", res, ref)
    print(f"[distributed] {mode} ep={ep} world=4 layout: {res['layout']}")
    assert dl <= 1e-5 and dw <= 1e-4
    assert res["bias_same_on_ranks"] and torch.equal(res["bias"], ref["bias"])
    assert res["layout"]["local_experts"] == tiny_config().n_routed_experts // ep
    assert res["layout"]["placements"] == {"experts": ["(Replicate(), Shard(dim=0))"],
                                           "other": ["(Replicate(), Shard(dim=0))"]}


def test_resume_on_four_processes(runs4):
    """The same 2-rank checkpoint resharded onto 4 ranks (FSDP + 2 experts per rank)."""
    out, ref = runs4
    res = torch.load(out / "resume_w4.pt")
    saved = torch.load(out / "{}_ep{}_w2.pt".format(*CKPT_MODE))
    assert res["step"] == STEPS
    assert state_diff(res["loaded"], saved["state"]) == 0.0
    d = state_diff(res["state"], saved["state_after"])
    print(f"[distributed] resume world 2 -> 4: loaded weights identical; next step vs world-2 run "
          f"{d:.2e}, vs 1 process {state_diff(res['state'], ref['state_after']):.2e}")
    assert d <= 1e-4
    assert res["bias_same_on_ranks"]


def test_node_limited_bound():
    """V3: 256 experts in 8 groups on 8 nodes (EP 64, 8 GPUs per node), topk_group 4 -> <= 4 nodes."""
    from nanoseek.parallel.expert_parallel import check_node_limited
    assert check_node_limited(256, 8, 4, ep=64, ranks_per_node=8) == 4
    assert check_node_limited(256, 16, 4, ep=64, ranks_per_node=8) == 4    # 2 groups per node
    assert check_node_limited(256, 4, 2, ep=64, ranks_per_node=8) is None  # a group spans 2 nodes
    assert check_node_limited(64, 8, 4, ep=8, ranks_per_node=8) == 1       # one node: trivially 1
