"""FP8 mixed precision (kernels/fp8.py, hf/fp8_export.py): quantization error bounds, the promoted GEMM
against float64, Fp8Linear / Fp8Experts against their high-precision selves, apply_fp8's choice, training,
and the FP8 checkpoint's round trip (nanoseek and transformers)."""
import json
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from nanoseek.config import get_preset
from nanoseek.kernels import speedup
from nanoseek.kernels.fp8 import (FP8, FP8_MAX, TILE, Fp8Experts, Fp8Linear, Fp8MLP, apply_fp8,
                                  dequantize_tiles, fp8_gemm, fp8_linear, quantize_blocks, quantize_tiles, round_e4m3,
                                  scaled_mm_runs)
from nanoseek.hf.fp8_export import QUANTIZATION_CONFIG, fp8_checkpoint_names, save_fp8_pretrained
from nanoseek.hf.load import dequantize_blocks, from_pretrained
from nanoseek.model.moe import Experts
from nanoseek.model.transformer import Transformer
from nanoseek.train.trainer import TrainOptions, Trainer

SMALL = {"hidden_size": 128, "intermediate_size": 256, "moe_intermediate_size": 64, "num_hidden_layers": 2,
         "vocab_size": 64}
U = 2.0 ** -24  # fp32 unit roundoff
# e4m3 keeps 3 mantissa bits: neighbouring values are 2^-3 apart relative to the binade, so rounding to the
# nearest is off by at most half of that, 2^-4 of |value|; below 2^-6 (subnormals) the spacing is a fixed 2^-9,
# so at most 2^-10 off. In x's units (x = value * scale), plus the fp32 roundings of x / scale and value * scale:
#   |x - deq(q(x))| <= 2^-4 |x| + 2^-10 scale + 2^-20 (|x| + scale),   scale = tile amax / 448
HALF_STEP, SUBNORMAL_HALF_STEP, SLACK = 2.0 ** -4, 2.0 ** -10, 2.0 ** -20


def _scaled_normals(draw, shape):
    """Gaussian values whose magnitudes spread over ~2^-20 .. 2^20 (per column), plus exact zeros."""
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g) * torch.exp2(torch.randint(-20, 21, shape[-1:], generator=g).float())
    return x * (torch.rand(*shape, generator=g) > 0.05)


@st.composite
def matrices(draw, max_rows=6, max_cols=300):
    return _scaled_normals(draw, (draw(st.integers(1, max_rows)), draw(st.integers(1, max_cols))))


def _elementwise_bound(x: torch.Tensor, scale_per_element: torch.Tensor) -> torch.Tensor:
    return HALF_STEP * x.abs() + SUBNORMAL_HALF_STEP * scale_per_element + SLACK * (x.abs() + scale_per_element)


# ---------------------------------------------------------------------- quantization
@given(st.lists(st.floats(-FP8_MAX, FP8_MAX, width=32, allow_subnormal=True), min_size=1, max_size=64))
def test_round_e4m3_is_the_float8_cast_bit_for_bit(values):
    r = torch.tensor(values, dtype=torch.float32)
    assert torch.equal(round_e4m3(r), r.to(FP8).float())


def test_round_e4m3_on_every_e4m3_value_and_every_tie():
    grid = torch.arange(256, dtype=torch.uint8).view(FP8).float()
    grid = grid[grid.isfinite()].unique()
    ties = (grid[1:] + grid[:-1]) / 2  # exact in fp32: the cast rounds these to the even neighbour
    for r in (grid, ties, ties.nextafter(torch.tensor(math.inf)), ties.nextafter(torch.tensor(-math.inf))):
        assert torch.equal(round_e4m3(r), r.to(FP8).float())


@settings(deadline=None)
@given(matrices())
def test_tile_quantization_error_bound(x):
    q, scale = quantize_tiles(x)
    n_tiles = math.ceil(x.shape[-1] / TILE)
    assert q.dtype == FP8 and q.shape == x.shape and scale.shape == (x.shape[0], n_tiles)
    tiles = torch.nn.functional.pad(x, (0, -x.shape[-1] % TILE)).unflatten(-1, (-1, TILE))
    amax = tiles.abs().amax(-1)
    assert torch.equal(scale, torch.where(amax > 0, amax / FP8_MAX, 1.0))  # a partial tile: its real elements' amax
    per_element = scale.repeat_interleave(TILE, -1)[:, :x.shape[-1]]
    err = (x - dequantize_tiles(q, scale)).abs()
    assert (err <= _elementwise_bound(x, per_element)).all()
    assert (err <= (HALF_STEP + SLACK) * amax.repeat_interleave(TILE, -1)[:, :x.shape[-1]]).all()  # per tile: amax/16
    q32, scale32 = quantize_tiles(x, torch.float32)  # the emulation's form: the same values, held in fp32
    assert torch.equal(q32, q.float()) and torch.equal(scale32, scale)


@settings(deadline=None)
@given(st.data())
def test_block_quantization_error_bound(data):
    shape = (data.draw(st.integers(1, 3)), data.draw(st.integers(1, 300)), data.draw(st.integers(1, 300)))
    w = _scaled_normals(data.draw, shape).transpose(-1, -2).contiguous()  # magnitudes spread over rows: many blocks
    q, scale = quantize_blocks(w)
    e, n, k = w.shape
    assert q.dtype == FP8 and q.shape == w.shape and scale.shape == (e, math.ceil(n / TILE), math.ceil(k / TILE))
    per_element = scale.repeat_interleave(TILE, -2).repeat_interleave(TILE, -1)[:, :n, :k]
    assert ((w - dequantize_blocks(q, scale)).abs() <= _elementwise_bound(w, per_element)).all()
    # each block's largest element lands on +-448: the scale is its amax / 448
    top = (q.float().abs() == FP8_MAX) & (w != 0)
    assert torch.equal(torch.nn.functional.pad(top.float(), (0, -k % TILE, 0, -n % TILE))
                       .unflatten(-1, (-1, TILE)).unflatten(-3, (-1, TILE)).amax((-3, -1)) > 0, scale != 1)


def test_all_zero_tiles_quantize_to_zero_with_scale_one():
    x = torch.zeros(3, 200)
    x[1, 150] = 2.0
    q, scale = quantize_tiles(x)
    assert torch.equal(scale, torch.tensor([[1.0, 1.0], [1.0, 2.0 / FP8_MAX], [1.0, 1.0]]))
    assert torch.equal(dequantize_tiles(q, scale), x)


# ---------------------------------------------------------------------- GEMM
def _promoted_reference(a, sa, b, sb):
    """float64 sum over 128-wide K chunks of (a_c @ b_c^T) * sa_c (x) sb_c: exact up to float64 rounding, as
    e4m3 values times fp32 scales are exact in float64 (4 + 24 significant bits)."""
    k = a.shape[1]
    out = torch.zeros(a.shape[0], b.shape[0], dtype=torch.float64)
    for c in range(math.ceil(k / TILE)):
        cols = slice(c * TILE, (c + 1) * TILE)
        out += (a[:, cols].double() @ b[:, cols].double().t()) * sa[:, c, None].double() * sb[None, :, c].double()
    return out


def _fp32_bound(a, sa, b, sb):
    """What fp32 may lose in the promoted GEMM: a chunk's dot product of <= 128 exact products (<= 127
    roundings), the scale product and its multiplication (2), and the adds into the accumulator (one per
    chunk), each relative to the sum of the magnitudes they touch."""
    n_chunks = math.ceil(a.shape[1] / TILE)
    mag = _promoted_reference(a.abs(), sa.abs(), b.abs(), sb.abs())
    return (TILE + 2 + n_chunks) * U * 1.01 * mag


@st.composite
def gemm_operands(draw):
    m, n, k = draw(st.integers(1, 24)), draw(st.integers(1, 24)), draw(st.integers(1, 400))
    a, sa = quantize_tiles(_scaled_normals(draw, (m, k)))
    b, sb = quantize_tiles(_scaled_normals(draw, (n, k)))
    return a, sa, b, sb


@settings(deadline=None, max_examples=60)
@given(gemm_operands())
def test_emulated_gemm_is_the_promoted_sum_within_fp32_rounding(operands):
    a, sa, b, sb = operands
    ref = _promoted_reference(a.float(), sa, b.float(), sb)
    for a_form, b_form in ((a, b), (a.float(), b.float())):  # e4m3 storage, or the same values held in fp32
        got = fp8_gemm(a_form, sa, b_form, sb).double()
        assert ((got - ref).abs() <= _fp32_bound(a.float(), sa, b.float(), sb)).all()


@st.composite
def exact_operands(draw):
    """e4m3 integers in [-8, 8] and power-of-two scales in 2^-2 .. 2^2, K <= 512: every partial product, chunk sum,
    scaled partial and accumulated sum is a multiple of 2^-4 below 2^19, so fp32 holds each exactly."""
    m, n, k = draw(st.integers(1, 16)), draw(st.integers(1, 16)), draw(st.integers(1, 512))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    chunks = math.ceil(k / TILE)
    a, b = (torch.randint(-8, 9, (r, k), generator=g).float().to(FP8) for r in (m, n))
    sa, sb = (torch.exp2(torch.randint(-2, 3, (r, chunks), generator=g).float()) for r in (m, n))
    return a, sa, b, sb


@settings(deadline=None)
@given(exact_operands())
def test_emulated_gemm_applies_each_chunks_scales_exactly(operands):
    a, sa, b, sb = operands
    assert torch.equal(fp8_gemm(a, sa, b, sb).double(), _promoted_reference(a.float(), sa, b.float(), sb))


def _devices_with_scaled_mm():
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    return [pytest.param(d, marks=pytest.mark.skipif(not scaled_mm_runs(torch.device(d)), reason=(
        f"torch._scaled_mm does not run e4m3 with per-row scales on {d} in this torch build"))) for d in devices]


@pytest.mark.parametrize("device", _devices_with_scaled_mm())
@settings(deadline=None, max_examples=40)
@given(operands=gemm_operands(), exact=exact_operands())
def test_scaled_mm_and_emulation_agree(device, operands, exact):
    a, sa, b, sb = operands
    on = lambda *ts: [t.to(device) for t in ts]  # noqa: E731
    bound = 2 * _fp32_bound(a.float(), sa, b.float(), sb)  # each within the fp32 bound of the same float64 sum
    real = fp8_gemm(*on(a, sa, b, sb), backend="scaled_mm").cpu().double()
    emulated = fp8_gemm(*on(a.float(), sa, b.float(), sb)).cpu().double()
    assert ((real - emulated).abs() <= bound).all()
    a, sa, b, sb = exact
    assert torch.equal(fp8_gemm(*on(a, sa, b, sb), backend="scaled_mm").cpu(), fp8_gemm(a, sa, b, sb))


# ---------------------------------------------------------------------- Linear and experts
def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def _deq64(q: torch.Tensor, per_element_scale: torch.Tensor) -> torch.Tensor:
    """Dequantized in float64, where e4m3 value * fp32 scale is exact (fp32 itself would round it)."""
    return q.double() * per_element_scale.double()


def _tiles64(x: torch.Tensor) -> torch.Tensor:
    q, scale = quantize_tiles(x)
    return _deq64(q, scale.repeat_interleave(TILE, -1)[..., :x.shape[-1]])


@settings(deadline=None, max_examples=25)
@given(b=st.integers(1, 3), t=st.integers(1, 70), k=st.integers(1, 300), n=st.integers(1, 300), bias=st.booleans(),
       seed=st.integers(0, 99))
def test_fp8_linear_backward_is_the_quantized_gemms_and_close_to_fp32(b, t, k, n, bias, seed):
    torch.manual_seed(seed)
    ref = torch.nn.Linear(k, n, bias=bias)
    lin = Fp8Linear(k, n, bias=bias)
    lin.load_state_dict(ref.state_dict())
    x = torch.randn(b, t, k)
    x_ref, x8 = x.clone().requires_grad_(), x.clone().requires_grad_()
    dy = torch.randn(b, t, n)
    (ref(x_ref) * dy).sum().backward()
    y = lin(x8)
    (y * dy).sum().backward()
    grads = [x8.grad, lin.weight.grad] + ([lin.bias.grad] if bias else [])
    assert all(g.isfinite().all() for g in [y, *grads])
    y_gemm = fp8_linear(x, lin.weight.detach())
    assert torch.equal(y, y_gemm + lin.bias if bias else y_gemm)  # the bias is added after the GEMM, in fp32
    # the paper's three FP8 GEMMs, recomputed from the quantized operands in float64 (fp8.py's docstring)
    qw, sw = quantize_blocks(lin.weight.detach())
    w64 = _deq64(qw, sw.repeat_interleave(TILE, 0).repeat_interleave(TILE, 1)[:n, :k])
    x2, dy2 = x.reshape(-1, k), dy.reshape(-1, n)
    x_saved = dequantize_tiles(*quantize_tiles(x2))                      # kept from forward: its 1x128 tiles
    gemms = {"y": (_tiles64(x2), w64, y_gemm.reshape(-1, n)),            # x in tiles along K
             "dx": (_tiles64(dy2), w64.t(), x8.grad.reshape(-1, k)),     # dy in tiles along N, W^T's blocks
             "dW": (_tiles64(dy2.t()), _tiles64(x_saved.t()), lin.weight.grad)}  # both in tiles along the tokens
    for name, (a, bt, got) in gemms.items():
        reduced = a.shape[1]
        gamma = (TILE + 2 + math.ceil(reduced / TILE)) * U * 1.01  # as _fp32_bound
        assert ((got.double() - a @ bt.t()).abs() <= gamma * (a.abs() @ bt.abs().t())).all(), name
    # against the fp32 Linear: e4m3 keeps each operand to 2^-4 at worst, and sums of a few dozen products or
    # more average the roundings, so the results to a few % (a sum of three may cancel down to its errors)
    if min(k, n, b * t) >= 32:
        assert _rel(y, ref(x)) < 0.1 and _rel(x8.grad, x_ref.grad) < 0.1
        assert _rel(lin.weight.grad, ref.weight.grad) < 0.1
    if bias:
        assert torch.allclose(lin.bias.grad, ref.bias.grad, rtol=1e-5, atol=1e-5)  # dy itself, unquantized


def test_fp8_linear_under_bf16_autocast_returns_bf16_and_fp32_weight_grads():
    lin = Fp8Linear(200, 96)
    x = torch.randn(4, 200, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = lin(x)
    assert y.dtype == torch.bfloat16
    y.float().square().sum().backward()
    assert lin.weight.grad.dtype == torch.float32 and x.grad.dtype == torch.float32
    assert _rel(y.float(), torch.nn.functional.linear(x, lin.weight, lin.bias)) < 0.1


def test_fp8_experts_match_the_reference_experts_and_train_every_chosen_expert():
    torch.manual_seed(0)
    ref = Experts(6, 160, 72)
    for p in ref.parameters():
        torch.nn.init.normal_(p, std=0.05)
    fp8 = Experts(6, 160, 72)
    fp8.load_state_dict(ref.state_dict())
    fp8.__class__ = Fp8Experts
    x = torch.randn(40, 160)
    idx = torch.stack([torch.randperm(5)[:2] for _ in range(40)])  # expert 5 is never chosen
    w = torch.rand(40, 2)
    (y_ref, counts_ref), (y, counts) = ref(x, idx, w), fp8(x, idx, w)
    assert torch.equal(counts, counts_ref)
    assert _rel(y, y_ref) < 0.1
    (y * y_ref.detach()).sum().backward()
    (y_ref * y_ref.detach()).sum().backward()
    for p8, p in zip(fp8.parameters(), ref.parameters()):
        assert p8.grad.isfinite().all() and _rel(p8.grad[:5], p.grad[:5]) < 0.15
        assert not p8.grad[5].any()
    # one expert alone is the FP8 SwiGLU of its rows
    rows = (idx == 0).any(-1)
    g = torch.where(idx[rows] == 0, w[rows], 0).sum(-1, keepdim=True)
    xe = x[rows]
    h = torch.nn.functional.silu(fp8_linear(xe, fp8.gate_proj[0])) * fp8_linear(xe, fp8.up_proj[0])
    only0 = fp8(x[rows], torch.zeros(int(rows.sum()), 1, dtype=torch.long), g)[0]
    assert torch.allclose(only0, fp8_linear(h, fp8.down_proj[0]) * g, rtol=1e-6, atol=1e-7)


def test_apply_fp8_keeps_the_papers_high_precision_parts_and_every_parameter():
    torch.manual_seed(0)
    model = Transformer(get_preset("tiny").replace(**SMALL))
    speedup(model, for_="train")
    params = {name: id(p) for name, p in model.named_parameters()}
    summary = apply_fp8(model)
    speedup(model, for_="train")  # again: must not put the fast MLP (which bypasses the Linears) back
    assert {name: id(p) for name, p in model.named_parameters()} == params
    assert summary.startswith("fp8 (emulated: ")
    kinds = {name: type(m) for name, m in model.named_modules()}
    assert kinds["lm_head"] is not Fp8Linear and not isinstance(model.embed_tokens, Fp8Linear)
    assert kinds["layers.1.mlp.experts"] is Fp8Experts and kinds["layers.0.mlp"] is Fp8MLP
    assert kinds["layers.1.mlp.shared_experts"] is Fp8MLP and kinds["mtp.0.eh_proj"] is Fp8Linear
    for name in ("self_attn.q_a_proj", "self_attn.q_b_proj", "self_attn.kv_a_proj_with_mqa", "self_attn.kv_b_proj",
                 "self_attn.o_proj", "mlp.shared_experts.down_proj"):
        assert kinds[f"layers.1.{name}"] is Fp8Linear, name
    linears = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    assert [n for n in linears if kinds[n] is not Fp8Linear] == ["lm_head"]
    # the router, norms and attention are not Linears: no FP8 class, their parameters untouched
    assert not any("gate." in n or "norm" in n for n, m in model.named_modules() if type(m) in (Fp8Linear, Fp8Experts))


def test_fp8_training_loss_falls(tmp_path, capsys):
    torch.manual_seed(0)
    model = Transformer(get_preset("tiny").replace(**SMALL))

    def batches():  # counting sequences mod 64 from random starts: learnable, never the same batch twice
        g = torch.Generator().manual_seed(1)
        while True:
            seq = (torch.randint(0, 64, (8, 1), generator=g) + torch.arange(65)) % 64
            yield {"input_ids": seq[:, :-1], "targets": seq[:, 1:]}

    opts = TrainOptions(steps=25, batch_size=8, seq_len=64, warmup_steps=3, lr=3e-3, dtype="fp32", device="cpu",
                        precision="fp8", progress=False, save_every=0)
    trainer = Trainer(model, opts, batches(), tmp_path)
    assert "precision: fp8 (emulated: " in capsys.readouterr().out
    assert isinstance(trainer.model.layers[1].mlp.experts, Fp8Experts)
    losses = [trainer.train_step()["lm_loss"] for _ in range(opts.steps)]
    assert all(math.isfinite(v) for v in losses)
    assert sum(losses[-5:]) / 5 < 0.7 * sum(losses[:5]) / 5


def test_precision_rejects_unknown_values(tmp_path):
    model = Transformer(get_preset("tiny").replace(**SMALL))
    with pytest.raises(ValueError, match="precision must be"):
        Trainer(model, TrainOptions(precision="fp4", device="cpu", dtype="fp32", progress=False), iter(()), tmp_path)


# ---------------------------------------------------------------------- export
@pytest.fixture(scope="module")
def fp8_export(tmp_path_factory):
    """The tiny preset (dims 256, 768 and partial blocks: kv_a's 80 rows, kv_b's 64 columns) saved as FP8, and the
    model with its FP8 weights replaced by their dequantized values (what the checkpoint holds)."""
    torch.manual_seed(0)
    model = Transformer(get_preset("tiny")).eval()
    path = save_fp8_pretrained(model, tmp_path_factory.mktemp("fp8") / "model")
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (torch.nn.Linear, Experts)) and m is not model.lm_head:
                for p in m.parameters(recurse=False):
                    if p.ndim >= 2:
                        p.copy_(dequantize_blocks(*quantize_blocks(p)))
    return path, model


def test_fp8_export_layout(fp8_export):
    from safetensors import safe_open

    path, model = fp8_export
    conf = json.loads((path / "config.json").read_text())
    assert conf["quantization_config"] == {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                           "weight_block_size": [128, 128]} == QUANTIZATION_CONFIG
    quantized = fp8_checkpoint_names(model)
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        for k in keys - {n + "_scale_inv" for n in quantized}:
            dtype = f.get_slice(k).get_dtype()
            assert (dtype == "F8_E4M3") == (k in quantized), k
        for k in quantized:
            n, kk = f.get_slice(k).get_shape()
            assert f.get_slice(k + "_scale_inv").get_shape() == [math.ceil(n / 128), math.ceil(kk / 128)]
            assert f.get_slice(k + "_scale_inv").get_dtype() == "F32"
    assert "model.layers.1.mlp.experts.15.down_proj.weight" in quantized
    assert "model.layers.4.self_attn.kv_b_proj.weight" in quantized  # the MTP block's, too
    assert "model.layers.4.eh_proj.weight" in quantized  # a Linear of the MTP module
    for kept in ("model.embed_tokens.weight", "lm_head.weight", "model.layers.1.mlp.gate.weight",
                 "model.norm.weight", "model.layers.1.self_attn.kv_a_layernorm.weight"):
        assert kept in keys and kept not in quantized, kept


def test_fp8_export_loads_back_as_the_dequantized_model(fp8_export):
    path, model = fp8_export
    loaded = from_pretrained(path)
    ids = torch.randint(0, model.config.vocab_size, (2, 40))
    with torch.no_grad():
        assert torch.equal(loaded(ids), model(ids))
    assert torch.equal(loaded.mtp[0].eh_proj.weight, model.mtp[0].eh_proj.weight)


def test_transformers_loads_the_fp8_export(fp8_export):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate", reason="transformers' FP8 loading needs accelerate")
    path, model = fp8_export
    # on a CPU transformers dequantizes the e4m3 blocks into plain Linears (its FP8 kernels need a GPU)
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ids = torch.randint(0, model.config.vocab_size, (2, 40))
    with torch.no_grad():
        assert (hf(ids).logits - model(ids)).abs().max() < 1e-5
