"""The LM head fused with cross-entropy: the loss and both gradients in one chunked pass over the
rows, so that the (N, V) logits never exist.

Math, for hidden h (N, C), weight w (V, C), logits x = h @ w.T, targets t (N,) and ignore_index
(nanoGPT's -1):
    counted rows   R = {i : t_i != ignore_index},  n = |R|
    row loss       l_i = logsumexp(x_i) - x_{i, t_i}          (i in R; 0 otherwise)
    loss           L = sum_i l_i / n                           (L = 0 when n = 0; torch gives nan)
    gradient       dL/dx_ij = (softmax(x_i)_j - [j == t_i]) / n   (i in R; 0 otherwise)
                   dL/dh = dL/dx @ w,  dL/dw = dL/dx.T @ h
Defining L = 0 with a zero gradient when every target is ignored keeps a fully padded micro-batch
from turning the whole step into nan.

`linear_cross_entropy` forms, over chunks of rows, z = h_chunk @ w.T; the row kernel overwrites z
with softmax - onehot; then grad_h_chunk = z @ w and grad_w += z.T @ h_chunk (accumulated in
fp32), all in the forward. Backward scales the two gradients by upstream / n in fp32 and casts
them to the inputs' dtypes. The forward keeps the gradients of the SUMMED row losses: dividing by
n first would underflow in fp16 (softmax values of 1/V divided by n = 16384 are ~1e-9, below
fp16's smallest subnormal, 6e-8), and GradScaler's factor (65536 at first, itself inf in fp16)
only arrives with the upstream.

Row kernel: one program per row sweeps the row twice in blocks of BLOCK_SIZE. The first sweep
keeps an online max m and sum of exponentials d (m' = max(m, max x_blk), d = d e^(m - m') +
sum e^(x_blk - m')), so lse = m + log d; the second writes softmax - onehot over the row. The
gradient needs lse, which needs the whole row, hence two sweeps; no softmax tensor is stored. n is
counted on the device over the whole batch before the first chunk (no host sync), so the mean is
right across chunks.

Bytes moved per logit (itemsize s: 2 for bf16): the row kernel reads it twice and writes its
gradient once, 3s; the matmuls write it once and read it twice. Memory: a chunk holds at most
CHUNK_LOGITS_BYTES of logits. At GPT-2 124M, batch 16 x 1024 (N = 16384, C = 768, V = 50304) in
bf16, the full logits would be 1.65 GB; the op holds 134 MB of chunk logits, the 155 MB fp32
grad_w accumulator (kept for backward), a 77 MB bf16 z.T @ h per chunk and the 25 MB grad_h:
about 0.4 GB. The matmul FLOPs are those of the unfused head: 2NCV forward, 4NCV for the two
gradients.

Limits: V < 2^31 (column offsets are int32; row offsets are int64, since 16384 x 50304 overflows
int32). Targets must be ignore_index or in [0, V); others are not checked (that would need a host
sync): such a row gets loss lse and no -1 in its gradient, with no out-of-bounds access.
fp32, bf16 and fp16 inputs; the loss is fp32, the gradients have their input's dtype.

References: llm.c's fused classifier (loss and gradient in one kernel, written over the logits);
Liger-Kernel's cross_entropy and fused_linear_cross_entropy (online softmax, chunked head);
Triton's 02-fused-softmax tutorial.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor

from kernels.common import as_2d, next_power_of_2, num_warps_for, on_device, tag_compile_caches

# Elements one program handles per loop step: 16 warps x 32 lanes x 16 values on a GPU; big
# enough that the interpreter sweeps a 50k vocabulary in 7 steps.
MAX_BLOCK = 8192
# Bytes of chunk logits linear_cross_entropy holds at once: large enough that each chunk's
# matmul (>= 1k rows at GPT-2's vocabulary in bf16) runs at full speed, small beside the 1.65 GB
# of full logits it replaces.
CHUNK_LOGITS_BYTES = 128 * 2**20
LOSS_DTYPE = torch.float32


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


def count_targets(targets: Tensor, ignore_index: int) -> Tensor:
    """() int64 on the targets' device: how many targets are counted. No host sync."""
    return (targets != ignore_index).sum()


def mean_loss(row_loss: Tensor, n_counted: Tensor) -> Tensor:
    """() fp32: the summed row losses over the counted targets, 0 when none is counted."""
    return row_loss.sum() / n_counted.clamp(min=1)


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


def default_chunk_size(n_rows: int, n_cols: int, itemsize: int) -> int:
    """Rows per chunk: equal chunks whose logits stay within CHUNK_LOGITS_BYTES."""
    n_chunks = max(1, math.ceil(n_rows * n_cols * itemsize / CHUNK_LOGITS_BYTES))
    return max(1, math.ceil(n_rows / n_chunks))


def _add_weight_grad(grad_weight: Tensor, z: Tensor, h_chunk: Tensor) -> None:
    """grad_weight (V, C) fp32 += z.T @ h_chunk. The product sums a whole chunk of rows of
    softmax - onehot, not yet divided by n: in fp16 it can pass 65504, and an inf there comes
    before GradScaler's factor, which then cannot undo it. So fp16 products come out in fp32
    (on CUDA straight from the fp16 matmul); bf16 has fp32's range."""
    if z.dtype == grad_weight.dtype:
        grad_weight.addmm_(z.T, h_chunk)
    elif z.dtype == torch.float16 and z.is_cuda and hasattr(torch.ops.aten.mm, "dtype"):
        grad_weight += torch.mm(z.T, h_chunk, out_dtype=torch.float32)
    elif z.dtype == torch.float16:  # no fp16 -> fp32 matmul on the CPU
        grad_weight.addmm_(z.T.float(), h_chunk.float())
    else:
        grad_weight += z.T @ h_chunk


def linear_cross_entropy_chunked(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    ignore_index: int = -1,
    chunk_size: int | None = None,
    *,
    with_grad: bool = True,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(mean loss L () fp32, n_counted () int64, dS/dhidden like hidden, dS/dweight (V, C) fp32) of
    L = S / n_counted = cross_entropy(hidden @ weight.T, targets), chunked over rows, where S is
    the sum of the row losses: dL/d = dS/d / n_counted, divided by the caller in fp32 (see the
    module docstring). Without with_grad the two gradients are empty."""
    if hidden.dim() < 1 or weight.dim() != 2 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"linear_cross_entropy: hidden {tuple(hidden.shape)} must be (..., C) and weight {tuple(weight.shape)} (V, C)")
    if targets.shape != hidden.shape[:-1]:
        raise ValueError(f"linear_cross_entropy: targets {tuple(targets.shape)} must be hidden {tuple(hidden.shape)} without the last dim")
    if hidden.dtype != weight.dtype:
        raise ValueError(f"linear_cross_entropy: hidden {hidden.dtype} and weight {weight.dtype} must share a dtype")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"linear_cross_entropy: chunk_size {chunk_size} must be at least 1")
    h = as_2d(hidden)  # (N, C)
    w = weight.contiguous()  # (V, C)
    t = targets.reshape(-1)
    n_rows, n_cols = h.shape[0], w.shape[0]
    chunk = chunk_size or default_chunk_size(n_rows, n_cols, h.element_size())
    n_counted = count_targets(t, ignore_index)  # over all chunks, before any of them
    row_loss = torch.empty(n_rows, dtype=LOSS_DTYPE, device=h.device)
    grad_hidden = torch.empty_like(h) if with_grad else h.new_empty(0)
    # fp32 accumulator: a bf16 sum over many chunks would lose the small contributions.
    grad_weight = torch.zeros(w.shape, dtype=torch.float32, device=w.device) if with_grad else None
    # The inputs' dtype is the matmuls' dtype: autocast, still on inside a custom op's body,
    # would make the chunks bf16 while the outputs written with out= stay in the inputs' dtype.
    with torch.autocast(h.device.type, enabled=False):
        for start in range(0, n_rows, chunk):
            end = min(start + chunk, n_rows)
            h_chunk = h[start:end]  # (rows, C)
            z = h_chunk @ w.T  # (rows, V): the only logits that ever exist
            cross_entropy_rows(z, t[start:end], ignore_index, write_grad=with_grad, row_loss=row_loss[start:end])
            if with_grad:  # z now holds dS/dz
                torch.mm(z, w, out=grad_hidden[start:end])
                _add_weight_grad(grad_weight, z, h_chunk)
            del z
    loss = mean_loss(row_loss, n_counted)
    if not with_grad:
        return loss, n_counted, grad_hidden, w.new_empty(0)
    return loss, n_counted, grad_hidden.view(hidden.shape), grad_weight


# --- references --------------------------------------------------------------------------------


def cross_entropy_reference(logits: Tensor, targets: Tensor, ignore_index: int = -1) -> Tensor:
    """The row kernel's loss in plain torch, fp32: F.cross_entropy's mean over the counted
    targets, except that no counted target gives 0 (torch: nan). Shares no code with the kernel."""
    x = logits.float().reshape(-1, logits.shape[-1])
    t = targets.reshape(-1)
    total = F.cross_entropy(x, t, ignore_index=ignore_index, reduction="sum")
    return total / (t != ignore_index).sum().clamp(min=1)


def linear_cross_entropy_reference(hidden: Tensor, weight: Tensor, targets: Tensor, ignore_index: int = -1) -> Tensor:
    """The unfused head: the full logits in the inputs' dtype, then the fp32 loss."""
    return cross_entropy_reference(F.linear(hidden, weight), targets, ignore_index)


# --- op ----------------------------------------------------------------------------------------


def _scale_grad(grad: Tensor, factor: Tensor) -> Tensor:
    """grad * factor, in grad's dtype. Eager scales in place: the buffer is this op's own, so
    backward allocates nothing. Under compile AOTAutograd wants a functional backward, and
    inductor plans the buffers itself."""
    return grad * factor if torch.compiler.is_compiling() else grad.mul_(factor)


@torch.library.custom_op("fastgpt::linear_cross_entropy", mutates_args=())
def _linear_cross_entropy_op(
    hidden: Tensor, weight: Tensor, targets: Tensor, ignore_index: int, chunk_size: int, with_grad: bool
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """linear_cross_entropy_chunked's (mean loss, n_counted, dS/dhidden, fp32 dS/dweight);
    chunk_size 0 picks default_chunk_size."""
    return linear_cross_entropy_chunked(hidden, weight, targets, ignore_index, chunk_size or None, with_grad=with_grad)


@_linear_cross_entropy_op.register_fake
def _(hidden, weight, targets, ignore_index, chunk_size, with_grad):
    loss, n_counted = hidden.new_empty((), dtype=LOSS_DTYPE), targets.new_empty((), dtype=torch.int64)
    if not with_grad:
        return loss, n_counted, hidden.new_empty(0), weight.new_empty(0)
    return loss, n_counted, hidden.new_empty(hidden.shape), weight.new_empty(weight.shape, dtype=torch.float32)


def _linear_setup(ctx, inputs, output):
    _, n_counted, grad_hidden, grad_weight = output
    ctx.mark_non_differentiable(n_counted, grad_hidden, grad_weight)
    ctx.save_for_backward(n_counted, grad_hidden, grad_weight)
    ctx.weight_dtype = inputs[1].dtype


def _linear_backward(ctx, grad_loss, *_):
    n_counted, grad_hidden, grad_weight = ctx.saved_tensors
    if grad_hidden.numel() == 0 and grad_weight.numel() == 0:
        raise RuntimeError("linear_cross_entropy ran without gradients (with_grad=False); cannot backpropagate")
    # Scaled in fp32, then cast: grad_hidden is small (N, C), and grad_weight is fp32 already.
    factor = grad_loss.float() / n_counted.clamp(min=1)  # upstream / n
    grad_hidden = _scale_grad(grad_hidden.float(), factor).to(grad_hidden.dtype)
    grad_weight = _scale_grad(grad_weight, factor).to(ctx.weight_dtype)
    return grad_hidden, grad_weight, None, None, None, None


_linear_cross_entropy_op.register_autograd(_linear_backward, setup_context=_linear_setup)
tag_compile_caches()  # compiled graphs holding this op are cached per version of its code


# --- public API --------------------------------------------------------------------------------


def _needs_grad(*tensors: Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def linear_cross_entropy(
    hidden: Tensor, weight: Tensor, targets: Tensor, ignore_index: int = -1, chunk_size: int | None = None
) -> Tensor:
    """Mean cross-entropy () fp32 of hidden (..., C) @ weight (V, C).T against targets (...), with
    the (N, V) logits formed only chunk_size rows at a time (default: CHUNK_LOGITS_BYTES of them).
    Gradients flow to hidden and to weight like any parameter use (a tied embedding included).
    The inputs are not modified."""
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"linear_cross_entropy: chunk_size {chunk_size} must be at least 1")
    loss, *_ = torch.ops.fastgpt.linear_cross_entropy(
        hidden, weight, targets, ignore_index, chunk_size or 0, _needs_grad(hidden, weight)
    )
    return loss
