"""AdamW, one Triton launch per parameter group over all of its parameters.

Per element, with g the gradient, t the parameter's step count after this step (1, 2, ...) and
lr, beta1, beta2, eps, wd the group's hyperparameters; math in fp32, state kept in fp32:

    p  = p * (1 - lr * wd)                        decoupled weight decay (Loshchilov & Hutter)
    m  = m + (1 - beta1) * (g - m)                torch's lerp, = beta1 * m + (1 - beta1) * g
    v  = v * beta2 + (1 - beta2) * g * g
    p  = p - (lr / (1 - beta1^t)) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)

and p is cast to its storage dtype once, on store (bf16 by integer round-to-nearest-even, see
_to_bf16_rne: the interpreter's own cast truncates). This is torch.optim.AdamW's single-tensor
update written in the same order (so fp32 results agree to a few ulps); the scalars lr/(1 -
beta1^t), sqrt(1 - beta2^t) and 1 - lr*wd are formed in fp64, as torch forms them in Python
floats, and beta^t is taken by repeated squaring (at most 24 rounds for the steps an fp32
counter can count), so no fp64 transcendental has to exist on the target.

Launch: a pointer table, as apex's multi_tensor_apply chunk lists. Per (group, device, dtype)
one int64 row per parameter (param, grad, exp_avg, exp_avg_sq, step addresses, numel) and one
int32 row per BLOCK-element chunk (parameter row, chunk index); program i turns its rows'
addresses into typed pointers (under TRITON_INTERPRET=1 they are host addresses). So one launch
covers embeddings and LayerNorm gains alike with no program idle, and nothing is gathered into a
flat buffer (two more passes over p and g). The tables are cached and re-uploaded only when an
address or a size changes; on CUDA from pinned memory, without a sync. Only a parameter's last
chunk is masked, and when every address is 16-byte aligned the kernel is told so, so full
chunks may use vector loads.

What may change between steps is read on the device: lr, betas, eps and weight decay from a
persistent (5,) fp64 tensor refreshed with `fill_` (no host sync), and each parameter's step
from its state['step'] tensor, which torch._foreach_add_ increments before the launch (as
torch's fused AdamW does). A new lr each step changes no kernel argument, so nothing is
re-specialised.

State is torch.optim.AdamW's: state[p] = {'step': 0-d fp32 tensor on p's device, 'exp_avg',
'exp_avg_sq'} and param_groups carry torch's keys, so state_dict() loads into torch's AdamW and
back (our moments stay fp32 for bf16/fp16 params; torch casts them to the param's dtype on load).

Bytes moved per element (e = bytes per param/grad element; tables and scalars left out):

    read p, g (e each), m, v (4 each); write p (e), m, v (4 each)     3e + 16
    fp32 params: 28 bytes,  bf16/fp16 params: 22 bytes per element
    (torch's fused AdamW: 28 for fp32; for bf16 params it keeps bf16 moments and moves 14, and
    rounds the decay and the update separately: a decay of lr*wd ~ 1e-4 is below half a bf16
    ulp and mostly lost)

e.g. GPT-2 124M in fp32: 3.5 GB per step.

Limits: params dense and contiguous (a ValueError otherwise; a strided grad is copied first),
fp32, bf16 or fp16, dense gradients of the param's dtype; no amsgrad, no maximize. Steps count
exactly to 2**24 (an fp32 counter, as torch's). Under TRITON_INTERPRET=1 only CPU tensors.

References: Loshchilov & Hutter, "Decoupled Weight Decay Regularization" (ICLR 2019);
torch.optim.AdamW (single-tensor and fused paths); NVIDIA apex multi_tensor_apply.
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Iterable

import torch
import triton
import triton.language as tl

from .common import interpreting, on_device, triton_usable

_TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}
SUPPORTED_DTYPES = tuple(_TL_DTYPES)
# Elements per program: 4096 fp32 elements move 112 KB, long enough to hide the per-program table
# reads and the scalar fp64 bias corrections; 8 warps give each thread 16 elements.
DEFAULT_BLOCK = 4096
NUM_WARPS = 8
# Columns of the per-parameter table (param, grad, exp_avg, exp_avg_sq, step addresses; numel),
# in the order the kernel reads them; the first four are the element streams.
_TABLE_COLUMNS = 6
_STREAM_COLUMNS = 4
_NUMEL_COLUMN = 5
# Slots of the per-group hyperparameter tensor: lr, beta1, beta2, eps, weight_decay.
_HYPER_SLOTS = 5
# Vector loads need 16-byte aligned addresses; the launcher checks before promising it.
_VECTOR_BYTES = 16


# ---------------------------------------------------------------------------------------------
# Kernel


@triton.jit
def _powers(
    beta1,  # () fp64
    beta2,  # () fp64
    n,  # () int32, >= 1
):
    """(beta1**n, beta2**n) by repeated squaring in fp64."""
    pow1 = beta1 * 0.0 + 1.0
    pow2 = beta2 * 0.0 + 1.0
    while n > 0:
        odd = (n % 2) == 1
        pow1 = tl.where(odd, pow1 * beta1, pow1)
        pow2 = tl.where(odd, pow2 * beta2, pow2)
        beta1 = beta1 * beta1
        beta2 = beta2 * beta2
        n = n // 2
    return pow1, pow2


@triton.jit
def _to_bf16_rne(
    x,  # (BLOCK,) fp32
):
    """x rounded to the nearest bf16, ties to even, by integer arithmetic on its bits. Triton's
    interpreter truncates in x.to(tl.bfloat16) (compiled code rounds to nearest even), so a bf16
    param would drift towards zero by up to an ulp a step on the CPU; this rounds the same in
    both. NaNs stay NaNs (quieted), overflow goes to inf, subnormals round like torch's cast."""
    bits = x.to(tl.uint32, bitcast=True)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    quiet_nan = (bits >> 16) | 0x40
    return tl.where(x != x, quiet_nan, rounded).to(tl.uint16).to(tl.bfloat16, bitcast=True)


@triton.jit
def _load_chunk(
    param_ptr,  # PARAM_DTYPE pointers at the chunk's first element
    grad_ptr,
    exp_avg_ptr,  # fp32
    exp_avg_sq_ptr,  # fp32
    offsets,  # (BLOCK,) int32
    remaining,  # () int64: elements from the chunk's start to the parameter's end
    MASKED: tl.constexpr,  # the chunk runs past the parameter's end
):
    """(p, g, m, v) of one chunk in fp32. Unmasked loads stay vectorizable (16-byte accesses)."""
    if MASKED:
        mask = offsets < remaining
        p = tl.load(param_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(grad_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        m = tl.load(exp_avg_ptr + offsets, mask=mask, other=0.0)
        v = tl.load(exp_avg_sq_ptr + offsets, mask=mask, other=0.0)
    else:
        p = tl.load(param_ptr + offsets).to(tl.float32)
        g = tl.load(grad_ptr + offsets).to(tl.float32)
        m = tl.load(exp_avg_ptr + offsets)
        v = tl.load(exp_avg_sq_ptr + offsets)
    return p, g, m, v


@triton.jit
def _store_chunk(param_ptr, exp_avg_ptr, exp_avg_sq_ptr, offsets, remaining, p, m, v, MASKED: tl.constexpr):
    """Write back one chunk: p (already in PARAM_DTYPE), m and v (fp32)."""
    if MASKED:
        mask = offsets < remaining
        tl.store(param_ptr + offsets, p, mask=mask)
        tl.store(exp_avg_ptr + offsets, m, mask=mask)
        tl.store(exp_avg_sq_ptr + offsets, v, mask=mask)
    else:
        tl.store(param_ptr + offsets, p)
        tl.store(exp_avg_ptr + offsets, m)
        tl.store(exp_avg_sq_ptr + offsets, v)


@triton.jit
def _adamw_kernel(
    tensors_ptr,  # (n_tensors, 6) int64, contiguous: param, grad, exp_avg, exp_avg_sq, step addresses; numel
    chunks_ptr,  # (n_chunks, 2) int32, contiguous: row in tensors_ptr, chunk index within that tensor
    hyper_ptr,  # (5,) fp64: lr, beta1, beta2, eps, weight_decay
    PARAM_DTYPE: tl.constexpr,  # element type of params and grads: fp32, bf16 or fp16
    ALIGNED: tl.constexpr,  # every address in the table is 16-byte aligned: vector loads are safe
    BLOCK: tl.constexpr,  # elements per chunk, a power of two
):
    pid = tl.program_id(0).to(tl.int64)
    row = tl.load(chunks_ptr + 2 * pid).to(tl.int64)
    chunk = tl.load(chunks_ptr + 2 * pid + 1).to(tl.int64)  # chunk * BLOCK overflows int32 past 2**31
    entry = tensors_ptr + row * 6
    param_ptr = tl.load(entry + 0).to(tl.pointer_type(PARAM_DTYPE))
    grad_ptr = tl.load(entry + 1).to(tl.pointer_type(PARAM_DTYPE))
    exp_avg_ptr = tl.load(entry + 2).to(tl.pointer_type(tl.float32))
    exp_avg_sq_ptr = tl.load(entry + 3).to(tl.pointer_type(tl.float32))
    step_ptr = tl.load(entry + 4).to(tl.pointer_type(tl.float32))
    numel = tl.load(entry + 5)
    if ALIGNED:
        param_ptr = tl.multiple_of(param_ptr, 16)
        grad_ptr = tl.multiple_of(grad_ptr, 16)
        exp_avg_ptr = tl.multiple_of(exp_avg_ptr, 16)
        exp_avg_sq_ptr = tl.multiple_of(exp_avg_sq_ptr, 16)
    # The chunk's start moves the four base pointers (int64, once per program), so the per-element
    # offsets stay int32: int64 offsets cost two registers per element per stream.
    start = chunk * BLOCK
    param_ptr += start
    grad_ptr += start
    exp_avg_ptr += start
    exp_avg_sq_ptr += start
    offsets = tl.arange(0, BLOCK)
    remaining = numel - start
    # Only a parameter's last chunk needs a mask. The element loads are issued before the scalar
    # work below (the step load and the fp64 bias corrections), so that work overlaps their
    # latency instead of preceding it.
    full = remaining >= BLOCK
    if full:
        p, g, m, v = _load_chunk(param_ptr, grad_ptr, exp_avg_ptr, exp_avg_sq_ptr, offsets, remaining, MASKED=False)
    else:
        p, g, m, v = _load_chunk(param_ptr, grad_ptr, exp_avg_ptr, exp_avg_sq_ptr, offsets, remaining, MASKED=True)

    # Per-tensor scalars, in fp64 as torch forms them in Python floats, rounded once to fp32.
    lr = tl.load(hyper_ptr + 0)
    beta1 = tl.load(hyper_ptr + 1)
    beta2 = tl.load(hyper_ptr + 2)
    eps = tl.load(hyper_ptr + 3).to(tl.float32)
    weight_decay = tl.load(hyper_ptr + 4)
    t = tl.load(step_ptr).to(tl.int32)  # already incremented for this step
    beta1_t, beta2_t = _powers(beta1, beta2, t)
    step_size = (lr / (1.0 - beta1_t)).to(tl.float32)
    bias_correction2_sqrt = tl.sqrt(1.0 - beta2_t).to(tl.float32)
    decay = (1.0 - lr * weight_decay).to(tl.float32)

    p = p * decay
    m = m + (1.0 - beta1).to(tl.float32) * (g - m)
    v = v * beta2.to(tl.float32) + (1.0 - beta2).to(tl.float32) * g * g
    # IEEE sqrt and division (Triton's defaults are approximate on CUDA) to track torch's update.
    denom = tl.div_rn(tl.sqrt_rn(v), bias_correction2_sqrt) + eps
    p = p - tl.div_rn(step_size * m, denom)
    if PARAM_DTYPE == tl.bfloat16:
        p = _to_bf16_rne(p)
    else:
        p = p.to(PARAM_DTYPE)  # fp16: the interpreter's numpy cast rounds to nearest even too

    if full:
        _store_chunk(param_ptr, exp_avg_ptr, exp_avg_sq_ptr, offsets, remaining, p, m, v, MASKED=False)
    else:
        _store_chunk(param_ptr, exp_avg_ptr, exp_avg_sq_ptr, offsets, remaining, p, m, v, MASKED=True)


# ---------------------------------------------------------------------------------------------
# Launcher


class _LaunchTables:
    """Device copies of the parameter and chunk tables of one (group, device, dtype), rebuilt
    only when an address or a size changes."""

    def __init__(self):
        self.key: tuple | None = None  # (rows, hyper address, dtype, block) last validated
        self.rows: tuple[int, ...] | None = None  # the flat table last uploaded
        self.tensors: torch.Tensor | None = None  # (n_tensors, 6) int64 on the device
        self.numels: tuple[int, ...] | None = None
        self.block: int | None = None
        self.chunks: torch.Tensor | None = None  # (n_chunks, 2) int32 on the device
        self.aligned = False  # every element stream starts on a 16-byte boundary

    def update(self, rows: tuple[int, ...], block: int, device: torch.device) -> None:
        numels = rows[_NUMEL_COLUMN::_TABLE_COLUMNS]
        if numels != self.numels or block != self.block:
            if triton.cdiv(max(numels), block) > 2**31:
                raise ValueError(f"a parameter of {max(numels)} elements has more than 2**31 chunks of {block}")
            counts = torch.tensor([triton.cdiv(n, block) for n in numels], dtype=torch.int64)
            owner = torch.repeat_interleave(torch.arange(len(numels)), counts)
            first = torch.cumsum(counts, 0) - counts  # first chunk of each tensor
            index = torch.arange(int(counts.sum())) - torch.repeat_interleave(first, counts)
            self.chunks = _upload(torch.stack([owner, index], dim=1).to(torch.int32), device)
            self.numels, self.block = numels, block
        if rows != self.rows:
            self.tensors = _upload(torch.tensor(rows, dtype=torch.int64).view(-1, _TABLE_COLUMNS), device)
            streams = (a for i, a in enumerate(rows) if i % _TABLE_COLUMNS < _STREAM_COLUMNS)
            self.aligned = all(a % _VECTOR_BYTES == 0 for a in streams)
            self.rows = rows


def _upload(table: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A device copy of a small host table, without a host sync on CUDA (pinned, non-blocking;
    torch's host allocator keeps the pinned buffer until the copy has run)."""
    if device.type == "cpu":
        return table.contiguous()
    return table.pin_memory().to(device, non_blocking=True)


def adamw_step_(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    exp_avgs: list[torch.Tensor],
    exp_avg_sqs: list[torch.Tensor],
    steps: list[torch.Tensor],
    hyper: torch.Tensor,
    tables: _LaunchTables | None = None,
    block: int = DEFAULT_BLOCK,
) -> None:
    """One AdamW update, in place, of `params` and their fp32 moments, in one launch.

    All tensors on one device; params contiguous and of one dtype, grads of that dtype and
    shape (any layout); exp_avgs/exp_avg_sqs fp32 and contiguous; steps 0-d fp32 tensors on the
    device, already counting this step; hyper a (5,) fp64 device tensor (lr, beta1, beta2, eps,
    weight_decay). `tables` caches the launch tables between calls: when every address and size
    is the one last validated, the checks are skipped too (torch checks a grad's shape and dtype
    when it is assigned), which keeps the host's share of a step small."""
    if not (len(params) == len(grads) == len(exp_avgs) == len(exp_avg_sqs) == len(steps)):
        raise ValueError(
            f"adamw_step_: {len(params)} params, {len(grads)} grads, {len(exp_avgs)} exp_avgs, "
            f"{len(exp_avg_sqs)} exp_avg_sqs and {len(steps)} steps; need one of each per param"
        )
    if not params:
        return
    # Strided grads (the stride-0 one `.sum()` sends back) copied dense; alive until the launch
    # is queued, after which the caching allocator reuses their memory in stream order.
    grads = [g if g.is_contiguous() else g.contiguous() for g in grads]
    rows = []
    for p, g, m, v, s in zip(params, grads, exp_avgs, exp_avg_sqs, steps):
        rows += (p.data_ptr(), g.data_ptr(), m.data_ptr(), v.data_ptr(), s.data_ptr(), p.numel())
    rows = tuple(rows)
    key = (rows, hyper.data_ptr(), params[0].dtype, block)
    tables = tables if tables is not None else _LaunchTables()
    if key != tables.key:
        _check_launch(params, grads, exp_avgs, exp_avg_sqs, steps, hyper, block)
        tables.update(rows, block, params[0].device)
        tables.key = key
    grid = (tables.chunks.shape[0],)
    if grid[0] == 0:  # only empty params
        return
    with on_device(params[0]):
        _adamw_kernel[grid](
            tables.tensors, tables.chunks, hyper,
            PARAM_DTYPE=_TL_DTYPES[params[0].dtype], ALIGNED=tables.aligned, BLOCK=block, num_warps=NUM_WARPS,
        )


def _check_param(p: torch.Tensor, where: str) -> None:
    if p.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"{where}: param of dtype {p.dtype}; supported: {SUPPORTED_DTYPES}")
    if not p.is_contiguous():
        raise ValueError(f"{where}: param of shape {tuple(p.shape)} has strides {p.stride()}; "
                         "the kernel needs contiguous params")


def _check_launch(params, grads, exp_avgs, exp_avg_sqs, steps, hyper, block) -> None:
    """ValueErrors naming what adamw_step_ cannot take."""
    if block <= 0 or block & (block - 1):
        raise ValueError(f"adamw_step_: block must be a power of two, got {block}")
    device, dtype = params[0].device, params[0].dtype
    if not triton_usable(device):
        raise RuntimeError(f"adamw_step_: Triton cannot run on {device} (CUDA, or TRITON_INTERPRET=1 on a CPU)")
    if interpreting() and device.type != "cpu":
        raise ValueError(f"adamw_step_: under TRITON_INTERPRET=1 the tensors must be on the CPU, not {device}")
    if hyper.shape != (_HYPER_SLOTS,) or hyper.dtype != torch.float64 or hyper.device != device:
        raise ValueError(f"adamw_step_: hyper must be a ({_HYPER_SLOTS},) fp64 tensor on {device}, got "
                         f"{tuple(hyper.shape)} {hyper.dtype} on {hyper.device}")
    for p, g, m, v, s in zip(params, grads, exp_avgs, exp_avg_sqs, steps):
        _check_param(p, "adamw_step_")
        if p.dtype != dtype or p.device != device:
            raise ValueError(f"adamw_step_: one launch takes one dtype and device: {p.dtype} on {p.device} "
                             f"next to {dtype} on {device}")
        if g.shape != p.shape or g.dtype != dtype or g.device != device or g.layout != torch.strided:
            raise ValueError(f"adamw_step_: grad {tuple(g.shape)} {g.dtype} {g.layout} on {g.device} for a "
                             f"param {tuple(p.shape)} {dtype} on {device}; need a dense grad like the param")
        for name, state in (("exp_avg", m), ("exp_avg_sq", v)):
            if state.shape != p.shape or state.dtype != torch.float32 or not state.is_contiguous() \
                    or state.device != device:
                raise ValueError(f"adamw_step_: {name} {tuple(state.shape)} {state.dtype} on {state.device} "
                                 f"for a param {tuple(p.shape)} on {device}; need contiguous fp32 on its device")
        if s.numel() != 1 or s.dtype != torch.float32 or s.device != device:
            raise ValueError(f"adamw_step_: step must be a 1-element fp32 tensor on {device}, "
                             f"got {tuple(s.shape)} {s.dtype} on {s.device}")


# ---------------------------------------------------------------------------------------------
# Torch reference


def adamw_reference(
    param: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    step: int,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
) -> torch.Tensor:
    """One AdamW step in plain fp32 torch, as torch.optim.AdamW's single-tensor path: updates the
    fp32 `exp_avg` and `exp_avg_sq` in place and `param` in place (cast once to its dtype), with
    `step` the step count including this one. Returns param."""
    p, g = param.float(), grad.float()
    p = p * (1 - lr * weight_decay)
    exp_avg.lerp_(g, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(g, g, value=1 - beta2)
    bias_correction1 = 1 - beta1**step
    bias_correction2_sqrt = math.sqrt(1 - beta2**step)
    denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
    p.addcdiv_(exp_avg, denom, value=-lr / bias_correction1)
    return param.copy_(p)


# ---------------------------------------------------------------------------------------------
# Optimizer

# torch.optim.AdamW's param_group flags, with the values our update implements. Kept in our groups
# so a state_dict of ours loads into torch's AdamW as if torch had written it; __setstate__ fills
# in those a state_dict of another torch version lacks.
_TORCH_FLAGS = {
    "amsgrad": False,
    "maximize": False,
    "foreach": None,
    "capturable": False,
    "differentiable": False,
    "fused": None,
    "decoupled_weight_decay": True,
}


class TritonAdamW(torch.optim.Optimizer):
    """torch.optim.AdamW's update and state, in one Triton launch per param group and dtype.

    Same constructor as torch.optim.AdamW; amsgrad, maximize and differentiable are not
    supported (ValueError); foreach, capturable and fused are accepted and ignored (they choose
    among torch's implementations). Moments are fp32 whatever the param dtype. `block_size` is
    the elements per Triton program (tests shrink it to exercise chunk boundaries).
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict],
        lr: float | torch.Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        capturable: bool = False,
        differentiable: bool = False,
        fused: bool | None = None,
        block_size: int = DEFAULT_BLOCK,
    ):
        if isinstance(lr, torch.Tensor) and lr.numel() != 1:
            raise ValueError(f"TritonAdamW: a tensor lr must have one element, got shape {tuple(lr.shape)}")
        betas = tuple(float(b) for b in betas)
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, **_TORCH_FLAGS)
        defaults.update(amsgrad=amsgrad, maximize=maximize, foreach=foreach, capturable=capturable,
                        differentiable=differentiable, fused=fused)
        _check_hyperparameters(defaults, "TritonAdamW")
        if block_size <= 0 or block_size & (block_size - 1):
            raise ValueError(f"TritonAdamW: block_size must be a power of two, got {block_size}")
        self.block_size = block_size
        # Per (group index, device): the (5,) fp64 tensor the kernel reads its scalars from, and
        # the Python values last written into it.
        self._hyper: dict[tuple[int, torch.device], tuple[torch.Tensor, list]] = {}
        self._tables: dict[tuple[int, torch.device, torch.dtype], _LaunchTables] = defaultdict(_LaunchTables)
        super().__init__(params, defaults)

    def __getstate__(self):
        return {**super().__getstate__(), "block_size": self.block_size}

    def __setstate__(self, state):
        super().__setstate__(state)
        # Unpickled or deep-copied optimizers come back without the caches (torch pickles only
        # defaults, state and param_groups, and our block_size).
        self.__dict__.setdefault("block_size", DEFAULT_BLOCK)
        self.__dict__.setdefault("_hyper", {})
        self.__dict__.setdefault("_tables", defaultdict(_LaunchTables))
        for group in self.param_groups:
            for key, value in _TORCH_FLAGS.items():
                group.setdefault(key, value)

    def load_state_dict(self, state_dict: dict) -> None:
        """Load a state_dict of ours or of torch.optim.AdamW. torch's loader casts the moments
        to the param dtype (lossy for bf16 params) and leaves step where it was, so the moments
        and steps are rebuilt from the saved values: fp32, on the param's device, copied."""
        for i, group in enumerate(state_dict["param_groups"]):
            _check_hyperparameters(group, f"TritonAdamW.load_state_dict: param_groups[{i}]")
        saved = state_dict["state"]
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        super().load_state_dict(state_dict)
        params = [p for g in self.param_groups for p in g["params"]]
        for saved_id, p in zip(saved_ids, params, strict=True):
            if saved_id in saved:
                self.state[p] = _fp32_state(p, saved[saved_id])

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for index, group in enumerate(self.param_groups):
            _check_hyperparameters(group, f"TritonAdamW: param_groups[{index}]")
            launches: dict[tuple[torch.device, torch.dtype], list] = defaultdict(list)
            for p in group["params"]:
                grad = p.grad
                if grad is None:
                    continue
                if grad.is_sparse:
                    raise ValueError("TritonAdamW does not support sparse gradients")
                state = self.state[p]
                if not state:
                    state.update(_fp32_state(p))
                launches[(p.device, p.dtype)].append((p, grad, state))
            for (device, dtype), entries in launches.items():
                params, grads, states = zip(*entries)
                steps = [s["step"] for s in states]
                torch._foreach_add_(steps, 1.0)  # one launch on CUDA, as in torch's fused AdamW
                try:
                    adamw_step_(
                        params, grads, [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states], steps,
                        self._hyper_tensor(index, device, group), self._tables[(index, device, dtype)],
                        self.block_size,
                    )
                except (ValueError, RuntimeError):
                    torch._foreach_add_(steps, -1.0)  # the step did not happen
                    raise
        return loss

    def _hyper_tensor(self, index: int, device: torch.device, group: dict) -> torch.Tensor:
        """The group's (lr, beta1, beta2, eps, weight_decay) on `device`, refreshed in place by
        fills of the values that changed: the tensor, and so the kernel's arguments, stay the
        same from step to step, and no fill waits for the device."""
        key = (index, device)
        if key not in self._hyper:
            self._hyper[key] = (torch.zeros(_HYPER_SLOTS, dtype=torch.float64, device=device), [None] * _HYPER_SLOTS)
        hyper, written = self._hyper[key]
        values = (group["lr"], group["betas"][0], group["betas"][1], group["eps"], group["weight_decay"])
        for slot, value in enumerate(values):
            if isinstance(value, torch.Tensor):
                hyper[slot].copy_(value.reshape(()))  # a tensor lr may change under us: always copy
                written[slot] = None
            elif value != written[slot]:
                hyper[slot].fill_(float(value))
                written[slot] = value
        return hyper


def _check_hyperparameters(group: dict, where: str) -> None:
    """ValueErrors, naming the field, for values torch.optim.AdamW rejects or we do not implement."""
    for flag in ("amsgrad", "maximize", "differentiable"):
        if group.get(flag, False):
            raise ValueError(f"{where}: {flag}=True is not supported by TritonAdamW")
    if not group.get("decoupled_weight_decay", True):
        raise ValueError(f"{where}: decoupled_weight_decay=False (torch.optim.Adam's L2 penalty) is not "
                         "supported by TritonAdamW, which decays decoupled as AdamW does")
    lr, (beta1, beta2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
    if not isinstance(lr, torch.Tensor) and not 0.0 <= lr:
        raise ValueError(f"{where}: invalid lr {lr}, must be >= 0")
    if not 0.0 <= eps:
        raise ValueError(f"{where}: invalid eps {eps}, must be >= 0")
    for i, beta in enumerate((beta1, beta2)):
        if not 0.0 <= float(beta) < 1.0:
            raise ValueError(f"{where}: invalid betas[{i}] {beta}, must be in [0, 1)")
    if not 0.0 <= wd:
        raise ValueError(f"{where}: invalid weight_decay {wd}, must be >= 0")


def _fp32_state(p: torch.Tensor, saved: dict | None = None) -> dict:
    """AdamW state for `p`: fp32 moments shaped and placed like p and a 0-d fp32 step on p's
    device; zeros, or copies of a saved state (ours, or torch's, whose moments may be in p's
    dtype and whose step may be on the CPU or, in old checkpoints, a plain number)."""
    _check_param(p, "TritonAdamW")
    if saved is None:
        return {
            "step": torch.zeros((), dtype=torch.float32, device=p.device),
            "exp_avg": torch.zeros(p.shape, dtype=torch.float32, device=p.device),
            "exp_avg_sq": torch.zeros(p.shape, dtype=torch.float32, device=p.device),
        }
    step = torch.as_tensor(saved["step"]).detach()
    state = {"step": step.to(device=p.device, dtype=torch.float32, copy=True).reshape(())}
    for key in ("exp_avg", "exp_avg_sq"):
        value = saved[key]
        if value.shape != p.shape:
            raise ValueError(f"TritonAdamW.load_state_dict: saved {key} of shape {tuple(value.shape)} "
                             f"for a param of shape {tuple(p.shape)}")
        state[key] = torch.empty(p.shape, dtype=torch.float32, device=p.device).copy_(value)
    return state
