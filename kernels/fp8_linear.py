"""A linear layer whose three matmuls run in fp8, for the LM head (opt-in): y = x @ w.T with x and w
cast to float8_e4m3fn and the gradient dy to float8_e5m2, each with one scale per tensor taken
from its absolute maximum (dynamic scaling), multiplied through torch._scaled_mm.

Math, for a tensor a and an fp8 format whose largest finite value is M (e4m3: 448, e5m2: 57344):
    s_a = max|a| / M  (1 when a is all zeros),   a8 = fp8(a / s_a),   a ~= s_a * a8
    forward   y  = s_x s_w (x8 @ w8.T)             x (N, C), w (V, C), y (N, V) in out_dtype
    backward  g8 = e5m2(dy / s_g)
              dx = s_g s_w (g8 @ w8)                (N, C), in x's dtype
              dw = s_g s_x (g8.T @ x8)              (V, C), accumulated and returned in fp32,
                                                    then cast to w's dtype
e4m3 (3 mantissa bits) holds values, e5m2 (2 mantissa bits, 5 exponent bits) gradients, whose
range is wider (Micikevicius et al. 2022, "FP8 Formats for Deep Learning"): a relative rounding
error of up to 2^-4 and 2^-3 per element, which the fp32 accumulation over C or N averages down.
The forward accumulates in Hopper's fast fp8 mode (as torchao and modded-nanogpt do), the
gradients in full fp32.

Layouts: torch._scaled_mm on CUDA takes A row-major and B column-major, every dimension a
multiple of 16. w8.T is column-major as it stands; the backward needs w8 and x8 column-major and
g8.T row-major, so each is copied transposed once (under torch.compile the copy is fused into
the cast that makes it).

Bytes beyond the matmuls: each scale is one read of its tensor (the (N, V) gradient's is the
largest: 1.65 GB at GPT-2 124M, batch 16 x 1024, in bf16), each cast one read and a write of
one byte an element. The matmuls run at up to twice the bf16 rate.

Where: CUDA GPUs of compute capability 8.9 (Ada) and 9.0 (Hopper) multiply fp8 natively; a CPU
computes torch._scaled_mm in software (slow: for tests and references).

References: NVIDIA Transformer Engine and torchao.float8 (tensorwise dynamic scaling);
modded-nanogpt's fp8 LM head (static scales).
"""

from __future__ import annotations

import torch
from torch import Tensor

E4M3 = torch.float8_e4m3fn
E5M2 = torch.float8_e5m2
# torch._scaled_mm's shape rule on CUDA: every dimension a multiple of this.
SHAPE_MULTIPLE = 16
# The first CUDA architecture with fp8 tensor cores (Ada, sm_89); Hopper is 9.0.
MIN_CAPABILITY = (8, 9)


def fp8_unsupported_reason(device_type: str, capability: tuple[int, int] | None = None, name: str = "") -> str | None:
    """Why fp8 matmuls cannot run on this device, or None when they can: CUDA of compute
    capability 8.9 or newer, or the CPU (in software)."""
    if device_type == "cpu":
        return None
    if device_type != "cuda":
        return f"fp8 matmuls run on CUDA GPUs of compute capability 8.9+ (or the CPU), not on {device_type}"
    if capability is None or tuple(capability) < MIN_CAPABILITY:
        return (f"{name or 'this GPU'} has compute capability {capability}; fp8 matmuls need "
                f"{MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]} or newer (Ada, Hopper)")
    return None


def check_shapes(n_rows: int, n_in: int, n_out: int) -> None:
    """ValueError naming the dimensions that torch._scaled_mm cannot take."""
    bad = {name: n for name, n in (("rows", n_rows), ("in_features", n_in), ("out_features", n_out))
           if n % SHAPE_MULTIPLE}
    if bad:
        listed = ", ".join(f"{name} {n}" for name, n in bad.items())
        raise ValueError(f"fp8_linear: {listed} must be multiples of {SHAPE_MULTIPLE} (torch._scaled_mm)")


def to_fp8(t: Tensor, fp8_dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """(t8, scale): t / scale in fp8_dtype, contiguous, and the () fp32 scale with t ~= scale * t8."""
    largest = torch.finfo(fp8_dtype).max
    amax = t.abs().amax().float()
    scale = torch.where(amax > 0, amax / largest, 1.0)
    # Multiplied in t's dtype (its own width, not an fp32 copy of the (N, V) gradient); the clamp
    # catches a quotient that rounds past the largest finite value, which e4m3fn would make NaN.
    t8 = (t * scale.reciprocal()).clamp(-largest, largest).to(fp8_dtype)
    return t8.contiguous(), scale


def _column_major(t8: Tensor) -> Tensor:
    """The same matrix stored column by column."""
    return t8.t().contiguous().t()


class _Fp8Linear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, w: Tensor, out_dtype: torch.dtype) -> Tensor:
        x8, sx = to_fp8(x, E4M3)
        w8, sw = to_fp8(w, E4M3)
        y = torch._scaled_mm(x8, w8.t(), scale_a=sx, scale_b=sw, out_dtype=out_dtype, use_fast_accum=True)
        ctx.save_for_backward(x8, w8, sx, sw)
        ctx.dtypes = (x.dtype, w.dtype)
        return y

    @staticmethod
    def backward(ctx, dy: Tensor):
        x8, w8, sx, sw = ctx.saved_tensors
        g8, sg = to_fp8(dy, E5M2)
        dx = dw = None
        if ctx.needs_input_grad[0]:
            dx = torch._scaled_mm(g8, _column_major(w8), scale_a=sg, scale_b=sw, out_dtype=ctx.dtypes[0])
        if ctx.needs_input_grad[1]:
            dw = torch._scaled_mm(g8.t().contiguous(), _column_major(x8), scale_a=sg, scale_b=sx,
                                  out_dtype=torch.float32).to(ctx.dtypes[1])
        return dx, dw, None


def fp8_linear(x: Tensor, weight: Tensor, out_dtype: torch.dtype | None = None) -> Tensor:
    """x (N, C) @ weight (V, C).T with the matmuls in fp8 (see the module docstring), returned in
    out_dtype (default: x's dtype); differentiable in x and weight. N, C and V must be multiples
    of 16."""
    if x.dim() != 2 or weight.dim() != 2 or x.shape[1] != weight.shape[1]:
        raise ValueError(f"fp8_linear: x {tuple(x.shape)} must be (N, C) and weight {tuple(weight.shape)} (V, C)")
    check_shapes(x.shape[0], x.shape[1], weight.shape[0])
    return _Fp8Linear.apply(x, weight, out_dtype or x.dtype)


def fp8_linear_reference(x: Tensor, weight: Tensor) -> Tensor:
    """The forward in fp32 from the same fp8 values: what fp8_linear computes, up to the order
    of the fp32 (or fast fp8) accumulation."""
    x8, sx = to_fp8(x, E4M3)
    w8, sw = to_fp8(weight, E4M3)
    return (x8.float() * sx) @ (w8.float() * sw).t()
