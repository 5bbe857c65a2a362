"""`nanoseek grpo` under torchrun (2 CPU ranks, gloo) takes the same steps as one process.

Each rank rolls out its half of the step's prompts (the sampling streams depend on the seed and
the sample's index in its group, not on the batch, so the rollouts are the ones of one process)
and the update is data parallel. Compared with the one-process run of the same command: the
rewards of every step (identical rollouts), the loss (<= 1e-5 relative) and the final weights.
Then the 2-rank sharded checkpoint resumes in one process.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.distributed

FLAGS = ["--mode", "r1", "--steps", "2", "--prompts-per-step", "4", "--group-size", "4", "--max-new-tokens", "12",
         "--temperature", "1.5", "--eval-n", "0", "--save-every", "1", "--keep-last", "0", "--beta", "0.04",
         "--language-weight", "1.0", "--lr", "1e-3", "--micro-batch", "8", "--device", "cpu"]
TIMEOUT_S = 180
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A random tiny MoE (with MTP) and a tokenizer trained on the built-in corpus, whose several
    scripts make the language reward of random completions vary (nonzero advantages)."""
    from nanoseek.config import get_preset
    from nanoseek.data.corpus import default_corpus
    from nanoseek.model.transformer import Transformer
    from nanoseek.tokenizer import train_tokenizer
    d = tmp_path_factory.mktemp("grpo_dist")
    tok = train_tokenizer(default_corpus(300, seed=1), 1024, d / "tok")
    torch.manual_seed(0)
    cfg = get_preset("tiny").replace(hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=2,
                                     n_routed_experts=8, num_experts_per_tok=2, n_group=2, topk_group=1,
                                     vocab_size=tok.vocab_size, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id,
                                     pad_token_id=tok.pad_id)
    Transformer(cfg).save_pretrained(d / "model", tokenizer=tok)
    return d / "model"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _grpo(model_dir: Path, out: Path, extra: list[str] = (), ranks: int = 1) -> None:
    launch = ([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks),
               "--master_addr", "127.0.0.1", "--master_port", str(_free_port())] if ranks > 1 else [sys.executable])
    done = subprocess.run(launch + ["-m", "nanoseek", "grpo", str(model_dir), "--out", str(out), *FLAGS, *extra],
                          env=ENV, capture_output=True, text=True, timeout=TIMEOUT_S)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert f"{ranks} rank(s)" in done.stdout


def _rows(out: Path) -> list[dict]:
    return [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]


def _weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file
    return load_file(path / "model.safetensors")


@pytest.fixture(scope="module")
def one_process(model_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("grpo_one")
    _grpo(model_dir, out)
    return out


@pytest.mark.parametrize("mode", [["--parallel", "ddp"], ["--parallel", "fsdp", "--ep", "2"]], ids=["ddp", "fsdp_ep2"])
def test_two_ranks_step_like_one_process(model_dir, one_process, tmp_path, mode):
    _grpo(model_dir, tmp_path, mode, ranks=2)
    ref, got = _rows(one_process), _rows(tmp_path)
    assert len(ref) == len(got) == 2
    assert any(r["zero_var_groups"] < 1 for r in ref), "the test needs nonzero advantages"
    for a, b in zip(got, ref):
        # the rollouts of rank r are the one-process rollouts of its prompts
        for k in ("reward", "reward_std", "reward_language", "response_len", "zero_var_groups"):
            assert a[k] == pytest.approx(b[k], abs=1e-9), k
        for k in ("loss", "kl", "mtp_loss", "entropy"):
            assert a[k] == pytest.approx(b[k], rel=1e-5, abs=1e-8), k
    wa, wb = _weights(tmp_path / "final"), _weights(one_process / "final")
    assert wa.keys() == wb.keys()
    moved = max((wb[k] - _weights(model_dir)[k]).abs().max().item() for k in wb)
    assert moved > 1e-4, "the update must change the weights"
    diff = max((wa[k] - wb[k]).abs().max().item() for k in wa)
    assert diff < 1e-5
    print(f"\n{mode}: loss rel diff {max(abs(a['loss'] - b['loss']) / abs(b['loss']) for a, b in zip(got, ref)):.1e}, "
          f"max weight diff {diff:.1e} (update moved weights by up to {moved:.1e})")


def test_zero_variance_filter_under_two_ranks(model_dir, tmp_path):
    """One process drops the groups whose rewards are all equal; two ranks must run the same micro-batches,
    so they mask those rows out instead: the same update. The masked rows still pass through the experts,
    so the MoE balance terms (sequence-wise loss, routing-bias load) see them: both are off here."""
    d = tmp_path / "no_balance_loss"
    shutil.copytree(model_dir, d)
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "aux_loss_alpha": 0.0}))
    model_dir = d
    extra = ["--filter-zero-var", "--bias-gamma", "0", "--prompts-per-step", "8", "--seed", "2", "--steps", "3"]
    _grpo(model_dir, tmp_path / "one", extra)
    _grpo(model_dir, tmp_path / "two", ["--parallel", "ddp", *extra], ranks=2)
    ref, got = _rows(tmp_path / "one"), _rows(tmp_path / "two")
    assert any(0 < r["zero_var_groups"] < 1 for r in ref), "the test needs both equal and informative groups"
    for a, b in zip(got, ref):
        assert a["trained_seqs"] == b["trained_seqs"] == round(8 * 4 * (1 - b["zero_var_groups"]))  # 8 prompts x G 4
        for k in ("reward", "zero_var_groups"):
            assert a[k] == pytest.approx(b[k], abs=1e-9), k
        assert ("loss" in a) == ("loss" in b) == (b["trained_seqs"] > 0)  # no update when every group is equal
        for k in ("loss", "mtp_loss", "entropy") if "loss" in b else ():
            assert a[k] == pytest.approx(b[k], rel=1e-4, abs=1e-7), k
    wa, wb = _weights(tmp_path / "two" / "final"), _weights(tmp_path / "one" / "final")
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) < 1e-5


def test_dynamic_sampling_and_mismatch_under_two_ranks(model_dir, tmp_path):
    """DAPO's refills under torchrun: every rank rolls out its share of each refill round, and the groups
    one process would drop (equal rewards, or past the first prompts-per-step informative ones) are masked:
    the same rounds, batch and update. The mismatch metrics are global sums (fp32: ~0, no router flips)."""
    d = tmp_path / "no_balance_loss"
    shutil.copytree(model_dir, d)
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "aux_loss_alpha": 0.0}))
    extra = ["--dynamic-sampling", "2", "--bias-gamma", "0", "--prompts-per-step", "8", "--seed", "2", "--log-router-flips"]
    _grpo(d, tmp_path / "one", extra)
    _grpo(d, tmp_path / "two", ["--parallel", "ddp", *extra], ranks=2)
    ref, got = _rows(tmp_path / "one"), _rows(tmp_path / "two")
    assert any(r["dynamic_rounds"] > 0 for r in ref), "the test needs a refill"
    assert any("router_flip_rate" in r for r in got), "the test needs an update"
    for a, b in zip(got, ref):
        for k in ("trained_seqs", "dynamic_rounds", "dynamic_extra_rollouts", "router_flip_rate"):
            assert a.get(k) == b.get(k), k  # a step with no informative group has no update (and no flips)
        assert a["reward"] == pytest.approx(b["reward"], abs=1e-9)
        assert ("loss" in a) == ("loss" in b) == (b["trained_seqs"] > 0)
        if "loss" in b:
            assert a["loss"] == pytest.approx(b["loss"], rel=1e-4, abs=1e-7)
            assert a["mismatch_kl"] < 1e-9 and b["mismatch_kl"] < 1e-9
    wa, wb = _weights(tmp_path / "two" / "final"), _weights(tmp_path / "one" / "final")
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) < 1e-5


def test_two_rank_checkpoint_resumes_in_one_process(model_dir, one_process, tmp_path):
    _grpo(model_dir, tmp_path, ["--parallel", "fsdp", "--steps", "1"], ranks=2)
    assert (tmp_path / "checkpoints" / "step_000001" / ".metadata").exists()  # a sharded (DCP) checkpoint
    _grpo(model_dir, tmp_path, ["--resume"])
    got, ref = _rows(tmp_path), _rows(one_process)
    assert [r["step"] for r in got] == [1, 2]
    assert got[1]["reward"] == pytest.approx(ref[1]["reward"], abs=1e-9)
    assert got[1]["loss"] == pytest.approx(ref[1]["loss"], rel=1e-5, abs=1e-8)
