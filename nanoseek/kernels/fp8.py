"""FP8 mixed precision as DeepSeek-V3 trains (V3 report §3.3): e4m3 everywhere, fine-grained scales.

    activations   1×128 tiles (per token, per 128 channels)     scale = tile amax / 448
    weights       128×128 blocks                                 scale = block amax / 448
    GEMM          y = sum over 128-wide K chunks c of (x_c @ w_c^T) · sx_c ⊗ sw_c, in fp32

The sum over chunks is V3's "promotion": each chunk's partial product is scaled and added to an fp32
accumulator, so a scale only ever covers 128 products. Within a chunk this accumulates in fp32 (H800
tensor cores keep ~14 bits there; the paper's reason for promoting at all). An all-zero tile gets
scale 1 (any scale gives zeros). A dimension that is not a multiple of 128 ends in a partial tile /
block: logically zero-padded, its scale is the amax of its real elements, and no padding is stored.

Backward (`Fp8Linear`) follows the paper's figure 6: dgrad dx = dy @ W takes dy in 1×128 tiles
along the output channels and the same 128×128 weight blocks; wgrad dW = dy^T @ x takes both
operands in 128×1 tiles along the tokens (the reduction axis). x is kept for backward quantized (its
forward 1×128 tiles) and re-quantized along the tokens there, as V3 caches it in FP8. The master weights
stay in their own dtype and receive dW directly: gradients pass straight through the rounding.

What `apply_fp8` leaves in high precision, as the paper does: the embedding, the output head, the
MoE router (`Gate` is not a Linear), the norms and the attention operators (scores, softmax, the
value bmm); every other Linear (attention projections, dense / shared-expert MLPs, MTP's eh_proj)
and the routed experts' stacked weights (each expert in its own 128×128 blocks) run in FP8.

The GEMM runs on torch._scaled_mm where it runs on CUDA; elsewhere it is emulated: the e4m3 values
held in fp32 (rounded by `round_e4m3`, bit for bit the float8 cast), one fp32 matmul per chunk (e4m3
products are exact in fp32), scaled and accumulated. torch._scaled_mm also runs on CPUs, where no
FP8 unit exists and it is slower than the emulation.
"""
from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import nn

from nanoseek.kernels.compute_dtype import compute_dtype
from nanoseek.kernels.expert_ffn import FastMLP
from nanoseek.kernels.experts import FastExperts
from nanoseek.model.moe import MLP, Experts

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0  # largest finite e4m3 value
TILE = 128       # tile length / block side, and the promotion interval along K


# ---------------------------------------------------------------------- quantization
def _scale(amax: torch.Tensor) -> torch.Tensor:
    return torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))


def round_e4m3(r: torch.Tensor) -> torch.Tensor:
    """r fp32 with |r| <= 448 -> the nearest e4m3 value (ties to even), still fp32: bit for bit
    r.to(float8_e4m3fn).float() without that round trip, the slower of the two on a CPU. Adding
    and subtracting c = 1.5 · 2^23 · ulp(r) makes the fp32 adder round r to a multiple of the e4m3
    ulp, which is 2^(exponent - 3) (3 mantissa bits), and 2^-9 for the subnormals below 2^-6."""
    exponent_bits = r.view(torch.int32) & 0x7F800000
    c = exponent_bits.add_(20 << 23).clamp_min_((127 - 9 + 23) << 23).view(torch.float32).mul_(1.5)
    return (r + c).sub_(c)


def _quantize(x: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # x / (amax / 448) may round to a hair above 448: clamp rather than rely on the cast's saturation
    r = (x / scale).clamp_(-FP8_MAX, FP8_MAX)
    return r.to(FP8) if dtype == FP8 else round_e4m3(r)


def quantize_tiles(x: torch.Tensor, dtype: torch.dtype = FP8) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., K] -> e4m3 values [..., K], fp32 scales [..., ceil(K/128)]: one per 1×128 tile of
    the last dimension (x ≈ values · scale of their tile). dtype float32 returns the same e4m3
    values held in fp32 (the emulated GEMM's operands: no conversions)."""
    k = x.shape[-1]
    tiles = F.pad(x.float(), (0, -k % TILE)).unflatten(-1, (-1, TILE))  # [..., nK, 128]
    scale = _scale(tiles.abs().amax(-1))
    return _quantize(tiles, scale.unsqueeze(-1), dtype).flatten(-2)[..., :k], scale


def dequantize_tiles(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The inverse of `quantize_tiles`, in fp32."""
    return q.float() * scale.repeat_interleave(TILE, -1)[..., :q.shape[-1]]


def quantize_blocks(w: torch.Tensor, dtype: torch.dtype = FP8) -> tuple[torch.Tensor, torch.Tensor]:
    """w [..., N, K] -> e4m3 values [..., N, K], fp32 scales [..., ceil(N/128), ceil(K/128)]: one
    per 128×128 block of the last two dimensions (DeepSeek-V3's `weight_scale_inv`); dtype as
    for `quantize_tiles`. Its inverse is `hf.load.dequantize_blocks`, which loading FP8 checkpoints uses."""
    n, k = w.shape[-2:]
    padded = F.pad(w.float(), (0, -k % TILE, 0, -n % TILE))
    blocks = padded.unflatten(-1, (-1, TILE)).unflatten(-3, (-1, TILE))  # [..., nN, 128, nK, 128]
    scale = _scale(blocks.abs().amax((-3, -1)))                           # [..., nN, nK]
    q = _quantize(blocks, scale[..., :, None, :, None], dtype).flatten(-2).flatten(-3, -2)
    return q[..., :n, :k], scale


def block_row_scales(scale: torch.Tensor, rows: int) -> torch.Tensor:
    """128×128 block scales [nN, nK] -> each of the `rows` rows' scale per K chunk [rows, nK], the
    per-row form `fp8_gemm` takes for both operands."""
    return scale.repeat_interleave(TILE, 0)[:rows]


# ---------------------------------------------------------------------- GEMM
@functools.cache
def scaled_mm_runs(device: torch.device) -> bool:
    """Whether torch._scaled_mm runs e4m3 with per-row scales and an fp32 result on `device`."""
    try:
        a = torch.ones(16, 32, device=device).to(FP8)
        one = torch.ones(16, 1, device=device)
        torch._scaled_mm(a, a.t(), scale_a=one, scale_b=one.t(), out_dtype=torch.float32)
        return True
    except (RuntimeError, AttributeError, TypeError, NotImplementedError):
        return False


def gemm_backend(device: torch.device) -> str:
    """"scaled_mm" on CUDA where torch._scaled_mm runs, "emulated" elsewhere (module docstring)."""
    return "scaled_mm" if device.type == "cuda" and scaled_mm_runs(device) else "emulated"


def describe_backend(device: torch.device) -> str:
    """What the FP8 GEMMs run on, for the training log."""
    if gemm_backend(device) == "scaled_mm":
        return f"torch._scaled_mm on {device}"
    why = ("no FP8 units on a CPU" if device.type == "cpu"
           else f"torch._scaled_mm does not run on {device}")
    return f"emulated: {why}; e4m3 values, fp32 GEMM per 128-wide K chunk, scaled and accumulated in fp32"


def _pad_fp8(t: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """An e4m3 matrix with `rows` zero rows and `cols` zero columns added, contiguous. Padded as bytes
    (0x00 is +0.0): that needs no float8 kernel on the device."""
    if not (rows or cols):
        return t.contiguous()
    return F.pad(t.view(torch.uint8), (0, cols, 0, rows)).view(FP8)


def _scaled_mm_chunk(a: torch.Tensor, b: torch.Tensor, sa: torch.Tensor, sb: torch.Tensor) -> torch.Tensor:
    """(a @ b^T) · sa ⊗ sb [M, N] fp32 on torch._scaled_mm, whose CUDA kernels want K and N
    multiples of 16 (zero padding adds nothing) and b column-major."""
    m, (n, k) = a.shape[0], b.shape
    a, b = _pad_fp8(a, 0, -k % 16), _pad_fp8(b, -n % 16, -k % 16)
    # fresh unit strides: .contiguous() keeps a size-1 dim's stride, which _scaled_mm rejects
    scale_a = sa.reshape(m, 1).clone(memory_format=torch.contiguous_format)
    scale_b = F.pad(sb, (0, -n % 16), value=1.0).reshape(1, -1).clone(memory_format=torch.contiguous_format)
    return torch._scaled_mm(a, b.t(), scale_a=scale_a, scale_b=scale_b, out_dtype=torch.float32)[:, :n]


def fp8_gemm(a: torch.Tensor, sa: torch.Tensor, b: torch.Tensor, sb: torch.Tensor,
             backend: str = "emulated") -> torch.Tensor:
    """a [M, K], b [N, K] e4m3 with each row's scale per 128-wide K chunk, sa [M, nK], sb [N, nK]
    -> [M, N] fp32 = sum over chunks c, in order, of (a_c @ b_c^T) · sa[:, c] ⊗ sb[:, c].

    backend "emulated": each chunk as an fp32 matmul of the e4m3 values, multiplied by the outer
    product of the two scales and added to the fp32 accumulator; "scaled_mm": each chunk on
    torch._scaled_mm (which applies the scales to its fp32 result) and the same accumulation."""
    if backend not in ("emulated", "scaled_mm"):
        raise ValueError(f"fp8_gemm: backend must be 'emulated' or 'scaled_mm', got {backend!r}")
    (m, k), n = a.shape, b.shape[0]
    out = torch.zeros(m, n, dtype=torch.float32, device=a.device)
    if backend == "emulated":
        a, b = a.float(), b.float()
    for c in range(math.ceil(k / TILE)):
        cols = slice(c * TILE, (c + 1) * TILE)
        if backend == "scaled_mm":
            out += _scaled_mm_chunk(a[:, cols], b[:, cols], sa[:, c], sb[:, c])
        else:
            out.addcmul_(a[:, cols] @ b[:, cols].t(), sa[:, c, None] * sb[None, :, c])
    return out


# ---------------------------------------------------------------------- Linear
class _Fp8Matmul(torch.autograd.Function):
    """x [M, K] @ w [N, K]^T with every GEMM (forward, dgrad, wgrad) in FP8 (module docstring)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor, backend: str) -> torch.Tensor:
        ctx.backend, ctx.dtypes = backend, (x.dtype, w.dtype)
        ctx.fp8 = FP8 if backend == "scaled_mm" else torch.float32
        qx, sx = quantize_tiles(x, ctx.fp8)
        qw, sw = quantize_blocks(w, ctx.fp8)
        ctx.save_for_backward(qx, sx, qw, sw)
        return fp8_gemm(qx, sx, qw, block_row_scales(sw, w.shape[0]), backend)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        qx, sx, qw, sw = ctx.saved_tensors
        need_x, need_w, _ = ctx.needs_input_grad
        dx = dw = None
        if need_x:  # dy [M, N] in 1×128 tiles along N; W^T [K, N] in the same (transposed) blocks
            qdy, sdy = quantize_tiles(dy, ctx.fp8)
            dx = fp8_gemm(qdy, sdy, qw.t(), block_row_scales(sw.t(), qw.shape[1]), ctx.backend).to(ctx.dtypes[0])
        if need_w:  # reduction over the tokens: both operands in 128×1 tiles along them
            qdyt, sdyt = quantize_tiles(dy.t(), ctx.fp8)
            qxt, sxt = quantize_tiles(dequantize_tiles(qx, sx).t(), ctx.fp8)
            dw = fp8_gemm(qdyt, sdyt, qxt, sxt, ctx.backend).to(ctx.dtypes[1])
        return dx, dw, None


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """x [..., K] @ weight [N, K]^T -> [..., N] in `out_dtype` (default x's), through FP8 GEMMs
    (autocast is off inside: the operands' precision is the FP8 scheme's, not autocast's)."""
    backend = gemm_backend(x.device)
    with torch.autocast(x.device.type, enabled=False):
        y = _Fp8Matmul.apply(x.reshape(-1, x.shape[-1]), weight, backend)
    return y.view(*x.shape[:-1], weight.shape[0]).to(out_dtype or x.dtype)


class Fp8Linear(nn.Linear):
    """`nn.Linear` whose forward and backward GEMMs run in FP8 (1×128 activation tiles, 128×128
    weight blocks); same parameters, kept in their own dtype; the bias is added in high precision."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = fp8_linear(x, self.weight, compute_dtype(x))
        return y if self.bias is None else y + self.bias.to(y.dtype)


class Fp8MLP(MLP):
    """`MLP` on its (Fp8Linear) projections: a class of its own so that `speedup`, which swaps exact
    types, does not put back `FastMLP`, whose training path reads the weights past the Linears."""


class Fp8Experts(Experts):
    """Routed experts with each expert's three GEMMs in FP8, its weights in their own 128×128 blocks;
    one expert at a time over the tokens that chose it, as the reference `Experts`."""

    def forward(self, x: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        counts = torch.bincount(idx.flatten(), minlength=self.gate_proj.shape[0])
        dt = compute_dtype(x)
        weights = weights.to(dt)
        y = torch.zeros_like(x, dtype=dt)
        # unbind, not [e]: its backward stacks the experts' gradients once, where indexing would
        # add a full-size zero tensor per expert
        gates, ups, downs = self.gate_proj.unbind(0), self.up_proj.unbind(0), self.down_proj.unbind(0)
        for e in torch.nonzero(counts).flatten().tolist():
            token, slot = torch.where(idx == e)
            xe = x[token]
            h = F.silu(fp8_linear(xe, gates[e], dt)) * fp8_linear(xe, ups[e], dt)
            y.index_add_(0, token, fp8_linear(h, downs[e], dt) * weights[token, slot, None])
        return y, counts


_SWAPS = {nn.Linear: Fp8Linear, Experts: Fp8Experts, FastExperts: Fp8Experts}


def fp8_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The modules whose GEMMs run in FP8 (module docstring): every Linear but the output head, and
    the routed experts."""
    head = getattr(model, "lm_head", None)
    return [(name, m) for name, m in model.named_modules()
            if isinstance(m, (nn.Linear, Experts)) and m is not head]


def apply_fp8(model: nn.Module) -> str:
    """Swap the model's modules in place for their FP8 drop-ins (same parameters, so optimizers,
    checkpoints and saving are unaffected), after `speedup` and before wrapping; modules already
    swapped stay as they are. Returns a summary for the log."""
    chosen = fp8_modules(model)
    for _, m in chosen:
        m.__class__ = _SWAPS.get(type(m), type(m))
    for m in model.modules():
        if type(m) in (MLP, FastMLP):
            m.__class__ = Fp8MLP
    n_linear = sum(isinstance(m, nn.Linear) for _, m in chosen)
    p = next(model.parameters(), None)
    where = describe_backend(p.device if p is not None else torch.device("cpu"))
    return (f"fp8 ({where}); {n_linear} Linear + {len(chosen) - n_linear} routed-expert groups in e4m3; "
            "embedding, lm_head, router, norms, attention in high precision")
