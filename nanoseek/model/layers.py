"""RMSNorm, rotary embedding on adjacent pairs (+ YaRN), SwiGLU MLP."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from nanoseek.model.config import ModelConfig, yarn_get_mscale


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and self.weight.dtype == torch.float32 and x.dtype in (torch.float32, torch.bfloat16):
            # training (fp32 master weight, also under autocast): the same forward, a leaner backward.
            # The output keeps x's dtype: an fp32 residual stream stays fp32 into the MoE gate and dispatch.
            return RMSNormFunction.apply(x, self.weight, self.eps, x.dtype)
        # Normalise in fp32, cast back before the weight (the HF / reference order). F.rms_norm is
        # one fused op instead of five: it matters when decoding runs thousands of small ops per token.
        if x.dtype == self.weight.dtype == torch.float32:   # the same numbers, the weight folded in
            return F.rms_norm(x, (x.shape[-1],), self.weight, eps=self.eps)
        return self.weight * F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)


class RMSNormFunction(torch.autograd.Function):
    """weight * rms_norm(x), computed in fp32 (at least) and returned in `out_dtype`, with a hand-written
    backward: autograd through F.rms_norm runs a dozen full-size ops (3x slower at (8, 512, 512) on
    CPU). With rstd = 1 / rms(x), xhat = x * rstd, g_w = g * weight:
    dx = rstd * (g_w - xhat * mean(g_w * xhat)) = rstd * g_w - x * (rstd^3 * mean(g_w * x)),
    dweight = sum over rows of g * xhat; the second form of dx needs no xhat tensor (8 passes over
    (..., D) instead of 10). x may be bf16 (a bf16 projection's output) and out_dtype bf16 (autocast):
    the gradient comes back in x's dtype, dweight in the weight's."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float,
                out_dtype: torch.dtype | None = None) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.eps = eps
        acc = torch.promote_types(x.dtype, weight.dtype)
        y = F.rms_norm(x.to(acc), (x.shape[-1],), weight.to(acc), eps=eps)
        return y if out_dtype is None or out_dtype == y.dtype else y.to(out_dtype)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        x_in, weight = ctx.saved_tensors
        acc = torch.promote_types(x_in.dtype, weight.dtype)
        x, g = x_in.to(acc), g.to(acc)
        D = x.shape[-1]
        rstd = torch.linalg.vector_norm(x, dim=-1, keepdim=True).square_().div_(D).add_(ctx.eps).rsqrt_()  # (..., 1)
        gw = g * weight.to(acc)
        c = torch.linalg.vecdot(gw, x).unsqueeze(-1).mul_(rstd.pow(3)).div_(D)   # (..., 1) rstd^3 mean(g_w x)
        dweight = (g * x).mul_(rstd).flatten(0, -2).sum(0)               # (D,)
        dx = gw.mul_(rstd).addcmul_(x, c, value=-1)
        return dx.to(x_in.dtype), dweight.to(weight.dtype), None, None


def rope_inv_freq(cfg: ModelConfig) -> tuple[torch.Tensor, float]:
    """Inverse frequencies of the qk_rope_head_dim/2 pairs, with YaRN when configured.

    Returns (inv_freq, attention_factor). attention_factor scales cos/sin:
    mscale(s, mscale) / mscale(s, mscale_all_dim), 1.0 for V3 and V2-Lite.
    """
    dim, base = cfg.qk_rope_head_dim, cfg.rope_theta
    # fp32 exactly as the reference and HF compute it, so angles agree bit for bit
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32, device="cpu") / dim))
    yarn = cfg.yarn
    if yarn is None:
        return inv_freq, 1.0
    factor, orig = yarn["factor"], yarn["original_max_position_embeddings"]

    def correction_dim(num_rotations: float) -> float:
        # d(r) = dim * ln(L_orig / (2 pi r)) / (2 ln base)
        return dim * math.log(orig / (num_rotations * 2 * math.pi)) / (2 * math.log(base))

    low = max(math.floor(correction_dim(yarn["beta_fast"])), 0)
    high = min(math.ceil(correction_dim(yarn["beta_slow"])), dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = ((torch.arange(dim // 2, dtype=torch.float32, device="cpu") - low) / (high - low)).clamp(0, 1)
    # pairs below `low` keep their frequency (extrapolate), above `high` are divided by s (interpolate)
    inv_freq = inv_freq / factor * ramp + inv_freq * (1 - ramp)
    if yarn.get("mscale") and yarn.get("mscale_all_dim"):
        att = yarn_get_mscale(factor, yarn["mscale"]) / yarn_get_mscale(factor, yarn["mscale_all_dim"])
    else:  # HF's rule when either mscale is absent
        att = yarn_get_mscale(factor)
    return inv_freq, att


def rope_cos_sin(inv_freq: torch.Tensor, positions: torch.Tensor, attention_factor: float = 1.0,
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin for integer positions (..., T) -> (..., T, rope/2) each, in fp32."""
    angles = positions.to(torch.float32)[..., None] * inv_freq.to(positions.device)  # (..., T, rope/2)
    return angles.cos() * attention_factor, angles.sin() * attention_factor


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor | None) -> torch.Tensor:
    """Rotate adjacent pairs (x[2i], x[2i+1]) as complex numbers: DeepSeek's released layout.

    x: (B, T, H, rope) or (B, T, rope); cos/sin: (B or 1, T, rope/2). Output keeps the
    interleaved layout (a plain rotate_half RoPE on these weights is silently wrong).
    sin=None: `cos` is already the complex rotation `rope_cis(cos, sin)` (B or 1, T, 1, rope/2), made
    once per forward and shared by the layers (decoding runs on the number of small ops); x is 4-d.
    """
    if sin is None:
        rot = cos
    else:
        if x.dim() == 4:
            cos, sin = cos[:, :, None, :], sin[:, :, None, :]
        rot = torch.complex(cos, sin)
    # complex multiply, as the reference does: one fast kernel instead of strided broadcasts
    xf = x if x.dtype == torch.float32 else x.float()
    xc = torch.view_as_complex(xf.contiguous().unflatten(-1, (-1, 2)))   # (..., rope/2)
    out = torch.view_as_real(xc * rot).flatten(-2)
    return out if out.dtype == x.dtype else out.to(x.dtype)


def rope_cis(cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """cos/sin (B|1, T, rope/2) -> the complex rotation (B|1, T, 1, rope/2) that apply_rope takes as `cos`."""
    return torch.complex(cos, sin)[:, :, None]


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear, except for 1-8 rows of fp32 on CPU without autograd (decoding): there y^T = W x^T.

    MKL's sgemm for y = x W^T with a handful of rows streams W 2-4x slower than the same product
    with W as the tall operand, and one row passed twice beats its gemv (small preset, one thread:
    the 8192x512 head 1.7 -> 0.8 ms at 1 row, 3.4 -> 0.8 ms at 2). The result is a strided view;
    the products are the same dot products (summed in another order).
    """
    return linears(x, (weight,), (bias,))[0]


def linears(x: torch.Tensor, weights: tuple[torch.Tensor, ...], biases: tuple | None = None,
            ) -> list[torch.Tensor]:
    """`linear` of one input by several weights (q and kv projections, an expert's w1 and w3): the
    transposed operand of the decode case is made once."""
    biases = biases or (None,) * len(weights)
    n = x.numel() // x.shape[-1] if x.dim() else 0
    if (not 0 < n <= 8 or torch.is_grad_enabled() or x.device.type != "cpu" or x.dtype != torch.float32
            or any(w.dtype != torch.float32 for w in weights)):
        return [F.linear(x, w, b) for w, b in zip(weights, biases)]
    x2 = x if x.dim() == 2 else x.reshape(n, x.shape[-1])
    # one row: passed twice, (2, in) contiguous, and column 0 of the (out, 2) product is the answer;
    # more rows: contiguous rows (x2^T a transposed view) are MKL's fast case, a row-major x2^T is not
    xt = (torch.cat([x2, x2]) if n == 1 else x2.contiguous()).t()
    outs = []
    for w, b in zip(weights, biases):
        y = torch.mm(w, xt)
        y = y.select(1, 0) if n == 1 else y.t()                          # (out,) or (n, out), strided
        if b is not None:
            y = y + b
        outs.append(y.view(*x.shape[:-1], w.shape[0]))
    return outs


def swiglu(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, w3: torch.Tensor) -> torch.Tensor:
    """w2(silu(w1 x) * w3 x): the dense MLP and every expert (decode-fast `linear`s)."""
    a, b = linears(x, (w1, w3))
    return linear(F.silu(a) * b, w2)


class MLP(nn.Module):
    """SwiGLU feed-forward: w2(silu(w1 x) * w3 x). Used dense and as the shared expert."""

    def __init__(self, dim: int, inter: int):
        super().__init__()
        self.w1 = nn.Linear(dim, inter, bias=False)
        self.w2 = nn.Linear(inter, dim, bias=False)
        self.w3 = nn.Linear(dim, inter, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return swiglu(x, self.w1.weight, self.w2.weight, self.w3.weight)
