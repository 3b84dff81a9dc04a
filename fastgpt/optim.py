"""The optimizer and the learning-rate schedule.

optimizer='adamw'  AdamW over every parameter, weight decay on matrices only (nanoGPT's).
optimizer='muon'   Muon (Keller Jordan 2024; torch.optim.Muon) over the transformer blocks' matrices
                   and AdamW over the rest, as one optimizer (MuonAdamW), as modded-nanogpt trains.
lr_schedule='cosine' is nanoGPT's warmup + cosine decay; 'wsd' is warmup-stable-decay (get_lr).
"""

from __future__ import annotations

import collections
import inspect
import math
from dataclasses import dataclass
from typing import Iterable

import torch
import torch.nn as nn

OPTIMIZERS = ("adamw", "muon")
LR_SCHEDULES = ("cosine", "wsd")
# nanoGPT's name for the transformer blocks' parameters: transformer.h.<layer>.<...>
BLOCKS_PREFIX = "transformer.h."
# The key a MuonAdamW state_dict carries, with the value 'muon'. AdamW's (nanoGPT's too) have
# none, so a resume tells a checkpoint of the other optimizer from the file itself.
KIND_KEY = "kind"


def param_groups(model: nn.Module, weight_decay: float, skip: Iterable[nn.Parameter] = ()) -> list[dict]:
    """Decay every parameter with 2+ dims (Linear weights, embeddings); leave biases and
    LayerNorm gains alone, as GPT-2 and nanoGPT do. Tied weights appear once. The parameters
    in `skip` (another optimizer's) are left out."""
    skipped = {id(p) for p in skip}
    # parameters() de-duplicates ties
    params = [p for p in model.parameters() if p.requires_grad and id(p) not in skipped]
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


def hidden_matrices(model: nn.Module) -> list[nn.Parameter]:
    """What optimizer='muon' gives Muon: the 2-D weights inside the transformer blocks, i.e. the
    attention and MLP Linear weights. Muon orthogonalises a matrix's whole update, which suits a
    map between hidden states; the embeddings and the LM head (tied or not: lm_head.weight is
    outside the blocks) stay with AdamW, as Keller Jordan's Muon prescribes, and norm gains and
    biases are not matrices. The fused c_attn (3C, C) is orthogonalised as one matrix: torch's
    Muon takes whole parameters, where modded-nanogpt's 2024 Muon split Q, K and V."""
    return [p for name, p in model.named_parameters()
            if p.requires_grad and p.dim() == 2 and name.startswith(BLOCKS_PREFIX)]


@dataclass(frozen=True)
class MuonSettings:
    """Muon's own hyperparameters (TrainConfig's muon_lr, muon_momentum, muon_weight_decay)."""

    lr: float  # at the schedule's peak: it moves with learning_rate's schedule (set_lr)
    momentum: float
    weight_decay: float


def make_optimizer(
    model: nn.Module,
    weight_decay: float,
    learning_rate: float,
    betas: tuple[float, float],
    device_type: str,
    optimizer_cls: type = torch.optim.AdamW,
    muon: MuonSettings | None = None,
) -> torch.optim.Optimizer:
    """AdamW over the model's two parameter groups (see build_adamw); with `muon`, a MuonAdamW:
    torch.optim.Muon over hidden_matrices(model) and that AdamW over the other parameters."""
    if muon is None:
        return build_adamw(param_groups(model, weight_decay), learning_rate, betas, device_type, optimizer_cls)
    if learning_rate <= 0:
        raise ValueError(f"Muon's rate is muon_lr times the schedule's fraction of learning_rate, so learning_rate "
                         f"must be > 0, got {learning_rate}")
    matrices = hidden_matrices(model)
    adamw = build_adamw(param_groups(model, weight_decay, skip=matrices), learning_rate, betas, device_type, optimizer_cls)
    # torch's other defaults are Keller Jordan's: Nesterov momentum, 5 quintic Newton-Schulz steps
    # in bf16, and the update scaled by sqrt(max(1, rows / cols)).
    inner = torch.optim.Muon(matrices, lr=muon.lr, momentum=muon.momentum, weight_decay=muon.weight_decay)
    return MuonAdamW(inner, adamw, muon.lr / learning_rate)


class MuonAdamW(torch.optim.Optimizer):
    """torch.optim.Muon over some parameters and an AdamW over the others, stepped, zeroed,
    saved and loaded as one optimizer. Its param_groups are Muon's then AdamW's, the same dicts,
    so GradScaler unscales every gradient and a group's lr set here is the one that steps.

    state_dict() is what one torch optimizer holding those groups would save: 'state' and the
    groups' 'params' numbered over Muon's parameters, then AdamW's; plus KIND_KEY: 'muon'.
    `lr_ratio` is Muon's rate per unit of AdamW's (muon_lr / learning_rate): set_lr keeps it."""

    def __init__(self, muon: torch.optim.Optimizer, adamw: torch.optim.Optimizer, lr_ratio: float):
        self.muon, self.adamw, self.lr_ratio = muon, adamw, lr_ratio
        # Optimizer.__init__ sets up the hooks that step() and GradScaler rely on; the one group it
        # builds is then replaced by the two optimizers' own.
        super().__init__([p for opt in (muon, adamw) for group in opt.param_groups for p in group["params"]], {})
        self._share_groups()

    def _share_groups(self) -> None:
        # Again after every load_state_dict: torch's loader gives each optimizer new group dicts.
        self.param_groups = [*self.muon.param_groups, *self.adamw.param_groups]
        self.state = collections.ChainMap(self.muon.state, self.adamw.state)  # for reading

    def set_lr(self, lr: float) -> None:
        """AdamW's groups at lr, Muon's at lr * lr_ratio: one schedule drives both."""
        for group in self.muon.param_groups:
            group["lr"] = lr * self.lr_ratio
        for group in self.adamw.param_groups:
            group["lr"] = lr

    def step(self, closure=None):
        """Muon's step, then AdamW's; a closure (it recomputes the loss) runs once, in Muon's."""
        loss = self.muon.step(closure)
        self.adamw.step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.muon.zero_grad(set_to_none)
        self.adamw.zero_grad(set_to_none)

    def state_dict(self) -> dict:
        muon = self.muon.state_dict()
        adamw = _renumbered(self.adamw.state_dict(), _count_params(muon))
        return {"state": {**muon["state"], **adamw["state"]}, "param_groups": muon["param_groups"] + adamw["param_groups"],
                KIND_KEY: "muon"}

    def load_state_dict(self, state_dict: dict) -> None:
        """Load what state_dict() saved; ValueError for another optimizer's (see optimizer_kind)."""
        if optimizer_kind(state_dict) != "muon":
            raise ValueError(f"an optimizer={optimizer_kind(state_dict)!r} state_dict does not load into Muon + AdamW")
        groups, n = state_dict["param_groups"], len(self.muon.param_groups)
        muon = {"state": {}, "param_groups": groups[:n]}
        muon_count = _count_params(muon)
        adamw = {"state": {}, "param_groups": groups[n:]}
        for index, value in state_dict["state"].items():
            (muon if index < muon_count else adamw)["state"][index] = value
        self.muon.load_state_dict(muon)
        self.adamw.load_state_dict(_renumbered(adamw, -muon_count))
        self._share_groups()


def _count_params(state_dict: dict) -> int:
    return sum(len(group["params"]) for group in state_dict["param_groups"])


def _renumbered(state_dict: dict, shift: int) -> dict:
    """state_dict with every parameter number moved by `shift`."""
    return {"state": {index + shift: value for index, value in state_dict["state"].items()},
            "param_groups": [{**group, "params": [index + shift for index in group["params"]]}
                             for group in state_dict["param_groups"]]}


def optimizer_kind(optimizer: torch.optim.Optimizer | dict) -> str:
    """'muon' for a MuonAdamW or its state_dict, 'adamw' for any other (nanoGPT's included)."""
    if isinstance(optimizer, dict):
        return optimizer.get(KIND_KEY, "adamw")
    return "muon" if isinstance(optimizer, MuonAdamW) else "adamw"


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
    """Every group's rate for the next step; a MuonAdamW's Muon groups at their share of it."""
    if isinstance(optimizer, MuonAdamW):
        optimizer.set_lr(lr)
        return
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
