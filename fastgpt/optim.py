"""AdamW with weight decay on matrices only, and the learning-rate schedule: nanoGPT's warmup +
cosine, or warmup-stable-decay."""

from __future__ import annotations

import inspect
import math

import torch
import torch.nn as nn

LR_SCHEDULES = ("cosine", "wsd")


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Decay every parameter with 2+ dims (Linear weights, embeddings); leave biases and
    LayerNorm gains alone, as GPT-2 and nanoGPT do. Tied weights appear once."""
    params = [p for p in model.parameters() if p.requires_grad]  # parameters() de-duplicates ties
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def fused_adamw_available(device_type: str) -> bool:
    """torch's fused AdamW runs on CUDA, and on CPU since torch 2.4; one kernel per step instead
    of a dozen per parameter."""
    if "fused" not in inspect.signature(torch.optim.AdamW).parameters:
        return False
    return device_type in ("cuda", "cpu", "mps")


def make_optimizer(
    model: nn.Module,
    weight_decay: float,
    learning_rate: float,
    betas: tuple[float, float],
    device_type: str,
    optimizer_cls: type = torch.optim.AdamW,
) -> torch.optim.Optimizer:
    """AdamW over the model's two parameter groups (see build_adamw)."""
    return build_adamw(param_groups(model, weight_decay), learning_rate, betas, device_type, optimizer_cls)


def build_adamw(groups: list[dict], learning_rate: float, betas: tuple[float, float], device_type: str,
                optimizer_cls: type = torch.optim.AdamW) -> torch.optim.Optimizer:
    """torch's AdamW (fused where available) or another class with its constructor, such as
    fastgpt_kernels.adamw.TritonAdamW."""
    if optimizer_cls is torch.optim.AdamW:
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, fused=fused_adamw_available(device_type))
    return optimizer_cls(groups, lr=learning_rate, betas=betas)


def get_lr(it: int, learning_rate: float, warmup_iters: int, lr_decay_iters: int, min_lr: float,
           schedule: str = "cosine", decay_fraction: float = 0.2) -> float:
    """Learning rate at iteration `it`: linear warmup from learning_rate/(warmup_iters+1) towards
    learning_rate over warmup_iters steps (as nanoGPT), then down to min_lr at lr_decay_iters, then
    min_lr. schedule='cosine': a cosine from the warmup's end (nanoGPT). schedule='wsd'
    (warmup-stable-decay, Hägele et al. 2024): learning_rate until the last decay_fraction of
    lr_decay_iters, then a straight line to min_lr (modded-nanogpt's cooldown)."""
    if it < warmup_iters:
        return learning_rate * (it + 1) / (warmup_iters + 1)
    if it > lr_decay_iters:
        return min_lr
    if schedule == "wsd":
        decay_start = wsd_decay_start(lr_decay_iters, decay_fraction)
        if it <= decay_start:
            return learning_rate
        return min_lr + (learning_rate - min_lr) * (lr_decay_iters - it) / (lr_decay_iters - decay_start)
    decay_ratio = (it - warmup_iters) / max(1, lr_decay_iters - warmup_iters)
    coeff = 0.5 * (1.0 + math.cos(math.pi * decay_ratio))  # 1 -> 0
    return min_lr + coeff * (learning_rate - min_lr)


def wsd_decay_start(lr_decay_iters: int, decay_fraction: float) -> float:
    """The iteration where lr_schedule='wsd' leaves learning_rate: the last decay_fraction of lr_decay_iters decays."""
    return lr_decay_iters * (1 - decay_fraction)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def clip_and_step(model: nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, grad_clip: float,
                  skip_nonfinite: bool) -> bool:
    """Unscale, clip the global gradient norm to grad_clip (0: no clipping), step, zero the
    gradients. With skip_nonfinite, a step whose gradient norm is NaN or inf is dropped instead
    (a CPU-GPU sync per step; the norm is the same on every DDP rank, so all ranks agree).
    Returns whether the step was taken."""
    taken = True
    if grad_clip > 0 or skip_nonfinite:
        scaler.unscale_(optimizer)
        params = [p for p in model.parameters() if p.grad is not None]
        norm = torch.nn.utils.clip_grad_norm_(params, grad_clip) if grad_clip > 0 else torch.nn.utils.get_total_norm(
            [p.grad for p in params])
        taken = not skip_nonfinite or bool(torch.isfinite(norm).item())  # CPU-GPU sync, in skip mode only
    if taken:
        scaler.step(optimizer)
    scaler.update()  # after a dropped step too: the fp16 scale still learns from the overflow
    optimizer.zero_grad(set_to_none=True)
    return taken
