"""nanoseek.hardware: peak measurement, bf16 detection, dtype choice, allocator settings."""
import json
import platform
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from nanoseek import hardware
from nanoseek.gpu_peaks import gpu_peak_flops


def test_matmul_peak_positive_and_cached():
    a = hardware.measure_matmul_peak(torch.float32, n=128, seconds=0.05)
    assert a > 1e6
    assert hardware.measure_matmul_peak(torch.float32, n=128, seconds=0.05) == a  # cached


def test_pick_dtype_cpu(monkeypatch):
    monkeypatch.setattr(hardware, "cpu_has_fast_bf16", lambda: False)
    assert hardware.pick_dtype("cpu") == (torch.float32, None)
    monkeypatch.setattr(hardware, "cpu_has_fast_bf16", lambda: True)
    assert hardware.pick_dtype("cpu") == (torch.float32, torch.bfloat16)
    assert hardware.pick_dtype("cpu", "fp32") == (torch.float32, None)
    assert hardware.pick_dtype("cpu", "BF16") == (torch.float32, torch.bfloat16)
    with pytest.raises(ValueError):
        hardware.pick_dtype("cpu", "fp8")


def test_fast_bf16_from_flags(monkeypatch):
    monkeypatch.delenv("NANOSEEK_CPU_BF16", raising=False)  # the override is tested below
    for flags, want in (({"avx2", "avx512f"}, False), ({"avx512_bf16"}, True), ({"amx_bf16"}, True)):
        hardware.cpu_has_fast_bf16.cache_clear()
        monkeypatch.setattr(hardware, "_cpu_flags", lambda f=flags: f)
        assert hardware.cpu_has_fast_bf16() is want
    hardware.cpu_has_fast_bf16.cache_clear()
    # no /proc/cpuinfo (macOS): decided by timing
    monkeypatch.setattr(hardware, "_cpu_flags", lambda: None)
    monkeypatch.setattr(hardware, "measure_matmul_peak", lambda dtype, **kw: 1e11 if dtype == torch.float32 else 1e9)
    assert hardware.cpu_has_fast_bf16() is False
    hardware.cpu_has_fast_bf16.cache_clear()


def test_fast_bf16_override(monkeypatch):
    monkeypatch.setattr(hardware, "_cpu_flags", lambda: {"avx2"})
    try:
        for value, want in (("1", True), ("0", False), ("", False)):
            hardware.cpu_has_fast_bf16.cache_clear()
            monkeypatch.setenv("NANOSEEK_CPU_BF16", value)
            assert hardware.cpu_has_fast_bf16() is want
        hardware.cpu_has_fast_bf16.cache_clear()
        monkeypatch.setenv("NANOSEEK_CPU_BF16", "yes")
        with pytest.raises(ValueError, match="NANOSEEK_CPU_BF16"):
            hardware.cpu_has_fast_bf16()
    finally:
        hardware.cpu_has_fast_bf16.cache_clear()


def test_gpu_peaks_and_description():
    assert gpu_peak_flops("H800") == 989e12
    assert gpu_peak_flops("NVIDIA H100 80GB HBM3", "fp8") == 1979e12
    assert gpu_peak_flops("NVIDIA H200") == gpu_peak_flops("H100")
    assert gpu_peak_flops("NVIDIA A100-SXM4-80GB") == 312e12
    assert gpu_peak_flops("A100", "fp8") is None
    assert gpu_peak_flops("Some GPU") is None
    d = hardware.describe_device("cpu")
    assert "cores" in d and len(d) < 200


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's allocator settings")
def test_retain_freed_memory_keeps_large_blocks_in_the_heap():
    """By default glibc gives a 64 MiB tensor its own mmap, returned to the OS (and page-faulted in
    anew) every time; after retain_freed_memory() it comes from the heap and stays there when freed."""
    code = textwrap.dedent("""
        import ctypes, torch
        from nanoseek.train.heap import retain_freed_memory
        class Info(ctypes.Structure):
            _fields_ = [(n, ctypes.c_size_t) for n in
                        "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]
        libc = ctypes.CDLL("libc.so.6")
        libc.mallinfo2.restype = Info
        def mapped_and_heap_free(mib=64):
            t = torch.ones(mib * 2**18)
            mapped = libc.mallinfo2().hblkhd >> 20          # bytes in blocks with their own mmap
            del t
            return mapped, libc.mallinfo2().fordblks >> 20  # free bytes kept in the heap
        before = mapped_and_heap_free()
        assert retain_freed_memory()
        print(*before, *mapped_and_heap_free())
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    mapped0, kept0, mapped1, kept1 = map(int, out)
    assert mapped0 >= 64 and kept0 < 64, out       # default: an own mapping, unmapped when freed
    assert mapped1 < 64 and kept1 >= 64, out       # retained: heap memory, kept for the next step


# --------------------------------------------------------------------------- the measured dtype choice
from nanoseek import dtype_choice  # noqa: E402
from nanoseek.model.moe import moe_layers  # noqa: E402


def _tiny_model(seed=0):
    from nanoseek.config import get_preset
    from nanoseek.model.transformer import Transformer
    torch.manual_seed(seed)
    cfg = get_preset("tiny").replace(hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
                                     num_hidden_layers=2, vocab_size=256)
    return Transformer(cfg).train()


def _loss_fn(model):
    return lambda b: model.loss(b["input_ids"], b["targets"], loss_mask=b["loss_mask"], doc_ids=b["doc_ids"])["loss"]


@pytest.fixture
def bf16_cpu(monkeypatch, tmp_path):
    """A CPU whose flags claim fast bf16, no NANOSEEK_CPU_BF16 override, the cache in tmp_path, and the
    dtypes of the real training steps timed (a measurement: 1 warm-up + 3 timed steps of each)."""
    monkeypatch.delenv("NANOSEEK_CPU_BF16", raising=False)
    monkeypatch.setenv("NANOSEEK_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(hardware, "_cpu_flags", lambda: {"avx512f", "avx512_bf16"})
    hardware.cpu_has_fast_bf16.cache_clear()
    calls = []
    real = dtype_choice.time_step

    def counted(*a, **kw):
        calls.append(a[3])  # the autocast dtype
        return real(*a, **kw)

    monkeypatch.setattr(dtype_choice, "time_step", counted)
    yield calls
    hardware.cpu_has_fast_bf16.cache_clear()


def _choose(model, requested="auto", batch_size=2, seq_len=16):
    return dtype_choice.choose_dtype("cpu", requested, model, _loss_fn(model), batch_size, seq_len)


def test_cache_path_honours_env(monkeypatch, tmp_path):
    monkeypatch.delenv("NANOSEEK_CACHE_DIR", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert dtype_choice.cache_path() == Path.home() / ".cache" / "nanoseek" / "dtype.json"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert dtype_choice.cache_path() == tmp_path / "xdg" / "nanoseek" / "dtype.json"
    monkeypatch.setenv("NANOSEEK_CACHE_DIR", str(tmp_path / "own"))
    assert dtype_choice.cache_path() == tmp_path / "own" / "dtype.json"


def test_measures_once_then_reads_the_cache(bf16_cpu, tmp_path):
    model = _tiny_model()
    first = _choose(model)
    assert first.reason == "measured" and bf16_cpu == [None, torch.bfloat16] * 4
    assert set(first.tokens_per_s) == {"fp32", "bf16"} and min(first.tokens_per_s.values()) > 0
    speeds = first.tokens_per_s
    clearly_bf16 = speeds["bf16"] > dtype_choice.BF16_MARGIN * speeds["fp32"]  # a near tie keeps exact fp32
    assert first.autocast == (torch.bfloat16 if clearly_bf16 else None)
    assert "measured on this CPU for this model" in first.describe() and "dtype.json" in first.describe()
    path = tmp_path / "cache" / "dtype.json"
    entries = json.loads(path.read_text())["entries"]
    assert list(entries) == [dtype_choice.cache_key(model, 2, 16)]
    assert [p.name for p in path.parent.iterdir()] == ["dtype.json"]  # no temp file left behind

    second = _choose(_tiny_model())  # a new model of the same config: same key
    assert len(bf16_cpu) == 8 and second.reason == "cached"
    assert (second.autocast, second.tokens_per_s) == (first.autocast, first.tokens_per_s)
    assert "cached choice" in second.describe()
    assert second.to_dict()["dtype"] in ("fp32", "bf16")

    _choose(model, seq_len=8)  # another batch shape is another key: measured, and added to the file
    assert len(bf16_cpu) == 16 and len(json.loads(path.read_text())["entries"]) == 2


@pytest.mark.parametrize("content", ["{not json", "[]", '{"version": 1, "entries": {"x": 3}}', "", "\x00\xff"])
def test_corrupt_cache_is_measured_again(bf16_cpu, tmp_path, content):
    path = tmp_path / "cache" / "dtype.json"
    path.parent.mkdir()
    path.write_text(content)
    model = _tiny_model()
    # an unreadable entry under the right key is no answer either
    if content.startswith('{"version"'):
        path.write_text(json.dumps({"version": 1, "entries": {dtype_choice.cache_key(model, 2, 16): {"dtype": "fp8"}}}))
    assert _choose(model).reason == "measured" and len(bf16_cpu) == 8
    assert _choose(model).reason == "cached"  # the file was rewritten whole


def test_unwritable_cache_dir_just_skips_caching(bf16_cpu, tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("NANOSEEK_CACHE_DIR", str(blocker / "sub"))  # a directory under a file: never creatable
    model = _tiny_model()
    c = _choose(model)
    assert c.reason == "measured" and "cache not written" in c.describe() and c.cache == ""
    assert _choose(model).reason == "measured" and len(bf16_cpu) == 16


def test_overrides_and_plain_cpus_never_measure(bf16_cpu, monkeypatch, tmp_path):
    model = _tiny_model()
    for value, want in (("1", torch.bfloat16), ("0", None)):
        monkeypatch.setenv("NANOSEEK_CPU_BF16", value)
        hardware.cpu_has_fast_bf16.cache_clear()
        c = _choose(model)
        assert (c.autocast, c.reason) == (want, f"NANOSEEK_CPU_BF16={value}")
        assert c.describe() == f"dtype: {c.name} (NANOSEEK_CPU_BF16={value})"
    monkeypatch.delenv("NANOSEEK_CPU_BF16")
    for requested, want in (("fp32", None), ("bf16", torch.bfloat16)):
        assert (_choose(model, requested).autocast, _choose(model, requested).reason) == (want, "requested")
    monkeypatch.setattr(hardware, "_cpu_flags", lambda: {"avx2", "avx512f"})  # no BF16 instructions
    hardware.cpu_has_fast_bf16.cache_clear()
    c = _choose(model)
    assert (c.autocast, c.describe()) == (None, "dtype: fp32 (CPU has no fast bf16)")
    assert bf16_cpu == [] and not (tmp_path / "cache").exists()


def test_probe_leaves_the_model_and_rng_as_they_were():
    model = _tiny_model()
    for i, p in enumerate(model.parameters()):  # some parameters carry gradients, the rest none
        p.grad = torch.randn_like(p) if i % 2 else None
    for m in moe_layers(model):
        m.load.copy_(torch.arange(m.load.numel(), dtype=m.load.dtype))  # tokens counted before the probe
    assert moe_layers(model)
    params = [p.detach().clone() for p in model.parameters()]
    grads = [None if p.grad is None else p.grad.clone() for p in model.parameters()]
    buffers = {k: b.clone() for k, b in model.named_buffers()}
    aux = [m.aux_loss for m in moe_layers(model)]
    rng = torch.get_rng_state()

    speeds = dtype_choice.probe_speeds(model, _loss_fn(model), 2, 16, torch.device("cpu"))
    assert set(speeds) == {"fp32", "bf16"} and min(speeds.values()) > 0
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(a, p) for a, p in zip(params, model.parameters()))
    assert all((g is None and p.grad is None) or torch.equal(g, p.grad) for g, p in zip(grads, model.parameters()))
    assert all(torch.equal(b, buffers[k]) for k, b in model.named_buffers())
    assert [m.aux_loss for m in moe_layers(model)] == aux


def test_trainer_logs_and_records_its_choice(bf16_cpu, capsys, tmp_path):
    """The trainer asks once, prints one line, and starts from the model and RNG state it was given."""
    from nanoseek.train.trainer import TrainOptions, Trainer
    model = _tiny_model()
    before = [p.detach().clone() for p in model.parameters()]
    rng = torch.get_rng_state()
    t = Trainer(model, TrainOptions(batch_size=2, seq_len=16, progress=False, device="cpu"), iter(()), tmp_path / "run")
    assert len(bf16_cpu) == 8 and t.amp_dtype is t.dtype_choice.autocast
    assert t.dtype_choice.to_dict()["reason"] == "measured"
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("dtype: ")]
    assert lines == [t.dtype_choice.describe()]
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(a, p) for a, p in zip(before, t.model.parameters()))
    assert all(p.grad is None for p in t.model.parameters())


def test_the_test_session_has_its_own_cache():
    """conftest.py points the dtype cache at a fresh temporary folder: no test reads a developer's cache."""
    assert dtype_choice.cache_path().parent != Path.home() / ".cache" / "nanoseek"
    assert "nanoseek-test-cache-" in str(dtype_choice.cache_path())
