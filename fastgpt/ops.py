"""The one place fastgpt chooses its implementation of the hot ops: Triton kernels or torch.

    kernels = "auto"    Triton on CUDA when triton imports, torch everywhere else
    kernels = "triton"  Triton (CUDA, or any device under TRITON_INTERPRET=1, for testing)
    kernels = "torch"   plain torch ops

Both implementations compute the same functions with the same parameters, so models built with
either load each other's checkpoints. A machine without CUDA never imports triton here unless
asked to.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from fastgpt.head_loss import chunked_head_loss, count_targets
from kernels.common import triton_installed, triton_usable

KERNEL_CHOICES = ("auto", "triton", "torch")
LN_EPS = 1e-5  # GPT-2's LayerNorm epsilon
IGNORE_INDEX = -1  # nanoGPT's convention: targets of -1 are not counted
# fp32 logits past this size take the fused head + loss on a CPU; below it the extra passes over
# the logits cost little.
CPU_FUSED_HEAD_MIN_BYTES = 32 * 2**20


class KernelChoiceError(ValueError):
    """The requested kernels cannot run here; one line for the user."""


@dataclass(frozen=True)
class Ops:
    """The model's hot ops."""

    name: str
    layer_norm: Callable  # (x, weight, bias) -> y
    add_layer_norm: Callable  # (x, residual, weight, bias) -> (x + residual, layer_norm(x + residual))
    head_and_loss: Callable  # (hidden (N, C), weight (V, C), targets (N,)) -> (logits (N, V) or None, mean loss)


@dataclass(frozen=True)
class Kernels:
    """One implementation choice: the model's ops and the optimizer class that goes with them."""

    ops: Ops
    optimizer: type  # an AdamW with torch.optim.AdamW's constructor and state_dict


def choose_kernels(choice: str, device: torch.device | str) -> Kernels:
    """The implementation `choice` (one of KERNEL_CHOICES) names on `device`."""
    device = torch.device(device)
    if choice not in KERNEL_CHOICES:
        raise KernelChoiceError(f"kernels={choice!r} is not allowed; choose one of {', '.join(KERNEL_CHOICES)}")
    runnable = triton_usable(device)
    if choice == "triton" and not runnable:
        why = "triton is not installed (pip install -e '.[triton]')" if not triton_installed() else f"device {device} is not CUDA"
        raise KernelChoiceError(f"kernels='triton' cannot run here: {why}; use kernels='auto' or 'torch'")
    # 'auto' never picks the interpreter: it is a correctness tool, far slower than torch.
    if choice == "triton" or (choice == "auto" and runnable and device.type == "cuda"):
        return triton_kernels()
    return Kernels(TORCH_OPS, torch.optim.AdamW)


def _torch_layer_norm(x, weight, bias):
    return F.layer_norm(x, weight.shape, weight, bias, LN_EPS)


def _torch_add_layer_norm(x, residual, weight, bias):
    s = x + residual
    return s, F.layer_norm(s, weight.shape, weight, bias, LN_EPS)


def _torch_head_and_loss(hidden, weight, targets):
    # On a CPU, large logits go through the fused head + loss (fastgpt.head_loss): no log-softmax
    # or probabilities kept, and past one chunk no full logits. Small vocabularies, and CUDA
    # (where this path is torch.compile's baseline), form the logits.
    if hidden.device.type == "cpu" and hidden.shape[0] * weight.shape[0] * 4 > CPU_FUSED_HEAD_MIN_BYTES:
        dtype = _autocast_dtype(hidden)
        return None, chunked_head_loss(hidden.to(dtype), weight.to(dtype), targets, IGNORE_INDEX)
    logits = F.linear(hidden, weight)  # (N, V)
    total = F.cross_entropy(logits.float(), targets, ignore_index=IGNORE_INDEX, reduction="sum")
    return logits, total / count_targets(targets, IGNORE_INDEX)


TORCH_OPS = Ops("torch", _torch_layer_norm, _torch_add_layer_norm, _torch_head_and_loss)


def _autocast_dtype(t: torch.Tensor) -> torch.dtype:
    """The dtype autocast would compute a matmul in: custom ops are opaque to autocast, so the
    Triton path casts its inputs itself, as torch's Linear would be cast."""
    device_type = t.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return t.dtype


def triton_kernels() -> Kernels:
    from kernels import adamw, cross_entropy, layernorm  # only here: importing triton needs a driver or the interpreter
    from kernels.common import MAX_FUSED_BLOCK

    # Rows wider than one program holds (n_embd > MAX_FUSED_BLOCK) take torch's LayerNorm: the
    # same function and parameters, so nothing else changes.
    def add_layer_norm(x, residual, weight, bias):
        if x.shape[-1] > MAX_FUSED_BLOCK:
            return _torch_add_layer_norm(x, residual, weight, bias)
        # The residual stream keeps its dtype (fp32 under autocast); the branch output joins it.
        return layernorm.add_layer_norm(x, residual.to(x.dtype), weight, bias, LN_EPS)

    def layer_norm(x, weight, bias):
        if x.shape[-1] > MAX_FUSED_BLOCK:
            return _torch_layer_norm(x, weight, bias)
        return layernorm.layer_norm(x, weight, bias, LN_EPS)

    def head_and_loss(hidden, weight, targets):
        # Chunked over tokens: the (N, V) logits never exist, so there are none to return.
        dtype = _autocast_dtype(hidden)
        return None, cross_entropy.linear_cross_entropy(hidden.to(dtype), weight.to(dtype), targets, IGNORE_INDEX)

    return Kernels(Ops("triton", layer_norm, add_layer_norm, head_and_loss), adamw.TritonAdamW)
