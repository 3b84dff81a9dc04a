"""The cross-entropy row kernel: each row's loss, and the gradient of the summed row losses written
over the row's logits, in one Triton program per row. kernels/head_loss.py calls it on each chunk
of logits of the fused LM head + loss (its impl='triton' row step); its torch twin and both
references live there too.

Math, per row x of V logits with target t (ignore_index: the row counts for nothing):
    loss     l = logsumexp(x) - x_t                       (0 for an ignored row)
    gradient dl/dx_j = softmax(x)_j - [j == t]            (0 for an ignored row)
The gradient is of the SUMMED row losses: the 1/n of the mean is left to the caller, in fp32
(see kernels/head_loss.py for why an fp16 gradient must not be divided first).

One program sweeps its row twice in blocks of BLOCK_SIZE. The first sweep keeps an online max m
and sum of exponentials d (m' = max(m, max x_blk), d = d e^(m - m') + sum e^(x_blk - m')), so
lse = m + log d; the second writes softmax - onehot over the row. The gradient needs lse, which
needs the whole row, hence two sweeps; no softmax tensor is stored.

Bytes moved per logit (itemsize s: 2 for bf16): read twice, gradient written once, 3s.

Limits: V < 2^31 (column offsets are int32; row offsets are int64, since 16384 x 50304 overflows
int32). Targets must be ignore_index or in [0, V); others are not checked (that would need a host
sync): such a row gets loss lse and no -1 in its gradient, with no out-of-bounds access. fp32,
bf16 and fp16 logits; the loss is fp32, the gradient has the logits' dtype.

References: llm.c's fused classifier (loss and gradient in one kernel, written over the logits);
Liger-Kernel's cross_entropy (online softmax); Triton's 02-fused-softmax tutorial.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .common import as_2d, next_power_of_2, num_warps_for, on_device
from .head_loss import LOSS_DTYPE

# Elements one program handles per loop step: 16 warps x 32 lanes x 16 values on a GPU; big
# enough that the interpreter sweeps a 50k vocabulary in 7 steps.
MAX_BLOCK = 8192


# --- kernel ------------------------------------------------------------------------------------


@triton.jit
def _cross_entropy_kernel(
    logits_ptr,  # (N, V) read; overwritten with d(row loss)/dlogits when WRITE_GRAD
    stride_logits_row,
    targets_ptr,  # (N,) int64
    stride_targets,
    row_loss_ptr,  # (N,) fp32 written: logsumexp - logit of the target, 0 for ignored rows
    stride_row_loss,
    n_cols,  # V
    ignore_index,
    BLOCK_SIZE: tl.constexpr,
    WRITE_GRAD: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    logits_row = logits_ptr + row * stride_logits_row
    target = tl.load(targets_ptr + row * stride_targets)
    counted = target != ignore_index
    cols = tl.arange(0, BLOCK_SIZE)

    # Sweep 1: online max and sum of exponentials.
    m = float("-inf")
    d = 0.0
    for start in range(0, n_cols, BLOCK_SIZE):
        mask = start + cols < n_cols
        x = tl.load(logits_row + start + cols, mask=mask, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, axis=0))
        # While every logit so far is -inf (masked), exp(-inf - -inf) would be nan: shift by 0.
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        d = d * tl.exp(m - shift) + tl.sum(tl.exp(x - shift), axis=0)
        m = m_new
    lse = m + tl.log(d)

    # Read before sweep 2 overwrites it. The bounds test only keeps a bad target
    # from reading outside the row.
    in_row = counted & (target >= 0) & (target < n_cols)
    x_target = tl.load(logits_row + target, mask=in_row, other=0.0).to(tl.float32)
    loss = tl.where(counted, lse - x_target, 0.0)
    tl.store(row_loss_ptr + row * stride_row_loss, loss)

    if WRITE_GRAD:
        # Sweep 2: softmax - onehot, zero for an ignored row. The 1/n is left to the backward.
        scale = tl.where(counted, 1.0, 0.0)
        for start in range(0, n_cols, BLOCK_SIZE):
            offs = start + cols
            mask = offs < n_cols
            x = tl.load(logits_row + offs, mask=mask, other=0.0).to(tl.float32)
            g = tl.exp(x - lse) - tl.where(offs == target, 1.0, 0.0)
            tl.store(logits_row + offs, (g * scale).to(logits_ptr.dtype.element_ty), mask=mask)


# --- launchers ---------------------------------------------------------------------------------


def cross_entropy_rows(
    logits: Tensor,
    targets: Tensor,
    ignore_index: int = -1,
    *,
    write_grad: bool = False,
    row_loss: Tensor | None = None,
    block_size: int | None = None,
) -> Tensor:
    """Row losses (rows,) fp32 of logits (..., V) against targets (...).

    With write_grad, the logits (which must then be contiguous) are overwritten with
    d(sum of row losses)/dlogits: softmax - onehot, 0 on ignored rows. row_loss: an optional
    (rows,) fp32 output. block_size: a power of two, to force several blocks per row (tests)."""
    if logits.dim() < 1 or targets.shape != logits.shape[:-1]:
        raise ValueError(f"cross_entropy: targets {tuple(targets.shape)} must be logits {tuple(logits.shape)} without the last dim")
    if targets.dtype.is_floating_point or targets.dtype.is_complex or targets.dtype == torch.bool:
        raise ValueError(f"cross_entropy: targets must be integers, got {targets.dtype}")
    if targets.device != logits.device:
        raise ValueError(f"cross_entropy: logits on {logits.device}, targets on {targets.device}")
    if write_grad and not logits.is_contiguous():
        raise ValueError(f"cross_entropy: writing the gradient in place needs contiguous logits, got strides {logits.stride()}")
    if block_size is not None and (block_size < 1 or block_size & (block_size - 1)):
        raise ValueError(f"cross_entropy: block_size {block_size} must be a power of two")
    x = as_2d(logits)  # (N, V); a view when contiguous, so the in-place write reaches logits
    t = targets.reshape(-1).to(torch.int64).contiguous()
    n_rows, n_cols = x.shape
    if n_cols >= 2**31:
        raise ValueError(f"cross_entropy: vocabulary {n_cols} must be below 2**31")
    if row_loss is None:
        row_loss = torch.empty(n_rows, dtype=LOSS_DTYPE, device=x.device)
    elif row_loss.shape != (n_rows,) or row_loss.dtype != LOSS_DTYPE:
        raise ValueError(f"cross_entropy: row_loss must be ({n_rows},) {LOSS_DTYPE}, got {tuple(row_loss.shape)} {row_loss.dtype}")
    if n_rows == 0:
        return row_loss
    block = block_size or min(next_power_of_2(n_cols), MAX_BLOCK)
    with on_device(x):
        _cross_entropy_kernel[(n_rows,)](
            x, x.stride(0),
            t, t.stride(0),
            row_loss, row_loss.stride(0),
            n_cols,
            ignore_index,
            BLOCK_SIZE=block,
            WRITE_GRAD=write_grad,
            num_warps=num_warps_for(block),
        )
    return row_loss
