"""Distillation: top-k KL is zero exactly when the student matches the teacher, both methods learn,
and the student is a real Qwen2 checkpoint for transformers."""
import copy
import json

import pytest
import torch

from nanoseek.config import DenseConfig, get_preset
from nanoseek.model.dense import DenseTransformer
from nanoseek.train.distill import Options, distill, logits_step, teacher_topk, topk_kl

SMALL_STUDENT = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
                 "num_key_value_heads": 2}


def batch(V=50, B=2, T=12):
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, V, (B, T + 1), generator=g)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[:, :4] = False  # the "prompt"
    return {"input_ids": x[:, :-1], "targets": x[:, 1:], "loss_mask": mask, "doc_ids": torch.zeros(B, T, dtype=torch.long)}


@pytest.mark.parametrize("tail", [True, False])
def test_topk_kl_zero_iff_student_equals_teacher(tail):
    torch.manual_seed(0)
    teacher = DenseTransformer(DenseConfig(vocab_size=50, **SMALL_STUDENT, initializer_range=0.2)).eval()
    b = batch()
    step = logits_step(teacher, top_k=5, alpha=0.0, tail=tail)
    same = step(copy.deepcopy(teacher), b)
    assert same["kl"].abs().item() < 1e-5
    other = DenseTransformer(DenseConfig(vocab_size=50, **SMALL_STUDENT, initializer_range=0.2))
    assert step(other, b)["kl"].item() > 1e-3
    # a shift of all logits changes nothing; moving mass out of the top-k shows only with the tail bucket
    t_logits = teacher(b["input_ids"])
    t_logp, t_idx = teacher_topk(t_logits, 5)
    assert topk_kl(t_logits + 3.0, t_logp, t_idx, b["loss_mask"], tail).item() < 1e-5
    flat = t_logits.clone()
    flat.scatter_(-1, t_idx, t_logits.gather(-1, t_idx) - 2.0)  # the same top-k shape, less top-k mass
    assert (topk_kl(flat, t_logp, t_idx, b["loss_mask"], tail).item() > 1e-3) == tail


@pytest.fixture(scope="module")
def teacher_and_traces(tmp_path_factory):
    from nanoseek.data.coldstart import coldstart_dataset
    from nanoseek.data.corpus import default_corpus
    from nanoseek.model.transformer import Transformer
    from nanoseek.tokenizer import train_tokenizer
    d = tmp_path_factory.mktemp("distill")
    traces = coldstart_dataset(120, tasks=["add", "max", "compare"], seed=0)
    tok = train_tokenizer(default_corpus(300, seed=1) + [m["content"] for r in traces for m in r["messages"]], 1024)
    torch.manual_seed(0)
    cfg = get_preset("tiny").replace(hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
                                     num_hidden_layers=2, vocab_size=tok.vocab_size)
    Transformer(cfg).save_pretrained(d / "teacher", tokenizer=tok)
    (d / "traces.jsonl").write_text("".join(json.dumps(r) + "\n" for r in traces))
    return d


@pytest.mark.auto_dtype
def test_both_methods_learn_and_student_loads_in_transformers(teacher_and_traces, tmp_path):
    d = teacher_and_traces
    opts = Options(teacher=str(d / "teacher"), data=str(d / "traces.jsonl"), method="both", alpha=0.2, top_k=8,
                   out=str(tmp_path / "run"), steps=8, seq_len=64, batch_size=4, lr=3e-3, warmup_steps=2,
                   student_overrides=SMALL_STUDENT, progress=False, device="cpu", dtype="auto", save_every=0)
    final = distill(opts)
    summary = json.loads((tmp_path / "run" / "distill.json").read_text())
    for method in ("sft", "logits"):
        r = summary["results"][method]
        assert r["last_loss"] < r["first_loss"], (method, r)
        assert r["val_ce"] > 0 and r["val_kl"] >= 0
        assert (tmp_path / "run" / method / "final" / "tokenizer.json").exists()
        rows = [json.loads(ln) for ln in (tmp_path / "run" / method / "metrics.jsonl").read_text().splitlines()]
        if method == "logits":
            assert {"kl", "ce"} <= set(rows[-1])
    assert "| logits |" in (tmp_path / "run" / "report.md").read_text()
    assert final == tmp_path / "run" / "sft" / "final"

    from transformers import AutoModelForCausalLM

    from nanoseek.hf.load import from_pretrained
    hf = AutoModelForCausalLM.from_pretrained(final).eval()
    assert type(hf).__name__ == "Qwen2ForCausalLM"
    ours = from_pretrained(final)
    assert isinstance(ours, DenseTransformer) and ours.config.vocab_size == hf.config.vocab_size
    x = torch.randint(0, ours.config.vocab_size, (2, 20))
    with torch.no_grad():
        assert (hf(x).logits - ours(x)).abs().max().item() <= 1e-4


def test_traces_come_from_rejection_sampling_without_data(tmp_path, monkeypatch):
    """No --data: the teacher's correct traces are sampled with train.rejection (stubbed here)."""
    from nanoseek.train.distill import teacher_traces
    calls = []

    def rejection_sample(model_dir, out=None, n_prompts=10, seed=0, other=None):
        calls.append((model_dir, out, n_prompts, seed))
        return out
    monkeypatch.setattr("nanoseek.train.distill.rejection_sample", rejection_sample)
    path = teacher_traces(Options(teacher="T", n_prompts=7, seed=3), tmp_path)
    assert path == tmp_path / "traces.jsonl" and calls == [("T", path, 7, 3)]
    assert teacher_traces(Options(teacher="T", data="x.jsonl"), tmp_path) == __import__("pathlib").Path("x.jsonl")
