"""Trainer, checkpoints, packing and the pretrain / sft commands, on a shrunken tiny preset (CPU)."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from nanoseek.config import get_preset
from nanoseek.model.moe import MoE, moe_layers, update_balancing_bias
from nanoseek.model.transformer import Transformer
from nanoseek.train.checkpoint import CheckpointError, latest_checkpoint, load_checkpoint
from nanoseek.train.data import BatchIterator, make_batch, pack_examples, pack_stream
from nanoseek.train.trainer import TrainOptions, Trainer, lr_factor

SMALL = {"hidden_size": 128, "intermediate_size": 256, "moe_intermediate_size": 64, "num_hidden_layers": 2}
FAST = dict(seq_len=64, batch_size=8, warmup_steps=5, progress=False, device="cpu", dtype="fp32")
# Pretraining, SFT and resume train in the dtype this CPU picks by itself (bf16 autocast where bf16 is fast, else
# fp32, by measurement where the CPU has bf16 instructions); `make test-dtypes` runs them with each dtype forced.
# Comparisons with other numerics keep fp32.
AUTO = {**FAST, "dtype": "auto"}


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    from nanoseek.data.corpus import default_corpus
    from nanoseek.tokenizer import train_tokenizer
    d = tmp_path_factory.mktemp("tok")
    train_tokenizer(default_corpus(400, seed=1), 4096, d)
    return d


@pytest.fixture(scope="module")
def tok(tok_dir):
    from nanoseek.tokenizer import load_tokenizer
    return load_tokenizer(tok_dir)


@pytest.fixture(scope="module")
def packed(tok):
    from nanoseek.data.corpus import default_corpus
    from nanoseek.train.pretrain import encode_documents
    return pack_stream(encode_documents(tok, default_corpus(300, seed=2)), 64)


def small_model(tok, seed=0, **kw) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(get_preset("tiny").replace(**{**SMALL, "vocab_size": tok.vocab_size, **kw}))


@pytest.fixture(scope="module")
def pretrained(tok_dir, tmp_path_factory):
    from nanoseek.train.pretrain import Options, pretrain
    out = tmp_path_factory.mktemp("pretrain")
    t0 = time.time()
    final = pretrain(Options(out=str(out), tokenizer=str(tok_dir), n_docs=400, steps=30, lr=3e-3,
                             model_overrides=SMALL, save_every=15, **AUTO))
    return out, final, time.time() - t0


# --------------------------------------------------------------------------- (1) pretraining learns
@pytest.mark.auto_dtype
def test_pretrain_loss_falls_and_writes_run_folder(pretrained):
    out, final, wall = pretrained
    rows = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    first, last = rows[0]["loss"], sum(r["loss"] for r in rows[-5:]) / 5
    print(f"\npretrain: loss {first:.3f} -> {last:.3f} in {wall:.1f}s")
    assert last < 0.6 * first
    # (no time assertion: ~15 s on an idle 2-core CPU, but shared test machines can be 10x slower)
    for key in ("step", "loss", "lm_loss", "mtp_loss", "balance_loss", "lr", "grad_norm", "tokens",
                "tokens_per_s", "load_max_over_mean", "load_max_over_mean_per_layer", "elapsed"):
        assert key in rows[-1], key
    assert [r["step"] for r in rows] == list(range(1, 31))
    for f in ("config.yaml", "cost.json", "plots/loss.png", "plots/lr.png", "plots/expert_load.png",
              "plots/tokens_per_s.png", "final/config.json", "final/model.safetensors", "final/tokenizer.json"):
        assert (out / f).exists(), f
    cost = json.loads((out / "cost.json").read_text())
    assert cost["mfu"] > 0
    assert cost["dtype"]["dtype"] in ("fp32", "bf16") and cost["dtype"]["reason"]  # what the run computed in, and why
    from nanoseek.hf.load import from_pretrained
    model = from_pretrained(final)
    assert model(torch.tensor([[0, 5, 6]])).shape == (1, 3, model.config.vocab_size)


def test_lr_schedules():
    assert lr_factor(0, 100, 10) == pytest.approx(0.1)
    assert lr_factor(9, 100, 10) == pytest.approx(1.0)
    assert lr_factor(100, 100, 10, min_ratio=0.1) == pytest.approx(0.1)
    assert lr_factor(50, 100, 10, "wsd", decay_frac=0.2) == 1.0
    assert lr_factor(90, 100, 10, "wsd", min_ratio=0.0, decay_frac=0.2) == pytest.approx(0.5)


# --------------------------------------------------------------------------- (2) bit-exact resume
def _trainer(tok, packed, out, steps, resume=False, seed=0, **kw):
    opts = TrainOptions(out=str(out), steps=steps, lr=3e-3, save_every=0, resume=resume, **{**FAST, **kw})
    return Trainer(small_model(tok, seed), opts, BatchIterator(packed, opts.batch_size, seed=0), out)


@pytest.mark.auto_dtype
def test_resume_is_bit_exact(tok, packed, tmp_path):
    straight = _trainer(tok, packed, tmp_path / "a", 8, dtype="auto")
    straight.fit()
    half = _trainer(tok, packed, tmp_path / "b", 8, dtype="auto")
    for _ in range(4):
        half.metrics.log(half.train_step())
    half.save()
    # other init: must be overwritten
    resumed = _trainer(tok, packed, tmp_path / "b", 8, resume=True, seed=123, dtype="auto")
    assert resumed.step == 4
    resumed.fit()
    losses = [[json.loads(ln)["loss"] for ln in (tmp_path / d / "metrics.jsonl").read_text().splitlines()]
              for d in "ab"]
    assert losses[0] == losses[1] and len(losses[0]) == 8
    sa, sb = straight.model.state_dict(), resumed.model.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    bias = [k for k in sa if k.endswith("e_score_correction_bias")]
    assert bias and any(sa[k].abs().sum() > 0 for k in bias)  # the routing biases moved and were restored


# --------------------------------------------------------------------------- (3) killed mid-save
def test_sigkill_mid_save_resumes_from_last_good(tok_dir, tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "nanoseek.cli", "pretrain", "--out", str(out), "--tokenizer", str(tok_dir),
           "--n-docs", "200", "--steps", "6", "--save-every", "2", "--model-overrides", json.dumps(SMALL),
           "--seq-len", "64", "--batch-size", "4", "--warmup-steps", "2", "--no-progress", "--dtype", "fp32"]
    env = {**os.environ, "NANOSEEK_TEST_SLOW_SAVE": "2"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpts = out / "checkpoints"
    deadline = time.time() + 60
    while time.time() < deadline and not list(ckpts.glob("tmp-step_000004-*/model.pt")):
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert list(ckpts.glob("tmp-step_000004-*")), "never caught the run inside its second save"
    assert latest_checkpoint(ckpts).name == "step_000002"
    env.pop("NANOSEEK_TEST_SLOW_SAVE")
    done = subprocess.run(cmd + ["--resume"], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "resumed from" in done.stdout and "step_000002" in done.stdout
    assert latest_checkpoint(ckpts).name == "step_000006"
    assert not list(ckpts.glob("tmp-*"))
    steps = [json.loads(ln)["step"] for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]


# --------------------------------------------------------------------------- (4) corrupt checkpoint
def test_corrupt_or_mismatched_checkpoint_gives_clear_error(pretrained, tok):
    out, _, _ = pretrained
    ckpt = latest_checkpoint(out / "checkpoints")
    model = small_model(tok)
    with pytest.raises(CheckpointError, match="does not fit this model"):
        load_checkpoint(ckpt, small_model(tok, hidden_size=64))
    opt_file = ckpt / "optimizer.pt"
    data = bytearray(opt_file.read_bytes())
    data[len(data) // 2] ^= 0xFF
    opt_file.write_bytes(bytes(data))
    opt = torch.optim.AdamW(model.parameters())
    with pytest.raises(CheckpointError, match=r"optimizer\.pt is corrupt.*delete"):
        load_checkpoint(ckpt, model, opt)
    (ckpt / "meta.json").write_text("{trunc")
    with pytest.raises(CheckpointError, match=r"meta\.json"):
        load_checkpoint(ckpt, model)


# --------------------------------------------------------------------------- (5) SFT mask and packing
def test_sft_mask_is_the_assistant_part_and_packing_isolates_examples(tok):
    from nanoseek.data.coldstart import coldstart_dataset
    from nanoseek.train.sft import encode_records
    records = coldstart_dataset(3, seed=5)
    examples = encode_records(tok, records)
    p = pack_examples(examples, sum(len(ids) for ids, _ in examples) + 9, tok.pad_id)
    assert len(p) == 1  # all three in one row, then padding
    b = make_batch(p, torch.tensor([0]))
    doc, targets, mask = b["doc_ids"][0], b["targets"][0], b["loss_mask"][0]
    for d, rec in enumerate(records):
        msgs = rec["messages"]
        completion = tok.apply_chat_template(msgs)[len(tok.apply_chat_template(msgs[:-1], add_generation_prompt=True)):]
        assert tok.decode(targets[mask & (doc == d)].tolist()) == completion
    assert not mask[doc == len(records)].any()  # padding never trains
    model = small_model(tok).eval()
    with torch.no_grad():
        packed_logits = model(b["input_ids"], doc_ids=b["doc_ids"])[0]
        pos = 0
        for ids, _ in examples:
            alone = model(torch.tensor([ids[:-1]]))[0]
            # positions are not reset per document: RoPE is relative, so equal up to rounding
            torch.testing.assert_close(packed_logits[pos: pos + len(ids) - 1], alone, atol=1e-4, rtol=1e-4)
            pos += len(ids)


@pytest.mark.auto_dtype
def test_sft_command_trains_on_chat_jsonl(pretrained, tmp_path):
    from nanoseek.data.coldstart import coldstart_dataset
    from nanoseek.train.sft import Options, sft
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in coldstart_dataset(60, seed=3)))
    final = sft(Options(model=str(pretrained[1]), data=str(data), out=str(tmp_path / "sft"), steps=4, **AUTO))
    assert (final / "model.safetensors").exists() and (tmp_path / "sft" / "plots" / "loss.png").exists()


# --------------------------------------------------------------------------- (6) load balancing works
def test_bias_update_lowers_expert_load_imbalance(tok, packed, tmp_path):
    ratios = {}
    for gamma in (0.0, 0.01):
        t = _trainer(tok, packed, tmp_path / f"g{gamma}", 30, bias_gamma=gamma, bias_freeze_frac=1.0)
        t.fit()
        rows = [json.loads(ln) for ln in (t.out_dir / "metrics.jsonl").read_text().splitlines()]
        ratios[gamma] = sum(r["load_max_over_mean"] for r in rows[-10:]) / 10
    print(f"\nload max/mean over the last 10 of 30 steps: gamma=0 {ratios[0.0]:.2f}, gamma=0.01 {ratios[0.01]:.2f}")
    assert ratios[0.01] < ratios[0.0]


# --------------------------------------------------------------------------- (7) the bias rule itself
def test_bias_update_rule_and_load_reset():
    cfg = get_preset("tiny").replace(n_routed_experts=4, num_experts_per_tok=2, n_group=1, topk_group=1)
    model = torch.nn.Sequential(MoE(cfg))
    (moe,) = moe_layers(model)
    before = moe.gate.e_score_correction_bias.clone()
    moe.load.copy_(torch.tensor([10.0, 0.0, 5.0, 5.0]))
    stats = update_balancing_bias(model, 0.01)
    delta = moe.gate.e_score_correction_bias - before
    assert torch.equal(delta, torch.tensor([-0.01, 0.01, 0.0, 0.0]))
    assert torch.equal(moe.load, torch.zeros(4))
    assert stats["load_max_over_mean"] == pytest.approx(2.0)


# --------------------------------------------------------------------------- (8) a non-finite step is skipped
def test_a_non_finite_step_is_skipped_whole(tok, packed, tmp_path):
    """A NaN loss reaches neither the weights, nor Adam's moments, nor the routing bias (its expert loads
    are dropped); the step still counts for the lr schedule, and the next step trains as usual."""
    from nanoseek.train.trainer import lm_step

    def nan_at_step_1(model, batch, trainer):
        out = lm_step(model, batch, trainer)
        return {**out, "loss": out["loss"] * float("nan")} if trainer.step == 1 else out

    t = _trainer(tok, packed, tmp_path, 4, bias_gamma=0.01)
    t.step_fn = nan_at_step_1
    t.train_step()
    weights = {k: v.clone() for k, v in t.model.state_dict().items()}
    moments = [{k: v.clone() for k, v in st.items()} for st in t.optimizer.state.values()]
    lr_before = t.optimizer.param_groups[0]["lr"]
    row = t.train_step()
    assert row["skipped"] == 1 and t.optimizer_step.skipped == 1 and not torch.isfinite(torch.tensor(row["grad_norm"]))
    assert all(torch.equal(v, t.model.state_dict()[k]) for k, v in weights.items())  # the routing bias too
    assert all(torch.equal(v, st[k]) for m, st in zip(moments, t.optimizer.state.values()) for k, v in m.items())
    assert all(m.load.sum() == 0 for m in moe_layers(t.model))
    assert all(p.grad is None for p in t.model.parameters())
    assert t.optimizer.param_groups[0]["lr"] != lr_before  # warmup went on
    row = t.train_step()
    assert row["skipped"] == 1 and torch.isfinite(torch.tensor(row["loss"]))
    assert any(not torch.equal(v, t.model.state_dict()[k]) for k, v in weights.items())


# --------------------------------------------------------------------------- torch.compile from outside
def test_compiled_blocks_train_like_eager_and_keep_checkpoint_names(tok, packed, tmp_path, monkeypatch):
    """--compile wraps every block with torch.compile from outside the model: same parameter names,
    and (dynamo + AOT autograd tracing the blocks, the hand-written expert/norm backward included)
    the same losses as eager to float rounding."""
    import importlib
    parallelize = importlib.import_module("nanoseek.parallel.parallelize")  # the package exports a same-named function
    real = parallelize.compile_blocks
    # aot_eager: the same tracing as inductor without its C++ build, which takes minutes on this CPU
    monkeypatch.setattr(parallelize, "compile_blocks", lambda m: real(m, backend="aot_eager"))
    compiled = _trainer(tok, packed, tmp_path / "c", 3, compile=True)
    monkeypatch.undo()
    eager = _trainer(tok, packed, tmp_path / "e", 3)
    assert all(getattr(b, "_compiled_call_impl", None) is not None for b in compiled.model.layers)
    for _ in range(3):
        a, b = compiled.train_step(), eager.train_step()
        assert abs(a["loss"] - b["loss"]) <= 1e-5 * b["loss"]
    assert compiled.model.state_dict().keys() == eager.model.state_dict().keys()


def test_compile_failure_falls_back_to_eager(tok):
    """A backend that cannot compile (as on a machine without a C++ compiler) leaves the blocks
    running eagerly: identical loss and gradients, no exception."""
    from nanoseek.parallel.parallelize import compile_blocks

    def broken_backend(gm, example_inputs):
        raise RuntimeError("no C++ compiler")

    eager, compiled = small_model(tok), small_model(tok)
    compile_blocks(compiled, backend=broken_backend)
    x = torch.randint(0, tok.vocab_size, (2, 17))
    la, lb = (m.loss(x[:, :-1], x[:, 1:])["loss"] for m in (compiled, eager))
    la.backward()
    lb.backward()
    assert torch.equal(la, lb)
    for (n, p), q in zip(compiled.named_parameters(), eager.parameters()):
        assert (p.grad is None) == (q.grad is None) and (p.grad is None or torch.equal(p.grad, q.grad)), n
