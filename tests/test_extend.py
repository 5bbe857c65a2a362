"""Context extension: the long-context probes, YaRN rebuild + export, activation checkpointing, and the
`nanoseek extend` stage end to end (its loss falls; the exported config carries the scaling)."""
import json
import random

import pytest
import torch
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from nanoseek.cli import main
from nanoseek.config import get_preset
from nanoseek.data.corpus import default_corpus
from nanoseek.long_context import Probe, ProbeBuilder, far_loss, score
from nanoseek.hf.load import from_pretrained
from nanoseek.model.transformer import Transformer
from nanoseek.parallel.activation_checkpoint import checkpoint_blocks
from nanoseek.tokenizer import load_tokenizer, train_tokenizer
from nanoseek.train.extend import Options, trained_length, extended_config


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("ext")
    tok = train_tokenizer(default_corpus(300, seed=1), 4096, d / "tok")
    torch.manual_seed(0)
    cfg = get_preset("tiny").replace(hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
                                     num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=128,
                                     vocab_size=tok.vocab_size, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id,
                                     pad_token_id=tok.pad_id)
    Transformer(cfg).save_pretrained(d / "run" / "final", tokenizer=tok)
    (d / "run" / "config.yaml").write_text(yaml.safe_dump({"seq_len": 96}))
    return d / "run" / "final"


@pytest.fixture(scope="module")
def builder(model_dir):
    return ProbeBuilder(load_tokenizer(model_dir), ["add", "max"], 2, n_filler=200)


@settings(max_examples=25, deadline=None)
@given(length=st.integers(80, 600), seed=st.integers(0, 10_000))
def test_passkey_probe_is_exactly_long_and_scores_the_key(builder, length, seed):
    tok = builder.tok
    p = builder.passkey(length, random.Random(seed))
    assert len(p.ids) == length and p.ids[0] == tok.bos_id
    key = tok.decode([p.ids[i] for i in p.scored])
    assert key.isdigit() and len(key) == 5
    text = tok.decode(p.ids)
    assert text.count(f"The pass key is {key}. Remember it.") == 1 and text.endswith(f"The pass key is {key}")


@settings(max_examples=15, deadline=None)
@given(length=st.integers(200, 600), seed=st.integers(0, 1000))
def test_task_probe_scores_the_whole_assistant_turn(builder, length, seed):
    from nanoseek.data.tasks import mix
    sample = mix(["add", "max"], 1, "test", 2, seed)[0]
    p = builder.task(length, sample)
    assert len(p.ids) == length
    scored = builder.tok.decode([p.ids[i] for i in p.scored])
    assert scored.rstrip().endswith(builder.tok.decode(builder.tok.encode(sample.answer)) + "<｜end▁of▁sentence｜>")
    assert p.scored == list(range(p.scored[0], length))  # the turn is the tail of the sequence


def test_score_agrees_with_greedy_decoding(model_dir):
    """A probe whose scored tail is the model's own greedy continuation scores 1; change one scored
    token and it scores 0."""
    model = from_pretrained(model_dir).eval()
    prefix = torch.randint(5, 100, (1, 30), generator=torch.Generator().manual_seed(0))
    ids = prefix
    with torch.no_grad():
        for _ in range(6):
            ids = torch.cat([ids, model(ids)[:, -1:].argmax(-1)], dim=1)
    seq = ids[0].tolist()
    tail = list(range(30, 36))
    assert score(model, [Probe(seq, tail)]) == 1.0
    wrong = seq.copy()
    wrong[33] = (wrong[33] + 1) % model.config.vocab_size
    assert score(model, [Probe(wrong, tail), Probe(seq, tail)], batch_size=2) == 0.5


def test_far_loss_is_the_models_own_loss_on_the_far_half(model_dir, builder):
    model = from_pretrained(model_dir).eval()
    rows = [builder.long_document(121, random.Random(i)) for i in range(3)]
    ids = torch.tensor(rows)
    mask = torch.zeros(3, 120, dtype=torch.bool)
    mask[:, 60:] = True
    with torch.no_grad():
        ref = model.loss(ids[:, :-1], ids[:, 1:], loss_mask=mask)
    assert far_loss(model, rows, batch_size=2) == pytest.approx(ref["lm_loss"].item(), rel=1e-5)


def test_trained_length_reads_the_run_folder(model_dir, tmp_path):
    cfg = from_pretrained(model_dir).config
    assert trained_length(model_dir, cfg) == 96  # the run folder's seq_len
    bare = tmp_path / "bare"
    Transformer(cfg).save_pretrained(bare)
    assert trained_length(bare, cfg) == 128  # no run folder: max_position_embeddings
    ext = extended_config(cfg, 96, Options(factor=4.0))
    assert trained_length(bare, ext) == 384 and ext.yarn_factor == 4.0
    control = extended_config(cfg, 96, Options(factor=4.0, rope_scaling="none"))
    assert control.rope_scaling is None and control.max_position_embeddings == 384


def test_activation_checkpointing_changes_no_number(model_dir):
    torch.manual_seed(0)
    ref = from_pretrained(model_dir).train()
    ckpt = from_pretrained(model_dir).train()
    assert checkpoint_blocks(ckpt) == len(ref.layers) + len(ref.mtp) and checkpoint_blocks(ckpt) == 0
    x = torch.randint(5, 100, (2, 40), generator=torch.Generator().manual_seed(1))
    losses = []
    for m in (ref, ckpt):
        loss = m.loss(x[:, :-1], x[:, 1:])
        loss = loss["loss"] if isinstance(loss, dict) else loss
        loss.backward()
        losses.append(loss.detach())
    assert torch.equal(losses[0], losses[1])
    for (n, a), b in zip(ref.named_parameters(), ckpt.parameters()):
        if a.grad is not None:
            torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=1e-6, msg=n)


def test_extend_end_to_end(model_dir, tmp_path):
    out = tmp_path / "ext"
    rc = main(["extend", str(model_dir), "--out", str(out), "--steps", "12", "--batch-size", "2", "--lr", "3e-3",
               "--factor", "2", "--eval-n", "2", "--eval-multiples", "1,2", "--save-every", "0", "--no-progress",
               "--tasks", "add,max", "--difficulty", "1"])
    assert rc in (0, None)
    conf = json.loads((out / "final" / "config.json").read_text())
    scaling = conf.get("rope_scaling") or conf.get("rope_parameters")
    assert scaling["factor"] == 2.0 and scaling["original_max_position_embeddings"] == 96
    assert conf["max_position_embeddings"] == 192
    rows = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert sum(r["loss"] for r in rows[-3:]) / 3 < sum(r["loss"] for r in rows[:3]) / 3 - 0.3
    res = json.loads((out / "long_context.json").read_text())
    assert set(res) == {"before", "after"} and set(res["after"]["passkey"]) == {"96", "192"}
    assert (out / "plots" / "long_context.png").stat().st_size > 0 and (out / "cost.json").exists()
    model = from_pretrained(out / "final")
    assert model.config.yarn_factor == 2.0


def test_extended_checkpoint_runs_in_transformers_with_the_same_positions(model_dir, tmp_path):
    transformers = pytest.importorskip("transformers")
    base = from_pretrained(model_dir)
    ext = Transformer(extended_config(base.config, 96, Options(factor=4.0))).eval()
    ext.load_state_dict(base.state_dict())
    ext.save_pretrained(tmp_path / "m")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    x = torch.randint(5, 100, (1, 300), generator=torch.Generator().manual_seed(2))  # past the original 96
    with torch.no_grad():
        assert (ext(x) - hf(x).logits).abs().max().item() < 1e-4
        assert (ext(x) - base(x)).abs().max().item() > 1e-3  # the scaling really changed the positions


def test_probes_that_cannot_fit_are_refused_before_the_run_folder_exists(model_dir, tmp_path, capsys):
    out = tmp_path / "nope"
    assert main(["extend", str(model_dir), "--out", str(out), "--original-len", "16", "--tasks", "add"]) == 2
    assert "shorter than the probe" in capsys.readouterr().err and not out.exists()


def test_long_eval_command_writes_its_table_and_plot(model_dir, tmp_path, capsys):
    rc = main(["long-eval", str(model_dir), "--base-len", "96", "--multiples", "1,2", "--n", "2",
               "--tasks", "add", "--difficulty", "1", "--out", str(tmp_path)])
    assert rc in (0, None)
    res = json.loads((tmp_path / "long_context.json").read_text())["model"]
    assert set(res) == {"passkey", "task", "far_loss"} and set(res["task"]) == {"96", "192"}
    assert (tmp_path / "long_context.png").exists() and "| 192 | 2 |" in capsys.readouterr().out
