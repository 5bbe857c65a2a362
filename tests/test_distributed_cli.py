"""`nanoseek pretrain` under torchrun (2 CPU ranks, gloo) trains exactly like one process.

Every launch is the real command line: `python -m torch.distributed.run --nproc_per_node 2 -m
nanoseek pretrain --parallel ddp|fsdp [--ep 2]`, compared with the same command in one process
(same global batch: each rank trains on half of it). The runs are shared by the tests through one
module fixture, launched one after another (one heavy job at a time on small CPUs).
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

OVERRIDES = {"hidden_size": 64, "intermediate_size": 128, "moe_intermediate_size": 32, "num_hidden_layers": 2,
             "n_routed_experts": 8, "num_experts_per_tok": 2, "n_group": 2, "topk_group": 1}
FLAGS = ["--steps", "4", "--batch-size", "4", "--seq-len", "64", "--n-docs", "200", "--vocab-size", "300",
         "--warmup-steps", "2", "--save-every", "2", "--model-overrides", json.dumps(OVERRIDES),
         "--no-progress", "--dtype", "fp32", "--device", "cpu"]
MODES = {"ddp": ["--parallel", "ddp"], "fsdp": ["--parallel", "fsdp"], "fsdp_ep2": ["--parallel", "fsdp", "--ep", "2"]}
TIMEOUT_S = 120
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(out: Path, extra: list[str], ranks: int = 1) -> subprocess.CompletedProcess:
    launch = ([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks),
               "--master_addr", "127.0.0.1", "--master_port", str(_free_port())] if ranks > 1 else [sys.executable])
    done = subprocess.run(launch + ["-m", "nanoseek", "pretrain", "--out", str(out), *FLAGS, *extra], env=ENV,
                          capture_output=True, text=True, timeout=TIMEOUT_S)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return done


def _losses(out: Path) -> list[float]:
    return [json.loads(ln)["loss"] for ln in (out / "metrics.jsonl").read_text().splitlines()]


def _weights(out: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file
    return load_file(out / "final" / "model.safetensors")


def _compare(name: str, out: Path, ref: Path) -> tuple[float, float]:
    a, b = _losses(out), _losses(ref)
    assert len(a) == len(b) == 4
    dl = max(abs(x - y) / abs(y) for x, y in zip(a, b))
    wa, wb = _weights(out), _weights(ref)
    assert wa.keys() == wb.keys()
    dw = max((wa[k] - wb[k]).abs().max().item() for k in wa)
    print(f"[distributed cli] {name}: loss max rel diff {dl:.1e}, final weights max abs diff {dw:.1e}")
    return dl, dw


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist_cli")
    t0 = time.time()
    logs = {"one": _run(root / "one", [])}
    for name, extra in MODES.items():
        logs[name] = _run(root / name, extra, ranks=2)
    # "killed" right after its step-2 checkpoint: the fsdp run's folder as it was then, resumed in one process
    resumed = root / "resumed"
    shutil.copytree(root / "fsdp", resumed)
    shutil.rmtree(resumed / "checkpoints" / "step_000004")
    shutil.rmtree(resumed / "final")
    logs["resumed"] = _run(resumed, ["--resume", "--tokenizer", str(resumed / "tokenizer")])
    print(f"\n[distributed cli] 1 + {len(MODES)} two-rank + 1 resumed pretrain runs: {time.time() - t0:.0f}s")
    return root, logs


@pytest.mark.distributed
@pytest.mark.parametrize("mode", MODES)
def test_torchrun_pretrain_matches_one_process(runs, mode):
    root, logs = runs
    dl, dw = _compare(f"{mode} 2 ranks vs 1 process", root / mode, root / "one")
    assert dl <= 1e-5 and dw <= 1e-4
    rows = [json.loads(ln) for ln in (root / mode / "metrics.jsonl").read_text().splitlines()]
    ref = [json.loads(ln) for ln in (root / "one" / "metrics.jsonl").read_text().splitlines()]
    assert [r["tokens"] for r in rows] == [r["tokens"] for r in ref]          # counted over both ranks
    assert logs[mode].stdout.count("pretrain done") == 1                      # rank 0 alone prints
    meta = json.loads((root / mode / "checkpoints" / "step_000004" / "meta.json").read_text())
    assert meta["format"] == "dcp" and any(n.endswith(".distcp") for n in meta["files"])
    for f in ("config.yaml", "cost.json", "plots/loss.png", "final/config.json", "final/tokenizer.json"):
        assert (root / mode / f).exists(), f


@pytest.mark.distributed
def test_two_rank_checkpoint_resumes_in_one_process(runs):
    root, logs = runs
    assert "resumed from" in logs["resumed"].stdout and "step_000002" in logs["resumed"].stdout
    dl, dw = _compare("fsdp 2 ranks to step 2, resumed in 1 process to step 4, vs uninterrupted",
                      root / "resumed", root / "fsdp")
    assert dl <= 1e-5 and dw <= 1e-4
    final = lambda d: _losses(root / d)[-1]  # noqa: E731
    print(f"[distributed cli] final loss: resumed {final('resumed'):.7f}, uninterrupted 2 ranks "
          f"{final('fsdp'):.7f}, 1 process {final('one'):.7f}")


def test_options_that_cannot_run_distributed_fail_early(monkeypatch, capsys):
    from nanoseek.cli import main
    from nanoseek.train import distributed
    from nanoseek.train.pretrain import Options
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(SystemExit, match=r"--batch-size 4 .* world size 3"):
        distributed.join(Options(batch_size=4), torch.device("cpu"))
    monkeypatch.setenv("WORLD_SIZE", "1")
    with pytest.raises(SystemExit, match="--ep 2 must divide the world size 1"):
        distributed.join(Options(ep=2), torch.device("cpu"))
    assert main(["eval", "m", "--parallel", "fsdp"]) == 2
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["eval", "m"]) == 2
    assert capsys.readouterr().err.count("nanoseek eval runs in one process") == 2
    from nanoseek.train.grpo import Options as GRPOOptions
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(SystemExit, match=r"--prompts-per-step 8 .* world size 3"):
        distributed.join(GRPOOptions(prompts_per_step=8), torch.device("cpu"))


@pytest.mark.distributed
def test_speedrun_launches_training_stages_with_torchrun(tmp_path, monkeypatch, capsys):
    """`nanoseek speedrun --nproc 2` runs a training stage as torchrun + FSDP from a config file."""
    from nanoseek.speedrun.run import train
    from nanoseek.train import pretrain as P
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    opts = P.Options(out=str(tmp_path / "pre"), steps=2, batch_size=4, seq_len=64, n_docs=200, vocab_size=300,
                     warmup_steps=1, model_overrides=OVERRIDES, progress=False, dtype="fp32", device="cpu")
    out = train("pretrain", P.pretrain, opts, nproc=2)
    assert "torch.distributed.run --standalone --nproc_per_node=2" in capsys.readouterr().out
    assert Path(out["model"]) == tmp_path / "pre" / "final" and (tmp_path / "pre" / "final" / "config.json").exists()
    assert "parallel: fsdp" in (tmp_path / "pre" / "launch.yaml").read_text()
    assert len(_losses(tmp_path / "pre")) == 2
    meta = json.loads((tmp_path / "pre" / "checkpoints" / "step_000002" / "meta.json").read_text())
    assert meta["format"] == "dcp"
