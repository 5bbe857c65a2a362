"""GRPO: the loss math against hand computations, learning on an easy task, exact resume."""
import json
import math
import shutil
from types import SimpleNamespace

import pytest
import torch

from nanoseek.config import get_preset
from nanoseek.model.moe import moe_layers
from nanoseek.model.transformer import Transformer
from nanoseek.train.grpo import GRPO, Options, grpo
from nanoseek.train.rollout import engine_rollout
from nanoseek.train.grpo_loss import group_advantages, grpo_loss, k3_kl, normalizer

SMALL = {"hidden_size": 64, "intermediate_size": 128, "moe_intermediate_size": 32, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 4}


# ------------------------------------------------------------------------------ math

def test_group_advantages_by_hand():
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0])
    adv, zero = group_advantages(r, 4, "group", eps=0.0)
    std = math.sqrt(1 / 3)  # unbiased std of (1, 0, 0, 1)
    assert torch.allclose(adv[:4], torch.tensor([0.5, -0.5, -0.5, 0.5]) / std)
    assert adv[4:].eq(0).all() and zero.tolist() == [False, True]  # equal rewards: exactly zero advantage
    adv, _ = group_advantages(r, 4, "none")  # Dr. GRPO: only centred
    assert adv.tolist() == [0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0]


def test_clip_both_sides_by_hand():
    # four tokens of one sequence pair: ratios 1.5, 0.5 under A = +1 (row 0) and A = -1 (row 1)
    old = torch.zeros(2, 2)
    logp = torch.log(torch.tensor([[1.5, 0.5], [1.5, 0.5]])).requires_grad_()
    adv, mask = torch.tensor([1.0, -1.0]), torch.ones(2, 2)
    loss, st = grpo_loss(logp, old, adv, mask, normalizer(mask, "token", 2), eps_low=0.2, eps_high=0.28)
    # A>0: min(1.5, 1.28) = 1.28 (clipped high), min(0.5, 0.8) = 0.5
    # A<0: min(-1.5, -1.28) = -1.5, min(-0.5, -0.8) = -0.8 (clipped low)
    assert loss.item() == pytest.approx(-(1.28 + 0.5 - 1.5 - 0.8) / 4)
    assert st["clipped"].item() == 2
    loss.backward()
    g = logp.grad
    assert g[0, 0] == 0 and g[1, 1] == 0          # clipped tokens pass no gradient
    assert g[0, 1] == pytest.approx(-0.5 / 4) and g[1, 0] == pytest.approx(1.5 / 4)  # d(-ratio*A)/dlogp


def test_k3_kl():
    a, b = torch.randn(100), torch.randn(100)
    assert (k3_kl(a, b) >= 0).all()
    assert k3_kl(a, a).abs().max() == 0
    # k3 is an unbiased KL estimator: mean over samples of pi ~ KL(pi || ref)
    p, q = torch.tensor([0.7, 0.2, 0.1]), torch.tensor([0.3, 0.4, 0.3])
    x = torch.multinomial(p, 200_000, replacement=True, generator=torch.Generator().manual_seed(0))
    est = k3_kl(p.log()[x], q.log()[x]).mean()
    assert est.item() == pytest.approx((p * (p / q).log()).sum().item(), rel=0.02)


def test_token_vs_sequence_aggregation_unequal_lengths():
    logp = torch.zeros(2, 3)
    mask = torch.tensor([[1.0, 0, 0], [1, 1, 1]])
    adv = torch.tensor([1.0, 2.0])  # per-token loss = -A (ratio 1)
    tok, _ = grpo_loss(logp, logp, adv, mask, normalizer(mask, "token", 3))
    seq, _ = grpo_loss(logp, logp, adv, mask, normalizer(mask, "sequence", 3))
    dr, _ = grpo_loss(logp, logp, adv, mask, normalizer(mask, "dr_grpo", 3))
    assert tok.item() == pytest.approx(-(1 + 2 * 3) / 4)       # every token counts once
    assert seq.item() == pytest.approx(-(1 / 1 + 6 / 3) / 2)    # mean of per-sequence means
    assert dr.item() == pytest.approx(-(1 + 6) / (2 * 3))       # constant normalizer
    # micro-batches with the full-batch normalizer add up to the full-batch loss
    for agg, full in (("token", tok), ("sequence", seq)):
        n = normalizer(mask, agg, 3)
        parts = [grpo_loss(logp[i:i + 1], logp[i:i + 1], adv[i:i + 1], mask[i:i + 1], n[i:i + 1] if n.dim() else n)[0]
                 for i in range(2)]
        assert sum(parts).item() == pytest.approx(full.item())


def test_kl_term_and_beta():
    logp, ref = torch.zeros(1, 2), torch.log(torch.tensor([[0.5, 2.0]]))
    mask, adv = torch.ones(1, 2), torch.zeros(1)
    loss, st = grpo_loss(logp, logp, adv, mask, normalizer(mask, "token", 2), ref, beta=0.1)
    k3 = (0.5 - math.log(0.5) - 1) + (2 - math.log(2) - 1)
    assert loss.item() == pytest.approx(0.1 * k3 / 2) and st["kl"].item() == pytest.approx(k3)


# ------------------------------------------------------------------------------ an easy task that must be learned

class DigitTok:
    """10 digit tokens (2..11), pad 0, eos 1, bos 12: enough for a task without a real tokenizer."""
    pad_id, eos_id, bos_id, vocab_size, stop_ids = 0, 1, 12, 16, [1]

    def decode(self, ids, skip_special_tokens=False):
        return "".join(str(i - 2) if 2 <= i < 12 else "|" for i in ids)

    def decode_completion(self, ids):
        return self.decode(ids)


class SuccessorGRPO(GRPO):
    """Prompt: one digit a. Reward 1 when the first completion token is a+1 (mod 10); the prompt
    matters, so this is real learning, and at 1/16 chance initially the reward is reachable."""

    def prompts_at(self, step):
        g = torch.Generator().manual_seed(1000 + step)
        return [SimpleNamespace(prompt=str(int(a))) for a in torch.randint(0, 10, (self.o.prompts_per_step,), generator=g)]

    def encode_prompt(self, s):
        return [12, 2 + int(s.prompt)]


def successor_rewards(samples, texts, n_tokens):
    out = []
    for s, t in zip(samples, texts):
        ok = float(t[:1] == str((int(s.prompt) + 1) % 10))
        out.append(SimpleNamespace(total=ok, accuracy=ok, format=1.0, language=1.0, length=0.0))
    return out


def tiny(vocab, seed=0, **kw):
    torch.manual_seed(seed)
    return Transformer(get_preset("tiny").replace(**SMALL, vocab_size=vocab, bos_token_id=12, eos_token_id=1, **kw))


def test_reward_rises_on_easy_task():
    torch.manual_seed(0)
    model = tiny(16).train()
    o = Options(steps=60, prompts_per_step=8, group_size=16, max_new_tokens=1, lr=5e-3, micro_batch=128, seed=0)
    run = SuccessorGRPO(model, DigitTok(), o, reward_fn=successor_rewards)
    rows = [run.step(s) for s in range(o.steps)]
    first = sum(r["reward"] for r in rows[:8]) / 8
    last = sum(r["reward"] for r in rows[-8:]) / 8
    assert last > first + 0.4, (first, last)  # measured: ~0.09 -> ~0.8
    assert all(r["clip_frac"] == 0 for r in rows)  # mu = 1: ratio is exactly 1, nothing is clipped
    assert all(math.isfinite(r["loss"]) for r in rows) and run.skipped == 0


def test_moe_bias_updates_and_mu_clipping():
    model = tiny(16).train()
    bias0 = [m.gate.e_score_correction_bias.clone() for m in moe_layers(model)]
    other = tiny(16).train()
    before = [m.gate.e_score_correction_bias.clone() for m in moe_layers(other)]
    SuccessorGRPO(other, DigitTok(), Options(steps=1, prompts_per_step=4, group_size=4, max_new_tokens=3, lr=3e-2),
                  reward_fn=successor_rewards).step(0)  # by default RL leaves the routing bias where pretraining left it
    assert all(torch.equal(b, m.gate.e_score_correction_bias) for b, m in zip(before, moe_layers(other)))
    o = Options(steps=2, prompts_per_step=4, group_size=4, max_new_tokens=3, lr=3e-2, mu=3, micro_batch=8, beta=0.1,
                bias_gamma=1e-3)
    run = SuccessorGRPO(model, DigitTok(), o, reward_fn=successor_rewards)
    assert run.ref is not None
    rows = [run.step(s) for s in range(2)]
    assert any(not torch.equal(b, m.gate.e_score_correction_bias) for b, m in zip(bias0, moe_layers(model)))
    assert all(m.load.sum() == 0 for m in moe_layers(model))  # load consumed by each bias update
    assert rows[-1]["kl"] > 0  # mu = 3 with a big lr: the policy moved away from the reference


def test_zero_variance_filter_and_nan_policy():
    model = tiny(16)
    const = lambda s, t, n: [SimpleNamespace(total=1.0, accuracy=1.0, format=1.0, language=1.0, length=0.0) for _ in t]  # noqa: E731
    o = Options(steps=1, prompts_per_step=2, group_size=4, max_new_tokens=2, filter_zero_var=True)
    row = SuccessorGRPO(model, DigitTok(), o, reward_fn=const).step(0)
    assert row["zero_var_groups"] == 1.0 and row["trained_seqs"] == 0

    def nan_rewards(s, t, n):
        return [SimpleNamespace(total=float("nan") if i == 0 else float(i), accuracy=0.0, format=0.0, language=0.0,
                                length=0.0) for i in range(len(t))]
    before = [p.clone() for p in model.parameters()]
    run = SuccessorGRPO(model, DigitTok(), Options(steps=1, prompts_per_step=2, group_size=4, max_new_tokens=2),
                        reward_fn=nan_rewards)
    run.step(0)
    assert run.skipped == 1 and all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    run = SuccessorGRPO(model, DigitTok(), Options(steps=1, prompts_per_step=2, group_size=4, max_new_tokens=2,
                                                   nan_policy="error"), reward_fn=nan_rewards)
    with pytest.raises(FloatingPointError, match="nan-policy"):
        run.step(0)


def test_sampler_prefix_sharing_matches_per_prompt_greedy():
    model = tiny(16).eval()
    prompts = [[12, 3], [12, 5, 7, 2]]
    both = engine_rollout(model, prompts, 2, 5, stop_ids=None, temperature=0.0)
    for i, p in enumerate(prompts):
        alone = engine_rollout(model, [p], 1, 5, stop_ids=None, temperature=0.0)[0]
        assert both[2 * i] == both[2 * i + 1] == alone
    ids = torch.tensor([prompts[1] + both[2]])
    greedy = model(ids).argmax(-1)[0, len(prompts[1]) - 1:-1].tolist()  # no cache: the same tokens
    assert greedy == both[2]


# ------------------------------------------------------------------------------ the run: files, seeds, resume

@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from nanoseek.data.corpus import default_corpus
    from nanoseek.tokenizer import train_tokenizer
    d = tmp_path_factory.mktemp("grpo_base")
    tok = train_tokenizer(default_corpus(300, seed=1), 4096, d / "tok")
    torch.manual_seed(0)
    cfg = get_preset("tiny").replace(**SMALL, vocab_size=tok.vocab_size, bos_token_id=tok.bos_id,
                                     eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)
    Transformer(cfg).save_pretrained(d / "model", tokenizer=tok)
    return d / "model"


def _opts(model_dir, out, **kw):
    base = dict(model=str(model_dir), out=str(out), steps=4, prompts_per_step=2, group_size=4, max_new_tokens=8,
                eval_n=2, save_every=2, keep_last=0, beta=0.04, device="cpu", temperature=1.0)
    return Options(**{**base, **kw})


def _rows(out):
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    drop = ("time", "tokens_per_s")
    return [{k: v for k, v in r.items() if not any(d in k for d in drop)} for r in rows]


@pytest.fixture
def one_thread():
    # with 2 intra-op threads some CPU kernels of the model's backward reduce in a varying order
    # (two identical runs then differ in the last bits); one thread is bit-exact
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.mark.parametrize("weighting", ["even", "learnable"])
def test_run_outputs_and_exact_resume(model_dir, tmp_path, one_thread, weighting):
    from nanoseek.hf.load import from_pretrained
    a = tmp_path / "a"
    kw = dict(mode="r1-zero", task_weighting=weighting, tasks=["add", "compare"])
    final = grpo(_opts(model_dir, a, **kw))
    assert (a / "config.yaml").exists() and (a / "plots" / "reward.png").exists()
    assert (final / "tokenizer.json").exists() and (final / "config.json").exists()
    row = _rows(a)[1]
    for k in ("reward", "reward_std", "reward_accuracy", "reward_format", "reward_language", "reward_length",
              "accuracy", "zero_var_groups", "response_len", "response_len_max", "kl", "clip_frac", "entropy", "lr"):
        assert k in row, k
    # kill after step 2 = keep only its checkpoint and the metrics up to it, then --resume
    b = tmp_path / "b"
    shutil.copytree(a / "checkpoints" / "step_000002", b / "checkpoints" / "step_000002")
    shutil.copy(a / "metrics.jsonl", b / "metrics.jsonl")
    grpo(_opts(model_dir, b, resume=True, **kw))
    assert _rows(a) == _rows(b)
    if weighting == "learnable":  # the checkpoint holds the draws' state: the resumed run drew the same prompts
        assert "task_share/add" in row
        assert "task_weights" in torch.load(b / "checkpoints" / "step_000004" / "trainer.pt", weights_only=False)["extra"]
    wa, wb = from_pretrained(a / "final").state_dict(), from_pretrained(b / "final").state_dict()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_on_policy_update_hands_the_head_its_exact_gradient(monkeypatch):
    """On policy GRPO backpropagates its loss and promises the chunked head the gradient that loss
    brings (`gradient_at_ratio_one`): every backward of the head finds it bit for bit, so none
    recomputes the logits."""
    from nanoseek.kernels import chunked_head
    found = []
    backward = chunked_head._HeadLogProbs.backward

    def recording(ctx, grad, ent_grad):
        hint = ctx.saved_tensors[4]
        found.append(hint is not None and torch.equal(grad, hint))
        return backward(ctx, grad, ent_grad)

    monkeypatch.setattr(chunked_head._HeadLogProbs, "backward", staticmethod(recording))
    monkeypatch.setenv("NANOSEEK_KERNELS", "1")  # the head under test is the kernels' one
    o = Options(steps=1, prompts_per_step=4, group_size=4, max_new_tokens=3, micro_batch=8, mtp_weight=0.1)
    SuccessorGRPO(tiny(16).train(), DigitTok(), o, reward_fn=successor_rewards).step(0)
    assert found and all(found)
