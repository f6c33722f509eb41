"""RMSNorm, rotary embedding on adjacent pairs (+ YaRN), SwiGLU MLP."""

from __future__ import annotations

import math
import os
import time
import warnings
import weakref
from typing import Callable, TypeVar

import torch
import torch.nn.functional as F
from torch import nn

from nanoseek.model.config import ModelConfig, yarn_get_mscale


class RMSNorm(nn.Module):
    # Training on fp32 tensors of at most this many elements (outside autocast) takes autograd through
    # F.rms_norm: below it, RMSNormFunction's Python forward and backward cost more than the ops they
    # save (the GRPO update of `tiny`, 3 groups x 8 x 32 tokens: forward+backward 40.4 -> 37.2 ms and
    # 41.5 -> 39.3 in paired runs; at 8 groups, ~150K elements a norm, the two were equal).
    SMALL = 1 << 16

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (torch.is_grad_enabled() and self.weight.dtype == torch.float32 and x.dtype in (torch.float32, torch.bfloat16)
                and not (x.numel() <= self.SMALL and x.dtype == torch.float32
                         and not torch.is_autocast_enabled(x.device.type))):
            # training (fp32 master weight, also under autocast): the same forward, a leaner backward.
            # Under autocast the output is the autocast dtype: every reader is a matmul that would cast
            # it anyway, once per weight (q and kv, each expert's w1 and w3), and autograd would cast
            # each of their gradients back to fp32 (small, bf16 autocast: 0.17 s of a 3.9 s step).
            # The MoE sums its expert outputs in fp32 itself (see Experts.forward_grouped).
            out = x.dtype
            if torch.is_autocast_enabled(x.device.type):
                out = torch.get_autocast_dtype(x.device.type)
            return RMSNormFunction.apply(x, self.weight, self.eps, out)
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
        D = x.shape[-1]
        R = RMSNormFunction._rows(x)
        if x.numel() <= R * D:
            y = F.rms_norm(x.to(acc), (D,), weight.to(acc), eps=eps)
            return y if out_dtype is None or out_dtype == y.dtype else y.to(out_dtype)
        # row blocks, as the backward: F.rms_norm on CPU is five passes with whole-size fp32 temporaries;
        # each row's numbers are the same whatever the block
        x2, w = x.reshape(-1, D), weight.to(acc)
        y = torch.empty(x2.shape, dtype=out_dtype or acc, device=x.device)
        for r0 in range(0, x2.shape[0], R):
            y[r0:r0 + R] = F.rms_norm(x2[r0:r0 + R].to(acc), (D,), w, eps=eps)
        return y.view(x.shape)

    # forward and backward run over row blocks of about this many elements: the fp32 temporaries stay
    # in cache (whole-tensor ones were 8 MB each for the residual norms of `small` at 8 x 512, fresh
    # per call; one thread: forward 7.2 -> 4.1 ms, backward 13 -> 5 ms). Already at 2 blocks the blocks
    # win (fwd+bwd of (2, 512, 512), one thread: 2.0 vs 4.5-6 ms; (4, 512, 512), a thread's half of the
    # `small` batch under the CPU split: 3.5 vs 4.5-11 ms); a tensor of one block runs whole.
    BLOCK_ELEMS = 2**18

    @staticmethod
    def _rows(x: torch.Tensor) -> int:
        D = x.shape[-1]
        if x.numel() <= RMSNormFunction.BLOCK_ELEMS:
            return max(1, x.numel() // D)
        return max(1, RMSNormFunction.BLOCK_ELEMS // D)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        x_in, weight = ctx.saved_tensors
        acc = torch.promote_types(x_in.dtype, weight.dtype)
        D = x_in.shape[-1]
        x2, g2 = x_in.reshape(-1, D), g.reshape(-1, D)                   # (N, D)
        w = weight.to(acc)
        dx = torch.empty(x2.shape, dtype=x_in.dtype, device=x_in.device)
        dweight = torch.zeros(D, dtype=acc, device=x_in.device)
        R = RMSNormFunction._rows(x_in)
        for r0 in range(0, x2.shape[0], R):
            x, gb = x2[r0:r0 + R].to(acc), g2[r0:r0 + R].to(acc)         # views when already acc: read only
            rstd = torch.linalg.vector_norm(x, dim=-1, keepdim=True).square_().div_(D).add_(ctx.eps).rsqrt_()  # (R, 1)
            gw = gb * w
            c = torch.linalg.vecdot(gw, x).unsqueeze_(-1).mul_(rstd.pow(3)).div_(D)   # (R, 1) rstd^3 mean(g_w x)
            dweight += (gb * x).mul_(rstd).sum(0)                          # (D,)
            dx[r0:r0 + R] = gw.mul_(rstd).addcmul_(x, c, value=-1)
        return dx.view(x_in.shape), dweight.to(weight.dtype), None, None


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


# --- decode-time linears
# A decode step multiplies a handful of rows by every weight once. On CPU it costs the weight stream
# plus a fixed cost per matmul call, and both depend on how the library is called (see `linear`).
_DERIVED: dict[tuple, tuple] = {}
_T = TypeVar("_T")
# The copies `derived` keeps are about as large as the weights they come from (an fp32 copy of bf16
# weights twice). Past this many bytes of them no new copy is made and the callers take their plain
# paths: a model that fills the machine's memory is never doubled by its decode caches.
DERIVED_MAX_BYTES = 4 << 30
_derived_bytes = 0


def derived(weights: tuple[torch.Tensor, ...], tag: str, make: Callable[..., _T]) -> _T | None:
    """`make(*weights)` (a repacked, concatenated or transposed copy) computed once and reused while
    the weights stay the same. An entry is keyed by the weights' addresses and layouts and checked
    against their base tensors (weakrefs: a new tensor at a freed address never matches) and versions
    (an in-place update such as an optimizer step makes a fresh copy). Entries go when a base is freed.
    None when a new copy would pass DERIVED_MAX_BYTES. Inference only: nothing here is differentiable."""
    global _derived_bytes
    if len(weights) == 1:
        w = weights[0]
        key = (tag, w.data_ptr(), w.shape, w.stride())
    else:
        key = (tag, *[(w.data_ptr(), w.shape, w.stride()) for w in weights])
    hit = _DERIVED.get(key)
    if hit is not None:
        refs, versions, value, nbytes = hit
        for r, v, w in zip(refs, versions, weights):
            if r() is not (w if w._base is None else w._base) or w._version != v:
                break
        else:
            return value
        del _DERIVED[key]
        _derived_bytes -= nbytes
    nbytes = sum(w.numel() * w.element_size() for w in weights)
    if _derived_bytes + nbytes > DERIVED_MAX_BYTES:
        return None
    value = make(*weights)
    _DERIVED[key] = (tuple(weakref.ref(w if w._base is None else w._base, _drop_derived) for w in weights),
                     tuple(w._version for w in weights), value, nbytes)
    _derived_bytes += nbytes
    return value


def _drop_derived(ref: weakref.ref) -> None:
    global _derived_bytes
    for k in [k for k, hit in _DERIVED.items() if any(r is ref for r in hit[0])]:
        _derived_bytes -= _DERIVED.pop(k)[3]


def _onednn_pack(*weights: torch.Tensor) -> torch.Tensor:
    w = weights[0] if len(weights) == 1 else torch.cat(weights)
    return torch.ops.mkldnn._reorder_linear_weight(w.contiguous(), 1)


def _fp16_pack(*weights: torch.Tensor) -> torch.Tensor | None:
    """FBGEMM's fp16 GEMV format, for one bf16 row: it streams the weight faster than oneDNN's bf16
    kernel (cold weights, one thread: 3072x512 234 -> 128 us, the 8192x512 head 497 -> 321 us). fp16
    holds every bf16 value of magnitude 2^-14 .. 65504 exactly (its mantissa is wider); smaller ones
    round to a multiple of 2^-24, an error under 3e-8, far below the bf16 rounding of the output. A
    weight with larger errors (a value over fp16's range) is not packed: None, oneDNN runs it."""
    w = (weights[0] if len(weights) == 1 else torch.cat(weights)).float()
    if (w.half().float() - w).abs().max().item() > 2.0**-25:
        return None
    global _fp16_quiet
    if _fp16_quiet:
        return _FP16_PACK(w)
    with warnings.catch_warnings():     # torch's once-per-process deprecation notices (see fp16_gemv)
        warnings.simplefilter("ignore")
        packed = _FP16_PACK(w)
        fp16_gemv(w.new_zeros(1, w.shape[1]), packed)
    _fp16_quiet = True
    return packed


def fp16_gemv(x: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
    """x (rows, in) fp32 times a `_fp16_pack`ed weight -> (rows, out) fp32, fp32 accumulation."""
    return _FP16_LINEAR(x, packed, None)


# FBGEMM's fp16 GEMV through torch's plain functions: the kernel of torch.ops.quantized.linear_dynamic_fp16
# (and its format), ~2 us a call from Python instead of ~12 (torch.ops resolves and converts its
# arguments on every call; a one-row decode step makes ~70 calls). torch marks these functions
# deprecated: without them the quantized op runs.
_FP16_GEMV = "fbgemm" in torch.backends.quantized.supported_engines
if _FP16_GEMV and hasattr(torch, "fbgemm_linear_fp16_weight_fp32_activation"):
    _FP16_PACK, _FP16_LINEAR = torch.fbgemm_pack_gemm_matrix_fp16, torch.fbgemm_linear_fp16_weight_fp32_activation
elif _FP16_GEMV and hasattr(torch.ops.quantized, "linear_dynamic_fp16"):
    _FP16_PACK = lambda w: torch.ops.quantized.linear_prepack_fp16(w, None)          # noqa: E731
    _FP16_LINEAR = lambda x, packed, bias: torch.ops.quantized.linear_dynamic_fp16(x, packed)   # noqa: E731
else:
    _FP16_GEMV = False
_fp16_quiet = False


# oneDNN's linear on a weight reordered once into its blocked layout. F.linear in bf16 reorders it on
# every call (small preset, one thread, 1 row, cold weights: the 8192x512 head 930 -> 540 us,
# 384x512 61 -> 44 us).
_ONEDNN = (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
           and hasattr(torch.ops.mkldnn, "_reorder_linear_weight"))
PACKED_MAX_ROWS = 64
# FBGEMM's fp16 kernel streams the weight once for a few rows too, and beats oneDNN's bf16 one up to
# about 4 (one thread, cold weights, 384x512: 1 row 24 vs 50 us, 4 rows 34 vs 54, 16 rows 78 vs 66):
# a batch's MoE experts mostly see 1-4 of its rows each.
FP16_MAX_ROWS = 4


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear, faster for a few rows on CPU without autograd (decoding), the same dot products
    summed in another order:

    - fp32, 1-8 rows, where this CPU runs it faster (`tall_mm_is_faster`, measured once): y^T = W x^T.
      On some CPUs MKL's sgemm for y = x W^T with a handful of rows streams W 2-4x slower than the
      same product with W as the tall operand, and one row passed twice beats its gemv (AVX-512 VM,
      small preset, one thread: the 8192x512 head 1.7 -> 0.8 ms at 1 row, 3.4 -> 0.8 ms at 2); on
      others (an AMX Xeon VM) it is the tall form that is 2-4x slower. The result is a strided view.
    - bf16, up to FP16_MAX_ROWS rows: FBGEMM's fp16 GEMV on the weight packed once (`derived`,
      `_fp16_pack`), the rows widened to fp32 exactly, fp32 accumulation, one rounding of the result to
      bf16 (as F.linear).
    - bf16, up to PACKED_MAX_ROWS rows: oneDNN with the weight packed once.
    """
    return linears(x, (weight,), (bias,))[0]


def linears(x: torch.Tensor, weights: tuple[torch.Tensor, ...], biases: tuple | None = None,
            ) -> list[torch.Tensor]:
    """`linear` of one input by several weights (q and kv projections, an expert's w1 and w3): the
    transposed operand of the fp32 case is made once; in bf16 the weights are packed together and
    run as one matmul."""
    if torch.is_grad_enabled() or x.device.type != "cpu" or x.dim() == 0:
        return [F.linear(x, w, b) for w, b in zip(weights, biases or (None,) * len(weights))]
    d = x.shape[-1]
    n = x.numel() // d
    dt = x.dtype
    packed = None
    if dt == torch.bfloat16 and 0 < n <= FP16_MAX_ROWS and _FP16_GEMV and _all_dtype(weights, dt):
        packed = derived(weights, "fp16", _fp16_pack)       # None where fp16 cannot hold the weights
    if packed is not None:
        y = fp16_gemv(x.reshape(n, d).float(), packed).to(dt)                 # (n, sum of outs)
        outs = (y,) if len(weights) == 1 else y.split([w.shape[0] for w in weights], dim=-1)
    elif (dt == torch.bfloat16 and 0 < n <= PACKED_MAX_ROWS and _ONEDNN and _all_dtype(weights, dt)
          and (onednn := derived(weights, "onednn", _onednn_pack)) is not None):
        y = torch.ops.mkldnn._linear_pointwise(x.view(n, d) if x.is_contiguous() else x.reshape(n, d),
                                               onednn, None, "none", [], "")
        outs = (y,) if len(weights) == 1 else y.split([w.shape[0] for w in weights], dim=-1)   # (n, out) each
    elif dt == torch.float32 and 0 < n <= 8 and _all_dtype(weights, dt) and tall_mm_is_faster():
        outs = tall_mm(x if x.dim() == 2 else x.reshape(n, d), weights)
    else:
        return [F.linear(x, w, b) for w, b in zip(weights, biases or (None,) * len(weights))]
    lead = x.shape[:-1]
    if biases is None or all(b is None for b in biases):
        return [y.view(*lead, w.shape[0]) for y, w in zip(outs, weights)]
    return [(y if b is None else y + b).view(*lead, w.shape[0]) for y, w, b in zip(outs, weights, biases)]


def onednn_cpu(t: torch.Tensor) -> bool:
    """A 16-bit CPU tensor: its matmuls go through oneDNN (fp32/fp64 ones through MKL), whose kernels
    want whole contiguous operands and pay per call and per shape."""
    return t.device.type == "cpu" and t.dtype in (torch.bfloat16, torch.float16)


_TALL_FASTER: bool | None = None


def tall_mm_is_faster() -> bool:
    """Whether `tall_mm` beats F.linear for a few fp32 rows on this CPU, measured once per process
    (10-25 ms): which of the two MKL streams a weight faster differs between CPUs by 2-4x either way.
    NANOSEEK_TALL_MM=0/1 decides it instead."""
    global _TALL_FASTER
    if _TALL_FASTER is None:
        env = os.environ.get("NANOSEEK_TALL_MM")
        if env in ("0", "1"):
            _TALL_FASTER = env == "1"
        else:
            with torch.no_grad():
                g = torch.Generator().manual_seed(0)
                ws = [torch.randn(1536, 512, generator=g) for _ in range(4)]    # 12 MB: past a core's L2
                x = torch.randn(1, 512, generator=g)
                forms = (lambda w: F.linear(x, w), lambda w: tall_mm(x, (w,)))
                best = [float("inf"), float("inf")]
                for _ in range(3):
                    for i, f in enumerate(forms):
                        t = time.perf_counter()
                        for w in ws:
                            f(w)
                        best[i] = min(best[i], time.perf_counter() - t)
            _TALL_FASTER = best[1] < best[0]
    return _TALL_FASTER


def tall_mm(x2: torch.Tensor, weights) -> list[torch.Tensor]:
    """x2 (n, in) fp32, a few rows -> [x2 W^T for each W] as (W x2^T)^T, MKL's fast case (see `linear`).
    One row is passed twice, (2, in) contiguous, and column 0 of the (out, 2) product is the answer;
    more rows: contiguous rows (x2^T a transposed view), a row-major x2^T is not. Results are strided
    views: (out,) for one row, (n, out) for more."""
    n = x2.shape[0]
    xt = (torch.cat([x2, x2]) if n == 1 else x2.contiguous()).t()
    outs = [torch.mm(w, xt) for w in weights]
    return [y.select(1, 0) for y in outs] if n == 1 else [y.t() for y in outs]


def _all_dtype(weights: tuple[torch.Tensor, ...], dtype: torch.dtype) -> bool:
    for w in weights:
        if w.dtype != dtype:
            return False
    return True


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
