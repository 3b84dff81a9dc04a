"""The LM head fused with its cross-entropy loss: the loss and both gradients in one chunked pass
over the rows, so that the (N, V) logits never exist at once. One op, two row steps: plain torch
(here) or the Triton row kernel (kernels/cross_entropy.py).

Math, for hidden h (N, C), weight w (V, C), logits x = h @ w.T, targets t (N,) and ignore_index
(nanoGPT's -1):
    counted rows   R = {i : t_i != ignore_index},  n = |R|
    row loss       l_i = logsumexp(x_i) - x_{i, t_i}          (i in R; 0 otherwise)
    loss           L = sum_i l_i / n                           (L = 0 when n = 0; torch gives nan)
    gradient       dL/dx_ij = (softmax(x_i)_j - [j == t_i]) / n   (i in R; 0 otherwise)
                   dL/dh = dL/dx @ w,  dL/dw = dL/dx.T @ h
Defining L = 0 with a zero gradient when every target is ignored keeps a fully padded micro-batch
from turning the whole step into nan.

Over chunks of rows the forward forms z = h_chunk @ w.T in the inputs' dtype, the row step
overwrites z with softmax - onehot (the gradient of the SUMMED row losses), then
grad_h_chunk = z @ w and grad_w += z.T @ h_chunk (accumulated in fp32). Backward only scales the
two gradients by upstream / n in fp32 and casts them to the inputs' dtypes. Dividing by n first
would underflow in fp16 (softmax values of 1/V divided by n = 16384 are ~1e-9, below fp16's
smallest subnormal, 6e-8), and GradScaler's factor only arrives with the upstream. n is counted on
the device over the whole batch before the first chunk: no host sync, and the mean is right
across chunks.

Memory: a chunk holds at most CHUNK_LOGITS_BYTES of logits. At GPT-2 124M, batch 16 x 1024
(N = 16384, C = 768, V = 50304) in bf16 the full logits would be 1.65 GB; the op holds 256 MB of
chunk logits, the 155 MB fp32 grad_w accumulator (kept for backward) and the 25 MB grad_h. The
matmul FLOPs are those of the unfused head: 2NCV forward, 4NCV for the two gradients.

Bytes moved per logit (itemsize s), beyond the matmuls' own: the Triton row step reads a logit
twice and writes its gradient once (3s); the torch row step makes several passes (max, exp, sum,
divide, mask), which is why CUDA takes the Triton one. On CUDA the fp32 grad_w is accumulated by
the matmul itself (addmm with an fp32 output: one read and one write of grad_w per chunk).

Limits: V < 2^31. Targets must be ignore_index or in [0, V); others are not checked (that would
need a host sync). fp32, bf16 and fp16 inputs, hidden and weight of one dtype; the loss is fp32,
the gradients have their input's dtype.

References: llm.c's fused classifier (loss and gradient in one kernel, written over the logits);
Liger-Kernel's fused_linear_cross_entropy (the chunked head); Wijmans et al. 2024, "Cut Your
Losses in Large-Vocabulary Language Models" (never materialising the logits).
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import Tensor

from .common import as_2d

# Bytes of chunk logits the op holds at once: chunks large enough that each chunk's matmuls run at
# full speed on a GPU (>= 2k rows at GPT-2's vocabulary in bf16) and on a multi-core CPU, few
# enough that accumulating the fp32 weight gradient (one read and write of it per chunk) stays
# small beside the matmuls, and a sixth of GPT-2's full bf16 logits at batch 16 x 1024.
# bench/test_bench_cross_entropy.py sweeps it.
CHUNK_LOGITS_BYTES = 256 * 2**20
LOSS_DTYPE = torch.float32
# The row steps: the gradient of the summed row losses, written over a chunk of logits.
IMPLS = ("torch", "triton")


# --- counting and chunking ---------------------------------------------------------------------


def count_targets(targets: Tensor, ignore_index: int) -> Tensor:
    """() int64 on the targets' device: how many targets are counted. No host sync."""
    return (targets != ignore_index).sum()


def mean_loss(row_loss: Tensor, n_counted: Tensor) -> Tensor:
    """() fp32: the summed row losses over the counted targets, 0 when none is counted."""
    return row_loss.sum() / n_counted.clamp(min=1)


def default_chunk_size(n_rows: int, n_cols: int, itemsize: int) -> int:
    """Rows per chunk: equal chunks whose logits stay within CHUNK_LOGITS_BYTES."""
    n_chunks = max(1, math.ceil(n_rows * n_cols * itemsize / CHUNK_LOGITS_BYTES))
    return max(1, math.ceil(n_rows / n_chunks))


# --- the torch row step ------------------------------------------------------------------------


def torch_row_losses(logits: Tensor, targets: Tensor, ignore_index: int = -1, *, write_grad: bool = False,
                     row_loss: Tensor | None = None) -> Tensor:
    """Row losses (rows,) fp32 of contiguous logits (rows, V) against targets (rows,), in torch; the
    same contract as fastgpt_kernels.cross_entropy.cross_entropy_rows. With write_grad the logits are
    overwritten with d(sum of row losses)/dlogits: softmax - onehot, 0 on ignored rows."""
    counted = targets != ignore_index
    safe = torch.where(counted, targets, 0).long()  # ignored rows read column 0, then count for nothing
    z = logits.float()  # logits themselves when fp32: the in-place work below is then the write
    picked = z.gather(1, safe[:, None]).squeeze(1)
    if write_grad:
        # logsumexp and softmax from one max, one exp and one sum, in z's own storage
        # (torch.logsumexp would allocate exp(z - max) of its own, and softmax exponentiate again)
        row_max = z.amax(dim=1, keepdim=True)
        z.sub_(row_max).exp_()
        row_sum = z.sum(dim=1, keepdim=True)
        lse = (row_max + row_sum.log()).squeeze(1)
        z.div_(row_sum)
        z[torch.arange(z.shape[0], device=z.device), safe] -= 1.0
        z.mul_(counted[:, None])
        if z.data_ptr() != logits.data_ptr():
            logits.copy_(z)
    else:
        lse = torch.logsumexp(z, dim=1)
    losses = torch.where(counted, lse - picked, 0.0)
    if row_loss is None:
        return losses
    return row_loss.copy_(losses)


def _row_step(impl: str):
    if impl == "torch":
        return torch_row_losses
    if impl == "triton":
        from .cross_entropy import cross_entropy_rows  # imports triton: only when asked for

        return cross_entropy_rows
    raise ValueError(f"linear_cross_entropy: impl={impl!r}; choose one of {', '.join(IMPLS)}")


# --- the weight gradient -----------------------------------------------------------------------


def weight_grad_method(dtype: torch.dtype, device_type: str, fp32_out_matmul: bool) -> str:
    """How grad_w (fp32) += z.T @ h_chunk is done for inputs of `dtype` on `device_type`;
    fp32_out_matmul: torch has addmm with an fp32 output for half inputs (aten::addmm.dtype).

    The product sums a whole chunk of rows of softmax - onehot, not yet divided by n: in fp16 it
    can pass 65504, and an inf there comes before GradScaler's factor, which then cannot undo it.
      'addmm'        fp32 inputs: in place
      'addmm_fp32'   half inputs on CUDA: the matmul reads and writes the fp32 sum itself, with no
                     half-precision product in between (and one pass over grad_w instead of three)
      'upcast'       fp16 elsewhere: no fp16 -> fp32 matmul, so the operands are upcast
      'add'          bf16 elsewhere: a bf16 product (fp32's range), added to the fp32 sum
    """
    if dtype == torch.float32:
        return "addmm"
    if device_type == "cuda" and fp32_out_matmul:
        return "addmm_fp32"
    return "upcast" if dtype == torch.float16 else "add"


@functools.cache
def _fp32_out_matmul(device: torch.device) -> bool:
    """Whether this torch's addmm takes half inputs to an fp32 output on `device`: tried once on
    two tiny matrices, since the overload's presence (torch 2.8+) does not say which devices and
    argument dtypes it was built for."""
    if device.type != "cuda" or not hasattr(torch.ops.aten.addmm, "dtype"):
        return False
    try:
        a = torch.ones(2, 2, dtype=torch.bfloat16, device=device)
        torch.addmm(torch.zeros(2, 2, device=device), a, a, out_dtype=torch.float32)
    except (RuntimeError, TypeError):
        return False
    return True


def _add_weight_grad(grad_weight: Tensor, z: Tensor, h_chunk: Tensor) -> Tensor:
    """grad_weight + z.T @ h_chunk, in place where the method allows; returns the sum."""
    method = weight_grad_method(z.dtype, z.device.type, z.dtype != torch.float32 and _fp32_out_matmul(z.device))
    if method == "addmm":
        return grad_weight.addmm_(z.T, h_chunk)
    if method == "addmm_fp32":
        return torch.addmm(grad_weight, z.T, h_chunk, out_dtype=torch.float32)
    if method == "upcast":
        return grad_weight.addmm_(z.T.float(), h_chunk.float())
    return grad_weight.add_(z.T @ h_chunk)


# --- the chunked head + loss -------------------------------------------------------------------


def linear_cross_entropy_chunked(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    ignore_index: int = -1,
    chunk_size: int | None = None,
    *,
    with_grad: bool = True,
    impl: str = "torch",
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(mean loss L () fp32, n_counted () int64, dS/dhidden like hidden, dS/dweight (V, C) fp32) of
    L = S / n_counted = cross_entropy(hidden @ weight.T, targets), chunked over rows, where S is
    the sum of the row losses: dL/d = dS/d / n_counted, divided by the caller in fp32 (see the
    module docstring). Without with_grad the two gradients are empty. impl: the row step."""
    if hidden.dim() < 1 or weight.dim() != 2 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"linear_cross_entropy: hidden {tuple(hidden.shape)} must be (..., C) and weight {tuple(weight.shape)} (V, C)")
    if targets.shape != hidden.shape[:-1]:
        raise ValueError(f"linear_cross_entropy: targets {tuple(targets.shape)} must be hidden {tuple(hidden.shape)} without the last dim")
    if hidden.dtype != weight.dtype:
        raise ValueError(f"linear_cross_entropy: hidden {hidden.dtype} and weight {weight.dtype} must share a dtype")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"linear_cross_entropy: chunk_size {chunk_size} must be at least 1")
    row_step = _row_step(impl)
    h = as_2d(hidden)  # (N, C)
    w = weight.contiguous()  # (V, C)
    t = targets.reshape(-1)
    n_rows, n_cols = h.shape[0], w.shape[0]
    if n_cols >= 2**31:
        raise ValueError(f"linear_cross_entropy: vocabulary {n_cols} must be below 2**31")
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
            row_step(z, t[start:end], ignore_index, write_grad=with_grad, row_loss=row_loss[start:end])
            if with_grad:  # z now holds dS/dz
                torch.mm(z, w, out=grad_hidden[start:end])
                grad_weight = _add_weight_grad(grad_weight, z, h_chunk)
            del z
    loss = mean_loss(row_loss, n_counted)
    if not with_grad:
        return loss, n_counted, grad_hidden, w.new_empty(0)
    return loss, n_counted, grad_hidden.view(hidden.shape), grad_weight


# --- references --------------------------------------------------------------------------------


def cross_entropy_reference(logits: Tensor, targets: Tensor, ignore_index: int = -1) -> Tensor:
    """The row steps' loss in plain torch, fp32: F.cross_entropy's mean over the counted targets,
    except that no counted target gives 0 (torch: nan). Shares no code with the row steps."""
    x = logits.float().reshape(-1, logits.shape[-1])
    t = targets.reshape(-1)
    total = F.cross_entropy(x, t, ignore_index=ignore_index, reduction="sum")
    return total / (t != ignore_index).sum().clamp(min=1)


def linear_cross_entropy_reference(hidden: Tensor, weight: Tensor, targets: Tensor, ignore_index: int = -1) -> Tensor:
    """The unfused head: the full logits in the inputs' dtype, then the fp32 loss."""
    return cross_entropy_reference(F.linear(hidden, weight), targets, ignore_index)


# --- op ----------------------------------------------------------------------------------------
# One torch.library custom op for both row steps: torch.compile (fullgraph=True) traces through it
# as one opaque call, and autograd calls the backward below.


def _scale_grad(grad: Tensor, factor: Tensor) -> Tensor:
    """grad * factor, in grad's dtype. Eager scales in place: the buffer is this op's own, so
    backward allocates nothing. Under compile AOTAutograd wants a functional backward, and
    inductor plans the buffers itself."""
    return grad * factor if torch.compiler.is_compiling() else grad.mul_(factor)


@torch.library.custom_op("fastgpt::linear_cross_entropy", mutates_args=())
def _linear_cross_entropy_op(
    hidden: Tensor, weight: Tensor, targets: Tensor, ignore_index: int, chunk_size: int, with_grad: bool, impl: str
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """linear_cross_entropy_chunked's (mean loss, n_counted, dS/dhidden, fp32 dS/dweight);
    chunk_size 0 picks default_chunk_size."""
    return linear_cross_entropy_chunked(hidden, weight, targets, ignore_index, chunk_size or None, with_grad=with_grad,
                                        impl=impl)


@_linear_cross_entropy_op.register_fake
def _(hidden, weight, targets, ignore_index, chunk_size, with_grad, impl):
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
    return grad_hidden, grad_weight, None, None, None, None, None


_linear_cross_entropy_op.register_autograd(_linear_backward, setup_context=_linear_setup)


# --- public API --------------------------------------------------------------------------------


def _needs_grad(*tensors: Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def linear_cross_entropy(
    hidden: Tensor, weight: Tensor, targets: Tensor, ignore_index: int = -1, chunk_size: int | None = None,
    impl: str = "torch",
) -> Tensor:
    """Mean cross-entropy () fp32 of hidden (..., C) @ weight (V, C).T against targets (...), with
    the (N, V) logits formed only chunk_size rows at a time (default: CHUNK_LOGITS_BYTES of them),
    each chunk's loss and gradient by the `impl` row step ('torch' or 'triton'). Gradients flow to
    hidden and to weight like any parameter use (a tied embedding included). The inputs are not
    modified; autocast does not apply (the caller picks the dtype)."""
    if chunk_size is not None and chunk_size < 1:  # checked here: the op reads 0 as the default
        raise ValueError(f"linear_cross_entropy: chunk_size {chunk_size} must be at least 1")
    loss, *_ = torch.ops.fastgpt.linear_cross_entropy(
        hidden, weight, targets, ignore_index, chunk_size or 0, _needs_grad(hidden, weight), impl
    )
    return loss
