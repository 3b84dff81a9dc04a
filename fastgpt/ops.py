"""The one place fastgpt chooses the implementation of each hot op: Triton kernels or torch.

Three ops, each chosen on its own (TrainConfig's layer_norm_kernel, head_loss_kernel and
optimizer_kernel; `kernels` sets whichever of them is left unset):
    layer_norm   LayerNorm, and the block's residual add fused with LayerNorm
    head_loss    the LM head and its cross-entropy loss
    optimizer    AdamW
Choices:
    "torch"   plain torch ops, which torch.compile hands to Inductor; on a CPU the head + loss past
              CPU_FUSED_HEAD_MIN_BYTES of logits is chunked over rows (kernels/head_loss.py)
    "triton"  the Triton kernels (CUDA, or any device under TRITON_INTERPRET=1, for testing)
    "fp8"     head_loss only, opt-in: the head's matmuls in fp8 (kernels/fp8_linear.py)
    "auto"    Triton only where a committed measurement for this GPU class
              (kernel_measurements.json beside this file, from scripts/gpu_check.sh's end-to-end
              table) shows the Triton op making the whole training step faster; torch everywhere
              else, CPUs included (the interpreter is a correctness tool, far slower than torch)
Every choice computes the same function with the same parameters, so models built with any of
them load each other's checkpoints. A machine without CUDA never imports triton here unless asked.
"""

from __future__ import annotations

import functools
import json
import pathlib
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

from fastgpt import hardware
from fastgpt.errors import FastgptError
from fastgpt_kernels.common import tag_compile_caches, triton_installed, triton_usable
from fastgpt_kernels.fp8_linear import check_shapes as check_fp8_shapes
from fastgpt_kernels.fp8_linear import fp8_linear, fp8_unsupported_reason
from fastgpt_kernels.head_loss import count_targets, linear_cross_entropy, mean_loss

KERNEL_CHOICES = ("auto", "triton", "torch")
# op -> what it may be set to, and the config field that sets it alone
OP_CHOICES = {"layer_norm": KERNEL_CHOICES, "head_loss": (*KERNEL_CHOICES, "fp8"), "optimizer": KERNEL_CHOICES}
OP_FIELDS = {op: f"{op}_kernel" for op in OP_CHOICES}
LN_EPS = 1e-5  # GPT-2's LayerNorm epsilon
IGNORE_INDEX = -1  # nanoGPT's convention: targets of -1 are not counted
# fp32 logits past this size take the fused head + loss on a CPU; below it the extra passes over
# the logits cost little.
CPU_FUSED_HEAD_MIN_BYTES = 32 * 2**20
# The committed end-to-end measurements 'auto' reads, and the margin a Triton op must win by:
# runs of one configuration on one GPU differ by about 1% in tokens/s.
MEASUREMENTS = pathlib.Path(__file__).with_name("kernel_measurements.json")
MIN_WIN = 1.01


class KernelChoiceError(FastgptError):
    """The requested kernels cannot run here; one line for the user."""


@dataclass(frozen=True)
class Ops:
    """The model's hot ops."""

    name: str
    layer_norm: Callable  # (x, weight, bias) -> y
    add_layer_norm: Callable  # (x, branch, weight, bias) -> (x + branch, layer_norm(x + branch))
    head_and_loss: Callable  # (hidden (N, C), weight (V, C), targets (N,)) -> (logits (N, V) or None, mean loss)


@dataclass(frozen=True)
class OpChoices:
    """What the per-op choices resolve to: the model's ops, the optimizer class that goes with
    them, and the choices themselves."""

    ops: Ops
    optimizer: type  # an AdamW with torch.optim.AdamW's constructor and state_dict
    choices: dict[str, str] = field(default_factory=dict)  # op -> 'torch', 'triton' or 'fp8'


# --- choosing ----------------------------------------------------------------------------------


@functools.cache
def committed_measurements(path: pathlib.Path = MEASUREMENTS) -> dict:
    """GPU class -> its end-to-end measurement (see triton_winners)."""
    return json.loads(path.read_text()) if path.is_file() else {}


def triton_winners(entry: dict) -> set[str]:
    """The ops whose Triton kernel made the measured training step faster by MIN_WIN or more.
    entry["tokens_per_s"] holds the step with every op in torch ("torch") and with one op at a
    time in Triton ("layer_norm=triton", ...), measured in one run."""
    rates = entry.get("tokens_per_s", {})
    base = rates.get("torch")
    if not base:
        return set()
    return {op for op in OP_CHOICES if rates.get(f"{op}=triton", 0) >= MIN_WIN * base}


def resolve_choices(kernels: str, overrides: dict[str, str | None], device: torch.device | str,
                    gpu_name: str | None = None, capability: tuple[int, int] | None = None,
                    measured: dict | None = None) -> dict[str, str]:
    """op -> 'torch', 'triton' or 'fp8': each op's own choice, else `kernels`, with 'auto'
    decided from the committed measurements of gpu_name's class. KernelChoiceError, naming the
    field, for a choice that is not allowed or cannot run on `device`."""
    device = torch.device(device)
    if kernels not in KERNEL_CHOICES:
        raise KernelChoiceError(f"kernels={kernels!r} is not allowed; choose one of {', '.join(KERNEL_CHOICES)}")
    winners = set()
    if device.type == "cuda" and triton_usable(device):
        table = committed_measurements() if measured is None else measured
        winners = triton_winners(table.get(hardware.gpu_class(gpu_name or "") or "", {}))
    choices = {}
    for op, allowed in OP_CHOICES.items():
        name, choice = OP_FIELDS[op], overrides.get(op) or kernels
        if choice not in allowed:
            raise KernelChoiceError(f"{name}={choice!r} is not allowed; choose one of {', '.join(allowed)}")
        if choice == "auto":
            choice = "triton" if op in winners else "torch"
        elif choice == "triton" and not triton_usable(device):
            why = "triton is not installed (pip install -e '.[triton]')" if not triton_installed() else f"device {device} is not CUDA"
            field_name = name if overrides.get(op) else "kernels"
            raise KernelChoiceError(f"{field_name}='triton' cannot run here: {why}; use 'auto' or 'torch'")
        elif choice == "fp8" and (why := fp8_unsupported_reason(device.type, capability, gpu_name or "")):
            raise KernelChoiceError(f"{name}='fp8' cannot run here: {why}; use 'auto', 'torch' or 'triton'")
        choices[op] = choice
    return choices


def choose_ops(kernels: str, device: torch.device | str, overrides: dict[str, str | None] | None = None) -> OpChoices:
    """The implementations `kernels` and the per-op `overrides` (op -> choice or None) name on
    `device` (see resolve_choices)."""
    device = torch.device(device)
    gpu_name = capability = None
    if device.type == "cuda":
        gpu_name, capability = torch.cuda.get_device_name(device), torch.cuda.get_device_capability(device)
    return build_ops(resolve_choices(kernels, overrides or {}, device, gpu_name, capability))


def describe(choices: dict[str, str]) -> str:
    """'torch' or 'triton' when every op agrees, else each op's choice."""
    if len(set(choices.values())) == 1:
        return next(iter(choices.values()))
    return ", ".join(f"{op}={choice}" for op, choice in choices.items())


def check_head_shapes(choices: dict[str, str], rows: int, n_embd: int, vocab_size: int) -> None:
    """KernelChoiceError when the fp8 head cannot take the model's shapes (multiples of 16)."""
    if choices.get("head_loss") != "fp8":
        return
    try:
        check_fp8_shapes(rows, n_embd, vocab_size)
    except ValueError as e:
        raise KernelChoiceError(f"head_loss_kernel='fp8': batch_size x block_size = {rows}, n_embd = {n_embd} and the "
                                f"padded vocab_size = {vocab_size} must be multiples of 16 ({e}); "
                                "change them (vocab_multiple=64 pads the vocabulary) or use head_loss_kernel='torch'") from e


# --- the torch ops -----------------------------------------------------------------------------


def _torch_layer_norm(x, weight, bias):
    return F.layer_norm(x, weight.shape, weight, bias, LN_EPS)


def _torch_add_layer_norm(x, branch, weight, bias):
    s = x + branch
    return s, F.layer_norm(s, weight.shape, weight, bias, LN_EPS)


def full_logits_loss(logits, targets):
    """Mean cross-entropy of formed logits (N, V) over the targets that are not IGNORE_INDEX; 0 when none is."""
    total = F.cross_entropy(logits.float(), targets, ignore_index=IGNORE_INDEX, reduction="sum")
    return mean_loss(total, count_targets(targets, IGNORE_INDEX))


def _torch_head_and_loss(hidden, weight, targets):
    # On a CPU, large logits go through the chunked head + loss: no log-softmax or probabilities
    # kept, and past one chunk no full logits. Small vocabularies, and CUDA (where this path is
    # what Inductor compiles, the baseline), form the logits.
    if hidden.device.type == "cpu" and hidden.shape[0] * weight.shape[0] * 4 > CPU_FUSED_HEAD_MIN_BYTES:
        dtype = _autocast_dtype(hidden)
        return None, linear_cross_entropy(hidden.to(dtype), weight.to(dtype), targets, IGNORE_INDEX, impl="torch")
    logits = F.linear(hidden, weight)  # (N, V)
    return logits, full_logits_loss(logits, targets)


def _fp8_head_and_loss(hidden, weight, targets):
    # The fp32 weight and residual stream are scaled into fp8 straight from fp32 (no bf16 rounding
    # first); the logits come out in the autocast dtype, as F.linear's would.
    logits = fp8_linear(hidden, weight, out_dtype=_autocast_dtype(hidden))  # (N, V)
    return logits, full_logits_loss(logits, targets)


TORCH_OPS = Ops("torch", _torch_layer_norm, _torch_add_layer_norm, _torch_head_and_loss)


def _autocast_dtype(t: torch.Tensor) -> torch.dtype:
    """The dtype autocast would compute a matmul in: custom ops are opaque to autocast, so the
    Triton path casts its inputs itself, as torch's Linear would be cast."""
    device_type = t.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return t.dtype


# --- the Triton ops ----------------------------------------------------------------------------


def _triton_layer_norms() -> tuple[Callable, Callable]:
    from fastgpt_kernels import layernorm  # only here: importing triton needs a driver or the interpreter
    from fastgpt_kernels.common import MAX_FUSED_BLOCK

    # Rows wider than one program holds (n_embd > MAX_FUSED_BLOCK) take torch's LayerNorm: the
    # same function and parameters, so nothing else changes.
    def add_layer_norm(x, branch, weight, bias):
        if x.shape[-1] > MAX_FUSED_BLOCK:
            return _torch_add_layer_norm(x, branch, weight, bias)
        # The residual stream keeps its dtype (fp32 under autocast); the branch output joins it.
        return layernorm.add_layer_norm(x, branch.to(x.dtype), weight, bias, LN_EPS)

    def layer_norm(x, weight, bias):
        if x.shape[-1] > MAX_FUSED_BLOCK:
            return _torch_layer_norm(x, weight, bias)
        return layernorm.layer_norm(x, weight, bias, LN_EPS)

    return layer_norm, add_layer_norm


def _triton_head_and_loss(hidden, weight, targets):
    # Chunked over tokens: the (N, V) logits never exist, so there are none to return.
    dtype = _autocast_dtype(hidden)
    return None, linear_cross_entropy(hidden.to(dtype), weight.to(dtype), targets, IGNORE_INDEX, impl="triton")


def build_ops(choices: dict[str, str]) -> OpChoices:
    """The ops and optimizer that `choices` (op -> 'torch', 'triton' or 'fp8') name."""
    if all(choice == "torch" for choice in choices.values()):
        return OpChoices(TORCH_OPS, torch.optim.AdamW, dict(choices))
    layer_norm, add_layer_norm = (_triton_layer_norms() if choices["layer_norm"] == "triton"
                                  else (_torch_layer_norm, _torch_add_layer_norm))
    head = {"torch": _torch_head_and_loss, "triton": _triton_head_and_loss, "fp8": _fp8_head_and_loss}[choices["head_loss"]]
    optimizer = torch.optim.AdamW
    if choices["optimizer"] == "triton":
        from fastgpt_kernels.adamw import TritonAdamW

        optimizer = TritonAdamW
    return OpChoices(Ops(describe(choices), layer_norm, add_layer_norm, head), optimizer, dict(choices))


def compile_model(model: torch.nn.Module) -> torch.nn.Module:
    """torch.compile, with the compile caches keyed by our kernels' code too: torch knows the
    custom ops (every choice's head + loss is one) by name only, so without the tag an upgrade
    would reuse graphs built on the old ops. The tag is process-wide, hence set here, when a model
    is compiled, and not at import."""
    tag_compile_caches()
    return torch.compile(model)
