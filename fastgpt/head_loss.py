"""The LM head and the cross-entropy together, in plain torch, chunked over rows.

For hidden h (N, C), the head's weight W (V, C) and targets t (N,), counted rows R = {i : t_i !=
ignore_index}, n = max(|R|, 1):
    loss      L = sum_{i in R} (logsumexp(z_i) - z_{i, t_i}) / n,   z = h W^T
    gradient  dL/dz_i = (softmax(z_i) - onehot(t_i)) / n  (i in R; 0 otherwise)
              dL/dh = dL/dz W,   dL/dW = dL/dz^T h
Over chunks of rows the forward forms a chunk of z, turns it into softmax - onehot in place and
multiplies it into both gradients at once, so the full (N, V) logits never exist and no
log-softmax or probability tensor is kept: at GPT-2's vocabulary that is the largest buffer of the
step, and on a CPU each pass over it costs memory bandwidth. The backward only scales the two
gradients by upstream / n. The matmul FLOPs are those of the unfused head (2NCV forward, 4NCV for
the gradients).

This is the CPU path; on CUDA the Triton kernel (kernels/cross_entropy.py) does the same with a
fused softmax pass.
"""

from __future__ import annotations

import torch
from torch import Tensor

# Rows of logits per chunk, by bytes: each chunk reads and writes all of dL/dW, and its matmuls
# lose efficiency on a multi-core CPU as the rows shrink, so chunks are large; the memory saved is
# the full logits beyond one chunk, and the log-softmax and probabilities never kept.
# bench/test_bench_cross_entropy.py sweeps it.
CHUNK_LOGITS_BYTES = 256 * 2**20


def count_targets(targets: Tensor, ignore_index: int) -> Tensor:
    """The number of counted targets, at least 1: the mean over none is 0 (not torch's nan), so a
    fully padded micro-batch adds nothing instead of poisoning the step."""
    return (targets != ignore_index).sum().clamp(min=1)


def chunk_rows(n_cols: int) -> int:
    return max(1, CHUNK_LOGITS_BYTES // (4 * n_cols))  # fp32 logits


class _ChunkedHeadLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, targets: Tensor, ignore_index: int, rows: int) -> Tensor:
        with_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        grad_hidden = torch.empty_like(hidden) if with_grad else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if with_grad else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.shape[0], rows):
            h, t = hidden[start : start + rows], targets[start : start + rows]
            counted = t != ignore_index
            safe = torch.where(counted, t, 0)  # ignored rows read column 0, then count for nothing
            z = (h @ weight.t()).float()  # (rows, V)
            picked = z.gather(1, safe[:, None]).squeeze(1)
            # logsumexp and softmax from one max, one exp and one sum, in z's own storage
            # (torch.logsumexp would allocate exp(z - max) of its own, and softmax exponentiate again)
            row_max = z.amax(dim=1, keepdim=True)
            z.sub_(row_max).exp_()
            row_sum = z.sum(dim=1, keepdim=True)
            lse = (row_max + row_sum.log()).squeeze(1)
            total += ((lse - picked) * counted).sum()
            if with_grad:
                z.div_(row_sum)  # softmax
                z[torch.arange(z.shape[0], device=z.device), safe] -= 1.0
                z.mul_(counted[:, None])  # an ignored row has no gradient
                z = z.to(hidden.dtype)
                torch.mm(z, weight, out=grad_hidden[start : start + rows])
                if h.dtype == torch.float32:
                    grad_weight.addmm_(z.t(), h)  # in place: no (V, C) temporary per chunk
                else:
                    grad_weight += (z.t() @ h).float()  # half-precision product, fp32 sum across chunks
        scale = 1.0 / count_targets(targets, ignore_index).float()
        if with_grad:
            ctx.save_for_backward(grad_hidden, grad_weight, scale)
            ctx.weight_dtype = weight.dtype
        return total * scale

    @staticmethod
    def backward(ctx, upstream: Tensor):
        grad_hidden, grad_weight, scale = ctx.saved_tensors
        factor = upstream * scale  # fp32: the 1/n and the upstream in one rounding
        return (grad_hidden * factor).to(grad_hidden.dtype), (grad_weight * factor).to(ctx.weight_dtype), None, None, None


def chunked_head_loss(hidden: Tensor, weight: Tensor, targets: Tensor, ignore_index: int = -1,
                      rows: int | None = None) -> Tensor:
    """Mean cross-entropy of hidden @ weight.T against targets, chunked over rows. hidden and
    weight share a dtype; the loss is fp32, the gradients have the inputs' dtypes."""
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1] or targets.shape != hidden.shape[:1]:
        raise ValueError(f"expected hidden (N, C), weight (V, C), targets (N,); got {tuple(hidden.shape)}, "
                         f"{tuple(weight.shape)}, {tuple(targets.shape)}")
    with torch.autocast(hidden.device.type, enabled=False):  # the caller has chosen the dtype
        return _ChunkedHeadLoss.apply(hidden, weight, targets, ignore_index, rows or chunk_rows(weight.shape[0]))
