"""LayerNorm over the last dimension, and residual-add fused with LayerNorm, in Triton.

Forward, per row x of width N, in fp32 whatever the storage dtype:

    mean = sum_j x_j / N
    var  = sum_j (x_j - mean)^2 / N            (biased, as torch.nn.LayerNorm)
    rstd = 1 / sqrt(var + eps)
    xhat = (x - mean) * rstd
    y    = xhat * w + b                         (b = 0 without bias)

mean and rstd (fp32, one per row) are saved so the backward needs no second reduction over x.

Backward, with g = w * dy per row:

    dx = rstd * (g - sum_j(g_j) / N - xhat * sum_j(g_j * xhat_j) / N)
    dw = sum over rows of dy * xhat             db = sum over rows of dy

dw and db are sums over all M rows: each of G programs (on CUDA, enough for 32 resident warps
an SM; see backward_grid) takes a contiguous group of rows, accumulates its partial sums in fp32
registers and writes one row of a (G, N) buffer; torch sums the G partials afterwards. No
atomics, and the result does not depend on scheduling.

Fused residual add (llm.c's fused_residual_forward; the GPT-2 block `x = x + attn(ln_1(x))`
followed by `ln_2(x)`, x the residual stream and branch = attn(ln_1(x)) the output added to it):
s = x + branch is rounded to the input dtype, written out, and normalized in the same pass, so
the norm sees exactly the s it returns and that the backward rereads:

    s, y = x + branch, layer_norm(x + branch)
    dx = dbranch = ds + (the dx above, for the input s)

ds is the gradient arriving from the next residual add, dy the one through the norm; both
inputs of the add get the same gradient, so the op returns one tensor for both.

Bytes moved per element (e = bytes per input element; weight, bias and statistics are O(N + M)
and left out, as are the G x N fp32 partials of dw/db, small when M >> G):

    layer_norm        forward  read x, write y               2e
                      backward read x, dy, write dx           3e
    add_layer_norm    forward  read x, branch, write s, y     4e
                      backward read s, dy, ds, write dx       4e

e.g. (16384, 768) in bf16: layer_norm forward 50 MB, backward 75 MB.

Limits: a row is held by one program's registers, so N <= fastgpt_kernels.common.MAX_FUSED_BLOCK,
the widest row whose backward compiles for sm_90 without spilling (a ValueError otherwise;
fastgpt.ops sends wider rows to torch); inputs in fp32, bf16 or fp16; weight and bias in any
float dtype (fp32 parameters with bf16 activations under autocast), gradients returned in each
input's own dtype.

References: Ba, Kiros, Hinton, "Layer Normalization" (2016); Triton tutorial 05-layer-norm;
Liger-Kernel ops/layer_norm.py (per-SM partial sums); llm.c (fused residual + LayerNorm).
"""

import functools
from typing import Optional

import torch
import triton
import triton.language as tl

from .common import INTERPRET_PROGRAMS, MAX_FUSED_BLOCK, as_2d, cdiv, next_power_of_2, num_warps_for, on_device

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# The backward's grid on CUDA (see backward_grid): warps an SM to keep busy, and the rows per
# program that bound the program count (at most ceil(M / 8) programs), so that the partial sums
# stay small beside the rows.
BWD_RESIDENT_WARPS = 32
MIN_ROWS_PER_PROGRAM = 8


# ---------------------------------------------------------------------------------------------
# Kernels


@triton.jit
def _layer_norm_fwd_kernel(
    X,  # (M, N) input
    stride_xm,
    BRANCH,  # (M, N) the branch output added to x, read only when HAS_BRANCH
    stride_brm,
    S,  # (M, N) output x + branch, written only when HAS_BRANCH
    stride_sm,
    Y,  # (M, N) output
    stride_ym,
    W,  # (N,) weight
    B,  # (N,) bias, read only when HAS_BIAS
    Mean,  # (M,) fp32 output
    Rstd,  # (M,) fp32 output
    N,  # row width
    eps,
    HAS_BRANCH: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_N: tl.constexpr,  # next power of two >= N
):
    row = tl.program_id(0).to(tl.int64)  # row * stride overflows int32 past 2**31 elements
    cols = tl.arange(0, BLOCK_N)
    mask = cols < N

    x = tl.load(X + row * stride_xm + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_BRANCH:
        br = tl.load(BRANCH + row * stride_brm + cols, mask=mask, other=0.0).to(tl.float32)
        s = (x + br).to(S.dtype.element_ty)  # rounded once, as the stored s the backward rereads
        tl.store(S + row * stride_sm + cols, s, mask=mask)
        x = s.to(tl.float32)

    mean = tl.sum(x, axis=0) / N
    xc = tl.where(mask, x - mean, 0.0)  # padding lanes would add mean^2 each to the variance
    var = tl.sum(xc * xc, axis=0) / N
    rstd = 1.0 / tl.sqrt(var + eps)
    tl.store(Mean + row, mean)
    tl.store(Rstd + row, rstd)

    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    y = xc * rstd * w
    if HAS_BIAS:
        y += tl.load(B + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(Y + row * stride_ym + cols, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _layer_norm_bwd_kernel(
    DY,  # (M, N) gradient of y
    stride_dym,
    DS,  # (M, N) gradient of s (fused op), read only when HAS_DS
    stride_dsm,
    X,  # (M, N) the input that was normalized (x, or s for the fused op)
    stride_xm,
    W,  # (N,) weight
    Mean,  # (M,) fp32, from the forward
    Rstd,  # (M,) fp32, from the forward
    DX,  # (M, N) output
    stride_dxm,
    DW_partial,  # (G, N) fp32 output: this program's sum of dy * xhat over its rows
    stride_dwg,
    DB_partial,  # (G, N) fp32 output: this program's sum of dy, written only when HAS_BIAS
    stride_dbg,
    M,  # rows
    N,  # row width
    rows_per_program,
    HAS_DS: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_N: tl.constexpr,  # next power of two >= N
):
    pid = tl.program_id(0).to(tl.int64)
    row_start = pid * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, M)
    cols = tl.arange(0, BLOCK_N)
    mask = cols < N

    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    dw = tl.zeros((BLOCK_N,), dtype=tl.float32)
    db = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for row in range(row_start, row_end):
        x = tl.load(X + row * stride_xm + cols, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + row * stride_dym + cols, mask=mask, other=0.0).to(tl.float32)
        mean = tl.load(Mean + row)
        rstd = tl.load(Rstd + row)

        # Padding lanes need no mask here: w and dy load as 0 there, so g and every term is 0.
        xhat = (x - mean) * rstd
        g = w * dy
        c1 = tl.sum(xhat * g, axis=0) / N
        c2 = tl.sum(g, axis=0) / N
        dx = (g - (xhat * c1 + c2)) * rstd
        if HAS_DS:
            dx += tl.load(DS + row * stride_dsm + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(DX + row * stride_dxm + cols, dx.to(DX.dtype.element_ty), mask=mask)

        dw += dy * xhat
        if HAS_BIAS:
            db += dy

    tl.store(DW_partial + pid * stride_dwg + cols, dw, mask=mask)
    if HAS_BIAS:
        tl.store(DB_partial + pid * stride_dbg + cols, db, mask=mask)


# ---------------------------------------------------------------------------------------------
# Launchers


def _check_inputs(op: str, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                  branch: Optional[torch.Tensor] = None) -> None:
    """ValueError naming the shapes when the inputs do not fit together or the kernel's limits."""
    n = x.shape[-1] if x.dim() else 0
    if x.dim() == 0 or n == 0:
        raise ValueError(f"{op}: x has shape {tuple(x.shape)}; expected (..., N) with N >= 1")
    if x.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"{op}: x has dtype {x.dtype}; supported: {', '.join(map(str, SUPPORTED_DTYPES))}")
    if n > MAX_FUSED_BLOCK:
        raise ValueError(f"{op}: rows of x {tuple(x.shape)} are {n} wide; one program holds at most "
                         f"MAX_FUSED_BLOCK = {MAX_FUSED_BLOCK} elements")
    if tuple(weight.shape) != (n,):
        raise ValueError(f"{op}: weight has shape {tuple(weight.shape)}; expected ({n},), the last dim of x {tuple(x.shape)}")
    if bias is not None and tuple(bias.shape) != (n,):
        raise ValueError(f"{op}: bias has shape {tuple(bias.shape)}; expected ({n},), the last dim of x {tuple(x.shape)}")
    for name, t in (("weight", weight), ("bias", bias), ("branch", branch)):
        if t is not None and t.device != x.device:
            raise ValueError(f"{op}: {name} is on {t.device}, x on {x.device}")
    if branch is not None and (branch.shape != x.shape or branch.dtype != x.dtype):
        raise ValueError(f"{op}: branch is {tuple(branch.shape)} {branch.dtype}; expected x's "
                         f"{tuple(x.shape)} {x.dtype}")


def _launch_config(n: int) -> tuple[int, int]:
    """(BLOCK_N, num_warps) for rows of width n."""
    block = next_power_of_2(n)
    return block, num_warps_for(block)


@functools.lru_cache(maxsize=None)
def _sm_count(device: torch.device) -> int | None:
    """The device's SM count on CUDA, None elsewhere (read once per device)."""
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else None


def backward_grid(m: int, warps: int, sms: int | None) -> tuple[int, int]:
    """(programs, rows_per_program) for the backward over m rows: each program takes a
    contiguous group of rows, one row at a time, and keeps its dw/db partial sums in registers.

    On CUDA (sms = the SM count): one program per SM (Liger-Kernel's grid) would leave 4 warps an
    SM at GPT-2's width, each waiting on one row's loads at a time. Instead, enough programs for
    BWD_RESIDENT_WARPS warps an SM, registers permitting (32 warps fit an SM's 64K registers at
    <= 64 registers a thread; scripts/compile_check.py prints the kernel's count), so several
    rows are in flight per SM. The price is more partial rows for torch to sum, G x N fp32 for dw and for db:
    at (16384, 768) in bf16 on 132 SMs, G = 1024 and the partials are 6.3 MB written and read
    back, beside the 75 MB the rows move; at most ceil(M / MIN_ROWS_PER_PROGRAM) programs bound them
    for small M (rows are then spread evenly, so a program may take fewer than 8).
    bench/test_bench_layernorm.py times this grid against one program per SM.
    Elsewhere (the interpreter): INTERPRET_PROGRAMS programs, enough to test the reduction."""
    if sms is None:
        programs = min(INTERPRET_PROGRAMS, max(m, 1))
    else:
        programs = max(1, min(sms * max(1, BWD_RESIDENT_WARPS // warps), cdiv(m, MIN_ROWS_PER_PROGRAM)))
    rows_per_program = cdiv(m, programs)
    # Recounted so that no program is left empty.
    return (cdiv(m, rows_per_program) if m > 0 else 1), rows_per_program


def layer_norm_forward(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], eps: float,
                       branch: Optional[torch.Tensor] = None):
    """(s, y, mean, rstd): s = x + branch (None without branch), y = LayerNorm(s or x) in x's
    dtype and shape, mean and rstd fp32 of shape x.shape[:-1]."""
    _check_inputs("add_layer_norm" if branch is not None else "layer_norm", x, weight, bias, branch)
    shape = x.shape
    x2 = as_2d(x)  # (M, N)
    m, n = x2.shape
    weight = weight.contiguous()
    bias = bias.contiguous() if bias is not None else None
    br2 = as_2d(branch) if branch is not None else None
    s2 = torch.empty_like(x2) if branch is not None else None
    y2 = torch.empty_like(x2)
    mean = torch.empty(shape[:-1], dtype=torch.float32, device=x.device)
    rstd = torch.empty(shape[:-1], dtype=torch.float32, device=x.device)
    if m > 0:
        block, warps = _launch_config(n)
        # Absent tensors are never read or written (constexpr flags), any pointer stands in.
        br_arg = br2 if br2 is not None else x2
        s_arg = s2 if s2 is not None else y2
        with on_device(x2):
            _layer_norm_fwd_kernel[(m,)](
                x2, x2.stride(0),
                br_arg, br_arg.stride(0),
                s_arg, s_arg.stride(0),
                y2, y2.stride(0),
                weight,
                bias if bias is not None else weight,
                mean,
                rstd,
                n,
                eps,
                HAS_BRANCH=branch is not None,
                HAS_BIAS=bias is not None,
                BLOCK_N=block,
                num_warps=warps,
            )
    s = s2.view(shape) if s2 is not None else None
    return s, y2.view(shape), mean, rstd


def layer_norm_backward(dy: torch.Tensor, ds: Optional[torch.Tensor], x: torch.Tensor, weight: torch.Tensor,
                        mean: torch.Tensor, rstd: torch.Tensor, has_bias: bool):
    """(dx, dweight, dbias): dx in x's dtype and shape (plus ds when given), dweight and dbias in
    weight's dtype; dbias is an empty tensor when has_bias is False."""
    shape = x.shape
    x2 = as_2d(x)  # (M, N)
    dy2 = as_2d(dy)  # the gradient of y.sum() is a stride-0 view: made dense here
    ds2 = as_2d(ds) if ds is not None else None
    m, n = x2.shape
    if dy2.shape != x2.shape or (ds2 is not None and ds2.shape != x2.shape):
        raise ValueError(f"layer_norm backward: dy {tuple(dy.shape)} and ds "
                         f"{None if ds is None else tuple(ds.shape)} must match x {tuple(shape)}")
    weight = weight.contiguous()
    mean = mean.contiguous()
    rstd = rstd.contiguous()
    dx2 = torch.empty_like(x2)
    block, warps = _launch_config(n)
    programs, rows_per_program = backward_grid(m, warps, _sm_count(x.device))
    # Every program writes its row of partial sums; only with no rows (no launch) must they be 0.
    partial = torch.empty if m > 0 else torch.zeros
    dw_partial = partial((programs, n), dtype=torch.float32, device=x.device)
    db_partial = partial((programs, n), dtype=torch.float32, device=x.device) if has_bias else None
    if m > 0:
        ds_arg = ds2 if ds2 is not None else dy2
        db_arg = db_partial if db_partial is not None else dw_partial
        with on_device(x2):
            _layer_norm_bwd_kernel[(programs,)](
                dy2, dy2.stride(0),
                ds_arg, ds_arg.stride(0),
                x2, x2.stride(0),
                weight,
                mean,
                rstd,
                dx2, dx2.stride(0),
                dw_partial, dw_partial.stride(0),
                db_arg, db_arg.stride(0),
                m,
                n,
                rows_per_program,
                HAS_DS=ds is not None,
                HAS_BIAS=has_bias,
                BLOCK_N=block,
                num_warps=warps,
            )
    dw = dw_partial.sum(0).to(weight.dtype)
    db = db_partial.sum(0).to(weight.dtype) if has_bias else weight.new_empty(0)
    return dx2.view(shape), dw, db


# ---------------------------------------------------------------------------------------------
# Reference: plain torch in fp32


def layer_norm_reference(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
                         eps: float = 1e-5) -> torch.Tensor:
    """LayerNorm over the last dim computed in fp32, returned in x's dtype."""
    xf = x.float()
    mean = xf.mean(-1, keepdim=True)
    var = (xf - mean).pow(2).mean(-1, keepdim=True)
    y = (xf - mean) * torch.rsqrt(var + eps) * weight.float()
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


def add_layer_norm_reference(x: torch.Tensor, branch: torch.Tensor, weight: torch.Tensor,
                             bias: Optional[torch.Tensor] = None, eps: float = 1e-5):
    """(s, y): s = x + branch and y = LayerNorm(s), computed in fp32, returned in x's dtype."""
    s = (x.float() + branch.float()).to(x.dtype)
    return s, layer_norm_reference(s, weight, bias, eps)


# ---------------------------------------------------------------------------------------------
# Ops: torch.library custom ops, the one path for eager and compiled calls: torch.compile
# (fullgraph=True) traces through them and autograd calls the Triton backward. The backward is an
# op of its own: AOTAutograd traces it with fake tensors, which a Triton launch cannot take.
# `Tensor?` (Optional) arguments carry the optional bias and ds; an op cannot return an optional
# tensor, so dbias is empty without bias.


@torch.library.custom_op("fastgpt::layer_norm", mutates_args=())
def _layer_norm_op(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                   eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    _, y, mean, rstd = layer_norm_forward(x, weight, bias, eps)
    return y, mean, rstd


@_layer_norm_op.register_fake
def _(x, weight, bias, eps):
    _check_inputs("layer_norm", x, weight, bias)
    stats = x.new_empty(x.shape[:-1], dtype=torch.float32)
    return torch.empty_like(x, memory_format=torch.contiguous_format), stats, torch.empty_like(stats)


@torch.library.custom_op("fastgpt::add_layer_norm", mutates_args=())
def _add_layer_norm_op(x: torch.Tensor, branch: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                       eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return layer_norm_forward(x, weight, bias, eps, branch=branch)


@_add_layer_norm_op.register_fake
def _(x, branch, weight, bias, eps):
    _check_inputs("add_layer_norm", x, weight, bias, branch)
    stats = x.new_empty(x.shape[:-1], dtype=torch.float32)
    s = torch.empty_like(x, memory_format=torch.contiguous_format)
    return s, torch.empty_like(s), stats, torch.empty_like(stats)


@torch.library.custom_op("fastgpt::layer_norm_backward", mutates_args=())
def _layer_norm_backward_op(dy: torch.Tensor, ds: Optional[torch.Tensor], x: torch.Tensor, weight: torch.Tensor,
                            mean: torch.Tensor, rstd: torch.Tensor,
                            has_bias: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return layer_norm_backward(dy, ds, x, weight, mean, rstd, has_bias)


@_layer_norm_backward_op.register_fake
def _(dy, ds, x, weight, mean, rstd, has_bias):
    dx = torch.empty_like(x, memory_format=torch.contiguous_format)
    return dx, weight.new_empty(weight.shape), weight.new_empty(weight.shape if has_bias else (0,))


def _setup_layer_norm(ctx, inputs, output):
    x, weight, bias, _ = inputs
    _, mean, rstd = output
    ctx.save_for_backward(x, weight, mean, rstd)
    ctx.has_bias = bias is not None


def _backward_layer_norm(ctx, dy, _dmean, _drstd):
    x, weight, mean, rstd = ctx.saved_tensors
    dx, dw, db = _layer_norm_backward_op(dy, None, x, weight, mean, rstd, ctx.has_bias)
    return dx, dw, db if ctx.has_bias else None, None


def _setup_add_layer_norm(ctx, inputs, output):
    _, _, weight, bias, _ = inputs
    s, _, mean, rstd = output
    ctx.save_for_backward(s, weight, mean, rstd)  # s, not x and branch: one tensor to keep
    ctx.has_bias = bias is not None


def _backward_add_layer_norm(ctx, ds, dy, _dmean, _drstd):
    s, weight, mean, rstd = ctx.saved_tensors
    dx, dw, db = _layer_norm_backward_op(dy, ds, s, weight, mean, rstd, ctx.has_bias)
    # d(x + branch)/dx = d(x + branch)/dbranch = 1: both get the same tensor.
    return dx, dx, dw, db if ctx.has_bias else None, None


_layer_norm_op.register_autograd(_backward_layer_norm, setup_context=_setup_layer_norm)
_add_layer_norm_op.register_autograd(_backward_add_layer_norm, setup_context=_setup_add_layer_norm)


# ---------------------------------------------------------------------------------------------
# Public API


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
               eps: float = 1e-5) -> torch.Tensor:
    """LayerNorm of x over its last dim (torch.nn.functional.layer_norm with normalized_shape
    = weight.shape), in x's dtype; differentiable in x, weight and bias."""
    y, _, _ = _layer_norm_op(x, weight, bias, eps)
    return y


def add_layer_norm(x: torch.Tensor, branch: torch.Tensor, weight: torch.Tensor,
                   bias: Optional[torch.Tensor] = None, eps: float = 1e-5) -> tuple[torch.Tensor, torch.Tensor]:
    """(s, y) with s = x + branch and y = layer_norm(s, weight, bias, eps), in one pass over
    memory; both outputs are differentiable."""
    s, y, _, _ = _add_layer_norm_op(x, branch, weight, bias, eps)
    return s, y
